"""tools/build_*_data.py user errors: exit status 2, one 'error: ...' line naming the flag, file
or line, and nothing left on disk."""

import json
import random
import socket

import pytest

from tests.unit.construct_fixtures import musique_record
from tools import build_longpo_data, build_solopo_data


@pytest.fixture
def qa(tmp_path):
    path = tmp_path / "qa.jsonl"
    rng = random.Random(0)
    path.write_text("".join(json.dumps(musique_record(rng, i, "1")) + "\n" for i in range(2)))
    return str(path)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(tool, args, capsys):
    code = tool.main([str(a) for a in args])
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize("extra, message", [
    (["--backend", "openai"], "--backend openai needs --tokenizer HF_DIR"),
    (["--backend", "hf", "--rope-scaling", "{yarn"], "--rope-scaling: not JSON"),
    (["--backend", "hf", "--num-shards", "2"], "give both --num-shards and --shard-index"),
    (["--backend", "hf", "--num-shards", "2", "--shard-index", "2"], "--shard-index 2 is not in"),
    (["--backend", "hf", "--temperature", "0"], "greedy decoding (temperature 0) gives one answer"),
    (["--backend", "hf", "--score", "nope"], "--score 'nope'"),
    (["--backend", "hf", "--format", "hotpotqa"], "field 'supporting_facts': missing"),
])
def test_solopo_flag_errors(tmp_path, qa, capsys, monkeypatch, extra, message):
    for name in ("WORLD_SIZE", "RANK", "SLURM_NTASKS", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    output = tmp_path / "new" / "out.jsonl"
    code, err = run(build_solopo_data, ["--input", qa, "--output", output, "--model", "m",
                                        *extra], capsys)
    assert code == 2 and err.count("error:") == 1 and message in err, err
    assert not (tmp_path / "new").exists()


def test_unreachable_server_leaves_nothing(tmp_path, qa, capsys):
    from megatron_solopo.data.tiny_tokenizers import make_hf_tokenizer

    tokenizer = make_hf_tokenizer(str(tmp_path / "tok"))
    url = f"http://127.0.0.1:{closed_port()}/v1"
    code, err = run(build_solopo_data, ["--input", qa, "--output", tmp_path / "new" / "o.jsonl",
                                        "--backend", "openai", "--model", "m", "--tokenizer",
                                        tokenizer, "--base-url", url], capsys)
    assert code == 2 and err.count("error:") == 1
    assert f"cannot reach an OpenAI-compatible server at --base-url {url}" in err
    assert not (tmp_path / "new").exists()


def test_longpo_input_errors(tmp_path, capsys):
    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"id": "a", "text": "x"}\n{"id": "b", "txt": "y"}\n')
    code, err = run(build_longpo_data, ["--input", docs, "--output", tmp_path / "o.jsonl",
                                        "--backend", "hf", "--model", "m"], capsys)
    assert code == 2 and f"{docs}:2: field 'text': missing" in err
    code, err = run(build_longpo_data, ["--input", docs, "--output", tmp_path / "o.jsonl",
                                        "--backend", "hf", "--model", "m", "--text-field", "txt"],
                    capsys)
    assert code == 2 and f"{docs}:1: field 'txt': missing" in err
    docs.write_text('{"id": "a", "text": "x"}\n')
    code, err = run(build_longpo_data, ["--input", docs, "--output", tmp_path / "o.jsonl",
                                        "--backend", "hf", "--model", "m", "--chunk-min-tokens",
                                        "10", "--chunk-max-tokens", "5"], capsys)
    assert code == 2 and "--chunk-min-tokens 10 > --chunk-max-tokens 5" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl"]
