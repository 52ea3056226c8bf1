"""What a first GPU run would hit, shown on CPU: checkpoints across "Transformer Engine present /
absent" (TE's norms carry an ``_extra_state`` the local spec's do not), and the distributed
optimizer's overlapped parameter all-gather with the log-prob head, which uses the output layer's
weight without calling the layer."""

from __future__ import annotations

import pytest
import torch

from tests.harness import run_distributed

pytestmark = pytest.mark.distributed


class _ExtraStateMixin:
    """Stands in for Transformer Engine's RMSNorm: same math as the module it is mixed into, plus
    an ``_extra_state`` (TE keeps FP8 metadata there, serialized into a uint8 tensor)."""

    def get_extra_state(self):
        return getattr(self, "_extra", torch.zeros(0, dtype=torch.uint8))

    def set_extra_state(self, state):
        self._extra = state


def _with_extra_state(chunks):
    """Give the final norm an ``_extra_state``, as megatron's TransformerBlock does with TENorm
    whenever TE imports (whatever the layer spec)."""
    for chunk in chunks:
        norm = chunk.decoder.final_layernorm
        norm.__class__ = type("NormWithExtraState", (_ExtraStateMixin, norm.__class__), {})
    return chunks


def _checkpoints_across_extra_state(converted: str, workdir: str) -> dict:
    """Rank function (world 1): every direction of "the final norm has / lacks extra state"."""
    import dataclasses

    from megatron_solopo.model.build import build_model
    from megatron_solopo.model.config import ModelConfig, build_transformer_config
    from megatron_solopo.model.state import gather_full_state_dict
    from megatron_solopo.parallel.distributed import initialize_distributed
    from megatron_solopo.parallel.layout import ParallelConfig
    from megatron_solopo.training import checkpoint as ckpt

    run_config = ckpt.read_run_config(converted)
    model_cfg = dataclasses.replace(ModelConfig(**run_config["model"]), attention_backend="reference")
    padded = model_cfg.padded_vocab_size(1)
    initialize_distributed(ParallelConfig(), model=model_cfg)

    def build(extra_state: bool):
        chunks = build_model(model_cfg, build_transformer_config(model_cfg, ParallelConfig()),
                             padded_vocab_size=padded)
        return _with_extra_state(chunks) if extra_state else chunks

    def load(path, extra_state: bool):
        chunks = build(extra_state)
        ckpt.load_checkpoint(path, chunks, padded_vocab_size=padded)
        return chunks

    def same_weights(chunks, expected):
        actual = gather_full_state_dict(chunks, local_only=True)
        return sorted(actual) == sorted(expected) and all(
            torch.equal(actual[key], expected[key]) for key in expected)

    plain = load(converted, extra_state=False)
    weights = gather_full_state_dict(plain, local_only=True)
    results = {"converted -> extra state": same_weights(load(converted, True), weights)}
    ckpt.save_checkpoint(f"{workdir}/plain", 1, plain, run_config)  # a CPU-trained checkpoint
    results["plain -> extra state"] = same_weights(load(f"{workdir}/plain", True), weights)
    with_extra = load(converted, extra_state=True)
    with_extra[0].decoder.final_layernorm.set_extra_state(torch.tensor([7, 1, 3], dtype=torch.uint8))
    ckpt.save_checkpoint(f"{workdir}/extra", 1, with_extra, run_config)  # a TE-trained one
    results["extra state -> plain"] = same_weights(load(f"{workdir}/extra", False), weights)
    again = load(f"{workdir}/extra", True)
    results["extra state -> extra state"] = same_weights(again, weights)
    results["extra state restored"] = again[0].decoder.final_layernorm.get_extra_state().tolist()
    # A real weight missing from the checkpoint is still refused, by name.
    bigger = dataclasses.replace(model_cfg, add_qkv_bias=True)
    chunks = build_model(bigger, build_transformer_config(bigger, ParallelConfig()),
                         padded_vocab_size=padded)
    try:
        ckpt.load_checkpoint(converted, chunks, padded_vocab_size=padded)
        results["missing weight"] = "loaded"
    except ValueError as err:
        results["missing weight"] = str(err)
    return results


def test_checkpoints_load_whether_the_norm_has_extra_state_or_not(tmp_path):
    """Converted and CPU-trained checkpoints (no norm extra state) load into a model whose final
    norm has one (TE's), and checkpoints written by such a model load into one without."""
    from megatron_solopo.convert.hf_to_megatron import hf_to_megatron
    from megatron_solopo.convert.tiny import make_tiny_hf_checkpoint

    hf_dir = make_tiny_hf_checkpoint(tmp_path / "hf", "llama_gqa_untied", tokenizer=False)
    hf_to_megatron(hf_dir, tmp_path / "converted")
    (results,) = run_distributed(_checkpoints_across_extra_state, 1, str(tmp_path / "converted"),
                                 str(tmp_path))
    missing = results.pop("missing weight")
    restored = results.pop("extra state restored")
    assert results == {name: True for name in results} and len(results) == 4, results
    assert restored == [7, 1, 3]
    assert "linear_qkv.bias" in missing and "checkpoint has no" in missing, missing


def _saved_weights(directory) -> dict:
    from megatron_solopo.convert.sharded import checkpoint_tensors, load_whole, single_process_group

    with single_process_group():
        saved = checkpoint_tensors(directory)
        # Model weights only: without overlap Megatron does not bucket, so the optimizer's
        # per-bucket state is laid out differently.
        return {key: load_whole(directory, key, saved) for key in saved
                if not key.startswith("optimizer.")}


def test_overlapped_param_gather_follows_the_run_without_it(tmp_path):
    """DP=2, distributed optimizer, tiny buckets (the untied output layer alone in its own, as
    Llama-3.1-8B's at TP=4 is with the default bucket size): overlapping the parameter all-gather
    with the forward gives the same losses and the same saved weights as not overlapping it."""
    from tests.distributed.trainer_common import base_config, logging_result, make_dataset, train

    paths = make_dataset(tmp_path / "data", num_records=16, long_length=60)
    runs = {}
    for overlap in (False, True):
        save = str(tmp_path / f"run-overlap-{overlap}")
        raw = base_config(paths, str(tmp_path), objective={"name": "simpo"},
                          training={"train_iters": 3}, checkpoint={"save": save},
                          optimizer={"use_distributed_optimizer": True},
                          ddp={"overlap_grad_reduce": overlap, "overlap_param_gather": overlap,
                               "bucket_size": 2000})
        runs[overlap] = logging_result(run_distributed(train, 2, raw))["losses"]
    assert len(runs[True]) == 3 and runs[True] == pytest.approx(runs[False], rel=1e-6), runs
    plain = _saved_weights(tmp_path / "run-overlap-False" / "iter_0000003")
    overlapped = _saved_weights(tmp_path / "run-overlap-True" / "iter_0000003")
    assert sorted(plain) == sorted(overlapped)
    for key in plain:
        torch.testing.assert_close(overlapped[key], plain[key], rtol=1e-6, atol=1e-7, msg=key)
