"""JSONL preference records -> Megatron indexed dataset (tools/preprocess_data.py is the CLI).

Output, all written under temporary names and renamed at the end (the sidecar last, so its
presence means the dataset is complete; a failed run leaves nothing)::

    <prefix>.bin / <prefix>.idx            token ids; one document per record, one sequence per
                                           (role, turn), the sequence "mode" is the role index
    <prefix>.mask.bin / <prefix>.mask.idx  uint8 response mask, same structure
    <prefix>.json                          sidecar: tokenizer, counts, length histogram, source
                                           hash, record ids

Two passes: every line is validated first (nothing is written if a line is bad, unless
``skip_invalid``), then records are tokenized by ``workers`` processes, in input order.
"""

from __future__ import annotations

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

from megatron_solopo.data.schema import PreferenceRecord, RecordError, parse_record
from megatron_solopo.data.tokenizers import PreferenceTokenizer, build_tokenizer, user_text
from megatron_solopo.roles import ALL_ROLES, Role

FORMAT_NAME = "megatron-solopo-preference"
FORMAT_VERSION = 1
OVERLONG_POLICIES = ("truncate-middle", "truncate-left", "drop")
MASK_SUFFIX = ".mask"


@dataclasses.dataclass
class TokenizedRecord:
    record_id: str
    roles: list  # Role per sequence
    tokens: list  # list[int] per sequence
    masks: list  # list[int] (0/1) per sequence
    truncated: dict  # context kind -> sequences truncated
    dropped: Optional[str] = None  # reason when the record is dropped


@dataclasses.dataclass
class LengthLimits:
    max_short_length: Optional[int] = None
    max_long_length: Optional[int] = None
    overlong: str = "truncate-middle"

    def limit(self, context: str) -> Optional[int]:
        return self.max_short_length if context == "short" else self.max_long_length


def prompt_ids(tokenizer: PreferenceTokenizer, record: PreferenceRecord, context: str) -> list[int]:
    text = record.context(context) or ""
    if record.messages is not None:
        messages = [dict(m) for m in record.messages]
        if record.system and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": record.system})
        messages[-1]["content"] = user_text(text, messages[-1]["content"])
        return tokenizer.encode_messages(messages)
    return tokenizer.encode_prompt(record.system, text, record.prompt)


def _truncate(prompt: list[int], keep: int, policy: str, bos_id: Optional[int]) -> list[int]:
    """Shorten the prompt to ``keep`` tokens; the response is never cut."""
    if policy == "truncate-middle":
        head = keep // 2
        return prompt[:head] + prompt[len(prompt) - (keep - head):]
    # truncate-left: drop the oldest context tokens, keeping a leading BOS.
    first = 1 if bos_id is not None and prompt and prompt[0] == bos_id else 0
    return prompt[:first] + prompt[len(prompt) - (keep - first):]


def tokenize_record(tokenizer: PreferenceTokenizer, record: PreferenceRecord,
                    roles: Sequence[Role], limits: LengthLimits) -> TokenizedRecord:
    """The record's sequences for the requested roles it has (in ``ALL_ROLES`` order)."""
    out = TokenizedRecord(record.id, [], [], [], {"short": 0, "long": 0})
    for role in ALL_ROLES:
        if role not in roles or not record.context(role.context):
            continue
        prompt = prompt_ids(tokenizer, record, role.context)
        response = tokenizer.encode_response(record.response(role.response))
        limit = limits.limit(role.context)
        if limit is not None and len(prompt) + len(response) > limit:
            keep = limit - len(response)
            if limits.overlong == "drop" or keep < 2:
                reason = ("response alone exceeds" if keep < 2 else "longer than") + \
                    f" --max-{role.context}-length={limit} ({role}: {len(prompt) + len(response)} tokens)"
                return dataclasses.replace(out, dropped=reason)
            prompt = _truncate(prompt, keep, limits.overlong, tokenizer.bos_id)
            out.truncated[role.context] += 1
        out.roles.append(role)
        out.tokens.append(prompt + response)
        out.masks.append([0] * len(prompt) + [1] * len(response))
    return out


def _iter_lines(paths: Sequence[str]) -> Iterator[tuple[str, int, bytes]]:
    for path in paths:
        with open(path, "rb") as handle:
            for number, raw in enumerate(handle, start=1):
                if raw.strip():
                    yield path, number, raw.rstrip(b"\r\n")


