"""Run configuration: typed dataclasses, YAML plus dotted overrides, validation before any collective.

A run is one YAML file (``examples/*.yaml``) with one section per dataclass below; any field can be
overridden on the command line as ``section.field=value`` (the value is parsed as YAML, so
``training.train_iters=100`` is an int and ``objective.base=simpo`` a string). Every default lives
here, once. Megatron-Core's own dataclasses are reused rather than re-declared: the ``optimizer``
and ``ddp`` sections take any field of ``OptimizerConfig`` and ``DistributedDataParallelConfig``,
and ``model.transformer_overrides`` any field of ``TransformerConfig``.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from megatron_solopo.model.config import ModelConfig, PrecisionConfig
from megatron_solopo.parallel.layout import ParallelConfig


@dataclasses.dataclass
class TokenizerConfig:
    tokenizer_type: str = "SentencePieceTokenizer"
    """``HuggingFaceTokenizer`` or ``SentencePieceTokenizer`` (Megatron's names)."""

    tokenizer_model: str = ""
    """Tokenizer directory (HF) or ``.model`` file (SentencePiece). Must be the dataset's."""


@dataclasses.dataclass
class DataConfig:
    train_prefix: str = ""
    """Preprocessed training set: ``<prefix>.bin``/``.idx``/``.json`` (tools/preprocess_data.py)."""

    valid_prefix: Optional[str] = None
    """Held-out set for periodic evaluation (same format); None = no evaluation."""

    max_tokens_per_micro_batch: int = 16384
    """Token budget of one packed micro-batch after padding; whole preference groups only."""

    fixed_length_micro_batches: bool = False
    """Pad every micro-batch to the budget: fixed pipeline shapes (required by the interleaved
    schedule on gloo; useful for CUDA graphs)."""

    shuffle: bool = True
    """Shuffle records each epoch (deterministic from ``training.seed`` and the epoch)."""

    shared_prefix: bool = True
    """Pack a group's chosen and rejected sequences of one context as ``[prefix | chosen |
    rejected]``, the common prefix (the context) computed once (docs/data.md "Shared-prefix
    packing"); log-probs, loss and gradients are the same as without. Applies with the
    ``reference`` and ``flex`` attention backends, and with Transformer Engine without context
    parallelism; elsewhere packing stays unshared (same results). ``false`` turns it off
    (comparison, fallback)."""


@dataclasses.dataclass
class ReferenceConfig:
    mode: Literal["auto", "precomputed", "live", "none"] = "auto"
    """Where reference log-probs come from. ``auto``: ``precomputed`` when the objective needs a
    reference, else ``none``. ``live`` runs a frozen copy of the starting model in the job."""

    cache: Optional[str] = None
    """Precomputed cache of the training set (tools/precompute_reference.py); default
    ``<data.train_prefix>.reference-<key>.npz``, keyed by the reference checkpoint and
    ``model_overrides`` (objectives sharing a reference share the file, merged per role)."""

    checkpoint: Optional[str] = None
    """The frozen reference model; default ``checkpoint.load`` (the starting point), unless that is
    ``checkpoint.save`` (which holds the trained model once the run has saved)."""

    model_overrides: dict = dataclasses.field(default_factory=dict)
    """ModelConfig fields that differ for the reference (LongPO: its original ``rotary_base``
    when the policy's RoPE base is raised)."""


@dataclasses.dataclass
class TrainingConfig:
    train_iters: int = 100
    """Optimizer steps."""

    global_batch_size: int = 8
    """Preference groups per step, over all data-parallel ranks."""

    seed: int = 1234
    """Seed for initialization and data order."""

    eval_interval: int = 0
    """Evaluate on ``data.valid_prefix`` every N steps (0 = never)."""

    eval_iters: int = 1
    """Global batches per evaluation."""

    max_consecutive_skipped_steps: int = 5
    """Stop when this many steps in a row had a NaN/Inf loss or gradient (each is skipped)."""

    logprob_chunk_size: int = 4096
    """Positions per chunk of the LM head when computing log-probs (bounds [chunk, V/TP] logits)."""

    exit_duration_minutes: Optional[float] = None
    """Wall-clock limit: after the first step that ends past this many minutes since start, save
    and exit 0 (set it below the job's time limit, leaving time for one step and one save).
    SIGTERM/SIGINT do the same at any time. None = no limit."""


@dataclasses.dataclass
class SchedulerConfig:
    lr_warmup_fraction: Optional[float] = None
    """Warm-up as a fraction of the decay steps (``lr_decay_iters``, default ``training.train_iters``;
    wins over ``lr_warmup_iters``)."""

    lr_warmup_iters: int = 0
    """Linear warm-up steps from 0 to ``optimizer.lr``."""

    lr_decay_style: Literal["cosine", "constant", "linear"] = "cosine"
    """Decay after warm-up, to ``optimizer.min_lr`` at ``lr_decay_iters``."""

    lr_decay_iters: Optional[int] = None
    """Default ``training.train_iters``."""


@dataclasses.dataclass
class CheckpointConfig:
    save: Optional[str] = None
    """Directory to save to (Megatron layout); None = no checkpoints. If it already holds a
    checkpoint, the run resumes from it (requeued jobs) and ``load`` is not read."""

    load: Optional[str] = None
    """Starting point: a converted/released weights-only checkpoint (fresh run from those
    weights), or a checkpoint of this trainer (resumes it). Also the default reference model."""

    save_interval: int = 0
    """Save every N steps (0 = only at the end)."""

    load_optimizer: bool = True
    """Restore optimizer state when resuming under the same layout (weights always load)."""


@dataclasses.dataclass
class LoggingConfig:
    log_interval: int = 1
    """Print Megatron's per-iteration line every N steps."""

    tensorboard_dir: Optional[str] = None
    """TensorBoard event files (written by the last global rank, which is on the last pipeline
    stage)."""

    wandb_project: Optional[str] = None
    """Weights & Biases project; used when wandb is installed."""

    wandb_exp_name: Optional[str] = None
    """W&B run name."""

    metrics_jsonl: Optional[str] = None
    """Append one JSON object per iteration (and evaluation) to this file: the same values as
    the log line, for scripts that should not parse logs."""


# Sections that are our dataclasses, and sections that are Megatron-Core's (kept as dicts here and
# turned into OptimizerConfig / DistributedDataParallelConfig where the job is built).
_SECTIONS = {
    "model": ModelConfig,
    "parallel": ParallelConfig,
    "precision": PrecisionConfig,
    "tokenizer": TokenizerConfig,
    "data": DataConfig,
    "reference": ReferenceConfig,
    "training": TrainingConfig,
    "scheduler": SchedulerConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
}
_DICT_SECTIONS = ("objective", "optimizer", "ddp")


@dataclasses.dataclass
class JobConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    precision: PrecisionConfig = dataclasses.field(default_factory=PrecisionConfig)
    tokenizer: TokenizerConfig = dataclasses.field(default_factory=TokenizerConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    reference: ReferenceConfig = dataclasses.field(default_factory=ReferenceConfig)
    training: TrainingConfig = dataclasses.field(default_factory=TrainingConfig)
    scheduler: SchedulerConfig = dataclasses.field(default_factory=SchedulerConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    objective: dict = dataclasses.field(default_factory=lambda: {"name": "solopo", "base": "dpo"})
    """``name`` plus the objective's hyper-parameters (docs/objectives.md)."""
    optimizer: dict = dataclasses.field(default_factory=lambda: {"lr": 5e-7, "min_lr": 0.0,
                                                                 "weight_decay": 0.0,
                                                                 "clip_grad": 1.0})
    """Megatron-Core ``OptimizerConfig`` fields (``bf16``/``params_dtype`` follow ``precision``)."""
    ddp: dict = dataclasses.field(default_factory=lambda: {"grad_reduce_in_fp32": True})
    """Megatron-Core ``DistributedDataParallelConfig`` fields (``use_distributed_optimizer``
    follows ``optimizer``)."""

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))


def _plain(value: Any) -> Any:
    """YAML-safe copy (tuples as lists)."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def _check_type(where: str, value: Any, annotation: Any) -> Any:
    """Coerce ints to floats where a float is declared; reject other mismatches by name."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        errors = []
        for option in args:
            if option is type(None):
                continue
            try:
                return _check_type(where, value, option)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{where}={value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        # YAML 1.1 reads "1e7" (no dot, no sign) as a string.
        try:
            return float(value)
        except ValueError:
            pass
    if annotation is int and isinstance(value, (str, float)) and not isinstance(value, bool):
        # "4e7" (a string to YAML 1.1) or 4.0e7 for an integer field: fine when integral.
        try:
            number = float(value)
        except ValueError:
            number = None
        if number is not None and number.is_integer():
            return int(number)
    if annotation in (int, float, str, bool):
        if not isinstance(value, annotation) or (annotation is int and isinstance(value, bool)):
            raise ValueError(f"{where}={value!r} should be of type {annotation.__name__}")
        return value
    if annotation is dict or origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where} should be a mapping, got {value!r}")
        return value
    return value


def _build_section(name: str, cls: type, values: dict):
    if not isinstance(values, dict):
        raise ValueError(f"config section {name!r} should be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(f'{name}.{u}' for u in unknown)}; valid "
                         f"fields of {name}: {', '.join(sorted(fields))}")
    checked = {key: _check_type(f"{name}.{key}", value, hints[key]) for key, value in values.items()}
    return cls(**checked)


def config_from_dict(raw: dict) -> JobConfig:
    """Build and validate a JobConfig from a nested dict (YAML content)."""
    raw = dict(raw or {})
    unknown = sorted(set(raw) - set(_SECTIONS) - set(_DICT_SECTIONS))
    if unknown:
        raise ValueError(f"unknown config section(s) {unknown}; valid sections: "
                         f"{', '.join(list(_SECTIONS) + list(_DICT_SECTIONS))}")
    defaults = JobConfig()
    sections = {name: _build_section(name, cls, raw.get(name, {}) or {})
                for name, cls in _SECTIONS.items()}
    dicts = {}
    for name in _DICT_SECTIONS:
        value = raw.get(name)
        if value is not None and not isinstance(value, dict):
            raise ValueError(f"config section {name!r} should be a mapping, got {value!r}")
        merged = dict(getattr(defaults, name))
        if name == "objective" and value:
            merged = {}  # an objective section replaces the default objective entirely
        merged.update(value or {})
        dicts[name] = merged
    config = JobConfig(**sections, **dicts)
    # Model fields the user set: the rest may come from the starting checkpoint's run_config.yaml.
    config.explicit_model_fields = sorted((raw.get("model") or {}).keys())
    validate_config(config)
    return config


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ValueError(f"override {item!r} is not of the form section.field=value")
    key, text = item.split("=", 1)
    path = key.strip().split(".")
    if len(path) < 2 or not all(path):
        raise ValueError(f"override {item!r}: the key must be section.field (e.g. "
                         f"training.train_iters=10)")
    return path, yaml.safe_load(text) if text.strip() else None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    raw = dict(raw)
    for item in overrides:
        path, value = parse_override(item)
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            node[part] = dict(child) if isinstance(child, dict) else {}
            node = node[part]
        node[path[-1]] = value
    return raw


def load_config(path: Optional[str], overrides: tuple[str, ...] = ()) -> JobConfig:
    """Read ``path`` (YAML), apply ``section.field=value`` overrides, validate."""
    raw: dict = {}
    if path:
        file = Path(path)
        if not file.exists():
            raise ValueError(f"config file {path} does not exist")
        try:
            raw = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: invalid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: the top level should be a mapping of sections")
    try:
        return config_from_dict(apply_overrides(raw, list(overrides)))
    except ValueError as err:
        culprit = _failing_override(raw, list(overrides), str(err))
        if culprit is not None:
            raise ValueError(f"command-line override {culprit}: {err}") from None
        raise ValueError(f"{path or 'config'}: {err}") from None


def _failing_override(raw: dict, overrides: list[str], message: str) -> Optional[str]:
    """The first override whose addition makes the config fail with ``message`` (None when the
    file alone already does): an error caused on the command line is not blamed on the file."""
    def error(items: list[str]) -> Optional[str]:
        try:
            config_from_dict(apply_overrides(raw, items))
        except ValueError as err:
            return str(err)
        return None

    if not overrides or error([]) == message:
        return None
    for count in range(1, len(overrides) + 1):
        if error(overrides[:count]) == message:
            return overrides[count - 1]
    return None


def warmup_iters(config: JobConfig) -> int:
    """Warm-up steps: ``lr_warmup_fraction`` of the decay steps when set, else ``lr_warmup_iters``."""
    schedule = config.scheduler
    decay = schedule.lr_decay_iters or config.training.train_iters
    if schedule.lr_warmup_fraction is not None:
        return int(round(schedule.lr_warmup_fraction * decay))
    return schedule.lr_warmup_iters


def validate_config(config: JobConfig) -> None:
    """Cross-section checks; field-level checks live in each dataclass."""
    from megatron_solopo.objectives import build_objective

    training, data = config.training, config.data
    _check_reference_overrides(config.reference.model_overrides)
    if training.train_iters < 1:
        raise ValueError(f"training.train_iters must be >= 1, got {training.train_iters}")
    if training.exit_duration_minutes is not None and not training.exit_duration_minutes > 0:
        raise ValueError(f"training.exit_duration_minutes must be > 0 (or null), got "
                         f"{training.exit_duration_minutes}")
    if training.global_batch_size < 1:
        raise ValueError(f"training.global_batch_size must be >= 1, got {training.global_batch_size}")
    if data.max_tokens_per_micro_batch < 1:
        raise ValueError("data.max_tokens_per_micro_batch must be >= 1")
    if config.logging.log_interval < 1:
        raise ValueError("logging.log_interval must be >= 1")
    if config.scheduler.lr_warmup_fraction is not None and not 0 <= config.scheduler.lr_warmup_fraction <= 1:
        raise ValueError("scheduler.lr_warmup_fraction must be in [0, 1]")
    decay = config.scheduler.lr_decay_iters or training.train_iters
    warmup = warmup_iters(config)
    if warmup >= decay:
        raise ValueError(f"scheduler warm-up ({warmup} steps) must be shorter than the decay "
                         f"({decay} steps: scheduler.lr_decay_iters, default training.train_iters)")
    if "name" not in config.objective:
        raise ValueError("objective.name is required (e.g. solopo, longpo, dpo)")
    objective_args = {k: v for k, v in config.objective.items() if k != "name"}
    objective = build_objective(config.objective["name"], **objective_args)  # raises on bad names
    if objective.needs_reference and config.reference.mode == "none":
        raise ValueError(f"objective {config.objective['name']!r} needs reference log-probs; "
                         f"reference.mode=none is only for reference-free objectives")
    for name in ("optimizer", "ddp"):
        _check_megatron_fields(name, getattr(config, name))
    _check_optimizer_numbers(config.optimizer)
    if config.parallel.virtual_pipeline_model_parallel_size and not data.fixed_length_micro_batches:
        import torch

        if not torch.cuda.is_available():
            raise ValueError("the interleaved pipeline schedule on CPU (gloo) needs "
                             "data.fixed_length_micro_batches=true")


def _check_reference_overrides(values: dict) -> None:
    """``reference.model_overrides``: ModelConfig fields (checked like the model section) that do
    not change the weights' shapes (the reference loads the same checkpoint)."""
    from megatron_solopo.model.config import ModelConfig
    from megatron_solopo.training.model_setup import SHAPE_FIELDS

    if not isinstance(values, dict):
        raise ValueError(f"reference.model_overrides should be a mapping, got {values!r}")
    hints = typing.get_type_hints(ModelConfig)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(f'reference.model_overrides.{u}' for u in unknown)}"
                         f"; valid: model fields ({', '.join(sorted(hints))})")
    shaped = sorted(set(values) & set(SHAPE_FIELDS))
    if shaped:
        raise ValueError(f"reference.model_overrides cannot change {shaped}: the reference loads "
                         f"the same weights (override e.g. rotary_base or rope_scaling)")
    for key, value in values.items():
        values[key] = _check_type(f"reference.model_overrides.{key}", value, hints[key])


