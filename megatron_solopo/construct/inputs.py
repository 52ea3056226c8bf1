"""Reading the pipelines' inputs: long documents (LongPO) and QA records (SoLoPO).

Files: ``.jsonl`` (one JSON object per line), ``.parquet`` (rows, with pyarrow; e.g. a local copy
of a Hugging Face dataset) and plain text (``.txt``, ``.md``, ``.tex``: the whole file is one
document whose id is the file name). Every input is checked before any generation starts: a bad
line is an error naming the file, line and field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

from megatron_solopo.construct.runner import file_sha256

TEXT_SUFFIXES = (".txt", ".md", ".tex")


def _rows(path: str) -> Iterator[tuple[int, object]]:
    """``(line or row number, parsed object)``; raises ValueError naming file and line."""
    suffix = Path(path).suffix.lower()
    if suffix in TEXT_SUFFIXES:
        yield 1, Path(path).read_text(encoding="utf-8")
        return
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"--input {path}: reading .parquet needs pyarrow "
                             f"(pip install pyarrow), or convert it to .jsonl") from None
        table = pq.read_table(path)
        for number, row in enumerate(table.to_pylist(), start=1):
            yield number, row
        return
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                yield number, json.loads(raw.decode("utf-8").lstrip("\ufeff"))
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid UTF-8 (byte {err.start})") from None
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: invalid JSON: {err.msg} (column "
                                 f"{err.colno})") from None


class InputFiles:
    """Items from files, each made by ``parse(row, where) -> (item id, item)`` (raising
    ValueError naming the field). ``check()`` reads everything once (ids unique, fingerprints);
    ``items()`` streams ``(index, id, item)`` in file order."""

    def __init__(self, paths: Sequence[str], parse: Callable[[object, str], tuple[str, object]]):
        self.paths = [str(p) for p in paths]
        self.parse = parse
        self.num_items: Optional[int] = None
        self.fingerprints: list = []

    def check(self) -> None:
        for path in self.paths:
            if not Path(path).is_file():
                raise ValueError(f"--input {path}: file not found")
        seen: dict[str, str] = {}
        count = 0
        for _, item_id, _, where in self._parsed():
            if item_id in seen:
                raise ValueError(f"{where}: id {item_id!r} repeats the one at {seen[item_id]} "
                                 f"(ids must be unique: resuming relies on them)")
            seen[item_id] = where
            count += 1
        if not count:
            raise ValueError(f"no input in {', '.join(self.paths)}")
        self.num_items = count
        self.fingerprints = [{"path": str(Path(p).resolve()), "sha256": file_sha256(p)}
                             for p in self.paths]

    def _parsed(self) -> Iterator[tuple[int, str, object, str]]:
        index = 0
        for path in self.paths:
            for number, row in _rows(path):
                where = f"{path}:{number}"
                item_id, item = self.parse(row, where)
                yield index, item_id, item, where
                index += 1

    def items(self) -> Iterator[tuple[int, str, object]]:
        for index, item_id, item, _ in self._parsed():
            yield index, item_id, item


def field(row: object, name: str, where: str, kind=str, required: bool = True):
    """``row[name]`` checked to be a ``kind``; errors name the file, line and field."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a record must be a JSON object, got {type(row).__name__}")
    if name not in row or row[name] is None:
        if required:
            raise ValueError(f"{where}: field {name!r}: missing")
        return None
    value = row[name]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        kinds = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise ValueError(f"{where}: field {name!r}: should be {kinds}, got {type(value).__name__}")
    return value


def document_parser(text_field: str = "text", id_field: str = "id"):
    """LongPO documents: ``{"id": ..., "text": ...}`` (field names configurable); a text file is
    one document; a missing id becomes ``<file name>:<line>``."""

    def parse(row, where: str):
        if isinstance(row, str):  # a whole text file
            text, item_id = row, Path(where.rsplit(":", 1)[0]).name
        else:
            text = field(row, text_field, where)
            raw_id = field(row, id_field, where, (str, int), required=False)
            item_id = str(raw_id) if raw_id is not None else \
                f"{Path(where.rsplit(':', 1)[0]).name}:{where.rsplit(':', 1)[1]}"
        if not text.strip():
            raise ValueError(f"{where}: field {text_field!r}: empty document")
        return item_id, text

    return parse
