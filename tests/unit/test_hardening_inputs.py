"""Bad inputs a new user meets, each with its message, exit code 2 and no partial output
(issue: hardening). Single process: the CLIs' ``main`` functions are called directly."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_solopo.config import config_from_dict, load_config
from tests.unit.data_fixtures import SP, record, tokenizers  # noqa: F401

REPO = Path(__file__).resolve().parents[2]
BIG_EXAMPLE = REPO / "examples" / "solopo_llama3_8b_64k_h100.yaml"
LONGPO_EXAMPLE = REPO / "examples" / "longpo_mistral_7b_128k_h100.yaml"


def write_jsonl(path: Path, records: list) -> Path:
    from megatron_solopo.data.synthetic import write_jsonl as write

    write(records, str(path))
    return path


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error: ")]


# -- 1. optimizer numbers ------------------------------------------------------------------------
@pytest.mark.parametrize("value, expected", [
    (".inf", "optimizer.lr=inf must be a finite number"),
    (".nan", "optimizer.lr=nan must be a finite number"),
    ("-1", "optimizer.lr=-1.0 is out of range: it must lie in [0, inf)"),
])
def test_learning_rate_is_checked_by_name(value, expected, capsys):
    from megatron_solopo.train import main

    assert main(["--config", str(BIG_EXAMPLE), f"optimizer.lr={value}", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert error_lines(err) == [f"error: command-line override optimizer.lr={value}: {expected}"]


def test_other_optimizer_numbers_are_in_range():
    base = {"objective": {"name": "simpo"}}
    for field, value in (("adam_beta2", 1.0), ("adam_eps", 0.0), ("clip_grad", -1.0),
                         ("weight_decay", float("inf"))):
        with pytest.raises(ValueError, match=f"optimizer.{field}="):
            config_from_dict(dict(base, optimizer={field: value}))
    with pytest.raises(ValueError, match="optimizer.min_lr=0.1 is above optimizer.lr=0.01"):
        config_from_dict(dict(base, optimizer={"lr": 0.01, "min_lr": 0.1}))
    config_from_dict(dict(base, optimizer={"lr": 0.0, "min_lr": 0.0}))  # a frozen run is fine


# -- 7. override errors are blamed on the override -----------------------------------------------
def test_override_errors_name_the_override_not_the_file(tmp_path):
    with pytest.raises(ValueError) as err:
        load_config(str(BIG_EXAMPLE), ("foo.bar=1",))
    assert str(err.value).startswith("command-line override foo.bar=1: unknown config section")
    with pytest.raises(ValueError) as err:
        load_config(str(LONGPO_EXAMPLE), ("objective.lambda=abc",))
    assert "command-line override objective.lambda=abc" in str(err.value)
    assert "lambda (preference_weight) must be a number, got 'abc'" in str(err.value)
    # An error in the file is still the file's.
    bad = tmp_path / "bad.yaml"
    bad.write_text("foo: {x: 1}\n")
    with pytest.raises(ValueError) as err:
        load_config(str(bad), ("training.train_iters=3",))
    assert str(err.value).startswith(f"{bad}: unknown config section")


def test_train_without_config_says_so(capsys):
    from megatron_solopo.train import main

    assert main([]) == 2
    assert error_lines(capsys.readouterr().err) == [
        "error: --config is required: a YAML run config (e.g. examples/"
        "solopo_converted_single.yaml), plus section.field=value overrides"]


def test_exit_duration_must_be_positive():
    with pytest.raises(ValueError, match="training.exit_duration_minutes must be > 0"):
        config_from_dict({"training": {"exit_duration_minutes": 0}})


# -- 10. dry run of the big example without its checkpoint ---------------------------------------
def llama_8b_config(directory: Path) -> Path:
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
        rope_theta=500000.0, tie_word_embeddings=False)
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config.to_dict()))
    return directory


def test_dry_run_of_the_big_example_from_a_hf_config(tmp_path, capsys):
    from megatron_solopo.train import main

    assert not Path("/ckpt/llama3.1-8b-megatron").exists()
    assert main(["--config", str(BIG_EXAMPLE), "--dry-run", "--world-size", "16"]) == 2
    assert "pass --hf-config" in capsys.readouterr().err
    hf = llama_8b_config(tmp_path / "llama")
    assert main(["--config", str(BIG_EXAMPLE), "--dry-run", "--world-size", "16",
                 "--hf-config", str(hf)]) == 0
    out = capsys.readouterr().out
    assert "TP=4 CP=2 PP=1 DP=2" in out and "32 layers, hidden 4096" in out
    assert "parameters: 8,030,261,248 total" in out
    # The same model from flags.
    flags = ["model.num_layers=32", "model.hidden_size=4096", "model.ffn_hidden_size=14336",
             "model.num_attention_heads=32", "model.num_query_groups=8", "model.vocab_size=128256"]
    assert main(["--config", str(BIG_EXAMPLE), "--dry-run", "--world-size", "16", *flags]) == 0
    assert "parameters: 8,030,261,248 total" in capsys.readouterr().out


def test_single_device_example_needs_no_gpu_features():
    config = load_config(str(REPO / "examples" / "solopo_converted_single.yaml"))
    assert config.precision.fp8 is None and not config.precision.bf16
    assert (config.parallel.tensor_model_parallel_size, config.parallel.context_parallel_size,
            config.parallel.pipeline_model_parallel_size) == (1, 1, 1)
    assert not config.tokenizer.tokenizer_model  # the converted checkpoint's own tokenizer
    assert config.logging.tensorboard_dir is None
    header = (REPO / "examples" / "solopo_converted_single.yaml").read_text()
    assert "precision.fp8=hybrid" in header and "parallel.context_parallel_size=2" in header


# -- 3. reference caches of different reference settings coexist --------------------------------
def test_reference_cache_paths_are_keyed_by_reference_settings(tmp_path):
    from megatron_solopo.training.reference import cache_to_read, run_cache_path

    def path_for(objective, **reference):
        raw = {"data": {"train_prefix": str(tmp_path / "train")}, "objective": objective,
               "reference": dict({"checkpoint": str(tmp_path / "ckpt")}, **reference)}
        config = config_from_dict(raw)
        return config, run_cache_path(config, config.data.train_prefix)

    solopo_config, solopo = path_for({"name": "solopo", "base": "dpo"})
    _, longpo = path_for({"name": "longpo"})  # same reference: one file, merged per role
    _, longpo_rope = path_for({"name": "longpo"}, model_overrides={"rotary_base": 10000.0})
    _, other_ckpt = path_for({"name": "solopo", "base": "dpo"}, checkpoint=str(tmp_path / "b"))
    assert longpo == solopo and len({solopo, longpo_rope, other_ckpt}) == 3
    assert solopo.startswith(str(tmp_path / "train") + ".reference-")
    # An older unkeyed cache is read when no keyed one exists.
    legacy = tmp_path / "train.reference.npz"
    legacy.write_bytes(b"")
    assert cache_to_read(solopo_config, str(tmp_path / "train")) == str(legacy)
    Path(solopo).write_bytes(b"")
    assert cache_to_read(solopo_config, str(tmp_path / "train")) == solopo


# -- 5. damaged files and bad outputs -----------------------------------------------------------
def test_corrupt_reference_cache_is_named(tmp_path):
    from megatron_solopo.training.reference import ReferenceCache

    path = tmp_path / "train.reference-0123456789.npz"
    np.savez(path, logps=np.zeros((2, 4)))
    path.write_bytes(path.read_bytes()[:40])  # truncated
    with pytest.raises(ValueError, match=f"reference cache {path} cannot be read .*--force"):
        ReferenceCache.load(str(path))


def test_verify_conversion_without_an_hf_dir(tmp_path, capsys):
    from tools.verify_conversion import main

    assert main(["--hf-dir", str(tmp_path / "nope"), "--megatron-dir", str(tmp_path)]) == 2
    assert error_lines(capsys.readouterr().err) == [
        f"error: --hf-dir {tmp_path / 'nope'}: no Hugging Face model there (no config.json); "
        f"give a local model directory"]


def test_preprocess_output_checked_before_tokenizing(tmp_path, tokenizers, capsys):  # noqa: F811
    from tools.preprocess_data import main

    inputs = write_jsonl(tmp_path / "in.jsonl", [record(i) for i in range(3)])
    blocker = tmp_path / "file"
    blocker.write_text("")
    args = ["--input", str(inputs), "--tokenizer-type", SP, "--tokenizer-model", tokenizers[SP],
            "--no-progress"]
    assert main(args + ["--output-prefix", str(blocker / "data" / "train")]) == 2
    assert f"{blocker} is a file, not a directory" in capsys.readouterr().err
    if os.geteuid() != 0:  # root writes anywhere
        readonly = tmp_path / "ro"
        readonly.mkdir()
        readonly.chmod(0o555)
        assert main(args + ["--output-prefix", str(readonly / "train")]) == 2
        assert "is not writable" in capsys.readouterr().err
        assert list(readonly.iterdir()) == []


# -- 4. a killed preprocess's temporaries --------------------------------------------------------
def test_preprocess_removes_a_killed_runs_temporaries(tmp_path, tokenizers, capsys):  # noqa: F811
    from megatron_solopo.data.preprocess import preprocess

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    prefix = tmp_path / "train"
    leftovers = [Path(f"{prefix}.tmp{dead.pid}{suffix}") for suffix in (".bin", ".idx", ".ids")]
    for path in leftovers:
        path.write_bytes(b"x" * 1000)
    alive = Path(f"{prefix}.tmp{os.getppid()}.bin")  # a running process's: left alone
    alive.write_bytes(b"")
    inputs = write_jsonl(tmp_path / "in.jsonl", [record(i) for i in range(3)])
    preprocess([str(inputs)], str(prefix), SP, tokenizers[SP])
    assert not any(path.exists() for path in leftovers) and alive.exists()
    err = capsys.readouterr().err
    assert "removed 3 file(s)" in err and f"(process {dead.pid}): {prefix}.tmp{dead.pid}.*" in err


# -- 9. progress lines without a TTY ------------------------------------------------------------
def test_log_interval_without_progress_bar(tmp_path, tokenizers, capsys):  # noqa: F811
    from megatron_solopo.data.preprocess import preprocess

    inputs = write_jsonl(tmp_path / "in.jsonl", [record(i) for i in range(40)])
    preprocess([str(inputs)], str(tmp_path / "train"), SP, tokenizers[SP], progress=False,
               log_interval=10)
    lines = [line for line in capsys.readouterr().err.splitlines()
             if line.startswith("[preprocess] ")]
    counts = [int(line.split()[1].split("/")[0].replace(",", "")) for line in lines]
    assert 1 <= len(lines) <= 4, lines
    assert counts == sorted(counts) and counts[-1] >= 30 and all(count > 0 for count in counts)


# -- 8. make_synthetic_data ---------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["--num-records", "0"], "--num-records must be >= 1, got 0"),
    (["--num-records", "2", "--long-length", "5"], "--long-length 5: needle cannot make long "
                                                    "contexts that short"),
])
def test_make_synthetic_data_refuses(tmp_path, capsys, args, message):
    from tools.make_synthetic_data import main

    output = tmp_path / "out.jsonl"
    assert main(["--task", "needle", "--output", str(output), *args]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert message in line
    assert not output.exists() and list(tmp_path.iterdir()) == []


def test_make_synthetic_data_output_under_a_file(tmp_path, capsys):
    from tools.make_synthetic_data import main

    (tmp_path / "file").write_text("")
    assert main(["--task", "needle", "--num-records", "2",
                 "--output", str(tmp_path / "file" / "x.jsonl")]) == 2
    assert f"{tmp_path / 'file'} is a file, not a directory" in capsys.readouterr().err


# -- 12. known-benign notices -------------------------------------------------------------------
def test_benign_notices_are_silenced_unless_asked():
    code = ("import warnings, logging, megatron_solopo\n"
            "warnings.warn('full scope is deprecated. Use empty cuda_graph_modules')\n"
            "warnings.warn('Please use DTensor instead and we are deprecating ShardedTensor.',"
            " FutureWarning)\n"
            "logging.basicConfig()\n"
            "logging.getLogger('megatron.core.models.gpt.gpt_model').warning('GPTModel IS "
            "DEPRECATED. x')\n"
            "warnings.warn('a real problem')\n")
    env = {k: v for k, v in os.environ.items() if k != "MEGATRON_SOLOPO_SHOW_WARNINGS"}
    quiet = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                           cwd=REPO, timeout=300)
    assert "a real problem" in quiet.stderr
    assert "full scope" not in quiet.stderr and "DTensor" not in quiet.stderr
    assert "GPTModel IS DEPRECATED" not in quiet.stderr
    loud = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env=dict(env, MEGATRON_SOLOPO_SHOW_WARNINGS="1"), timeout=300)
    assert "full scope" in loud.stderr and "GPTModel IS DEPRECATED" in loud.stderr


# -- 13, 14. image and launch scripts -----------------------------------------------------------
def test_dockerfile_keeps_ngc_constraints_and_ships_tests():
    text = (REPO / "Dockerfile").read_text()
    env_block = text[text.index("\nENV "):text.index("\nWORKDIR")]
    assert "PIP_CONSTRAINT" not in env_block
    assert 'RUN PIP_CONSTRAINT="" pip install' in text
    assert "COPY tests ./tests" in text and "COPY docs ./docs" in text
    assert '"transformers>=5.24,<6"' in text


@pytest.mark.parametrize("script", ["solopo_multinode.sbatch", "solopo_srun_per_gpu.sbatch"])
def test_sbatch_scripts_ask_for_the_warning_signal(script):
    text = (REPO / "examples" / "slurm" / script).read_text()
    directives = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --signal=TERM@600" in directives
    assert not any("--dependency" in line for line in directives)
    assert "CONTAINER_IMAGE=${CONTAINER_IMAGE:-$SLURM_SUBMIT_DIR/" in text


# -- 6. tokenizer mismatches in the trainer's words ---------------------------------------------
def test_tokenizer_mismatch_names_the_config_field(tmp_path, tokenizers):  # noqa: F811
    from megatron_solopo.data.dataset import PreferenceDataset
    from megatron_solopo.data.preprocess import preprocess
    from tests.unit.data_fixtures import HF

    inputs = write_jsonl(tmp_path / "in.jsonl", [record(i) for i in range(2)])
    preprocess([str(inputs)], str(tmp_path / "train"), SP, tokenizers[SP])
    dataset = PreferenceDataset(str(tmp_path / "train"))
    with pytest.raises(ValueError) as err:
        dataset.check_compatible(tokenizers[HF], 10_000)
    message = str(err.value)
    assert message.startswith("the dataset and the model use different tokenizers: dataset "
                              f"{tmp_path / 'train'} was made with the SentencePieceTokenizer")
    assert f"tokenizer.tokenizer_model={tokenizers[HF]} is a Hugging Face tokenizer directory" \
        in message
    assert "--tokenizer-model" not in message
    with pytest.raises(ValueError) as err:
        dataset.check_compatible("/ckpt/llama3.1-8b-megatron/tokenizer", 10_000,
                                 "the starting checkpoint's tokenizer (/ckpt/x)")
    assert str(err.value).startswith("the starting checkpoint's tokenizer (/ckpt/x)="
                                     "/ckpt/llama3.1-8b-megatron/tokenizer does not exist; ")
    assert "a placeholder path in an example config must be replaced" in str(err.value)


# -- 2. the signal handler ----------------------------------------------------------------------
def test_signal_is_recorded_then_a_second_one_acts():
    import signal

    from megatron_solopo.training.signals import ExitSignalHandler, agree_to_stop

    handler = ExitSignalHandler()
    try:
        os.kill(os.getpid(), signal.SIGINT)  # handled in the main thread at the next bytecode
        assert handler.received == signal.SIGINT and handler.name == "SIGINT"
        os.kill(os.getpid(), signal.SIGTERM)  # torchrun's forward of the same Ctrl-C: recorded
        assert handler.received == signal.SIGINT
        assert agree_to_stop(True) and not agree_to_stop(False)  # no process group: local
        with pytest.raises(KeyboardInterrupt):  # the second Ctrl-C: Python's default
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        handler.release()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# -- 11. the demo ends with what to do next -----------------------------------------------------
def test_demo_says_what_next(tmp_path):
    from megatron_solopo.demo import what_next

    text = what_next(tmp_path)
    assert text.splitlines()[1] == "[demo] what next"
    assert (f"python tools/convert_checkpoint.py megatron-to-hf --megatron-dir "
            f"{tmp_path / 'checkpoints'} --output {tmp_path / 'hf'}") in text
    assert "examples/solopo_converted_single.yaml" in text
