"""Checkpoints in Megatron's layout, written with ``megatron.core.dist_checkpointing``.

::

    <save>/
      latest_checkpointed_iteration.txt     "100" (or "release" for a converted checkpoint)
      iter_0000100/                          torch_dist shards + common.pt + metadata.json
        run_config.yaml                      the resolved config of the run that wrote it
      release/                               weights only (tools/convert_checkpoint.py)

Shards use Megatron's global (sharded) keys, so a checkpoint loads under another TP/PP/VPP/CP/DP
layout. Saving is crash-safe: the shards go to a hidden temporary directory that is renamed into
place, and the tracker file is replaced atomically last, so a job killed mid-save leaves the
previous checkpoint as the latest.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
import yaml

from megatron_solopo.model.build import unwrap_model
from megatron_solopo.model.state import VOCAB_KEYS, resize_vocab_rows

logger = logging.getLogger(__name__)

TRACKER_FILE = "latest_checkpointed_iteration.txt"
RUN_CONFIG_FILE = "run_config.yaml"
RELEASE = "release"
CHECKPOINT_FORMAT_VERSION = 1


class _DropSyncSaveNotice(logging.Filter):
    """megatron-core 0.19's torch_dist *synchronous* save goes through its deprecated async path
    and logs "MCore's async save is deprecated ...": misleading, as we never save asynchronously."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "async save is deprecated" not in record.getMessage()


logging.getLogger("megatron.core.dist_checkpointing.strategies.torch").addFilter(_DropSyncSaveNotice())


def checkpoint_dir(root: Union[str, Path], iteration: Union[int, str]) -> Path:
    name = RELEASE if iteration == RELEASE else f"iter_{int(iteration):07d}"
    return Path(root) / name


