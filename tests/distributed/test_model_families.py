"""Qwen3 (per-head q/k RMSNorm, tied and untied), YaRN RoPE (Qwen2 as Qwen2.5 ships it, Llama
with every YaRN knob) and a head_dim decoupled from hidden / heads (Mistral) under tensor and
context parallelism (gloo ranks):

- per-token log-probs of a converted checkpoint match transformers' own (fp32, eager) within
  1e-5 under the layout and at TP=1, on packed sequences one of which is longer than the YaRN
  variants' original_max_position_embeddings;
- re-saved under that layout, megatron-to-hf gives back every original tensor bit for bit;
- with Qwen3 + YaRN, CP=2 x TP=2 gives the single-process log-probs, loss and gradients (the
  q/k norm weights are replicated over TP and their gradients must be summed).

TP=1 parity and the TP=1 round trip of the same variants are in test_convert_roundtrip.py.
"""

import json

import pytest
import torch

from megatron_solopo.convert import hf_to_megatron, megatron_to_hf, verify
from megatron_solopo.convert.tiny import TINY_VARIANTS, make_tiny_hf_checkpoint
from tests.distributed.common import check_layout
from tests.distributed.test_convert_roundtrip import (SEQUENCES, TOLERANCE, assert_loads_with_transformers,
                                                      assert_same_tensors)
from tests.harness import run_distributed

pytestmark = pytest.mark.distributed

# 100 tokens: beyond original_max_position_embeddings of llama_yarn (32) and qwen2_yarn (64).
LONG_SEQUENCES = SEQUENCES + [[(7 * i + 3) % 300 for i in range(100)]]


def _logprobs_and_resave(megatron_dir: str, save_root: str, layout: dict, sequences: list):
    """Every rank: load the converted checkpoint under ``layout``, compute the per-token
    log-probs of ``sequences`` (packed; gathered over CP), save the weights as iteration 1."""
    from megatron.core import parallel_state

    from megatron_solopo.model.build import build_model
    from megatron_solopo.model.config import ModelConfig, build_transformer_config
    from megatron_solopo.parallel import context_parallel as cpar
    from megatron_solopo.parallel.distributed import initialize_distributed
    from megatron_solopo.parallel.layout import ParallelConfig
    from megatron_solopo.training import checkpoint as ckpt
    from megatron_solopo.training.model_setup import wrap_model
    from megatron_solopo.training.step import forward_backward

    run_config = ckpt.read_run_config(megatron_dir)
    model = ModelConfig(**run_config["model"])
    parallel = ParallelConfig(**layout)
    initialize_distributed(parallel, model=model)
    padded = model.padded_vocab_size(parallel.tensor_model_parallel_size)
    config = build_transformer_config(model, parallel, variable_seq_lengths=True)
    chunks = build_model(model, config, padded_vocab_size=padded)
    ckpt.load_checkpoint(megatron_dir, chunks, padded_vocab_size=padded)
    wrapped = wrap_model(chunks, config)
    cp_size = parallel.context_parallel_size
    batch = verify.pack_sequences(sequences, pad_multiple=2 * cp_size)
    seen = []
    forward_backward(wrapped, [batch], lambda b, sums: (sums.response_logps.sum(), {}),
                     vocab_size=model.vocab_size, forward_only=True,
                     on_token_logps=lambda local, logps: seen.append(logps.detach().cpu()))
    ckpt.save_checkpoint(save_root, 1, wrapped, dict(run_config, padded_vocab_size=padded,
                                                     parallel=layout), common={"iteration": 1})
    (local,) = seen
    full = torch.zeros(batch.num_tokens)
    cp_rank = parallel_state.get_context_parallel_rank()
    full[cpar.zigzag_indices(batch.cu_seqlens, cp_size, cp_rank)] = local.float()
    torch.distributed.all_reduce(full, group=parallel_state.get_context_parallel_group())
    return verify.split_packed(full, batch)


