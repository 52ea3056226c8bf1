"""Checkpoint conversion with tiny random Hugging Face models built here: per-token log-probs
match transformers' (fp32) at TP=1 and TP=2 x PP=2, HF -> ours -> HF is bit for bit, unsupported
configs are refused by name, and failures leave no output."""

import json
from pathlib import Path

import pytest
import torch

from megatron_solopo.convert import verify
from megatron_solopo.convert.checkpoints import hf_to_megatron, megatron_to_hf
from tests.harness import run_distributed

pytestmark = pytest.mark.distributed

BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=300, max_position_embeddings=512, dtype="float32")
FAMILIES = {
    "llama_gqa_untied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False)),
    "llama_tied_mha": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True,
                                                               num_key_value_heads=4)),
    "llama3_rope_scaling": ("LlamaConfig", "LlamaForCausalLM", dict(rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "qwen2_bias_tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
}


def make_hf_model(directory: Path, family: str, shard_size="200KB", **overrides) -> Path:
    import transformers

    from megatron_solopo.data.synthetic import make_hf_tokenizer

    config_name, model_name, extra = FAMILIES[family]
    torch.manual_seed(hash(family) % 1000)
    config = getattr(transformers, config_name)(**{**BASE, **extra, **overrides})
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():  # random biases and norms, so a mapping mistake cannot hide
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.normal_(0.0 if name.endswith("bias") else 1.0, 0.1)
    model.save_pretrained(directory, max_shard_size=shard_size)
    make_hf_tokenizer(str(directory), vocab_size=300)
    return directory


SEQUENCES = [list(range(5, 45)), [7, 3, 290, 11, 42] * 6, list(range(200, 260, 2))]


def _ours_single(megatron_dir):
    return verify.megatron_logprobs(megatron_dir, SEQUENCES)


def _ours_parallel(megatron_dir, layout):
    """Per-sequence log-probs from a TP/PP layout through Megatron's schedule (last stage)."""
    from megatron.core import parallel_state

    from megatron_solopo.model.build import build_model
    from megatron_solopo.model.config import ModelConfig, build_transformer_config
    from megatron_solopo.parallel.distributed import initialize_distributed
    from megatron_solopo.parallel.layout import ParallelConfig
    from megatron_solopo.training import checkpoint as ckpt
    from megatron_solopo.training.step import forward_backward

    model = ModelConfig(**ckpt.read_run_config(megatron_dir)["model"])
    parallel = ParallelConfig(**layout)
    initialize_distributed(parallel)
    chunks = build_model(model, build_transformer_config(model, parallel, variable_seq_lengths=True))
    ckpt.load_checkpoint(megatron_dir, chunks,
                         padded_vocab_size=model.padded_vocab_size(parallel.tensor_model_parallel_size))
    batch = verify.pack_sequences(SEQUENCES, pad_multiple=2 * parallel.tensor_model_parallel_size)
    seen = []
    with torch.no_grad():
        forward_backward(chunks, [batch], lambda b, sums: (sums.response_logps.sum() * 0, {}),
                         vocab_size=model.vocab_size, forward_only=True,
                         on_token_logps=lambda local, logps: seen.append(logps))
    if not parallel_state.is_pipeline_last_stage():
        return None
    return verify.split_packed(seen[0], batch)


def _convert(hf_dir, output, tp=1, pp=1):
    return str(hf_to_megatron(str(hf_dir), str(output), tensor_model_parallel_size=tp,
                              pipeline_model_parallel_size=pp))


def _to_hf(megatron_dir, output, **kwargs):
    return str(megatron_to_hf(str(megatron_dir), str(output), **kwargs))


def assert_logprobs_close(actual, reference, atol=1e-5):
    result = verify.compare(reference, actual)
    assert result.max_abs_diff <= atol, str(result)
    return result


@pytest.mark.parametrize("family", list(FAMILIES))
def test_hf_to_ours_to_hf(tmp_path, family):
    from transformers import AutoModelForCausalLM

    hf_dir = make_hf_model(tmp_path / "hf", family)
    assert len(list(hf_dir.glob("model-*.safetensors"))) > 1  # sharded input
    megatron_dir = tmp_path / "megatron"
    run_distributed(_convert, 1, hf_dir, megatron_dir, 2)
    assert (megatron_dir / "latest_checkpointed_iteration.txt").read_text().strip() == "release"
    assert (megatron_dir / "tokenizer" / "tokenizer.json").exists()
    reference = verify.hf_logprobs(str(hf_dir), SEQUENCES)
    (ours,) = run_distributed(_ours_single, 1, str(megatron_dir))
    assert_logprobs_close(ours, reference)

    back = tmp_path / "hf_back"
    run_distributed(_to_hf, 1, megatron_dir, back, max_shard_size="150KB")
    assert (back / "model.safetensors.index.json").exists() and (back / "tokenizer.json").exists()
    original = AutoModelForCausalLM.from_pretrained(str(hf_dir)).state_dict()
    restored = AutoModelForCausalLM.from_pretrained(str(back)).state_dict()
    assert set(original) == set(restored)
    for name in original:
        assert torch.equal(original[name], restored[name]), name
    assert json.loads((back / "config.json").read_text())["tie_word_embeddings"] == \
        json.loads((hf_dir / "config.json").read_text()).get("tie_word_embeddings", False)


@pytest.mark.parametrize("family", ["llama_gqa_untied", "qwen2_bias_tied"])
def test_tp2_pp2_logprobs_match_transformers(tmp_path, family):
    hf_dir = make_hf_model(tmp_path / "hf", family)
    megatron_dir = tmp_path / "megatron"
    run_distributed(_convert, 1, hf_dir, megatron_dir, 2, 2)
    reference = verify.hf_logprobs(str(hf_dir), SEQUENCES)
    results = run_distributed(_ours_parallel, 4, str(megatron_dir),
                              dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2))
    last_stage = [r for r in results if r is not None]
    assert len(last_stage) == 2  # the two TP ranks of the last stage
    for ours in last_stage:
        assert_logprobs_close(ours, reference)