def validate_inputs(paths: Sequence[str], max_errors: int):
    """Pass 1. Returns (valid (path, line) set, errors (capped), number of bad lines, source info)."""
    valid, errors, num_bad = set(), [], 0
    seen_ids: dict[str, tuple[str, int]] = {}
    sources = []
    for path in paths:
        if not Path(path).is_file():
            raise ValueError(f"--input {path}: file not found")
        sources.append({"path": os.path.abspath(path), "sha256": _sha256(path)})
    for path, line, raw in _iter_lines(paths):
        record, record_errors = parse_record(raw, path, line)
        if record is not None:
            if record.id in seen_ids:
                first = seen_ids[record.id]
                record_errors = [RecordError(path, line, record.id, "id",
                                             f"duplicate id (first at {first[0]}:{first[1]})")]
            else:
                seen_ids[record.id] = (path, line)
        if record_errors:
            num_bad += 1
            errors.extend(record_errors[:max(0, max_errors - len(errors))])
        else:
            valid.add((path, line))
    return valid, errors, num_bad, sources


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# Worker state for multiprocess tokenization (one tokenizer per process).
_WORKER: dict = {}


def _init_worker(tokenizer_type: str, tokenizer_model: str, roles, limits) -> None:
    _WORKER.update(tokenizer=build_tokenizer(tokenizer_type, tokenizer_model), roles=roles,
                   limits=limits)


def _work(item: tuple[str, int, bytes]) -> TokenizedRecord:
    path, line, raw = item
    record, _ = parse_record(raw, path, line)
    return tokenize_record(_WORKER["tokenizer"], record, _WORKER["roles"], _WORKER["limits"])


@dataclasses.dataclass
class PreprocessSummary:
    records_read: int
    records_written: int
    records_rejected: int
    records_dropped: int
    sequences_truncated: dict
    num_tokens: int
    seconds: float
    output_prefix: str

    @property
    def tokens_per_second(self) -> float:
        return self.num_tokens / max(self.seconds, 1e-9)

    def __str__(self) -> str:
        return (f"records read {self.records_read}, written {self.records_written}, rejected "
                f"{self.records_rejected}, dropped (overlong) {self.records_dropped}; truncated "
                f"sequences: short {self.sequences_truncated['short']}, long "
                f"{self.sequences_truncated['long']}; {self.num_tokens:,} tokens in "
                f"{self.seconds:.1f} s ({self.tokens_per_second:,.0f} tokens/s) -> "
                f"{self.output_prefix}.{{bin,idx,json}}")