CASES = {
    "qwen3_tied-tp2": ("qwen3_tied", 2, dict(tensor_model_parallel_size=2)),
    "qwen3_untied-tp2": ("qwen3_untied", 2, dict(tensor_model_parallel_size=2)),
    "qwen2_yarn-tp2": ("qwen2_yarn", 2, dict(tensor_model_parallel_size=2)),
    "llama_yarn-tp2": ("llama_yarn", 2, dict(tensor_model_parallel_size=2)),
    "mistral_head_dim-tp2": ("mistral_head_dim", 2, dict(tensor_model_parallel_size=2)),
    "qwen2_yarn-cp2": ("qwen2_yarn", 2, dict(context_parallel_size=2)),
    "llama_yarn-cp2_tp2": ("llama_yarn", 4, dict(context_parallel_size=2,
                                                  tensor_model_parallel_size=2)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_layout_matches_transformers_and_resaved_checkpoint_converts_back(tmp_path, case):
    variant, world, layout = CASES[case]
    hf_dir = make_tiny_hf_checkpoint(tmp_path / "hf", variant, seed=len(case), tokenizer=False)
    megatron_dir = hf_to_megatron(hf_dir, tmp_path / "megatron", tensor_model_parallel_size=2)
    reference = verify.hf_logprobs(str(hf_dir), LONG_SEQUENCES)
    results = run_distributed(_logprobs_and_resave, world, str(megatron_dir),
                              str(tmp_path / "run"), layout, LONG_SEQUENCES)
    results.append(verify.megatron_logprobs(str(megatron_dir), LONG_SEQUENCES))  # TP=1, here
    for ours in results:
        result = verify.compare(reference, ours)
        print(f"{case}: {result}")
        assert result.max_abs_diff <= TOLERANCE, str(result)

    back = megatron_to_hf(tmp_path / "run", tmp_path / "back")
    assert_same_tensors(hf_dir, back)
    assert_loads_with_transformers(hf_dir, back)
    written = json.loads((back / "config.json").read_text())
    source = json.loads((hf_dir / "config.json").read_text())
    for field in ("architectures", "rope_parameters", "head_dim", "tie_word_embeddings"):
        assert written.get(field) == source.get(field), field


def test_the_long_sequence_reaches_beyond_the_original_context():
    for variant in ("qwen2_yarn", "llama_yarn"):
        extra = TINY_VARIANTS[variant][2]
        scaling = extra.get("rope_parameters") or extra.get("rope_scaling")
        assert max(map(len, LONG_SEQUENCES)) > scaling["original_max_position_embeddings"]


def test_qwen3_with_yarn_under_cp2_tp2_gives_single_process_logprobs_and_gradients():
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
    run_distributed(check_layout, 4, dict(context_parallel_size=2, tensor_model_parallel_size=2),
                    model_overrides=dict(family="qwen3", qk_layernorm=True, kv_channels=32,
                                         rope_scaling=yarn, max_position_embeddings=64))


def _precompute(raw: dict) -> None:
    """Rank function: the reference caches of the run's datasets."""
    import contextlib
    import io

    from megatron_solopo.config import config_from_dict
    from megatron_solopo.training.precompute import precompute_reference

    with contextlib.redirect_stdout(io.StringIO()):
        precompute_reference(config_from_dict(raw))


def test_solopo_trains_from_a_converted_qwen3_checkpoint(tmp_path):
    """Convert a tiny Qwen3 (tied, head_dim 32 != hidden / heads), tokenize data with its
    tokenizer, precompute the reference log-probs with it and run SoLoPO (DPO base) for a few
    steps on CPU (architecture from the checkpoint), convert the result back: the loss falls, no
    step is skipped, and transformers loads a changed Qwen3 whose q/k norms were trained too."""
    import math

    from transformers import AutoModelForCausalLM

    from megatron_solopo.data import synthetic
    from megatron_solopo.data.preprocess import preprocess
    from tests.distributed.trainer_common import base_config, logging_result, train

    hf_dir = make_tiny_hf_checkpoint(tmp_path / "hf", "qwen3_tied", max_position_embeddings=1024)
    megatron_dir = hf_to_megatron(hf_dir, tmp_path / "megatron")
    tokenizer = str(megatron_dir / "tokenizer")
    paths = {"tokenizer": tokenizer, "init": str(megatron_dir)}
    for split, count, seed in (("train", 24, 1), ("valid", 8, 2)):
        records = synthetic.generate_records("kv_retrieval", count, seed=seed, long_length=80)
        synthetic.write_jsonl(records, str(tmp_path / f"{split}.jsonl"))
        preprocess([str(tmp_path / f"{split}.jsonl")], str(tmp_path / split),
                   "HuggingFaceTokenizer", tokenizer)
        paths[split] = str(tmp_path / split)
    raw = base_config(paths, str(tmp_path), training={"train_iters": 4, "global_batch_size": 6},
                      checkpoint={"save": str(tmp_path / "run")},
                      tokenizer={"tokenizer_type": "HuggingFaceTokenizer"},
                      objective={"name": "solopo", "base": "dpo", "beta": 0.5, "alpha": 1.0})
    raw["model"] = {}  # the architecture comes from the converted checkpoint
    run_distributed(_precompute, 1, raw)
    result = logging_result(run_distributed(train, 1, raw))
    print("qwen3 SoLoPO losses:", result["losses"])
    assert len(result["losses"]) == 4 and result["num_skipped"] == 0
    assert all(math.isfinite(loss) for loss in result["losses"])
    assert result["losses"][-1] < result["losses"][0]
    last = [row for row in result["history"] if "loss" in row and not row.get("eval")][-1]
    assert last["short/rewards/accuracies"] > 0.5 and last["solo_ra/gap"] > 0

    back = megatron_to_hf(tmp_path / "run", tmp_path / "back")
    assert json.loads((back / "config.json").read_text())["architectures"] == ["Qwen3ForCausalLM"]
    before = AutoModelForCausalLM.from_pretrained(str(hf_dir)).state_dict()
    after = AutoModelForCausalLM.from_pretrained(str(back)).state_dict()
    assert before.keys() == after.keys()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert "model.layers.0.self_attn.q_norm.weight" in changed
    assert "model.layers.1.self_attn.k_norm.weight" in changed
    assert len(changed) > len(before) // 2