def atomic_write_text(path: Union[str, Path], text: str) -> None:
    """Write via a temporary file in the same directory, fsync, then rename over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def check_writable(root: Union[str, Path], field: str) -> None:
    """Every rank, before any collective: the save directory can be created and written, so a
    read-only or wrong path stops the run at start, not at its first save. Nothing is created
    (the first save makes the directory): a run that fails at set-up leaves no empty directory."""
    root = Path(root)
    if root.exists():
        if not root.is_dir():
            raise ValueError(f"{field}={root} is a file, not a directory")
        probe = root / f".write-test-{os.uname().nodename}-{os.getpid()}"
        try:
            probe.write_text("")
            probe.unlink()
        except OSError as err:
            raise ValueError(f"{field}={root} is not writable: {err}") from None
        return
    ancestor = root.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"{field}={root} cannot be created: {ancestor} is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"{field}={root} cannot be created: {ancestor} is not writable")


def _displaced(directory: Path) -> Path:
    """Where an existing checkpoint directory waits while a new save of its iteration lands."""
    return directory.with_name(f".old-{directory.name}")


def read_tracker(root: Union[str, Path]) -> Optional[Union[int, str]]:
    tracker = Path(root) / TRACKER_FILE
    if not tracker.exists():
        return None
    text = tracker.read_text().strip()
    if text == RELEASE:
        return RELEASE
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{tracker}: expected an iteration number or 'release', got {text!r}") from None


def resolve_checkpoint(path: Union[str, Path]) -> Optional[Path]:
    """The checkpoint directory that ``path`` designates: a save root (through its tracker
    file), or an ``iter_*``/``release`` directory itself. None if there is no checkpoint yet."""
    path = Path(path)
    if (path / "metadata.json").exists():
        return path
    iteration = read_tracker(path)
    if iteration is None:
        return None
    resolved = checkpoint_dir(path, iteration)
    if not (resolved / "metadata.json").exists() and (_displaced(resolved) / "metadata.json").exists():
        # A save of the same iteration was killed between its two renames.
        logger.warning("%s is missing; loading the previous copy %s", resolved, _displaced(resolved))
        return _displaced(resolved)
    if not (resolved / "metadata.json").exists():
        raise ValueError(f"{path / TRACKER_FILE} points to {resolved.name}, which is missing or "
                         f"incomplete")
    return resolved


def read_run_config(directory: Union[str, Path]) -> dict:
    """The ``run_config.yaml`` of a checkpoint (a save root or an iteration directory)."""
    resolved = resolve_checkpoint(directory)
    if resolved is None:
        raise ValueError(f"no checkpoint in {directory} (no {TRACKER_FILE})")
    config_path = resolved / RUN_CONFIG_FILE
    if not config_path.exists():
        raise ValueError(f"{resolved} has no {RUN_CONFIG_FILE}; it was not written by megatron-solopo")
    return yaml.safe_load(config_path.read_text()) or {}


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# The distributed optimizer's checkpoint format. megatron-core 0.19's default
# ("fully_sharded_model_space") builds flattened ShardedTensors that its own validation then
# refuses ("ShardedTensor.flattened_range is not supported"); "dp_reshardable" is Megatron-LM's
# default: every rank writes its own buckets in parallel, no gather. Optimizer state is restored
# only under the layout that saved it (weights load under any layout).
DISTRIBUTED_OPTIMIZER_FORMAT = "dp_reshardable"


def _optimizer_parts(optimizer) -> list:
    """The optimizers a (possibly chained) Megatron optimizer is made of."""
    return getattr(optimizer, "chained_optimizers", [optimizer])


def _optimizer_metadata(optimizer, given: Optional[dict]) -> Optional[dict]:
    if given is not None:
        return given
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    if any(isinstance(part, DistributedOptimizer) for part in _optimizer_parts(optimizer)):
        return {"distrib_optim_sharding_type": DISTRIBUTED_OPTIMIZER_FORMAT}
    return None


def _allocate_optimizer_state(optimizer) -> None:
    """A distributed optimizer that has not stepped yet has no Adam state to load into, and with
    torch's Adam (no TE/apex: CPU) its ``state_dict()`` fails on the missing ``step``. Megatron
    allocates the state with a zero-gradient step before loading (as its FSDP path does); the
    step's only effect, weight decay on the main params, is overwritten by the loaded state."""
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:  # TE/apex Adam: state_dict() copes with no state
        return
    for part in _optimizer_parts(optimizer):
        inner = getattr(part, "optimizer", None)
        if isinstance(part, distrib_optimizer.DistributedOptimizer) and inner is not None \
                and not inner.state:
            part._init_optimizer_states_with_dummy_values()


def _restore_adam_steps(optimizer) -> None:
    """Without TE/apex (CPU: torch's Adam), the distributed optimizer keeps Adam's iteration count
    in two places: the param groups' ``step`` (saved and restored by megatron) and a ``step`` tensor
    per parameter. The dp_reshardable load leaves the per-parameter tensors as the template had
    them, and megatron's own restore hands every parameter the *same* tensor, which torch's Adam
    would then increment once per parameter per step. Set each parameter's own ``step`` from its
    group's, so the bias correction continues where the saved run stopped."""
    for part in _optimizer_parts(optimizer):
        inner = getattr(part, "optimizer", None)
        for group in getattr(inner, "param_groups", []):
            if group.get("step") is None:
                continue
            for param in group["params"]:
                state = inner.state.get(param)
                step = state.get("step") if state else None
                if isinstance(step, torch.Tensor):
                    state["step"] = torch.full_like(step, float(group["step"]))


class NonFiniteWeightsError(RuntimeError):
    """The weights hold NaN/Inf: such a checkpoint is never written."""