def _histogram(lengths: list[int]) -> dict:
    """Counts of sequence lengths per power-of-two bucket: {"<=512": n, ...}."""
    counts: dict[str, int] = {}
    for length in lengths:
        bucket = 1 << max(0, (max(length, 1) - 1).bit_length())
        counts[f"<={bucket}"] = counts.get(f"<={bucket}", 0) + 1
    return dict(sorted(counts.items(), key=lambda item: int(item[0][2:])))


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
) -> PreprocessSummary:
    import megatron_solopo  # noqa: F401  (triton stub before megatron imports)
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    if overlong not in OVERLONG_POLICIES:
        raise ValueError(f"--overlong {overlong!r}; valid: {', '.join(OVERLONG_POLICIES)}")
    for flag, value in (("--max-long-length", max_long_length), ("--max-short-length", max_short_length)):
        if value is not None and value < 2:
            raise ValueError(f"{flag} must be >= 2, got {value}")
    roles = tuple(roles) if roles else ALL_ROLES
    start = time.perf_counter()
    tokenizer = build_tokenizer(tokenizer_type, tokenizer_model)  # fail fast on a bad tokenizer
    valid, errors, num_bad, sources = validate_inputs(inputs, max_errors)
    if num_bad and not skip_invalid:
        shown = "\n  ".join(str(e) for e in errors)
        raise ValueError(f"{num_bad} invalid record(s); nothing was written (use --skip-invalid to "
                         f"write them to a rejects file and go on). First {len(errors)} error(s):"
                         f"\n  {shown}")
    limits = LengthLimits(max_short_length, max_long_length, overlong)
    output_prefix = str(output_prefix)
    Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{output_prefix}.tmp-{os.getpid()}"
    finals = {f"{tmp}.bin": f"{output_prefix}.bin", f"{tmp}.idx": f"{output_prefix}.idx",
              f"{tmp}{MASK_SUFFIX}.bin": f"{output_prefix}{MASK_SUFFIX}.bin",
              f"{tmp}{MASK_SUFFIX}.idx": f"{output_prefix}{MASK_SUFFIX}.idx",
              f"{tmp}.json": f"{output_prefix}.json"}
    token_dtype = DType.optimal_dtype(tokenizer.vocab_size)
    try:
        tokens_builder = IndexedDatasetBuilder(f"{tmp}.bin", dtype=token_dtype, multimodal=True)
        mask_builder = IndexedDatasetBuilder(f"{tmp}{MASK_SUFFIX}.bin", dtype=np.uint8, multimodal=True)
        items = [item for item in _iter_lines(inputs) if (item[0], item[1]) in valid]
        record_ids, dropped, truncated = [], 0, {"short": 0, "long": 0}
        role_counts = {role.value: 0 for role in ALL_ROLES}
        lengths = {"short": [], "long": []}
        num_tokens = 0
        results = _tokenize_all(items, tokenizer_type, tokenizer_model, roles, limits, workers,
                                progress)
        for result in results:
            if result.dropped:
                dropped += 1
                continue
            document = np.concatenate([np.asarray(t, dtype=np.int64) for t in result.tokens])
            if document.size and int(document.max()) >= tokenizer.vocab_size:
                raise ValueError(f"record {result.record_id!r}: token id {int(document.max())} "
                                 f">= vocab size {tokenizer.vocab_size}")
            seq_lengths = [len(t) for t in result.tokens]
            modes = [role.index for role in result.roles]
            tokens_builder.add_document(document, seq_lengths, modes)
            mask_builder.add_document(np.concatenate([np.asarray(m, dtype=np.uint8)
                                                      for m in result.masks]), seq_lengths, modes)
            record_ids.append(result.record_id)
            for role, length in zip(result.roles, seq_lengths):
                role_counts[role.value] += 1
                lengths[role.context].append(length)
            num_tokens += int(document.size)
            for kind in truncated:
                truncated[kind] += result.truncated[kind]
        tokens_builder.finalize(f"{tmp}.idx")
        mask_builder.finalize(f"{tmp}{MASK_SUFFIX}.idx")
        source_hash = hashlib.sha256("".join(s["sha256"] for s in sources).encode()).hexdigest()
        sidecar = {
            "format": FORMAT_NAME, "version": FORMAT_VERSION,
            "tokenizer": tokenizer.describe(), "vocab_size": tokenizer.vocab_size,
            "pad_id": tokenizer.pad_id, "eos_id": tokenizer.eos_id,
            "token_dtype": np.dtype(token_dtype).name,
            "num_records": len(record_ids), "num_tokens": num_tokens,
            "roles": {name: count for name, count in role_counts.items() if count},
            "length_histogram": {kind: _histogram(values) for kind, values in lengths.items() if values},
            "max_length": {kind: max(values) for kind, values in lengths.items() if values},
            "limits": dataclasses.asdict(limits), "truncated": truncated, "dropped": dropped,
            "rejected": num_bad, "sources": sources, "source_hash": source_hash,
            "record_ids": record_ids,
        }
        with open(f"{tmp}.json", "w") as handle:
            json.dump(sidecar, handle, indent=1)
        if num_bad and skip_invalid:
            _write_rejects(rejects_file or f"{output_prefix}.rejects.jsonl", inputs, valid, max_errors)
        for source, target in finals.items():  # sidecar last: it marks a complete dataset
            os.replace(source, target)
    finally:
        for source in finals:
            if os.path.exists(source):
                os.remove(source)
    return PreprocessSummary(len(valid) + num_bad, len(record_ids), num_bad, dropped, truncated,
                             num_tokens, time.perf_counter() - start, output_prefix)


def _tokenize_all(items, tokenizer_type, tokenizer_model, roles, limits, workers, progress):
    from tqdm import tqdm

    bar = tqdm(total=len(items), unit="rec", desc="tokenizing", file=sys.stderr,
               disable=not progress, mininterval=0.5)
    if workers <= 1:
        _init_worker(tokenizer_type, tokenizer_model, roles, limits)
        for item in items:
            yield _work(item)
            bar.update()
    else:
        context = multiprocessing.get_context("spawn")
        with context.Pool(workers, initializer=_init_worker,
                          initargs=(tokenizer_type, tokenizer_model, roles, limits)) as pool:
            for result in pool.imap(_work, items, chunksize=max(1, min(64, len(items) // (4 * workers) or 1))):
                yield result
                bar.update()
    bar.close()


def _write_rejects(path: str, inputs: Sequence[str], valid: set, max_errors: int) -> None:
    """Every invalid line with its errors, as JSONL (atomic)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as handle:
        for source, line, raw in _iter_lines(inputs):
            if (source, line) in valid:
                continue
            _, errors = parse_record(raw, source, line)
            if not errors:  # a duplicate id: valid on its own
                errors = [RecordError(source, line, None, "id", "duplicate id")]
            handle.write(json.dumps({"file": source, "line": line,
                                     "errors": [str(e) for e in errors],
                                     "raw": raw.decode("utf-8", errors="replace")}) + "\n")
    os.replace(tmp, path)
