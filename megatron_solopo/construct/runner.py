"""Resumable, sharded execution of a construction pipeline (LongPO or SoLoPO).

The inputs of one run are numbered in file order; shard ``I`` of ``K`` takes inputs ``i`` with
``i % K == I`` and processes them in blocks of ``block_size``. A block is committed atomically:

1. its records are appended to ``<output>.work/shard-I-of-K.jsonl`` and flushed to disk;
2. one line ``{"block", "ids", "offset", "stats"}`` is appended to ``shard-I-of-K.done.jsonl``
   (``offset``: the shard file's size after the block).

A run started again with the same settings reads the done file, cuts the shard file back to the
last committed offset (records of a block that was interrupted before step 2 are discarded) and
skips the committed blocks, so a kill at any moment loses no record and duplicates none; blocks
are fixed by the input order, so the resumed output is identical to an uninterrupted one. When
every shard is complete, the last one to finish merges the shards in input order into
``<output>`` (temporary name, then renamed), writes the summary next to it and removes the work
directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import heapq
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

from megatron_solopo.construct.text import Counts
from megatron_solopo.generation import GenerationRequest
from megatron_solopo.generation.base import ProgressMeter


# ----------------------------------------------------------------------------------------------
# Shards
# ----------------------------------------------------------------------------------------------
def shard_from_env(num_shards: Optional[int], shard_index: Optional[int]) -> tuple[int, int]:
    """``--num-shards/--shard-index``, else the launcher's ranks (torchrun's WORLD_SIZE/RANK,
    Slurm's SLURM_NTASKS/SLURM_PROCID), else one shard."""
    if num_shards is None and shard_index is None:
        for size_var, rank_var in (("WORLD_SIZE", "RANK"), ("SLURM_NTASKS", "SLURM_PROCID")):
            if os.environ.get(size_var) and os.environ.get(rank_var):
                num_shards, shard_index = int(os.environ[size_var]), int(os.environ[rank_var])
                break
        else:
            num_shards, shard_index = 1, 0
    if num_shards is None or shard_index is None:
        raise ValueError("give both --num-shards and --shard-index (or neither)")
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ValueError(f"--shard-index {shard_index} is not in [0, --num-shards {num_shards})")
    return num_shards, shard_index


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Stats:
    """What a block (and, summed, a run) cost and dropped."""

    inputs: int = 0
    records: int = 0
    model_calls: int = 0  # generation requests
    samples: int = 0  # answers generated (a request with n samples gives n)
    prompt_tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    dropped: Counts = dataclasses.field(default_factory=Counts)
    sums: Counts = dataclasses.field(default_factory=Counts)  # pipeline extras, e.g. ratios

    def add(self, other: "Stats") -> None:
        for field in ("inputs", "records", "model_calls", "samples", "prompt_tokens",
                      "generated_tokens", "seconds"):
            setattr(self, field, getattr(self, field) + getattr(other, field))
        self.dropped.update(other.dropped)
        self.sums.update(other.sums)

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["dropped"], out["sums"] = dict(self.dropped), dict(self.sums)
        return out

    @classmethod
    def from_json(cls, data: dict) -> "Stats":
        data = dict(data)
        dropped, sums = Counts(data.pop("dropped", {})), Counts(data.pop("sums", {}))
        return cls(**data, dropped=dropped, sums=sums)


class CountingGenerator:
    """Forwards to a generator and counts calls and tokens into ``stats``."""

    def __init__(self, generator):
        self.generator = generator
        self.stats = Stats()

    def generate(self, requests: list, desc: str, backend=None) -> list:
        """``backend`` (default: the run's generator) answers; the cost is counted either way."""
        if not requests:
            return []
        completions = (backend or self.generator).generate(requests, desc=desc)
        self.stats.model_calls += len(requests)
        self.stats.samples += sum(r.params.n for r in requests)
        self.stats.prompt_tokens += sum(c.num_prompt_tokens for c in completions)
        self.stats.generated_tokens += sum(c.num_generated_tokens for c in completions)
        return completions

    def count_tokens(self, text: str) -> int:
        return self.generator.count_tokens(text)