def state_is_finite(model_state: dict) -> bool:
    """Collective: True when every rank's tensors in ``model_state`` (a sharded state dict) are
    all finite: one reduced flag."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    bad = torch.zeros(())

    def visit(value) -> None:
        nonlocal bad
        if isinstance(value, dict):
            for item in value.values():
                visit(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)
        elif isinstance(value, ShardedTensor) and value.data is not None \
                and value.data.is_floating_point():
            bad = bad.to(value.data.device)
            bad = torch.maximum(bad, (~torch.isfinite(value.data.detach()).all()).float())

    visit(model_state)
    if torch.cuda.is_available():
        bad = bad.cuda()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bool(bad.item() == 0)


def weights_are_finite(model_chunks: list) -> bool:
    """Collective: :func:`state_is_finite` of the model chunks' weights."""
    return state_is_finite(_model_state(model_chunks))


def _model_state(model_chunks) -> dict:
    return {f"chunk{i}": unwrap_model(chunk).sharded_state_dict() for i, chunk in enumerate(model_chunks)}


def save_checkpoint(
    root: Union[str, Path],
    iteration: Union[int, str],
    model_chunks: list,
    run_config: dict,
    *,
    optimizer=None,
    optimizer_metadata: Optional[dict] = None,
    common: Optional[dict] = None,
) -> Path:
    """Collective: every rank writes its shards. Returns the checkpoint directory.

    ``common`` holds small replicated state (iteration, consumed samples, scheduler) saved once.
    """
    from megatron.core import dist_checkpointing

    root = Path(root)
    final = checkpoint_dir(root, iteration)
    tmp = root / f".tmp-{final.name}"
    state: dict[str, Any] = {"model": _model_state(model_chunks)}
    if not state_is_finite(state["model"]):  # before any file: a NaN model is never saved
        raise NonFiniteWeightsError(f"not saving iteration {iteration} to {root}: the model "
                                    f"weights hold NaN/Inf values")
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a save that crashed
        tmp.mkdir()
    _barrier()
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(
            state["model"], is_loading=False, metadata=_optimizer_metadata(optimizer, optimizer_metadata))
    state["common"] = dict(common or {}, checkpoint_format_version=CHECKPOINT_FORMAT_VERSION,
                           has_optimizer=optimizer is not None)
    dist_checkpointing.save(state, str(tmp))
    _barrier()
    if _rank() == 0:
        atomic_write_text(tmp / RUN_CONFIG_FILE, yaml.safe_dump(run_config, sort_keys=False))
        previous = _displaced(final)
        if final.exists():
            # Re-saving an iteration that exists (a run resumed at its last iteration): keep the
            # old copy under a hidden name until the new one is in place, so no instant exists
            # at which the tracker points to nothing loadable (resolve_checkpoint falls back).
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(final, previous)
        os.replace(tmp, final)
        atomic_write_text(root / TRACKER_FILE, f"{iteration}\n")
        shutil.rmtree(previous, ignore_errors=True)
    _barrier()
    return final


@dataclasses.dataclass
class LoadedCheckpoint:
    directory: Path
    iteration: Union[int, str]
    run_config: dict
    common: dict
    loaded_optimizer: bool

    @property
    def is_release(self) -> bool:
        """A weights-only (converted) checkpoint: training starts fresh from it."""
        return self.iteration == RELEASE


def _vocab_requests(model_state: dict, checkpoint_vocab_rows: int) -> list:
    """Replace the model's vocab-row shards by whole-tensor requests with the checkpoint's
    padded row count (vocab padding is a multiple of 128 * TP, so it changes with TP)."""
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    replaced = []
    for chunk_name, chunk_state in model_state.items():
        for name, sharded in list(chunk_state.items()):
            if isinstance(sharded, ShardedTensor) and sharded.key in VOCAB_KEYS:
                buffer = torch.empty((checkpoint_vocab_rows,) + tuple(sharded.global_shape[1:]),
                                     dtype=sharded.data.dtype, device=sharded.data.device)
                # Every TP rank of the stage now asks for the whole tensor: exactly one request
                # stays the main replica (the model's own main replica on TP rank 0). Other
                # stages' copies (a tied output layer) keep their non-main replica ids.
                original = sharded.replica_id if isinstance(sharded.replica_id, tuple) \
                    else (sharded.replica_id,)
                chunk_state[name] = ShardedTensor.from_rank_offsets(
                    sharded.key, buffer, replica_id=(*original, tp_rank))
                replaced.append((chunk_name, name, sharded))
    return replaced


