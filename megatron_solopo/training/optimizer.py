"""Megatron-Core optimizer (Adam, optional distributed optimizer) and learning-rate schedule."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_solopo.config import JobConfig, warmup_iters


def optimizer_config(config: JobConfig):
    """Megatron ``OptimizerConfig`` from the ``optimizer`` section; precision fields follow the
    ``precision`` section so they are set in one place."""
    from megatron.core.optimizer import OptimizerConfig

    fields = dict(config.optimizer)
    fields.update(bf16=config.precision.bf16, fp16=False, params_dtype=config.precision.params_dtype)
    return OptimizerConfig(**fields)


def ddp_config(config: JobConfig):
    from megatron.core.distributed import DistributedDataParallelConfig

    fields = dict(config.ddp)
    fields["use_distributed_optimizer"] = bool(config.optimizer.get("use_distributed_optimizer", False))
    return DistributedDataParallelConfig(**fields)


def build_optimizer(config: JobConfig, model_chunks: list):
    """The optimizer and its parameter scheduler (steps counted in iterations)."""
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    opt_config = optimizer_config(config)
    optimizer = get_megatron_optimizer(opt_config, model_chunks)
    schedule = config.scheduler
    train_iters = config.training.train_iters
    decay_iters = schedule.lr_decay_iters or train_iters
    warmup = warmup_iters(config)  # < decay_iters: validated with the config
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warmup > 0 else opt_config.lr,
        max_lr=opt_config.lr,
        min_lr=opt_config.min_lr if opt_config.min_lr is not None else 0.0,
        lr_warmup_steps=warmup,
        lr_decay_steps=decay_iters,
        lr_decay_style=schedule.lr_decay_style,
        start_wd=opt_config.weight_decay,
        end_wd=opt_config.weight_decay,
        wd_incr_steps=decay_iters,
        wd_incr_style="constant",
        # On resume the config's schedule wins (the trainer prints what differs from the
        # checkpoint's); megatron-core's default would silently keep the checkpoint's.
        override_opt_param_scheduler=True,
        use_checkpoint_opt_param_scheduler=False,
    )
    return optimizer, scheduler


def grads_are_finite(model_chunks: list, extra_bad: bool = False) -> bool:
    """True when every rank's gradient buffers are finite and no rank reports ``extra_bad`` (e.g.
    a non-finite loss on the last stage): one scalar all-reduce over the world.

    Checked before the optimizer step so that a NaN/Inf step is skipped instead of written into
    the weights (bf16 has no loss scaler to catch it)."""
    bad = torch.tensor(float(extra_bad))
    for chunk in model_chunks:
        for buffer in getattr(chunk, "buffers", []):
            bad = bad.to(buffer.grad_data.device)
            bad = torch.maximum(bad, (~torch.isfinite(buffer.grad_data).all()).float())
    if torch.cuda.is_available():
        bad = bad.cuda()
    if dist.is_initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bool(bad.item() == 0)


def current_lr(optimizer) -> float:
    groups = [group for group in optimizer.param_groups if group.get("params")]
    return float((groups or optimizer.param_groups)[0]["lr"])

