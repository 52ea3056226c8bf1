"""HF -> ours -> HF with tiny random models built here with transformers (world of one, in this
process): per-token log-probs match transformers' own (fp32, eager) within 1e-5, every tensor
comes back bit for bit and loads with AutoModelForCausalLM, failures leave no output, and the
CLIs work. tests/distributed/test_convert_layouts.py covers TP=2 x PP=2."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_solopo.convert import hf_to_megatron, megatron_to_hf, verify
from megatron_solopo.convert.hf_io import SafetensorsReader
from megatron_solopo.convert.tiny import TINY_VARIANTS, make_tiny_hf_checkpoint
from megatron_solopo.training import checkpoint as ckpt

pytestmark = pytest.mark.distributed

# Three packed sequences (40, 30, 30 tokens): exercises the packed (THD) path as well.
SEQUENCES = [list(range(5, 45)), [7, 3, 290, 11, 42] * 6, list(range(200, 260, 2))]
TOLERANCE = 1e-5


def assert_same_tensors(original_dir, converted_dir):
    """Every safetensors tensor: same names, dtypes, values (bit for bit)."""
    original, converted = SafetensorsReader(original_dir), SafetensorsReader(converted_dir)
    assert original.names() == converted.names()
    for name in original.names():
        a, b = original.get(name), converted.get(name)
        assert a.dtype == b.dtype and torch.equal(a, b), name


def assert_loads_with_transformers(original_dir, converted_dir):
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(str(original_dir)).state_dict()
    restored = AutoModelForCausalLM.from_pretrained(str(converted_dir)).state_dict()
    assert sorted(original) == sorted(restored)
    assert all(torch.equal(original[name], restored[name]) for name in original)


@pytest.mark.parametrize("variant", list(TINY_VARIANTS))
def test_hf_to_ours_matches_transformers_and_comes_back_bit_for_bit(tmp_path, variant):
    hf_dir = make_tiny_hf_checkpoint(tmp_path / "hf", variant, seed=len(variant))
    assert len(list(hf_dir.glob("model-*.safetensors"))) > 1  # sharded input
    megatron_dir = hf_to_megatron(hf_dir, tmp_path / "megatron", tensor_model_parallel_size=2)
    assert (megatron_dir / ckpt.TRACKER_FILE).read_text().strip() == "release"
    run_config = ckpt.read_run_config(megatron_dir)
    assert run_config["padded_vocab_size"] == 512  # vocab 300 padded to a multiple of 128 * TP=2
    assert run_config["parallel"] == {"tensor_model_parallel_size": 2,
                                      "pipeline_model_parallel_size": 1}
    assert run_config["tokenizer"]["tokenizer_model"] == str(megatron_dir / "tokenizer")
    assert (megatron_dir / "tokenizer" / "tokenizer.json").exists()
    assert run_config["hf"]["architectures"] == [TINY_VARIANTS[variant][1]]

    result = verify.compare(verify.hf_logprobs(str(hf_dir), SEQUENCES),
                            verify.megatron_logprobs(str(megatron_dir), SEQUENCES))
    print(f"{variant}: {result}")
    assert result.num_tokens == sum(len(s) - 1 for s in SEQUENCES)
    assert result.max_abs_diff <= TOLERANCE, str(result)

    back = megatron_to_hf(megatron_dir, tmp_path / "back", max_shard_size="150KB")
    assert (back / "model.safetensors.index.json").exists()  # sharded output
    assert (back / "tokenizer.json").exists() and (back / "generation_config.json").exists()
    assert_same_tensors(hf_dir, back)
    assert_loads_with_transformers(hf_dir, back)
    written = json.loads((back / "config.json").read_text())
    source = json.loads((hf_dir / "config.json").read_text())
    for field in ("tie_word_embeddings", "rope_parameters", "num_key_value_heads", "head_dim",
                  "rms_norm_eps", "bos_token_id", "eos_token_id"):
        assert written.get(field) == source.get(field), field


def test_bf16_stays_bf16_and_comes_back_bit_for_bit(tmp_path):
    from megatron.core import dist_checkpointing

    hf_dir = make_tiny_hf_checkpoint(tmp_path / "hf", "qwen2_bias_tied", dtype=torch.bfloat16)
    megatron_dir = hf_to_megatron(hf_dir, tmp_path / "megatron")
    stored = dist_checkpointing.load_tensors_metadata(str(megatron_dir / "release"))
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    result = verify.compare(verify.hf_logprobs(str(hf_dir), SEQUENCES),
                            verify.megatron_logprobs(str(megatron_dir), SEQUENCES))
    assert result.max_abs_diff <= TOLERANCE, str(result)
    back = megatron_to_hf(megatron_dir, tmp_path / "back")
    assert (back / "model.safetensors").exists()  # below the default 5GB: one file
    assert_same_tensors(hf_dir, back)
    assert json.loads((back / "config.json").read_text())["dtype"] == "bfloat16"
    float32 = megatron_to_hf(megatron_dir, tmp_path / "fp32", dtype="float32")
    assert SafetensorsReader(float32).get("model.norm.weight").dtype == torch.float32


def test_refused_config_leaves_no_output(tmp_path):
    hf_dir = make_tiny_hf_checkpoint(tmp_path / "hf", "mistral_head_dim", sliding_window=64,
                                     tokenizer=False)
    with pytest.raises(ValueError, match="sliding_window=64 is not supported"):
        hf_to_megatron(hf_dir, tmp_path / "megatron")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_failure_during_the_save_leaves_no_output(tmp_path, monkeypatch):
    hf_dir = make_tiny_hf_checkpoint(tmp_path / "hf", tokenizer=False)

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_checkpoint", broken_save)
    with pytest.raises(OSError, match="disk full"):
        hf_to_megatron(hf_dir, tmp_path / "megatron")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


@pytest.mark.parametrize("damage,message", [
    (lambda d: (d / "config.json").write_text('{"hidden_size": 64,'), r"config.json: invalid JSON"),
    (lambda d: (d / "model.safetensors.index.json").write_text('{"metadata": {}}'),
     r"model.safetensors.index.json: no 'weight_map'"),
    (lambda d: (d / "model-00001-of-00003.safetensors").write_bytes(b"\x00" * 100),
     r"model-00001-of-00003.safetensors: not a readable safetensors file"),
])
def test_damaged_input_files_are_named(tmp_path, damage, message):
    hf_dir = make_tiny_hf_checkpoint(tmp_path / "hf", tokenizer=False)
    damage(hf_dir)
    with pytest.raises(ValueError, match=message):
        hf_to_megatron(hf_dir, tmp_path / "megatron")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def _resave_single_file(hf_dir, edit):
    """Rewrite a tiny checkpoint as one file after ``edit(tensors)``."""
    tensors = {}
    for path in sorted(hf_dir.glob("model-*.safetensors")):
        tensors.update(load_file(str(path)))
        path.unlink()
    (hf_dir / "model.safetensors.index.json").unlink()
    edit(tensors)
    save_file(tensors, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.update({"model.layers.0.self_attn.q_norm.weight": torch.ones(16)}),
     "tensors with no place in a llama model .*q_norm"),
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"),
     "tensor 'model.layers.1.mlp.up_proj.weight' is missing"),
    (lambda t: t.update({"model.norm.weight": torch.ones(65)}),
     r"'model.norm.weight' has shape \(65,\), config.json implies \(64,\)"),
])
def test_weights_that_do_not_fit_the_config_are_refused(tmp_path, edit, message):
    hf_dir = make_tiny_hf_checkpoint(tmp_path / "hf", tokenizer=False)
    _resave_single_file(hf_dir, edit)
    with pytest.raises(ValueError, match=message):
        hf_to_megatron(hf_dir, tmp_path / "megatron")
    assert not (tmp_path / "megatron").exists()


def test_cli_converts_both_ways_and_reports_errors(tmp_path, capsys):
    import tools.convert_checkpoint as tool

    hf_dir = make_tiny_hf_checkpoint(tmp_path / "hf", "llama_mha_tied")
    assert tool.main(["hf-to-megatron", "--hf-dir", str(hf_dir), "--output", str(tmp_path / "m"),
                      "--tensor-model-parallel-size", "4", "--pipeline-model-parallel-size", "2"]) == 0
    assert "padded to 512" in capsys.readouterr().out
    assert tool.main(["megatron-to-hf", "--megatron-dir", str(tmp_path / "m" / "release"),
                      "--output", str(tmp_path / "back")]) == 0
    assert_same_tensors(hf_dir, tmp_path / "back")
    assert tool.main(["megatron-to-hf", "--megatron-dir", str(tmp_path / "m"),
                      "--output", str(tmp_path / "back")]) == 2
    assert "exists and is not an empty directory" in capsys.readouterr().err
    assert tool.main(["hf-to-megatron", "--hf-dir", str(hf_dir), "--output", str(tmp_path / "x"),
                      "--tensor-model-parallel-size", "3"]) == 2
    assert "num_attention_heads=4 is not divisible by TP=3" in capsys.readouterr().err
    assert tool.main(["megatron-to-hf", "--megatron-dir", str(tmp_path / "hf"),
                      "--output", str(tmp_path / "y")]) == 2
    assert "no checkpoint there" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_verify_tool_passes_a_conversion_and_fails_a_wrong_one(tmp_path, capsys):
    import tools.verify_conversion as tool

    hf_dir = make_tiny_hf_checkpoint(tmp_path / "hf", "qwen2_bias_tied")
    hf_to_megatron(hf_dir, tmp_path / "megatron")
    assert tool.main(["--hf-dir", str(hf_dir), "--megatron-dir", str(tmp_path / "megatron"),
                      "--tolerance", str(TOLERANCE)]) == 0
    assert "max abs diff" in capsys.readouterr().out
    other = make_tiny_hf_checkpoint(tmp_path / "other", "qwen2_bias_tied", seed=1)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Alice met Bob in Paris.\nThe answer is forty two.\n")
    assert tool.main(["--hf-dir", str(other), "--megatron-dir", str(tmp_path / "megatron"),
                      "--prompts-file", str(prompts)]) == 1
    assert "FAIL: max abs diff" in capsys.readouterr().err