def load_checkpoint(
    path: Union[str, Path],
    model_chunks: list,
    *,
    optimizer=None,
    optimizer_metadata: Optional[dict] = None,
    load_optimizer: bool = True,
    padded_vocab_size: Optional[int] = None,
) -> Optional[LoadedCheckpoint]:
    """Load weights (and optimizer state when asked and present) into this rank's model chunks.

    Returns None when ``path`` holds no checkpoint yet. ``padded_vocab_size`` is the model's own
    (embedding rows); when the checkpoint was padded for another TP, rows are cut or zero-padded.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from megatron.core.dist_checkpointing.validation import StrictHandling

    directory = resolve_checkpoint(path)
    if directory is None:
        return None
    run_config = yaml.safe_load((directory / RUN_CONFIG_FILE).read_text()) \
        if (directory / RUN_CONFIG_FILE).exists() else {}
    common_state = dist_checkpointing.load_common_state_dict(str(directory))
    common = dict(common_state.get("common", {}))
    request: dict[str, Any] = {"model": _model_state(model_chunks)}
    replaced = []
    checkpoint_rows = run_config.get("padded_vocab_size")
    if padded_vocab_size is not None and checkpoint_rows and checkpoint_rows != padded_vocab_size:
        replaced = _vocab_requests(request["model"], int(checkpoint_rows))
    use_optimizer = (optimizer is not None and load_optimizer and common.get("has_optimizer")
                     and not replaced)
    if use_optimizer:
        _allocate_optimizer_state(optimizer)
        request["optimizer"] = optimizer.sharded_state_dict(
            request["model"], is_loading=True, metadata=_optimizer_metadata(optimizer, optimizer_metadata))
    try:
        # Requests the checkpoint cannot answer come back by name instead of failing inside torch
        # DCP: `_extra_state` (Transformer Engine's FP8 metadata: its norms and linear layers
        # have one, the local spec's do not) may be absent, anything else may not.
        loaded, _, not_in_checkpoint = dist_checkpointing.load(
            request, str(directory), strict=StrictHandling.RETURN_UNEXPECTED)
    except CheckpointingException as err:
        raise ValueError(f"{directory} does not fit the model being loaded (its run_config.yaml "
                         f"describes what it holds): {err}") from err
    absent = sorted(key for key in not_in_checkpoint if not key.endswith("_extra_state"))
    if absent:
        raise ValueError(f"{directory} does not fit the model being loaded (its run_config.yaml "
                         f"describes what it holds): the checkpoint has no {absent}")
    for chunk_name, name, sharded in replaced:
        rows = resize_vocab_rows(loaded["model"][chunk_name][name], sharded.global_shape[0])
        loaded["model"][chunk_name][name] = rows[sharded.global_slice()]
    for index, chunk in enumerate(model_chunks):
        # TE keeps FP8 metadata in `_extra_state`; a checkpoint from the other spec may lack it.
        result = unwrap_model(chunk).load_state_dict(loaded["model"][f"chunk{index}"], strict=False)
        problems = [key for key in result.missing_keys + result.unexpected_keys
                    if not key.endswith("_extra_state")]
        if problems:
            raise ValueError(f"{directory}: weights do not match the model: {sorted(problems)}")
    if use_optimizer:
        # fp32 params: the distributed optimizer's main params are views of the model's (leaf,
        # requires_grad) params, which megatron copies into in place.
        with torch.no_grad():
            optimizer.load_state_dict(loaded["optimizer"])
        _restore_adam_steps(optimizer)
    iteration = RELEASE if directory.name == RELEASE else int(directory.name.split("_")[-1])
    return LoadedCheckpoint(directory, iteration, run_config, common, bool(use_optimizer))