def user_message(text: str) -> list:
    return [{"role": "user", "content": text}]


def request(text: str, params, key: str) -> GenerationRequest:
    return GenerationRequest(user_message(text), params, key)


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------
class Pipeline:
    """What the runner needs from a pipeline (construct/longpo.py, construct/solopo.py)."""

    name = "pipeline"

    def settings(self) -> dict:
        """Everything the output depends on (a resumed run must have the same)."""
        raise NotImplementedError

    def items(self) -> Iterator[tuple]:
        """``(index, item id, item)`` for every input, in order (the inputs were validated)."""
        raise NotImplementedError

    def process(self, block: list, generator: CountingGenerator, stats: Stats) -> list:
        """Records ``[(index, record dict)]`` of a block of items; drops counted in ``stats``."""
        raise NotImplementedError

    def describe(self, stats: Stats) -> dict:
        """Pipeline-specific summary fields from the summed stats."""
        return {}

    def num_inputs(self) -> int:
        """Inputs of all shards (known once the inputs were checked)."""
        return self.inputs.num_items


def summary_path(output: Path) -> Path:
    stem = output.name[:-len(".jsonl")] if output.name.endswith(".jsonl") else output.name
    return output.with_name(stem + ".summary.json")


class Runner:
    def __init__(self, pipeline: Pipeline, output: str, *, num_shards: int = 1, shard_index: int = 0,
                 block_size: int = 16, generation: Optional[dict] = None, log=print,
                 progress: bool = False):
        if block_size < 1:
            raise ValueError(f"--block-size must be >= 1, got {block_size}")
        self.pipeline = pipeline
        self.output = Path(output)
        self.num_shards, self.shard_index, self.block_size = num_shards, shard_index, block_size
        self.log, self.progress = log, progress
        self.work = self.output.with_name(self.output.name + ".work")
        tag = f"shard-{shard_index:05d}-of-{num_shards:05d}"
        self.shard_file = self.work / f"{tag}.jsonl"
        self.done_file = self.work / f"{tag}.done.jsonl"
        self.complete_file = self.work / f"{tag}.complete.json"
        settings = dict(pipeline.settings(), num_shards=num_shards, block_size=block_size,
                        generation=generation or {})
        self.settings = settings
        self.fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()

    # -- entry point --------------------------------------------------------------------------
    def run(self, generator_factory) -> dict:
        """Process this shard (building the generator only if work is left) and merge when every
        shard is complete; returns the summary (the run's, or this shard's while others run)."""
        finished = self._finished_summary()
        if finished is not None:
            self.log(f"{self.output} is already complete (same settings); nothing to do")
            return finished
        created = self._prepare_work_dir()
        try:
            committed, stats = self._resume()
            if not self.complete_file.exists():
                stats = self._process(committed, stats, generator_factory)
                _write_json_atomic(self.complete_file, {"stats": stats.to_json()})
        except BaseException:
            # A run that fails before committing anything (no model, bad flag) leaves no trace.
            if created and not (self.done_file.exists() and self.done_file.stat().st_size):
                for path in reversed(created):
                    shutil.rmtree(path, ignore_errors=True)
            raise
        return self._merge_if_complete(stats)

    def _finished_summary(self) -> Optional[dict]:
        summary_file = summary_path(self.output)
        if not self.output.exists():
            return None
        try:
            summary = json.loads(summary_file.read_text())
        except (OSError, json.JSONDecodeError):
            summary = None
        if summary is None or summary.get("settings_sha256") != self.fingerprint:
            raise ValueError(f"--output {self.output} exists and was not written by this command "
                             f"with these settings; remove it or choose another --output")
        return summary

    def _prepare_work_dir(self) -> list:
        """Directories this call created (outermost first)."""
        created = [p for p in reversed(self.work.parents) if not p.exists()]
        if not self.work.exists():
            created.append(self.work)
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(exist_ok=True)
        settings_file = self.work / "settings.json"
        if settings_file.exists():
            previous = json.loads(settings_file.read_text())
            if previous.get("sha256") != self.fingerprint:
                changed = sorted(k for k in set(previous.get("settings", {})) | set(self.settings)
                                 if previous.get("settings", {}).get(k) != self.settings.get(k))
                raise ValueError(
                    f"{self.work} holds an interrupted run with other settings (changed: "
                    f"{', '.join(changed) or 'unknown'}); run the same command to resume it, or "
                    f"remove {self.work} to start over")
        else:
            _write_json_atomic(settings_file, {"sha256": self.fingerprint,
                                               "settings": self.settings})
        return created

    def _resume(self) -> tuple[set, Stats]:
        """Committed blocks and their summed stats; the shard file cut to the last commit."""
        committed, stats, offset = set(), Stats(), 0
        if self.done_file.exists():
            with open(self.done_file, "rb") as handle:
                lines = handle.read().split(b"\n")
            good = 0
            for raw in lines:
                try:
                    entry = json.loads(raw)
                except json.JSONDecodeError:
                    break  # a line cut by a kill: that block was not committed
                committed.add(entry["block"])
                stats.add(Stats.from_json(entry["stats"]))
                offset = entry["offset"]
                good += len(raw) + 1
            with open(self.done_file, "r+b") as handle:
                handle.truncate(min(good, os.path.getsize(self.done_file)))
                if good > os.path.getsize(self.done_file):  # a commit cut just before its newline
                    handle.seek(0, os.SEEK_END)
                    handle.write(b"\n")
        if self.shard_file.exists() and os.path.getsize(self.shard_file) != offset:
            with open(self.shard_file, "r+b") as handle:
                handle.truncate(offset)
        if committed:
            self.log(f"resuming {self.output} shard {self.shard_index}/{self.num_shards}: "
                     f"{len(committed)} block(s) done, {stats.records} record(s) kept")
        return committed, stats

    def _blocks(self) -> Iterator[tuple[int, list]]:
        block, number = [], 0
        for index, item_id, item in self.pipeline.items():
            if index % self.num_shards != self.shard_index:
                continue
            block.append((index, item_id, item))
            if len(block) == self.block_size:
                yield number, block
                block, number = [], number + 1
        if block:
            yield number, block

    def _process(self, committed: set, stats: Stats, generator_factory) -> Stats:
        generator = meter = None
        total = len(range(self.shard_index, self.pipeline.num_inputs(), self.num_shards))
        with open(self.shard_file, "ab") as shard, open(self.done_file, "ab") as done, \
                contextlib.ExitStack() as stack:
            for number, block in self._blocks():
                if number in committed:
                    continue
                if generator is None:
                    generator = CountingGenerator(generator_factory())
                    # The run's bar (once the model is loaded): inputs of this shard, ETA, and
                    # the rates of the model calls.
                    meter = stack.enter_context(contextlib.closing(ProgressMeter(
                        total, f"{self.pipeline.name} shard {self.shard_index}", self.progress,
                        unit="input", leave=True)))
                    meter.bar.update(stats.inputs)
                start = time.perf_counter()
                generator.stats = block_stats = Stats(inputs=len(block))
                records = self.pipeline.process(block, generator, block_stats)
                block_stats.records = len(records)
                block_stats.seconds = time.perf_counter() - start
                payload = b"".join(json.dumps({"i": index, "record": record},
                                              ensure_ascii=False).encode() + b"\n"
                                   for index, record in records)
                shard.write(payload)
                shard.flush()
                os.fsync(shard.fileno())
                self._commit(done, {"block": number, "ids": [item_id for _, item_id, _ in block],
                                    "offset": shard.tell(), "stats": block_stats.to_json()})
                stats.add(block_stats)
                meter.update(len(block), block_stats.generated_tokens,
                             num_prompts=block_stats.model_calls)
        if generator is not None:
            close = getattr(generator.generator, "close", None)
            if close:
                close()
        return stats

    @staticmethod
    def _commit(done, entry: dict) -> None:
        done.write(json.dumps(entry).encode() + b"\n")
        done.flush()
        os.fsync(done.fileno())

    # -- merge --------------------------------------------------------------------------------
    def _merge_if_complete(self, shard_stats: Stats) -> dict:
        with open(self.work / "merge.lock", "w") as lock:
            # Each shard marks itself complete before taking the lock, so the last one to take
            # it sees every mark.
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.output.exists():
                return json.loads(summary_path(self.output).read_text())
            tags = [f"shard-{i:05d}-of-{self.num_shards:05d}" for i in range(self.num_shards)]
            missing = [t for t in tags if not (self.work / f"{t}.complete.json").exists()]
            if missing:
                summary = self._summary(shard_stats, partial=True)
                self.log(f"shard {self.shard_index}/{self.num_shards} complete; waiting for "
                         f"{len(missing)} other shard(s) (the last one writes {self.output})")
                return summary
            total = Stats()
            for tag in tags:
                total.add(Stats.from_json(json.loads(
                    (self.work / f"{tag}.complete.json").read_text())["stats"]))
            tmp = self.output.with_name(f"{self.output.name}.tmp{os.getpid()}")
            try:
                with open(tmp, "wb") as out:
                    for _, line in heapq.merge(*(_shard_lines(self.work / f"{t}.jsonl")
                                                 for t in tags)):
                        out.write(line)
                    out.flush()
                    os.fsync(out.fileno())
                summary = self._summary(total, partial=False)
                _write_json_atomic(summary_path(self.output), summary)
                os.replace(tmp, self.output)
            finally:
                if tmp.exists():
                    tmp.unlink()
        shutil.rmtree(self.work, ignore_errors=True)
        return summary

    def _summary(self, stats: Stats, partial: bool) -> dict:
        per_record = max(stats.records, 1)
        summary = {
            "pipeline": self.pipeline.name,
            "output": str(self.output),
            "complete": not partial,
            "shards": self.num_shards,
            **({"shard_index": self.shard_index} if partial else {}),
            "inputs_read": stats.inputs,
            "records_written": stats.records,
            "dropped": dict(sorted(stats.dropped.items())),
            "model_calls": stats.model_calls,
            "samples": stats.samples,
            "prompt_tokens": stats.prompt_tokens,
            "generated_tokens": stats.generated_tokens,
            "seconds": round(stats.seconds, 3),
            "per_kept_record": {
                "model_calls": round(stats.model_calls / per_record, 3),
                "generated_tokens": round(stats.generated_tokens / per_record, 1),
                "prompt_tokens": round(stats.prompt_tokens / per_record, 1)},
            **self.pipeline.describe(stats),
            "settings_sha256": self.fingerprint,
        }
        return summary


