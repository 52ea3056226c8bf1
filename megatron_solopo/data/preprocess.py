"""JSONL preference records -> Megatron indexed dataset (tools/preprocess_data.py is the CLI).

Two passes over the input:

1. validation (one process): every line is parsed and checked, ids must be unique; by default a
   single bad line stops the run here, before any output exists, and every bad line (up to
   ``max_errors``) is reported with file, line, record id and field;
2. tokenization (``workers`` processes, results consumed in input order so the output does not
   depend on the number of workers), written as it arrives.

Outputs (layout in data/dataset.py) are written under temporary names in the output directory
and renamed at the end, the sidecar last; a failed run leaves nothing behind.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from megatron_solopo.data.dataset import (DATA_SUFFIXES, FORMAT_NAME, FORMAT_VERSION,
                                          SIDECAR_SUFFIX, SPANS_SUFFIX)
from megatron_solopo.data.encoding import OVERLONG_POLICIES, LengthLimits, encode_record
from megatron_solopo.data.schema import RecordError, parse_record
from megatron_solopo.data.tokenizers import build_tokenizer
from megatron_solopo.roles import ALL_ROLES, Role

__all__ = ["OVERLONG_POLICIES", "LengthLimits", "PreprocessSummary", "Validation", "preprocess",
           "validate_inputs"]

# Lines per task sent to a worker, and the raw bytes at which a task is cut short: big enough to
# amortize inter-process traffic, small enough to keep memory flat on 128K-token records.
_CHUNK_RECORDS = 64
_CHUNK_BYTES = 8 << 20


# ----------------------------------------------------------------------------------------------
# Pass 1: validation
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Validation:
    num_records: int  # non-blank lines
    invalid: dict  # {(file index, line number): [error message, ...]} for every bad line
    errors: list  # list[RecordError], the first max_errors
    sources: list  # [{"path", "sha256", "records"}] per input file

    @property
    def num_invalid(self) -> int:
        return len(self.invalid)


def _lines(handle) -> Iterator[tuple[int, bytes]]:
    """(line number, line without its newline) for the non-blank lines of a binary file."""
    for number, raw in enumerate(handle, start=1):
        if raw.strip():
            yield number, raw.rstrip(b"\r\n")


def validate_inputs(paths: Sequence[str], max_errors: int = 20) -> Validation:
    """Pass 1: every line of every file; ids must be unique across the files."""
    for path in paths:
        if not Path(path).is_file():
            raise ValueError(f"--input {path}: file not found")
    invalid: dict = {}
    errors: list[RecordError] = []
    first_seen: dict[str, tuple[str, int]] = {}
    sources, num_records = [], 0
    for file_index, path in enumerate(paths):
        digest, count = hashlib.sha256(), 0
        with open(path, "rb") as handle:
            for number, raw in enumerate(handle, start=1):
                digest.update(raw)
                if not raw.strip():
                    continue
                count += 1
                record, record_errors = parse_record(raw.rstrip(b"\r\n"), path, number)
                if record is not None:
                    if record.id in first_seen:
                        earlier = first_seen[record.id]
                        record_errors = [RecordError(path, number, record.id, "id", f"duplicate id "
                                                     f"(first at {earlier[0]}:{earlier[1]})")]
                    else:
                        first_seen[record.id] = (path, number)
                if record_errors:
                    invalid[(file_index, number)] = [str(e) for e in record_errors]
                    errors.extend(record_errors[:max(0, max_errors - len(errors))])
        sources.append({"path": os.path.abspath(path), "sha256": digest.hexdigest(),
                        "records": count})
        num_records += count
    return Validation(num_records, invalid, errors, sources)


def _invalid_input_message(validation: Validation, paths: Sequence[str]) -> str:
    shown = "\n  ".join(str(error) for error in validation.errors)
    more = validation.num_invalid - len({(e.path, e.line) for e in validation.errors})
    tail = f"\n  ... and {more} more invalid record(s) (raise --max-errors to see them)" if more > 0 else ""
    return (f"{validation.num_invalid} invalid record(s) in {', '.join(paths)}; nothing was "
            f"written (fix them, or use --skip-invalid to write them to a rejects file and go "
            f"on):\n  {shown}{tail}")


# ----------------------------------------------------------------------------------------------
# Pass 2: tokenization in worker processes
# ----------------------------------------------------------------------------------------------
_WORKER: dict = {}  # per process: the tokenizer, roles and limits


def _init_worker(tokenizer_type: str, tokenizer_model: str, roles, limits) -> None:
    _WORKER.update(tokenizer=build_tokenizer(tokenizer_type, tokenizer_model), roles=roles,
                   limits=limits)


def _encode_chunk(chunk: list) -> list:
    """Tokenize ``[(path, line, raw)]``; numpy arrays keep the trip back to the writer cheap."""
    results = []
    for path, line, raw in chunk:
        record, errors = parse_record(raw, path, line)
        assert record is not None, errors  # pass 1 let only valid lines through
        try:
            encoded = encode_record(_WORKER["tokenizer"], record, _WORKER["roles"], _WORKER["limits"])
        except ValueError as err:
            raise ValueError(f"{path}:{line}: {err}") from None
        sequences = encoded.sequences
        results.append({
            "record_id": encoded.record_id,
            "dropped": encoded.dropped,
            "truncated": encoded.truncated,
            "multi_turn": record.is_multi_turn,
            "tokens": (np.concatenate([np.asarray(s.tokens, dtype=np.int32) for s in sequences])
                       if sequences else np.zeros(0, dtype=np.int32)),
            "lengths": [len(s.tokens) for s in sequences],
            "roles": [s.role.index for s in sequences],
            "spans": np.asarray([b for s in sequences for span in s.spans for b in span],
                                dtype=np.int32),
            "span_lengths": [2 * len(s.spans) for s in sequences],
        })
    return results


def _chunks(paths: Sequence[str], invalid: dict) -> Iterator[list]:
    chunk, size = [], 0
    for file_index, path in enumerate(paths):
        with open(path, "rb") as handle:
            for number, raw in _lines(handle):
                if (file_index, number) in invalid:
                    continue
                chunk.append((path, number, raw))
                size += len(raw)
                if len(chunk) >= _CHUNK_RECORDS or size >= _CHUNK_BYTES:
                    yield chunk
                    chunk, size = [], 0
    if chunk:
        yield chunk


def _encoded(paths, invalid, init_args, workers: int) -> Iterator[list]:
    """Encoded chunks in input order; at most a few chunks per worker in flight (flat memory)."""
    if workers <= 1:
        _init_worker(*init_args)
        for chunk in _chunks(paths, invalid):
            yield _encode_chunk(chunk)
        return
    # spawn, not fork: the parent may hold torch/OpenMP threads, which do not survive a fork.
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_init_worker, initargs=init_args) as pool:
        pending: collections.deque = collections.deque()
        for chunk in _chunks(paths, invalid):
            pending.append(pool.apply_async(_encode_chunk, (chunk,)))
            if len(pending) >= 3 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# ----------------------------------------------------------------------------------------------
# The whole run
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class PreprocessSummary:
    records_read: int
    records_written: int
    records_rejected: int  # invalid lines (only with skip_invalid; otherwise the run stops)
    records_dropped: int  # over the length limit with --overlong drop, or beyond any fix
    records_without_roles: int  # none of the --roles requested
    records_truncated: dict  # {"short": n, "long": n} records whose context was cut
    num_sequences: int
    num_tokens: int
    seconds: float
    output_prefix: str

    @property
    def tokens_per_second(self) -> float:
        return self.num_tokens / max(self.seconds, 1e-9)

    def __str__(self) -> str:
        return (f"records read {self.records_read:,}, written {self.records_written:,}, rejected "
                f"{self.records_rejected:,}, dropped {self.records_dropped:,} (overlong) + "
                f"{self.records_without_roles:,} (no requested role); truncated contexts: short "
                f"{self.records_truncated['short']:,}, long {self.records_truncated['long']:,}; "
                f"{self.num_sequences:,} sequences, {self.num_tokens:,} tokens in "
                f"{self.seconds:.1f} s ({self.tokens_per_second:,.0f} tokens/s) -> "
                f"{self.output_prefix}{{.bin,.idx,{SPANS_SUFFIX}.bin,{SPANS_SUFFIX}.idx,.ids,"
                f"{SIDECAR_SUFFIX}}}")


def _histogram(lengths: Sequence[int]) -> dict:
    """Counts of sequence lengths per power-of-two bucket: ``{"<=512": n, ...}``."""
    counts: dict[int, int] = collections.Counter(
        1 << max(0, (max(length, 1) - 1).bit_length()) for length in lengths)
    return {f"<={bucket}": counts[bucket] for bucket in sorted(counts)}


class _Stats:
    """What the writer counts for the sidecar and the summary."""

    def __init__(self):
        self.record_ids: list[str] = []
        self.dropped, self.without_roles, self.multi_turn = 0, 0, 0
        self.truncated = {"short": 0, "long": 0}
        self.role_records = collections.Counter()
        self.role_sequences = collections.Counter()
        self.lengths: dict[str, list[int]] = {"short": [], "long": []}
        self.num_tokens, self.num_response_tokens = 0, 0

    def add(self, result: dict) -> None:
        self.record_ids.append(result["record_id"])
        self.multi_turn += int(result["multi_turn"])
        for kind in result["truncated"]:
            self.truncated[kind] += 1
        roles = [Role.from_index(index) for index in result["roles"]]
        self.role_records.update(set(role.value for role in roles))
        self.role_sequences.update(role.value for role in roles)
        for role, length in zip(roles, result["lengths"]):
            self.lengths[role.context].append(length)
        spans = result["spans"]
        self.num_response_tokens += int((spans[1::2] - spans[0::2]).sum())
        self.num_tokens += int(result["tokens"].size)


def _write_rejects(path: str, inputs: Sequence[str], invalid: dict) -> None:
    """Every invalid line with its errors, as JSONL."""
    with open(path, "w") as out:
        for file_index, source in enumerate(inputs):
            with open(source, "rb") as handle:
                for number, raw in _lines(handle):
                    if (file_index, number) in invalid:
                        out.write(json.dumps({"file": source, "line": number,
                                              "errors": invalid[(file_index, number)],
                                              "raw": raw.decode("utf-8", errors="replace")}) + "\n")


def preprocess(
    inputs: Sequence[str],
    output_prefix: str,
    tokenizer_type: str,
    tokenizer_model: str,
    *,
    workers: int = 1,
    max_long_length: Optional[int] = None,
    max_short_length: Optional[int] = None,
    overlong: str = "truncate-middle",
    skip_invalid: bool = False,
    rejects_file: Optional[str] = None,
    max_errors: int = 20,
    roles: Optional[Sequence[Role]] = None,
    progress: bool = False,
    log_interval: int = 0,
) -> PreprocessSummary:
    """Validate, tokenize and write ``inputs`` as the dataset ``output_prefix`` (see the module
    docstring and docs/data.md); raises ValueError for bad input or flags, writing nothing."""
    import megatron_solopo  # noqa: F401  (triton stub before megatron imports)
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    from tqdm import tqdm

    start = time.perf_counter()
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    limits = LengthLimits(max_short_length, max_long_length, overlong)
    roles = tuple(sorted(set(roles), key=lambda role: role.index)) if roles else ALL_ROLES
    output_prefix = str(output_prefix)
    _check_output_prefix(output_prefix)  # before any tokenizing: a bad path fails in a second
    tokenizer = build_tokenizer(tokenizer_type, tokenizer_model)  # fail fast on a bad tokenizer
    validation = validate_inputs(inputs, max_errors)
    if validation.num_invalid and not skip_invalid:
        raise ValueError(_invalid_input_message(validation, inputs))
    num_valid = validation.num_records - validation.num_invalid
    if num_valid == 0:
        raise ValueError(f"no valid record in {', '.join(inputs)}; nothing was written")

    Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(output_prefix)
    tmp = f"{output_prefix}.tmp{os.getpid()}"
    rejects_path = rejects_file or f"{output_prefix}.rejects.jsonl"
    renames = {tmp + suffix: output_prefix + suffix for suffix in DATA_SUFFIXES}
    if validation.num_invalid:
        renames[f"{rejects_path}.tmp{os.getpid()}"] = rejects_path
    renames[tmp + SIDECAR_SUFFIX] = output_prefix + SIDECAR_SUFFIX  # last: marks completion
    token_dtype = DType.optimal_dtype(tokenizer.vocab_size)
    stats = _Stats()
    bar = tqdm(total=num_valid, unit="rec", desc="tokenizing", file=sys.stderr,
               disable=not progress, mininterval=0.5, dynamic_ncols=True)
    builders = []
    done = 0
    try:
        token_builder = IndexedDatasetBuilder(tmp + ".bin", dtype=token_dtype, multimodal=True)
        span_builder = IndexedDatasetBuilder(tmp + SPANS_SUFFIX + ".bin", dtype=np.int32)
        builders = [token_builder, span_builder]
        init_args = (tokenizer_type, tokenizer_model, roles, limits)
        encoded = contextlib.closing(_encoded(inputs, validation.invalid, init_args, workers))
        with open(tmp + ".ids", "w") as ids_file, encoded as chunks:
            for chunk in chunks:
                for result in chunk:
                    if result["dropped"]:
                        if result["dropped"].startswith("overlong"):
                            stats.dropped += 1
                        else:
                            stats.without_roles += 1
                        continue
                    tokens = result["tokens"]
                    if int(tokens.max()) >= tokenizer.vocab_size or int(tokens.min()) < 0:
                        raise ValueError(f"record {result['record_id']!r}: token id outside "
                                         f"[0, {tokenizer.vocab_size}) from {tokenizer.name}")
                    token_builder.add_document(tokens, result["lengths"], result["roles"])
                    span_builder.add_document(result["spans"], result["span_lengths"])
                    ids_file.write(json.dumps(result["record_id"]) + "\n")
                    stats.add(result)
                bar.update(len(chunk))
                bar.set_postfix_str(f"{stats.num_tokens / (time.perf_counter() - start):,.0f} tok/s",
                                    refresh=False)
                done += len(chunk)  # not bar.n: a disabled bar (--no-progress) counts nothing
                if log_interval and done // log_interval != (done - len(chunk)) // log_interval:
                    bar.write(f"[preprocess] {done:,}/{num_valid:,} records, {stats.num_tokens:,} "
                              f"tokens, {stats.num_tokens / (time.perf_counter() - start):,.0f} "
                              f"tokens/s", file=sys.stderr)
        bar.close()
        if not stats.record_ids:
            raise ValueError(f"every record was dropped ({stats.dropped} over the length limits "
                             f"with --overlong {overlong}, {stats.without_roles} without a "
                             f"requested role); nothing was written")
        token_builder.finalize(tmp + ".idx")
        span_builder.finalize(tmp + SPANS_SUFFIX + ".idx")
        if validation.num_invalid:
            _write_rejects(f"{rejects_path}.tmp{os.getpid()}", inputs, validation.invalid)
        sidecar = _sidecar(tokenizer, token_dtype, limits, roles, stats, validation,
                           {suffix: os.path.getsize(tmp + suffix) for suffix in DATA_SUFFIXES})
        with open(tmp + SIDECAR_SUFFIX, "w") as handle:
            json.dump(sidecar, handle, indent=1)
            handle.write("\n")
        # An older dataset at this prefix stops being one before its files are replaced.
        if os.path.exists(output_prefix + SIDECAR_SUFFIX):
            os.remove(output_prefix + SIDECAR_SUFFIX)
        for source, target in renames.items():
            os.replace(source, target)
    finally:
        bar.close()
        for builder in builders:
            builder.data_file.close()
        for source in renames:
            if os.path.exists(source):
                os.remove(source)
    return PreprocessSummary(
        records_read=validation.num_records, records_written=len(stats.record_ids),
        records_rejected=validation.num_invalid, records_dropped=stats.dropped,
        records_without_roles=stats.without_roles, records_truncated=dict(stats.truncated),
        num_sequences=sum(stats.role_sequences.values()), num_tokens=stats.num_tokens,
        seconds=time.perf_counter() - start, output_prefix=output_prefix)


def _check_output_prefix(output_prefix: str) -> None:
    """``--output-prefix`` can be written: its directory exists or can be made, is not a file and
    is writable. Checked first, so a bad path does not fail after the whole input is tokenized."""
    directory = Path(output_prefix).parent
    ancestor = directory
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"--output-prefix {output_prefix}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"--output-prefix {output_prefix}: {ancestor} is not writable")
    if Path(output_prefix).is_dir():
        raise ValueError(f"--output-prefix {output_prefix} is a directory; give a prefix such as "
                         f"{output_prefix.rstrip('/')}/train")


def _remove_stale_temporaries(output_prefix: str) -> None:
    """Files ``<prefix>.tmp<pid>.*`` of a preprocess that was killed (its process is gone) are
    removed, and said; a live process's files are left alone."""
    import glob
    import re

    stale: dict[int, list[str]] = {}
    for path in glob.glob(glob.escape(output_prefix) + ".tmp*"):
        match = re.match(re.escape(output_prefix) + r"\.tmp(\d+)", path)
        if match is None:
            continue
        pid = int(match.group(1))
        if pid == os.getpid() or _process_alive(pid):
            continue
        stale.setdefault(pid, []).append(path)
    for pid, paths in stale.items():
        size = sum(os.path.getsize(path) for path in paths if os.path.isfile(path))
        for path in paths:
            os.remove(path)
        print(f"[preprocess] removed {len(paths)} file(s) ({size / 2**20:.1f} MiB) left by an "
              f"interrupted run (process {pid}): {output_prefix}.tmp{pid}.*", file=sys.stderr)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _sidecar(tokenizer, token_dtype, limits, roles, stats: _Stats, validation: Validation,
             files: dict) -> dict:
    ids_digest = hashlib.sha256("\n".join(stats.record_ids).encode()).hexdigest()
    source_hash = hashlib.sha256("".join(s["sha256"] for s in validation.sources).encode()).hexdigest()
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "tokenizer": tokenizer.describe(),
        "vocab_size": tokenizer.vocab_size,
        "pad_id": tokenizer.pad_id,
        "eos_id": tokenizer.eos_id,
        "bos_id": tokenizer.bos_id,
        "token_dtype": np.dtype(token_dtype).name,
        "num_records": len(stats.record_ids),
        "num_multi_turn_records": stats.multi_turn,
        "num_sequences": sum(stats.role_sequences.values()),
        "num_tokens": stats.num_tokens,
        "num_response_tokens": stats.num_response_tokens,
        "roles": {role.value: stats.role_records[role.value] for role in ALL_ROLES
                  if stats.role_records[role.value]},
        "sequences": {role.value: stats.role_sequences[role.value] for role in ALL_ROLES
                      if stats.role_sequences[role.value]},
        "requested_roles": [role.value for role in roles],
        "length_histogram": {kind: _histogram(v) for kind, v in stats.lengths.items() if v},
        "max_length": {kind: max(v) for kind, v in stats.lengths.items() if v},
        "mean_length": {kind: round(sum(v) / len(v), 1) for kind, v in stats.lengths.items() if v},
        "limits": dataclasses.asdict(limits),
        "truncated": stats.truncated,
        "dropped": {"overlong": stats.dropped, "no_requested_role": stats.without_roles},
        "rejected": validation.num_invalid,
        "sources": validation.sources,
        "source_hash": source_hash,
        "record_ids_sha256": ids_digest,
        "files": files,
    }