# Optimizer numbers and the range each must lie in: (low, low inclusive, high, high inclusive).
# A non-finite or negative learning rate turns the weights into NaN at the first step; torch's own
# "Invalid learning rate" names no config field.
_OPTIMIZER_RANGES = {
    "lr": (0.0, True, None, False),
    "min_lr": (0.0, True, None, False),
    "weight_decay": (0.0, True, None, False),
    "clip_grad": (0.0, True, None, False),
    "adam_beta1": (0.0, True, 1.0, False),
    "adam_beta2": (0.0, True, 1.0, False),
    "adam_eps": (0.0, False, None, False),
    "sgd_momentum": (0.0, True, 1.0, False),
}


def _check_optimizer_numbers(values: dict) -> None:
    """The optimizer's numbers are finite and in range, refused by field name at set-up."""
    import math

    for key, (low, low_ok, high, high_ok) in _OPTIMIZER_RANGES.items():
        value = values.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"optimizer.{key}={value!r} must be a finite number")
        too_low = value < low or (value == low and not low_ok)
        too_high = high is not None and (value > high or (value == high and not high_ok))
        if too_low or too_high:
            interval = (("[" if low_ok else "(") + f"{low:g}, "
                        + (f"{high:g}" + ("]" if high_ok else ")") if high is not None else "inf)"))
            raise ValueError(f"optimizer.{key}={value!r} is out of range: it must lie in {interval}")
    if values.get("min_lr") is not None and values.get("lr") is not None \
            and values["min_lr"] > values["lr"]:
        raise ValueError(f"optimizer.min_lr={values['min_lr']!r} is above optimizer.lr="
                         f"{values['lr']!r}: the schedule decays from lr to min_lr")