def _resave_under(megatron_dir, target, layout):
    """Load a converted checkpoint under another layout and save it there (as training would)."""
    from megatron_solopo.model.build import build_model
    from megatron_solopo.model.config import ModelConfig, build_transformer_config
    from megatron_solopo.parallel.distributed import initialize_distributed
    from megatron_solopo.parallel.layout import ParallelConfig
    from megatron_solopo.training import checkpoint as ckpt

    run_config = ckpt.read_run_config(megatron_dir)
    model = ModelConfig(**run_config["model"])
    parallel = ParallelConfig(**layout)
    initialize_distributed(parallel)
    padded = model.padded_vocab_size(parallel.tensor_model_parallel_size)
    chunks = build_model(model, build_transformer_config(model, parallel), padded_vocab_size=padded)
    ckpt.load_checkpoint(megatron_dir, chunks, padded_vocab_size=padded)
    ckpt.save_checkpoint(target, 7, chunks, dict(run_config, padded_vocab_size=padded))


def test_megatron_to_hf_from_a_checkpoint_saved_under_another_layout(tmp_path):
    from transformers import AutoModelForCausalLM

    hf_dir = make_hf_model(tmp_path / "hf", "llama_gqa_untied")
    run_distributed(_convert, 1, hf_dir, tmp_path / "megatron")
    run_distributed(_resave_under, 4, str(tmp_path / "megatron"), str(tmp_path / "run"),
                    dict(tensor_model_parallel_size=4))
    run_distributed(_to_hf, 1, tmp_path / "run", tmp_path / "back")
    original = AutoModelForCausalLM.from_pretrained(str(hf_dir)).state_dict()
    restored = AutoModelForCausalLM.from_pretrained(str(tmp_path / "back")).state_dict()
    assert all(torch.equal(original[name], restored[name]) for name in original)


@pytest.mark.parametrize("family,overrides,message", [
    ("llama_gqa_untied", dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}),
     "rope_scaling.rope_type='yarn' is not supported"),
    ("mistral", dict(sliding_window=64), "sliding_window=64 is not supported"),
    ("llama_gqa_untied", dict(attention_bias=True), "attention_bias=True is not supported"),
    ("llama_gqa_untied", dict(hidden_act="gelu"), "hidden_act='gelu' is not supported"),
])
def test_unsupported_features_are_refused_by_name(tmp_path, family, overrides, message):
    hf_dir = make_hf_model(tmp_path / "hf", family, **overrides)
    with pytest.raises(pytest.fail.Exception, match=message.replace("(", "\\(").replace("[", "\\[")):
        run_distributed(_convert, 1, hf_dir, tmp_path / "megatron")
    assert not (tmp_path / "megatron").exists()
    assert not list(tmp_path.glob(".megatron.tmp-*"))


def test_unknown_architecture_is_refused(tmp_path):
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"],
                                                    "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="architectures=\\['GPT2LMHeadModel'\\] is not supported"):
        hf_to_megatron(str(hf_dir), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def _verify_tool(hf_dir, megatron_dir):
    import tools.verify_conversion as tool

    return tool.main(["--hf-dir", hf_dir, "--megatron-dir", megatron_dir, "--tolerance", "1e-5"])


def test_verify_tool_reports_parity(tmp_path):
    hf_dir = make_hf_model(tmp_path / "hf", "qwen2_bias_tied")
    run_distributed(_convert, 1, hf_dir, tmp_path / "megatron")
    assert run_distributed(_verify_tool, 1, str(hf_dir), str(tmp_path / "megatron")) == [0]
