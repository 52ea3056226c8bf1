"""Shared pieces of the layout-parity tests: a tiny Llama-style model, a DPO-style loss, the
single-process reference and the comparison (run inside gloo ranks, see tests/harness.py)."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from megatron.core.transformer.module import Float16Module

from megatron_solopo.model.build import build_model
from megatron_solopo.model.config import ModelConfig, PrecisionConfig, build_transformer_config
from megatron_solopo.model.logprobs import forward_packed, masked_sequence_sums
from megatron_solopo.model.state import VOCAB_KEYS, gather_full_state_dict, load_full_state_dict
from megatron_solopo.parallel import context_parallel as cpar
from megatron_solopo.parallel.distributed import initialize_distributed
from megatron_solopo.parallel.layout import ParallelConfig
from megatron_solopo.training.model_setup import wrap_model
from megatron_solopo.training.step import forward_backward
from tests.batches import random_packed_batch

VOCAB = 100
BETA = 0.5


def tiny_model(**overrides) -> ModelConfig:
    fields = dict(num_layers=4, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                  num_query_groups=2, vocab_size=VOCAB, max_position_embeddings=512,
                  rotary_base=10000.0)
    fields.update(overrides)
    return ModelConfig(**fields)


def pair_loss(batch, response_logps: torch.Tensor, num_groups_global: int):
    """DPO-style: groups hold (chosen, rejected); -logsigmoid(beta * (chosen - rejected))."""
    chosen = response_logps[0::2]
    rejected = response_logps[1::2]
    return -F.logsigmoid(BETA * (chosen - rejected)).sum() / num_groups_global


# Preference pairs per micro-batch: lengths that are not multiples of any chunk size, short and
# long sequences mixed in one pack (the short ones are padded and sharded like the rest).
DEFAULT_SHAPES = [[[13, 9], [21, 6]], [[30, 17]], [[7, 11], [5, 19]], [[25, 4]],
                  [[9, 9]], [[16, 3], [8, 12]], [[14, 27]], [[6, 10]]]
MIXED_SHAPES = [[[5, 3], [61, 58]], [[3, 70]], [[47, 2], [6, 9]], [[66, 5]]]


def make_micro_batches(num_microbatches: int, pad_multiple: int, seed: int = 0,
                       shapes=DEFAULT_SHAPES, response_tokens=None):
    """Micro-batches of 1-2 preference pairs."""
    batches = []
    first = 0
    for index in range(num_microbatches):
        groups = shapes[index % len(shapes)]
        batches.append(random_packed_batch(groups, VOCAB, pad_multiple, seed + index,
                                           first_sample=first, response_tokens=response_tokens))
        first += len(groups)
    return batches, first


def _swap_params_and_grads(chunks):
    for chunk in chunks:
        for param in chunk.parameters():
            grad = getattr(param, "main_grad", None)
            if grad is None:
                grad = param.grad if param.grad is not None else torch.zeros_like(param)
            param.data, param._saved_data = grad.to(param.dtype).view_as(param.data), param.data


def _restore_params(chunks):
    for chunk in chunks:
        for param in chunk.parameters():
            param.data = param._saved_data
            del param._saved_data


def full_grads(chunks, local_only=False):
    """Gradients in canonical (sharded-key, global-shape) form."""
    _swap_params_and_grads(chunks)
    try:
        return gather_full_state_dict(chunks, local_only=local_only)
    finally:
        _restore_params(chunks)


def reference_run(model_cfg: ModelConfig, micro_batches, num_groups: int, seed: int = 7,
                  precision=None, attention_backend="auto"):
    """Single-process model (TP=PP=CP=1, no DDP) on every micro-batch of the global batch."""
    parallel = ParallelConfig()
    initialize_distributed(parallel, seed=seed)
    model_cfg = dataclasses.replace(model_cfg, attention_backend=attention_backend)
    tc = build_transformer_config(model_cfg, parallel, precision)
    (model,) = build_model(model_cfg, tc)
    if tc.bf16:
        model = Float16Module(tc, model)
    device = next(model.parameters()).device
    weights = gather_full_state_dict([model], local_only=True)
    token_logps, losses = [], []
    for batch in micro_batches:
        logps = forward_packed(model, batch.to(device), VOCAB)
        token_logps.append(logps.detach())
        sums = masked_sequence_sums(logps, batch.loss_mask.to(device), batch.cu_seqlens)
        loss = pair_loss(batch, sums, num_groups)
        loss.backward()
        losses.append(loss.detach().cpu())
    token_logps = [logps.cpu() for logps in token_logps]
    grads = full_grads([model], local_only=True)
    return weights, token_logps, torch.stack(losses).sum(), grads


def parallel_run(model_cfg: ModelConfig, parallel: ParallelConfig, weights, micro_batches,
                 num_groups: int, precision=None, attention_backend="auto",
                 response_logprobs_only=False):
    """The same weights under ``parallel``; this DP rank takes its share of the micro-batches."""
    from megatron.core import parallel_state

    initialize_distributed(parallel)
    model_cfg = dataclasses.replace(model_cfg, attention_backend=attention_backend)
    tc = build_transformer_config(model_cfg, parallel, precision, variable_seq_lengths=True)
    chunks = build_model(model_cfg, tc)
    load_full_state_dict(chunks, weights)
    model = wrap_model(chunks, tc)
    dp_size = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    per_rank = len(micro_batches) // dp_size
    mine = list(range(dp_rank * per_rank, (dp_rank + 1) * per_rank))
    seen = []

    def loss_fn(batch, sums):
        loss = pair_loss(batch, sums.response_logps, num_groups)
        return loss, {"loss": loss}

    mask_fn = (lambda batch: batch.loss_mask.bool()) if response_logprobs_only else None
    metrics = forward_backward(model, [micro_batches[i] for i in mine], loss_fn, vocab_size=VOCAB,
                               on_token_logps=lambda local, logps: seen.append((local, logps)),
                               logprob_mask_fn=mask_fn)
    loss = torch.stack([m["loss"] for m in metrics]).sum() if metrics else torch.zeros(())
    if torch.cuda.is_available():
        loss = loss.cuda()
    if parallel_state.is_pipeline_last_stage():
        torch.distributed.all_reduce(loss, group=parallel_state.get_data_parallel_group())
    loss = loss.cpu()
    seen = [(local.to("cpu"), logps.cpu()) for local, logps in seen]
    grads = full_grads(model)
    cp_size = parallel_state.get_context_parallel_world_size()
    cp_rank = parallel_state.get_context_parallel_rank()
    return mine, seen, loss, grads, cp_size, cp_rank


def assert_close(actual, expected, what, rtol=1e-5):
    if expected.numel() == 0:  # e.g. a CP rank that holds no response token
        assert actual.numel() == 0, what
        return
    scale = expected.abs().max().clamp(min=1e-30)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * float(scale),
                               msg=lambda m: f"{what}: {m}")


def check_layout(parallel_fields: dict, num_microbatches: int = 4, model_overrides=None,
                 shapes=DEFAULT_SHAPES, attention_backend="auto", bf16=False, rtol=1e-5,
                 reference_backend=None, response_tokens=None, response_logprobs_only=False):
    """Run in every rank: reference vs ``parallel_fields`` layout; raises on any mismatch."""
    from megatron.core import parallel_state

    precision = PrecisionConfig(bf16=bf16)
    model_cfg = tiny_model(**(model_overrides or {}))
    parallel = ParallelConfig(**parallel_fields)
    tp, cp = parallel.tensor_model_parallel_size, parallel.context_parallel_size
    pad_multiple = 2 * cp * (tp if parallel.sequence_parallel else 1)
    micro_batches, num_groups = make_micro_batches(num_microbatches, pad_multiple, shapes=shapes,
                                                   response_tokens=response_tokens)
    if parallel.virtual_pipeline_model_parallel_size:
        # Fixed pipeline shapes (see training/step.py): pad every pack to the longest.
        longest = max(batch.num_tokens for batch in micro_batches)
        micro_batches = [batch.padded_to(longest) for batch in micro_batches]
    weights, ref_logps, ref_loss, ref_grads = reference_run(
        model_cfg, micro_batches, num_groups, precision=precision,
        attention_backend=reference_backend or attention_backend)
    mine, seen, loss, grads, cp_size, cp_rank = parallel_run(
        model_cfg, parallel, weights, micro_batches, num_groups, precision=precision,
        attention_backend=attention_backend, response_logprobs_only=response_logprobs_only)
    checked = 0
    if parallel_state.is_pipeline_last_stage():
        assert len(seen) == len(mine)
        for index, (local, logps) in zip(mine, seen):
            batch = micro_batches[index]
            expected = ref_logps[index]
            expected = expected[cpar.zigzag_indices(batch.cu_seqlens, cp_size, cp_rank)]
            # Compared where log-probs were computed (pad positions carry no target).
            mask = (local.loss_mask if response_logprobs_only else local.target_mask).bool()
            assert_close(logps[mask], expected[mask], f"per-token log-probs, micro-batch {index}",
                         rtol)
            checked += 1
        assert_close(loss, ref_loss, "loss", rtol)
    assert sorted(grads) == sorted(ref_grads), (sorted(grads), sorted(ref_grads))
    for key in ref_grads:
        grad, ref = grads[key].float(), ref_grads[key].float()
        if key in VOCAB_KEYS:  # padded rows differ with TP; real rows must match
            grad, ref = grad[:VOCAB], ref[:VOCAB]
        assert_close(grad, ref, f"gradient of {key}", rtol)
    return {"checked_micro_batches": checked, "loss": float(loss), "ref_loss": float(ref_loss)}