def _check_megatron_fields(section: str, values: dict) -> None:
    if section == "optimizer":
        from megatron.core.optimizer import OptimizerConfig as cls
    else:
        from megatron.core.distributed import DistributedDataParallelConfig as cls
    values.update(coerce_megatron_fields(section, values, cls))


def coerce_megatron_fields(where: str, values: dict, cls: type) -> dict:
    """``values`` checked against the fields of Megatron-Core dataclass ``cls``: unknown names
    are refused by name, and values are coerced to the declared scalar types the way our own
    sections are (``lr: 1e-3`` is a string to YAML 1.1, and to a command-line override)."""
    valid = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise ValueError(f"unknown {where} field(s) {unknown}: the {where} section takes "
                         f"Megatron-Core {cls.__name__} fields")
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # a forward reference megatron does not resolve: check nothing
        hints = {}
    return {key: _check_type(f"{where}.{key}", value, hints[key]) if key in hints else value
            for key, value in values.items()}


def resolved_objective(config: JobConfig):
    from megatron_solopo.objectives import build_objective

    return build_objective(config.objective["name"],
                           **{k: v for k, v in config.objective.items() if k != "name"})


def load_is_save(config: JobConfig) -> bool:
    """``checkpoint.load`` names the save directory itself (a job configured to resume from where
    it saves): then it is not a fixed starting point."""
    import os

    load, save = config.checkpoint.load, config.checkpoint.save
    return bool(load and save and os.path.realpath(load) == os.path.realpath(save))


def reference_checkpoint(config: JobConfig) -> Optional[str]:
    """The frozen reference model's checkpoint: ``reference.checkpoint``, else ``checkpoint.load``
    (the starting point), except when that is the save directory: after the first save it holds
    the *trained* model, so the reference must be named explicitly. None: no checkpoint (a live
    reference then copies the freshly initialized model)."""
    if config.reference.checkpoint:
        return config.reference.checkpoint
    if load_is_save(config):
        return None
    return config.checkpoint.load or None


def reference_mode(config: JobConfig) -> str:
    """``precomputed``, ``live`` or ``none``: ``auto`` resolved, and always ``none`` for a
    reference-free objective (SimPO, ORPO, SFT, SoLoPO on those), whatever the config says: the
    shipped examples set ``precomputed`` for their DPO-style objectives, and switching the
    objective alone must not leave a run waiting for a cache nobody can compute."""
    if not resolved_objective(config).needs_reference:
        return "none"
    if config.reference.mode != "auto":
        return config.reference.mode
    return "precomputed"