def _shard_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    if not path.exists():
        return
    with open(path, "rb") as handle:
        for raw in handle:
            entry = json.loads(raw)
            yield entry["i"], json.dumps(entry["record"], ensure_ascii=False).encode() + b"\n"


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=1)
        handle.write("\n")
    os.replace(tmp, path)


def format_summary(summary: dict) -> str:
    """The lines a run prints."""
    dropped = ", ".join(f"{reason} {count:,}" for reason, count in summary["dropped"].items())
    per = summary["per_kept_record"]
    what = "done" if summary["complete"] else f"shard {summary.get('shard_index')} done"
    lines = [
        f"{what}: inputs read {summary['inputs_read']:,}, records written "
        f"{summary['records_written']:,} -> {summary['output']}",
        f"dropped: {dropped or 'none'}",
        f"model calls {summary['model_calls']:,} ({summary['samples']:,} samples), prompt tokens "
        f"{summary['prompt_tokens']:,}, generated tokens {summary['generated_tokens']:,}, "
        f"{summary['seconds']:.1f} s",
        f"per kept record: {per['model_calls']:.2f} model calls, {per['generated_tokens']:,.0f} "
        f"generated tokens, {per['prompt_tokens']:,.0f} prompt tokens",
    ]
    extra = {k: v for k, v in summary.items() if k in ("compression_ratio", "turns_per_record")}
    if extra:
        lines.append(", ".join(f"{k} {v}" for k, v in extra.items()))
    return "\n".join(lines)


def log_stderr(message: str) -> None:
    print(message, file=sys.stderr)
