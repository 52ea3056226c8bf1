"""A converted checkpoint under TP=2 x PP=2 (4 gloo ranks): per-token log-probs through
Megatron's pipeline schedule match transformers' own within 1e-5; re-saved there as a trainer
would (iteration directory, optimizer state, layout-specific shards), megatron-to-hf still gives
back every original tensor bit for bit, with or without the original config.json."""

import pytest

from megatron_solopo.convert import hf_to_megatron, megatron_to_hf, verify
from megatron_solopo.convert.tiny import make_tiny_hf_checkpoint
from tests.distributed.test_convert_roundtrip import (SEQUENCES, TOLERANCE, assert_loads_with_transformers,
                                                      assert_same_tensors)
from tests.harness import run_distributed

pytestmark = pytest.mark.distributed

LAYOUT = dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)


def _run_and_resave(megatron_dir: str, save_root: str, keep_hf: bool):
    """Every rank: load the converted checkpoint under LAYOUT, compute per-token log-probs (and
    gradients), take an optimizer step that changes nothing, then save weights and optimizer
    state under LAYOUT as iteration 7."""
    from megatron.core import parallel_state
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_solopo.model.build import build_model
    from megatron_solopo.model.config import ModelConfig, build_transformer_config
    from megatron_solopo.parallel.distributed import initialize_distributed
    from megatron_solopo.parallel.layout import ParallelConfig
    from megatron_solopo.training import checkpoint as ckpt
    from megatron_solopo.training.model_setup import wrap_model
    from megatron_solopo.training.step import forward_backward

    run_config = ckpt.read_run_config(megatron_dir)
    model = ModelConfig(**run_config["model"])
    parallel = ParallelConfig(**LAYOUT)
    initialize_distributed(parallel, model=model)
    padded = model.padded_vocab_size(parallel.tensor_model_parallel_size)
    config = build_transformer_config(model, parallel, variable_seq_lengths=True)
    chunks = build_model(model, config, padded_vocab_size=padded)
    ckpt.load_checkpoint(megatron_dir, chunks, padded_vocab_size=padded)
    wrapped = wrap_model(chunks, config)
    batch = verify.pack_sequences(SEQUENCES)
    seen = []
    forward_backward(wrapped, [batch], lambda b, sums: (-sums.response_logps.sum(), {}),
                     vocab_size=model.vocab_size,
                     on_token_logps=lambda local, logps: seen.append(logps.detach().cpu()))
    # One step with lr=0: Adam state exists (and is saved) while the weights stay bit-exact.
    optimizer = get_megatron_optimizer(OptimizerConfig(lr=0.0, weight_decay=0.0, bf16=False),
                                       wrapped)
    optimizer.step()
    trainer_run_config = {key: value for key, value in run_config.items()
                          if keep_hf or key != "hf"}
    trainer_run_config.update(padded_vocab_size=padded, parallel=LAYOUT)
    ckpt.save_checkpoint(save_root, 7, wrapped, trainer_run_config, optimizer=optimizer,
                         common={"iteration": 7})
    if not parallel_state.is_pipeline_last_stage():
        return None
    return verify.split_packed(seen[0], batch)


@pytest.mark.parametrize("variant,keep_hf", [("llama_gqa_untied", False), ("qwen2_bias_tied", True),
                                           ("qwen3_tied", True)])
def test_tp2_pp2_logprobs_match_transformers_and_resaved_checkpoint_converts_back(
        tmp_path, variant, keep_hf):
    from megatron.core import dist_checkpointing

    hf_dir = make_tiny_hf_checkpoint(tmp_path / "hf", variant, num_hidden_layers=4)
    megatron_dir = hf_to_megatron(hf_dir, tmp_path / "megatron", tensor_model_parallel_size=2,
                                  pipeline_model_parallel_size=2)
    reference = verify.hf_logprobs(str(hf_dir), SEQUENCES)
    results = run_distributed(_run_and_resave, 4, str(megatron_dir), str(tmp_path / "run"), keep_hf)
    last_stage = [r for r in results if r is not None]
    assert len(last_stage) == 2  # the two TP ranks of the last pipeline stage
    for ours in last_stage:
        result = verify.compare(reference, ours)
        print(f"{variant} TP2xPP2: {result}")
        assert result.max_abs_diff <= TOLERANCE, str(result)

    saved = dist_checkpointing.load_tensors_metadata(str(tmp_path / "run" / "iter_0000007"))
    assert any(key.startswith("optimizer.") for key in saved)  # ignored by megatron-to-hf
    back = megatron_to_hf(tmp_path / "run", tmp_path / "back")
    assert_same_tensors(hf_dir, back)
    assert_loads_with_transformers(hf_dir, back)
    # Without the original config.json it is generated from ModelConfig: same model, same numbers.
    again = verify.compare(reference, verify.hf_logprobs(str(back), SEQUENCES))
    assert again.max_abs_diff == 0.0, str(again)
