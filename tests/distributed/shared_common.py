"""Shared-prefix packing parity: preference groups whose chosen and rejected sequences share a
context, packed with and without sharing, and the rank functions that compare the two (run
inside gloo ranks, see tests/harness.py)."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from megatron_solopo.data.dataset import PreferenceGroup
from megatron_solopo.data.packing import pack_groups
from megatron_solopo.roles import Role
from tests.distributed.common import VOCAB, assert_close, full_grads, tiny_model

# objective name -> (build_objective arguments, multi-turn records)
OBJECTIVES = {
    "dpo": ({"name": "dpo", "beta": 0.5}, False),
    "long_dpo": ({"name": "long_dpo", "beta": 0.5}, False),
    "longpo": ({"name": "longpo", "beta": 0.5, "lambda": 1.0}, False),
    "longpo_multiturn": ({"name": "longpo", "beta": 0.5, "lambda": 1.0}, True),
    "solopo_both": ({"name": "solopo", "base": "dpo", "beta": 0.5, "alpha": 1.0,
                     "solo_ra": "both"}, False),
}


def _objective(name):
    from megatron_solopo.objectives import build_objective

    arguments = dict(OBJECTIVES[name][0])
    return build_objective(arguments.pop("name"), **arguments)


def _sequence(parts, gen) -> tuple:
    """``parts``: [(tokens, is_response)] -> (ids, response_mask)."""
    ids = np.concatenate([np.asarray(tokens, dtype=np.int64) for tokens, _ in parts])
    mask = np.concatenate([np.full(len(tokens), flag) for tokens, flag in parts])
    return ids, mask


def make_groups(num_groups: int, multi_turn: bool, seed: int = 0) -> list[PreferenceGroup]:
    """Random records with every role. Some answers start with the same token, so a shared prefix
    can end inside the responses; lengths are not multiples of any pad size."""
    gen = np.random.default_rng(seed)
    rand = lambda n: gen.integers(3, VOCAB, n)  # noqa: E731
    groups = []
    for index in range(num_groups):
        turns = 2 if multi_turn else 1
        long_context = rand(int(gen.integers(30, 60)))
        prompts = [rand(int(gen.integers(2, 5))) for _ in range(turns)]
        chosen = [rand(int(gen.integers(1, 6))) for _ in range(turns)]
        rejected = [rand(int(gen.integers(1, 6))) for _ in range(turns)]
        for k in range(turns):
            if (index + k) % 2 == 0:  # a common first answer token
                rejected[k][0] = chosen[k][0]
        sequences = {Role.SHORT_CHOSEN: [], Role.SHORT_REJECTED: []}
        for k in range(turns):
            short_context = rand(int(gen.integers(4, 12)))
            for role, answers in ((Role.SHORT_CHOSEN, chosen), (Role.SHORT_REJECTED, rejected)):
                sequences[role].append(_sequence(
                    [([1], False), (short_context, False), (prompts[k], False),
                     (np.append(answers[k], 2), True)], gen))
        for role, answers in ((Role.LONG_CHOSEN, chosen), (Role.LONG_REJECTED, rejected)):
            parts = [([1], False), (long_context, False)]
            for k in range(turns):
                parts += [(prompts[k], False), (np.append(answers[k], 2), True)]
            sequences[role] = [_sequence(parts, gen)]
        groups.append(PreferenceGroup(index, f"record-{index}", sequences))
    return groups


def roles_of(objective) -> list[Role]:
    from megatron_solopo.roles import ALL_ROLES

    return [role for role in ALL_ROLES if role in objective.policy_roles]


def reference_values(groups, seed: int = 1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    from megatron_solopo.roles import ALL_ROLES

    return {(group.index, role): float(-5 - 10 * torch.rand((), generator=gen))
            for group in groups for role in ALL_ROLES}


def micro_batches(groups, roles, pad_multiple, shared, per_batch=2):
    return [pack_groups(groups[start:start + per_batch], roles, pad_multiple, 0, shared)
            for start in range(0, len(groups), per_batch)]


def _compared(values: dict, whole) -> dict:
    """Per-sequence values that carry meaning: whole-sequence sums only for the roles whose
    whole sequence is computed (elsewhere only response positions have log-probs)."""
    keep = torch.zeros_like(values["roles"], dtype=torch.bool)
    for role in whole:
        keep |= values["roles"] == role.index
    out = {name: values[name] for name in ("response", "response_tokens", "target_tokens")}
    out["target"] = values["target"][keep]
    return out


def make_loss_fn(objective, num_groups, references, captured):
    from megatron_solopo.objectives.base import ObjectiveInputs, RoleLogps
    from megatron_solopo.training.batches import group_role_values, reference_tensor

    def loss_fn(batch, sums):
        policy = {role: RoleLogps(
            logps=group_role_values(sums.response_logps, batch, role),
            num_tokens=group_role_values(sums.response_tokens, batch, role),
            sequence_logps=group_role_values(sums.target_logps, batch, role),
            sequence_num_tokens=group_role_values(sums.target_tokens, batch, role))
            for role in objective.policy_roles}
        reference = {role: reference_tensor(references, batch, role).to(sums.response_logps.device)
                     for role in objective.reference_roles}
        loss, metrics = objective(ObjectiveInputs(policy=policy, reference=reference,
                                                  num_groups=float(num_groups)))
        captured.append(dict({name: value.detach().cpu() for name, value in (
            ("response", sums.response_logps), ("response_tokens", sums.response_tokens),
            ("target", sums.target_logps), ("target_tokens", sums.target_tokens),
            ("loss", loss))}, roles=batch.roles.cpu()))
        return loss, {"loss": loss.detach()}

    return loss_fn


def _unshared_reference(objective, groups, roles, references, seed: int = 7):
    """Single process, no sharing: per-sequence sums of every micro-batch, loss, gradients."""
    from megatron_solopo.model.build import build_model
    from megatron_solopo.model.config import build_transformer_config
    from megatron_solopo.model.logprobs import forward_packed
    from megatron_solopo.model.state import gather_full_state_dict
    from megatron_solopo.parallel.distributed import initialize_distributed
    from megatron_solopo.parallel.layout import ParallelConfig
    from megatron_solopo.training.batches import logprob_positions
    from megatron_solopo.training.step import sequence_logps

    parallel = ParallelConfig()
    initialize_distributed(parallel, seed=seed)
    model_cfg = dataclasses.replace(tiny_model(), attention_backend="reference")
    (model,) = build_model(model_cfg, build_transformer_config(model_cfg, parallel))
    weights = gather_full_state_dict([model], local_only=True)
    captured = []
    loss_fn = make_loss_fn(objective, len(groups), references, captured)
    whole = objective.sequence_logps_roles
    total = torch.zeros(())
    device = next(model.parameters()).device
    for batch in micro_batches(groups, roles, 2, shared=False):
        batch = batch.to(device)
        logps = forward_packed(model, batch, VOCAB, logprob_mask=logprob_positions(batch, whole))
        loss, _ = loss_fn(batch, sequence_logps(logps, batch, batch, 1, None))
        loss.backward()
        total = total + loss.detach().cpu()
    return weights, captured, total, full_grads([model], local_only=True)


def check_shared_prefix(parallel_fields: dict, objective_name: str, num_groups: int = 4,
                        attention_backend: str = "reference", rtol: float = 1e-5,
                        bf16: bool = False) -> dict:
    """Rank function: the same weights and groups, packed without sharing on one process (fp32,
    reference attention) and with sharing under ``parallel_fields`` with ``attention_backend``
    (``bf16`` compute for Transformer Engine): per-sequence log-prob sums and token counts, the
    objective's loss and every gradient agree to ``rtol``."""
    from megatron.core import parallel_state

    from megatron_solopo.model.build import build_model
    from megatron_solopo.model.config import PrecisionConfig, build_transformer_config
    from megatron_solopo.model.state import load_full_state_dict
    from megatron_solopo.parallel.distributed import initialize_distributed
    from megatron_solopo.parallel.layout import ParallelConfig
    from megatron_solopo.training.batches import logprob_positions
    from megatron_solopo.training.model_setup import wrap_model
    from megatron_solopo.training.step import forward_backward

    objective = _objective(objective_name)
    groups = make_groups(num_groups, OBJECTIVES[objective_name][1])
    roles = roles_of(objective)
    references = reference_values(groups)
    weights, expected, expected_loss, expected_grads = _unshared_reference(
        objective, groups, roles, references)
    parallel_state.destroy_model_parallel()

    parallel = ParallelConfig(**parallel_fields)
    initialize_distributed(parallel)
    tp, cp = parallel.tensor_model_parallel_size, parallel.context_parallel_size
    pad_multiple = 2 * cp * (tp if parallel.sequence_parallel else 1)
    shared = micro_batches(groups, roles, pad_multiple, shared=True)
    for batch in shared:
        batch.validate(pad_multiple)
    assert sum(int(b.num_tokens) for b in shared) < sum(
        int(b.num_tokens) for b in micro_batches(groups, roles, pad_multiple, shared=False))
    model_cfg = dataclasses.replace(tiny_model(), attention_backend=attention_backend)
    tc = build_transformer_config(model_cfg, parallel, PrecisionConfig(bf16=bf16),
                                  variable_seq_lengths=True)
    chunks = build_model(model_cfg, tc)
    load_full_state_dict(chunks, weights)
    model = wrap_model(chunks, tc)
    dp_size = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    per_rank = len(shared) // dp_size
    mine = list(range(dp_rank * per_rank, (dp_rank + 1) * per_rank))
    captured = []
    whole = objective.sequence_logps_roles
    metrics = forward_backward(model, [shared[i] for i in mine],
                               make_loss_fn(objective, num_groups, references, captured),
                               vocab_size=VOCAB,
                               logprob_mask_fn=lambda batch: logprob_positions(batch, whole))
    checked = 0
    if parallel_state.is_pipeline_last_stage():
        assert len(captured) == len(mine)
        for index, values in zip(mine, captured):
            values, reference = _compared(values, whole), _compared(expected[index], whole)
            for name in ("response", "response_tokens", "target", "target_tokens"):
                assert_close(values[name], reference[name],
                             f"{objective_name}: per-sequence {name}, micro-batch {index}", rtol)
            checked += 1
        loss = torch.stack([m["loss"] for m in metrics]).sum()
        torch.distributed.all_reduce(loss, group=parallel_state.get_data_parallel_group())
        loss = loss.cpu()
        assert_close(loss, expected_loss, f"{objective_name}: loss", rtol)
    grads = full_grads(model)
    assert sorted(grads) == sorted(expected_grads)
    from megatron_solopo.model.state import VOCAB_KEYS

    for key, ref in expected_grads.items():
        grad, ref = grads[key].float(), ref.float()
        if key in VOCAB_KEYS:
            grad, ref = grad[:VOCAB], ref[:VOCAB]
        assert_close(grad, ref, f"{objective_name}: gradient of {key}", rtol)
    return {"checked": checked}


