"""The trainer: SoLoPO / LongPO / DPO on packed preference groups with Megatron-Core.

``Trainer(config).setup()`` builds everything (process groups, model, optimizer, data, reference,
writers); ``train()`` runs the loop and returns a summary. One step reads top to bottom: this
rank's micro-batches -> reference log-probs (live mode) -> forward/backward through Megatron's
schedule -> finite check -> optimizer step (clips) -> scheduler -> metrics.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Optional

import torch
import torch.distributed as dist
import yaml

from megatron_solopo.config import (JobConfig, reference_checkpoint, reference_mode,
                                    resolved_objective)
from megatron_solopo.model.config import build_transformer_config
from megatron_solopo.model.setup_checks import check_fp8_data_parallel
from megatron_solopo.objectives import ObjectiveInputs, RoleLogps
from megatron_solopo.training import checkpoint as ckpt
from megatron_solopo.training import metrics as metrics_lib
from megatron_solopo.training.model_setup import resolve_model_config, starting_checkpoint
from megatron_solopo.training.batches import (MicroBatchBuilder, StepData,
                                              check_groups_per_rank, cycle, group_role_values,
                                              logprob_positions, min_micro_batches,
                                              reference_tensor, use_shared_prefix)
from megatron_solopo.training.optimizer import build_optimizer, current_lr, ddp_config, grads_are_finite
from megatron_solopo.training.step import forward_backward

logger = logging.getLogger("megatron_solopo")


class TrainingStopped(RuntimeError):
    """Training cannot go on (diverged: NaN/Inf); the message says what was (not) saved."""


@dataclasses.dataclass
class StepResult:
    metrics: dict  # global-batch means (objective metrics and "loss"); empty off the last stage
    grad_norm: Optional[float]
    skipped: bool
    num_tokens: int
    flops: float
    elapsed: float


class Trainer:
    def __init__(self, config: JobConfig):
        self.config = config
        self.objective = resolved_objective(config)
        self.reference_mode = reference_mode(config)
        self.iteration = 0
        self.consumed_samples = 0
        self.num_skipped = 0
        self.num_nan = 0
        self.history: list[dict] = []  # per-iteration metrics on the logging rank
        self.start_time = time.time()  # for training.exit_duration_minutes
        self.last_saved: Optional[str] = None  # the newest checkpoint this run wrote
        self._log_window = self._new_log_window()  # what the next log line averages

    # ------------------------------------------------------------------------------------------
    # Set-up
    # ------------------------------------------------------------------------------------------
    def setup(self) -> "Trainer":
        from megatron.core import parallel_state

        from megatron_solopo.data.dataset import PreferenceDataset
        from megatron_solopo.data.packing import pad_multiple_for
        from megatron_solopo.data.sampler import PreferenceSampler
        from megatron_solopo.model.build import build_model
        from megatron_solopo.parallel.distributed import initialize_distributed
        from megatron_solopo.training.model_setup import wrap_model

        config = self.config
        self.load_path, self.start_checkpoint = starting_checkpoint(config)
        self.train_set = PreferenceDataset(config.data.train_prefix)
        self.valid_set = PreferenceDataset(config.data.valid_prefix) if config.data.valid_prefix else None
        needed = set(self.objective.policy_roles)
        if self.reference_mode == "live":
            needed |= set(self.objective.reference_roles)
        for dataset in (self.train_set, self.valid_set):
            if dataset is not None:
                dataset.check_roles(sorted(needed, key=lambda role: role.index))
        if self.valid_set is not None and len(self.valid_set) < config.training.global_batch_size:
            raise ValueError(f"data.valid_prefix {config.data.valid_prefix} has {len(self.valid_set)} "
                             f"records, fewer than one global batch (training.global_batch_size="
                             f"{config.training.global_batch_size}): evaluation runs whole global "
                             f"batches")
        self.model_config = resolve_model_config(
            config, self.start_checkpoint, self.train_set, start_path=self.load_path,
            datasets=(self.valid_set,) if self.valid_set is not None else ())
        if config.checkpoint.save:
            ckpt.check_writable(config.checkpoint.save, "checkpoint.save")
        self.env = initialize_distributed(config.parallel, model=self.model_config,
                                          seed=config.training.seed)
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        check_groups_per_rank(config, self.dp_size)
        check_fp8_data_parallel(config.precision, self.dp_size)
        self.world_size = dist.get_world_size()
        self.is_logging_rank = dist.get_rank() == self.world_size - 1  # last PP stage
        self.padded_vocab_size = self.model_config.padded_vocab_size(
            config.parallel.tensor_model_parallel_size)
        self.transformer_config = build_transformer_config(
            self.model_config, config.parallel, config.precision, variable_seq_lengths=True)
        chunks = build_model(self.model_config, self.transformer_config,
                             padded_vocab_size=self.padded_vocab_size)
        self.model = wrap_model(chunks, self.transformer_config, ddp_config(config))
        self.optimizer, self.scheduler = build_optimizer(config, self.model)
        self._load_starting_point()

        pad_multiple = pad_multiple_for(config.parallel.context_parallel_size,
                                        config.parallel.tensor_model_parallel_size,
                                        config.parallel.sequence_parallel,
                                    fp8=config.precision.fp8 is not None)
        self.pad_multiple = pad_multiple
        self.builder = self._builder(self.train_set, self.objective.policy_roles)
        self.sampler = PreferenceSampler(
            len(self.train_set), config.training.global_batch_size, self.dp_rank, self.dp_size,
            seed=config.training.seed, consumed_samples=self.consumed_samples,
            shuffle=config.data.shuffle)
        self.batches = cycle(self.sampler)
        self._setup_reference()
        # Built once (each checks its dataset against the micro-batch budget): (policy, live
        # reference or None) for the validation split.
        self.valid_builders = (None, None) if self.valid_set is None else (
            self._builder(self.valid_set, self.objective.policy_roles),
            self._builder(self.valid_set, self.objective.reference_roles)
            if self.reference_model is not None else None)
        self.run_config = self._run_config()
        self.writers = metrics_lib.MetricWriters(
            config.logging.tensorboard_dir, config.logging.wandb_project,
            config.logging.wandb_exp_name, self.run_config, self.is_logging_rank,
            config.logging.metrics_jsonl)
        if dist.get_rank() == 0 and config.training.eval_interval and self.valid_set is None:
            print("[megatron-solopo] training.eval_interval is set but data.valid_prefix is not: "
                  "no evaluation", flush=True)
        if dist.get_rank() == 0 and config.reference.mode not in ("auto", self.reference_mode):
            print(f"[megatron-solopo] reference.mode={config.reference.mode} ignored: objective "
                  f"{self.objective.name} needs no reference log-probs", flush=True)
        if dist.get_rank() == 0:
            print("[megatron-solopo] resolved config:\n" + yaml.safe_dump(self.run_config, sort_keys=False),
                  flush=True)
            print(f"[megatron-solopo] {config.parallel.describe(self.world_size)} | objective "
                  f"{self.objective.name} | reference {self.reference_mode} | shared-prefix "
                  f"packing {'on' if self.builder.shared_prefix else 'off'} | parameters "
                  f"{self.model_config.num_parameters(self.padded_vocab_size):,} | starting at "
                  f"iteration {self.iteration}, consumed samples {self.consumed_samples}", flush=True)
        return self

    def _builder(self, dataset, roles) -> MicroBatchBuilder:
        return MicroBatchBuilder(
            dataset, roles, token_budget=self.config.data.max_tokens_per_micro_batch,
            pad_multiple=self.pad_multiple, pad_token_id=int(dataset.metadata["pad_id"]),
            fixed_length=self.config.data.fixed_length_micro_batches,
            min_micro_batches=min_micro_batches(self.config.parallel),
            shared_prefix=use_shared_prefix(self.config, self.model_config.attention_backend))

    def _load_starting_point(self) -> None:
        config = self.config
        if not self.load_path:
            return
        loaded = ckpt.load_checkpoint(
            self.load_path, self.model, optimizer=self.optimizer,
            load_optimizer=config.checkpoint.load_optimizer and self._same_layout(),
            padded_vocab_size=self.padded_vocab_size)
        if loaded is None:
            return  # an empty save directory on the first run of a requeued job
        if loaded.is_release:
            return  # weights only: a fresh run from them
        common = loaded.common
        self.iteration = int(common["iteration"])
        self.consumed_samples = int(common["consumed_samples"])
        self.num_skipped = int(common.get("num_skipped", 0))
        self.num_nan = int(common.get("num_nan", 0))
        self._report_schedule_changes(common["scheduler"])
        self._report_data_order_changes()
        self.scheduler.load_state_dict(common["scheduler"])
        if not loaded.loaded_optimizer and dist.get_rank() == 0:
            print("[megatron-solopo] resumed weights, iteration and schedule; optimizer state was "
                  "not restored (parallel layout changed or checkpoint.load_optimizer=false)",
                  flush=True)

    def _report_data_order_changes(self) -> None:
        """The sampler resumes at ``consumed_samples`` of a permutation drawn from the seed: with
        another seed or shuffle setting the rest of the current epoch repeats some records and
        skips others. Allowed (a deliberate change), but said."""
        saved = self.start_checkpoint
        changed = []
        for section, key in (("training", "seed"), ("data", "shuffle"),
                             ("training", "global_batch_size")):
            before = (saved.get(section) or {}).get(key)
            now = getattr(getattr(self.config, section), key)
            if before is not None and before != now:
                changed.append(f"{section}.{key} {before} -> {now}")
        if changed and dist.get_rank() == 0:
            print(f"[megatron-solopo] warning: resuming with {', '.join(changed)}: the data order "
                  f"of the current epoch changes (some records repeat, others are skipped until "
                  f"the next epoch)", flush=True)

    def _report_schedule_changes(self, saved: dict) -> None:
        """A resumed run follows the config's LR/WD schedule (e.g. a raised train_iters extends
        the decay); say so when it differs from the schedule the checkpoint was trained with."""
        current = self.scheduler.state_dict()
        keys = ("max_lr", "min_lr", "lr_warmup_steps", "lr_decay_steps", "lr_decay_style",
                "start_wd", "end_wd", "wd_incr_steps", "wd_incr_style")
        changed = [f"{key} {saved[key]} -> {current[key]}" for key in keys
                   if key in saved and key in current and saved[key] != current[key]]
        if changed and dist.get_rank() == 0:
            print(f"[megatron-solopo] the schedule differs from the checkpoint's; following the "
                  f"config: {', '.join(changed)}", flush=True)

    def _same_layout(self) -> bool:
        saved = self.start_checkpoint.get("layout")
        return saved is None or saved == self._layout()

    def _layout(self) -> dict:
        parallel = dataclasses.asdict(self.config.parallel)
        parallel.pop("distributed_timeout_minutes")
        return dict(parallel, world_size=self.world_size,
                    use_distributed_optimizer=bool(self.config.optimizer.get("use_distributed_optimizer")))

    def _setup_reference(self) -> None:
        from megatron_solopo.training.reference import cache_to_read, checkpoint_fingerprint

        self.reference_values = None
        self.valid_reference_values = None
        self.reference_model = None
        if self.reference_mode == "none":
            return
        checkpoint = reference_checkpoint(self.config)
        if checkpoint is None and (self.reference_mode == "precomputed" or self.iteration > 0):
            raise ValueError(
                f"reference.mode={self.reference_mode} needs the reference model's checkpoint: set "
                f"reference.checkpoint (checkpoint.load is unset or is the save directory, which "
                f"holds the trained model once the run has saved)")
        if self.reference_mode == "precomputed":
            fingerprint = checkpoint_fingerprint(checkpoint)
            self.reference_values = self._load_cache(
                cache_to_read(self.config, self.config.data.train_prefix),
                self.train_set, fingerprint)
            if self.valid_set is not None:
                self.valid_reference_values = self._load_cache(
                    cache_to_read(self.config, self.config.data.valid_prefix),
                    self.valid_set, fingerprint)
            return
        self.reference_model = self._build_live_reference(checkpoint)
        self.reference_builder = self._builder(self.train_set, self.objective.reference_roles)

    def _load_cache(self, path: str, dataset, fingerprint: str) -> dict:
        from megatron_solopo.training.reference import ReferenceCache

        cache = ReferenceCache.load(path)
        cache.check(fingerprint=fingerprint, dataset_metadata=dataset.metadata,
                    roles=self.objective.reference_roles, path=path)
        return cache.lookup()

    def _build_live_reference(self, reference_checkpoint: Optional[str]) -> list:
        """A frozen copy of the starting model (reference.model_overrides applied)."""
        from megatron_solopo.training.reference import build_frozen_model

        model = dataclasses.replace(self.model_config, **self.config.reference.model_overrides)
        return build_frozen_model(model, self.config.parallel, self.config.precision,
                                  checkpoint=reference_checkpoint,
                                  padded_vocab_size=self.padded_vocab_size, init_from=self.model)

    def _run_config(self) -> dict:
        run_config = self.config.to_dict()
        run_config["model"] = dataclasses.asdict(self.model_config)
        run_config["padded_vocab_size"] = self.padded_vocab_size
        run_config["layout"] = self._layout()
        if self.start_checkpoint.get("hf"):  # keeps megatron-to-hf faithful to the source config
            run_config["hf"] = self.start_checkpoint["hf"]
        run_config["dataset"] = {key: self.train_set.metadata.get(key)
                                 for key in ("tokenizer", "vocab_size", "source_hash", "num_records")}
        # The tokenizer the run really used (the config may leave it to the starting checkpoint):
        # later runs check their data against it, megatron-to-hf copies its files.
        run_config["tokenizer"] = self._resolved_tokenizer()
        return run_config

    def _resolved_tokenizer(self) -> dict:
        import os

        from megatron_solopo.training.model_setup import run_tokenizer

        described = self.train_set.metadata["tokenizer"]
        path = run_tokenizer(self.config, self.start_checkpoint, self.load_path)
        if path is None and described.get("model") and os.path.exists(described["model"]):
            path = described["model"]  # what the dataset was made with
        return {"tokenizer_type": described["type"],
                "tokenizer_model": os.path.abspath(path) if path else ""}

    # ------------------------------------------------------------------------------------------
    # The objective inside Megatron's schedule
    # ------------------------------------------------------------------------------------------
    def _loss_fn(self, num_groups: int, reference_values: Optional[dict]):
        objective = self.objective

        def loss_fn(batch, sums):
            policy = {}
            for role in objective.policy_roles:
                policy[role] = RoleLogps(
                    logps=group_role_values(sums.response_logps, batch, role),
                    num_tokens=group_role_values(sums.response_tokens, batch, role),
                    sequence_logps=group_role_values(sums.target_logps, batch, role),
                    sequence_num_tokens=group_role_values(sums.target_tokens, batch, role))
            reference = {}
            if objective.needs_reference:
                device = sums.response_logps.device
                reference = {role: reference_tensor(reference_values, batch, role).to(device)
                             for role in objective.reference_roles}
            loss, metrics = objective(ObjectiveInputs(policy=policy, reference=reference,
                                                      num_groups=float(num_groups)))
            metrics = dict(metrics)
            metrics.setdefault("loss", loss.detach())
            return loss, metrics

        return loss_fn

    def _live_reference_values(self, indices, builder=None) -> dict:
        """Reference log-probs of this step's groups from the frozen model (forward only). They
        exist on the last pipeline stage, which is where the policy's loss is computed too.
        ``builder``: another dataset's (evaluation); default the training set's."""
        from megatron_solopo.training.reference import compute_reference_logps

        return compute_reference_logps(
            self.reference_model, builder or self.reference_builder, indices,
            self.objective.reference_roles,
            vocab_size=self.model_config.vocab_size,
            logprob_chunk_size=self.config.training.logprob_chunk_size, batch_size=len(indices))

    # ------------------------------------------------------------------------------------------
    # The step
    # ------------------------------------------------------------------------------------------
    def train_step(self) -> StepResult:

        config = self.config
        start = time.perf_counter()
        indices = next(self.batches)
        step = self.builder.build(indices, config.training.global_batch_size)
        reference_values = self.reference_values
        if self.reference_model is not None:
            reference_values = self._live_reference_values(indices)
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        whole = self.objective.sequence_logps_roles
        outputs = forward_backward(
            self.model, step.micro_batches, self._loss_fn(step.num_groups, reference_values),
            vocab_size=self.model_config.vocab_size,
            logprob_mask_fn=lambda batch: logprob_positions(batch, whole),
            logprob_chunk_size=config.training.logprob_chunk_size)
        metrics = self._reduce_metrics(outputs)
        loss_finite = all(math.isfinite(v) for v in metrics.values())
        finite = grads_are_finite(self.model, extra_bad=not loss_finite)
        grad_norm = None
        if finite:
            success, grad_norm, _ = self.optimizer.step()
            finite = bool(success) and (grad_norm is None or math.isfinite(grad_norm))
        if finite:
            self.scheduler.step(increment=1)
        self.iteration += 1
        self.consumed_samples += config.training.global_batch_size
        elapsed = time.perf_counter() - start
        flops = self._step_flops(step)
        return StepResult(metrics, grad_norm, not finite, step.num_tokens, flops, elapsed)

    def _step_flops(self, step: StepData) -> float:
        """Model FLOPs of this rank's micro-batches: forward + backward (3x forward), plus the live
        reference's forward."""
        total = 0.0
        whole = self.objective.sequence_logps_roles
        for batch in step.micro_batches:
            lengths = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).tolist()
            positions = int(logprob_positions(batch, whole).sum())
            bounds = batch.branch_bounds.tolist() if batch.shared else None
            total += 3 * metrics_lib.forward_flops(self.model_config, lengths, positions,
                                                   self.padded_vocab_size, bounds)
        if self.reference_model is not None:
            total *= 4 / 3  # roughly: one more forward of comparable size
        return total

    def _reduce_metrics(self, outputs: list) -> dict:
        """Sum micro-batch metrics (each is already a share of the global mean), then sum over
        data-parallel ranks only: CP and TP ranks hold identical copies."""
        from megatron.core import parallel_state

        names = sorted({name for output in outputs for name in output})
        if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            return {}
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
        values = torch.stack([sum(output[name].float().to(device) for output in outputs)
                              for name in names]) if names else torch.zeros(0, device=device)
        if self.dp_size > 1:
            dist.all_reduce(values, group=parallel_state.get_data_parallel_group())
        return dict(zip(names, values.tolist()))

    # ------------------------------------------------------------------------------------------
    # Evaluation, checkpoints, the loop
    # ------------------------------------------------------------------------------------------
    def evaluate(self) -> dict:
        """Objective metrics on ``data.valid_prefix`` (forward only), prefixed ``eval/``."""
        from megatron_solopo.data.sampler import PreferenceSampler

        if self.valid_set is None:
            return {}
        config = self.config
        sampler = PreferenceSampler(len(self.valid_set), config.training.global_batch_size,
                                    self.dp_rank, self.dp_size, seed=config.training.seed,
                                    consumed_samples=0, shuffle=False)
        builder, reference_builder = self.valid_builders
        whole = self.objective.sequence_logps_roles
        totals: dict = {}
        for index, indices in zip(range(config.training.eval_iters), sampler):
            step = builder.build(indices, config.training.global_batch_size)
            values = self.valid_reference_values
            if reference_builder is not None:
                values = self._live_reference_values(indices, reference_builder)
            with torch.no_grad():
                outputs = forward_backward(
                    self.model, step.micro_batches, self._loss_fn(step.num_groups, values),
                    vocab_size=self.model_config.vocab_size, forward_only=True,
                    # As in training: the LM head only where the objective reads a log-prob.
                    logprob_mask_fn=lambda batch: logprob_positions(batch, whole),
                    logprob_chunk_size=config.training.logprob_chunk_size)
            for name, value in self._reduce_metrics(outputs).items():
                totals[name] = totals.get(name, 0.0) + value / config.training.eval_iters
        return {f"eval/{name}": value for name, value in totals.items()}

    def save(self) -> Optional[str]:
        """Save this iteration (collective); refuses weights that are not all finite."""
        if not self.config.checkpoint.save:
            return None
        for chunk in self.model:
            if chunk.ddp_config.use_distributed_optimizer and chunk.ddp_config.overlap_param_gather:
                # The last step's updated shards reach the model's parameters at the next
                # forward; gather them now so the checkpoint holds the stepped weights (as
                # Megatron-LM's disable_forward_pre_hook(param_sync=True) does before a save).
                chunk.start_param_sync(force_sync=True)
        common = {"iteration": self.iteration, "consumed_samples": self.consumed_samples,
                  "scheduler": self.scheduler.state_dict(), "num_skipped": self.num_skipped,
                  "num_nan": self.num_nan}
        try:
            path = ckpt.save_checkpoint(self.config.checkpoint.save, self.iteration, self.model,
                                        self.run_config, optimizer=self.optimizer, common=common)
        except ckpt.NonFiniteWeightsError as err:
            raise TrainingStopped(f"{err}; {self._last_checkpoint_note()}") from None
        self.last_saved = str(path)
        if dist.get_rank() == 0:
            print(f"[megatron-solopo] saved checkpoint {path}", flush=True)
        return self.last_saved

    def _last_checkpoint_note(self) -> str:
        if self.last_saved:
            return f"the last checkpoint this run saved is {self.last_saved}"
        if self.load_path:
            return f"this run saved no checkpoint; it started from {self.load_path}"
        return "this run saved no checkpoint"

    def train(self) -> dict:
        from megatron_solopo.training.signals import StopConditions

        config = self.config
        first_step = True
        consecutive_skips = 0
        start_iteration = saved_iteration = self.iteration
        stopped = None
        if self.iteration >= config.training.train_iters and dist.get_rank() == 0:
            print(f"[megatron-solopo] nothing to train: the checkpoint is at iteration "
                  f"{self.iteration}, training.train_iters={config.training.train_iters}",
                  flush=True)
        stop = StopConditions(config.training.exit_duration_minutes, self.start_time)
        try:
            while self.iteration < config.training.train_iters:
                result = self.train_step()
                if result.skipped:
                    self.num_skipped += 1
                    self.num_nan += 1
                    consecutive_skips += 1
                    if consecutive_skips >= config.training.max_consecutive_skipped_steps:
                        raise TrainingStopped(
                            f"{consecutive_skips} consecutive steps had a NaN/Inf loss or gradient "
                            f"(iteration {self.iteration}); stopping without saving. Lower the "
                            f"learning rate or check the data; {self._last_checkpoint_note()}")
                else:
                    consecutive_skips = 0
                self._log(result, first_step)
                first_step = False
                if (config.training.eval_interval and self.iteration % config.training.eval_interval == 0
                        and self.valid_set is not None):
                    self._log_eval(self.evaluate())
                if (config.checkpoint.save_interval and self.iteration % config.checkpoint.save_interval == 0
                        and self.iteration < config.training.train_iters):
                    self.save()
                    saved_iteration = self.iteration
                if stop.should_stop():  # every rank: the step in flight is done
                    stopped = stop.local_reason() or "another rank received a signal or reached " \
                                                     "training.exit_duration_minutes"
                    break
            if self.iteration > saved_iteration:
                self.save()  # still under the handler: a signal now does not cut the save short
        finally:
            stop.release()
        if stopped and dist.get_rank() == 0:
            where = (f"saved iteration {self.iteration} in {config.checkpoint.save}; the same "
                     f"command resumes it" if config.checkpoint.save else
                     "checkpoint.save is not set: nothing saved")
            print(f"[megatron-solopo] {stopped}: stopped after iteration {self.iteration}, "
                  f"{where}", flush=True)
        self.writers.close()
        return {"iterations": self.iteration, "history": self.history,
                "num_skipped": self.num_skipped, "stopped": stopped,
                "start_iteration": start_iteration}

    def print_summary(self, summary: dict) -> None:
        """The run's last lines (logging rank): what was trained, where it is, what next."""
        if not self.is_logging_rank:
            return
        config = self.config
        steps = [row for row in summary["history"] if not row.get("eval")]
        lines = [f"[megatron-solopo] summary: iterations {summary['start_iteration']} -> "
                 f"{summary['iterations']} of {config.training.train_iters}"
                 + (f" ({summary['stopped']})" if summary["stopped"] else "")
                 + f", skipped (NaN/Inf) {summary['num_skipped']}, wall time "
                 f"{time.time() - self.start_time:.0f} s"]
        if steps and "loss" in steps[0] and "loss" in steps[-1]:
            lines.append(f"  loss {steps[0]['loss']:.4f} (iteration {steps[0]['iteration']}) -> "
                         f"{steps[-1]['loss']:.4f} (iteration {steps[-1]['iteration']})")
        if self.last_saved:
            lines.append(f"  checkpoint: {self.last_saved}")
            lines.append(f"  next: python tools/convert_checkpoint.py megatron-to-hf --megatron-dir "
                         f"{config.checkpoint.save} --output <new HF directory>")
        elif not config.checkpoint.save:
            lines.append("  checkpoint: none (checkpoint.save is not set)")
        print("\n".join(lines), flush=True)

    def _log(self, result: StepResult, first_step: bool) -> None:
        config = self.config
        values = dict(result.metrics)
        per_gpu_tflops = result.flops / max(result.elapsed, 1e-9) / 1e12
        tokens_per_sec = result.num_tokens / max(result.elapsed, 1e-9)
        if not self.is_logging_rank:
            return
        record = dict(values, iteration=self.iteration, lr=current_lr(self.optimizer),
                      grad_norm=result.grad_norm, skipped=result.skipped)
        self.history.append(record)
        scalars = {f"train/{name}": value for name, value in values.items()}
        scalars.update({"train/learning_rate": record["lr"],
                        "train/grad_norm": result.grad_norm if result.grad_norm is not None else math.nan,
                        "train/throughput_tflops_per_gpu": per_gpu_tflops,
                        "train/tokens_per_sec_per_gpu": tokens_per_sec})
        self.writers.write(scalars, self.iteration)
        window = self._log_window
        window["iterations"] += 1
        window["elapsed"] += result.elapsed
        window["tokens"] += result.num_tokens
        window["flops"] += result.flops
        window["skipped"] += int(result.skipped)
        if not result.skipped:
            for name, value in values.items():
                window["sums"][name] = window["sums"].get(name, 0.0) + value
            window["good"] += 1
        if self.iteration % config.logging.log_interval == 0 or first_step:
            # Megatron's line: averages over the iterations since the last line (metrics over the
            # steps that were not skipped), counts of skipped/NaN iterations in that window.
            iterations = window["iterations"]
            elapsed = window["elapsed"] / iterations
            interval_tflops = window["flops"] / max(window["elapsed"], 1e-9) / 1e12
            interval_tokens = window["tokens"] / max(window["elapsed"], 1e-9)
            averaged = {name: total / max(window["good"], 1) for name, total in window["sums"].items()}
            fields = [
                f"consumed samples: {self.consumed_samples:12d}",
                f"elapsed time per iteration (ms): {elapsed * 1000:.1f}",
                # CPU runs are far below 0.1 TFLOP/s: keep significant digits there.
                "throughput per GPU (TFLOP/s/GPU): "
                + (f"{interval_tflops:.1f}" if interval_tflops >= 1 else f"{interval_tflops:.3g}"),
                f"tokens/s/GPU: {interval_tokens:.1f}",
                f"learning rate: {record['lr']:.6E}",
                f"global batch size: {config.training.global_batch_size:5d}",
            ]
            # Megatron's order: the loss first, then our preference metrics.
            ordered = sorted(averaged, key=lambda name: (name != "loss", name))
            fields += [f"{name}: {averaged[name]:.6E}" for name in ordered]
            fields += [f"loss scale: {1.0:.1f}",
                       f"grad norm: {result.grad_norm:.3f}" if result.grad_norm is not None
                       else "grad norm: nan",
                       f"number of skipped iterations: {window['skipped']:3d}",
                       f"number of nan iterations: {window['skipped']:3d}"]
            print(f" iteration {self.iteration:8d}/{config.training.train_iters:8d} | "
                  + " | ".join(fields) + " |", flush=True)
            self._log_window = self._new_log_window()
        if first_step:
            print(metrics_lib.memory_line(), flush=True)

    @staticmethod
    def _new_log_window() -> dict:
        return {"iterations": 0, "good": 0, "elapsed": 0.0, "tokens": 0, "flops": 0.0,
                "skipped": 0, "sums": {}}

    def _log_eval(self, values: dict) -> None:
        if not self.is_logging_rank or not values:
            return
        self.writers.write(values, self.iteration)
        self.history.append(dict(values, iteration=self.iteration, eval=True))
        print(" validation at iteration {:d} | ".format(self.iteration)
              + " | ".join(f"{name}: {value:.6E}" for name, value in values.items()) + " |",
              flush=True)

    def close(self) -> None:
        from megatron_solopo.parallel.distributed import destroy_distributed

        destroy_distributed()