def check_flex_forward(parallel_fields: dict, objective_name: str, num_groups: int = 4,
                       rtol: float = 1e-5) -> dict:
    """Rank function: FlexAttention (forward only on CPU) on shared packs gives the unshared
    reference's per-sequence log-prob sums."""
    from megatron.core import parallel_state

    from megatron_solopo.model.build import build_model
    from megatron_solopo.model.config import build_transformer_config
    from megatron_solopo.model.state import load_full_state_dict
    from megatron_solopo.parallel.distributed import initialize_distributed
    from megatron_solopo.parallel.layout import ParallelConfig
    from megatron_solopo.training.batches import logprob_positions
    from megatron_solopo.training.step import forward_backward

    objective = _objective(objective_name)
    groups = make_groups(num_groups, OBJECTIVES[objective_name][1])
    roles = roles_of(objective)
    references = reference_values(groups)
    weights, expected, _, _ = _unshared_reference(objective, groups, roles, references)
    parallel_state.destroy_model_parallel()
    parallel = ParallelConfig(**parallel_fields)
    initialize_distributed(parallel)
    pad_multiple = 2 * parallel.context_parallel_size
    model_cfg = dataclasses.replace(tiny_model(), attention_backend="flex")
    tc = build_transformer_config(model_cfg, parallel, variable_seq_lengths=True)
    chunks = build_model(model_cfg, tc)
    load_full_state_dict(chunks, weights)
    for chunk in chunks:
        chunk.eval()
    captured = []
    whole = objective.sequence_logps_roles
    results = {}
    for shared in (False, True):
        captured.clear()
        batches = micro_batches(groups, roles, pad_multiple, shared=shared)
        with torch.no_grad():
            forward_backward(chunks, batches, make_loss_fn(objective, num_groups, references, captured),
                             vocab_size=VOCAB, forward_only=True,
                             logprob_mask_fn=lambda batch: logprob_positions(batch, whole))
        for index, values in enumerate(captured):
            values, reference = _compared(values, whole), _compared(expected[index], whole)
            for name in ("response", "target"):
                assert_close(values[name], reference[name],
                             f"flex, shared={shared}: per-sequence {name}, micro-batch {index}", rtol)
        results[shared] = len(captured)
    if not torch.cuda.is_available():  # training with flex on the CPU is refused, clearly
        import pytest

        batch = micro_batches(groups, roles, pad_multiple, shared=True)[0]
        with pytest.raises(ValueError, match="no backward on the CPU"):
            forward_backward(chunks, [batch], make_loss_fn(objective, num_groups, references, []),
                             vocab_size=VOCAB)
    return results


def check_all_objectives(parallel_fields: dict, objectives=tuple(OBJECTIVES)) -> dict:
    """Rank function: :func:`check_shared_prefix` for every objective, one process group."""
    from megatron.core import parallel_state

    checked = {}
    for name in objectives:
        checked[name] = check_shared_prefix(parallel_fields, name)["checked"]
        parallel_state.destroy_model_parallel()
    return checked
