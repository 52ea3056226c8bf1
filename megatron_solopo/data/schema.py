"""The preference record schema and its validation (docs/data.md "Record schema").

One JSON object per line. Three forms:

Plain::

    {"id": "q-17", "prompt": "Who wrote ...?", "long_context": "...", "short_context": "...",
     "chosen": "...", "rejected": "...", "system": "optional", "meta": {"optional": true}}

Chat: ``prompt`` (or ``messages``) is a list of ``{"role", "content"}`` messages ending with the
user's question (earlier messages are conversation history); ``chosen``/``rejected`` may be an
assistant message (or a one-element list of one) instead of a string. The context is put before
the content of the last user message.

Multi-turn (LongPO): one long context and several questions about it::

    {"id": "doc-3", "long_context": "...", "turns": [
        {"prompt": "...", "short_context": "<the chunk it was asked from>", "chosen": "...",
         "rejected": "..."}, ...]}

Any form may carry ``evidence_spans``: ``[[start, end], ...]`` character offsets (end exclusive)
into ``long_context`` of the text the answers rest on (the supporting paragraphs, the chunks the
questions were asked from); truncation of the long context keeps them (data/encoding.py).

A record may have only a short or only a long context (a multi-turn record has short contexts on
all of its turns or on none); objectives that need the missing side refuse the dataset when
training starts. Unknown top-level fields are ignored.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional

from megatron_solopo.roles import ALL_ROLES, Role

RESPONSE_FIELDS = ("chosen", "rejected")
CONTEXT_FIELDS = ("short_context", "long_context")
MESSAGE_ROLES = ("system", "user", "assistant")
SINGLE_TURN_FIELDS = ("prompt", "messages", "short_context", "chosen", "rejected")


@dataclasses.dataclass
class RecordError:
    """One problem in one input line; ``str()`` is the message users see."""

    path: str
    line: int
    record_id: Optional[str]
    field: Optional[str]
    message: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}"
        if self.record_id is not None:
            where += f": record {self.record_id!r}"
        if self.field:
            where += f": field {self.field!r}"
        return f"{where}: {self.message}"


@dataclasses.dataclass(frozen=True)
class Turn:
    """One question with its two answers (a single-turn record has exactly one)."""

    prompt: str
    chosen: str
    rejected: str
    short_context: Optional[str] = None

    def response(self, kind: str) -> str:
        """``kind`` is ``"chosen"`` or ``"rejected"`` (``Role.response``)."""
        return self.chosen if kind == "chosen" else self.rejected


@dataclasses.dataclass
class PreferenceRecord:
    id: str
    turns: list  # list[Turn]; one for the plain and chat forms
    long_context: Optional[str] = None
    system: Optional[str] = None
    history: list = dataclasses.field(default_factory=list)  # chat messages before the question
    meta: Optional[dict] = None
    evidence_spans: tuple = ()  # ((start, end), ...) in long_context, sorted, merged

    @property
    def is_multi_turn(self) -> bool:
        return len(self.turns) > 1

    def has_context(self, kind: str) -> bool:
        """``kind`` is ``"short"`` or ``"long"`` (``Role.context``)."""
        if kind == "long":
            return self.long_context is not None
        return all(turn.short_context is not None for turn in self.turns)

    @property
    def roles(self) -> list[Role]:
        """The roles this record can provide, in ``ALL_ROLES`` order."""
        return [role for role in ALL_ROLES if self.has_context(role.context)]


def _response_text(value: Any) -> Optional[str]:
    """The text of a response given as a string or an assistant message; None if neither."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict) and value.get("role") == "assistant":
        value = value.get("content")
    return value if isinstance(value, str) else None


def _check_messages(value: Any) -> Optional[str]:
    """None if ``value`` is a valid chat prompt, else what is wrong with it."""
    if not isinstance(value, list) or not value:
        return "should be a non-empty list of {role, content} messages"
    for index, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            return f"message {index} should be an object with string 'role' and 'content'"
        if message.get("role") not in MESSAGE_ROLES:
            return f"message {index} has role {message.get('role')!r}; valid: {', '.join(MESSAGE_ROLES)}"
        if message["role"] == "system" and index != 0:
            return f"message {index}: a system message may only come first"
    if value[-1]["role"] != "user":
        return "the last message must be the user's question (the answers are chosen/rejected)"
    if not value[-1]["content"].strip():
        return "the last (user) message is empty"
    return None


class _Checker:
    """Collects every error of one record, each naming its field."""

    def __init__(self, path: str, line: int):
        self.path, self.line = path, line
        self.record_id: Optional[str] = None
        self.errors: list[RecordError] = []
        self.num_contexts = 0  # valid contexts seen (a record needs at least one)

    def error(self, field: Optional[str], message: str) -> None:
        self.errors.append(RecordError(self.path, self.line, self.record_id, field, message))

    def response(self, data: dict, name: str, field: str) -> Optional[str]:
        if name not in data:
            self.error(field, "missing field")
            return None
        text = _response_text(data[name])
        if text is None:
            self.error(field, "should be a string or an assistant message, got "
                              f"{type(data[name]).__name__}")
        elif not text.strip():
            self.error(field, "empty response")
        else:
            return text
        return None

    def context(self, data: dict, name: str, field: str) -> Optional[str]:
        value = data.get(name)
        if value is None:
            return None
        if not isinstance(value, str):
            self.error(field, f"should be a string (or null), got {type(value).__name__}")
        elif not value.strip():
            self.error(field, "is empty (use null, or leave the field out, for a record without "
                              "this context)")
        else:
            self.num_contexts += 1
            return value
        return None

    def turn(self, data: dict, prefix: str, prompt: Optional[str],
             long_context: Optional[str]) -> Optional[Turn]:
        chosen = self.response(data, "chosen", prefix + "chosen")
        rejected = self.response(data, "rejected", prefix + "rejected")
        if chosen is not None and rejected is not None and chosen.strip() == rejected.strip():
            self.error(prefix + "rejected", "chosen and rejected are identical")
        short = self.context(data, "short_context", prefix + "short_context")
        if short is not None and long_context is not None and len(short) > len(long_context):
            self.error(prefix + "short_context", f"is longer than long_context ({len(short)} > "
                                                 f"{len(long_context)} characters)")
        if prompt is None or chosen is None or rejected is None:
            return None
        return Turn(prompt, chosen, rejected, short)


def parse_record(raw: bytes, path: str, line: int) -> tuple[Optional[PreferenceRecord], list[RecordError]]:
    """Parse and validate one JSONL line: ``(record, [])`` or ``(None, every error found)``."""
    check = _Checker(path, line)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        check.error(None, f"not valid UTF-8 (byte {err.start}: {err.reason})")
        return None, check.errors
    if line == 1:
        text = text.lstrip("\ufeff")  # a byte-order mark some editors write
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        check.error(None, f"invalid JSON: {err.msg} (column {err.colno})")
        return None, check.errors
    if not isinstance(data, dict):
        check.error(None, f"a record must be a JSON object, got {type(data).__name__}")
        return None, check.errors

    record_id = data.get("id")
    if record_id is None:
        check.error("id", "missing field")
    elif isinstance(record_id, bool) or not isinstance(record_id, (str, int)) or str(record_id) == "":
        check.error("id", f"should be a non-empty string (or integer), got {record_id!r}")
    else:
        check.record_id = str(record_id)

    system = data.get("system")
    if system is not None and not isinstance(system, str):
        check.error("system", f"should be a string, got {type(system).__name__}")
        system = None
    meta = data.get("meta")
    if meta is not None and not isinstance(meta, dict):
        check.error("meta", f"should be an object, got {type(meta).__name__}")
    long_context = check.context(data, "long_context", "long_context")

    if "turns" in data:
        turns = _parse_turns(check, data, long_context)
        history: list = []
    else:
        turns, history, system = _parse_single_turn(check, data, long_context, system)
    if not check.num_contexts and not any(e.field and e.field.endswith("context")
                                          for e in check.errors):
        check.error("long_context", "a record needs short_context or long_context")
    evidence = _parse_evidence(check, data.get("evidence_spans"), long_context)
    if check.errors:
        return None, check.errors
    return PreferenceRecord(check.record_id, turns, long_context, system or None, history, meta,
                            evidence), []


def _parse_evidence(check: _Checker, value: Any, long_context: Optional[str]) -> tuple:
    """``evidence_spans`` sorted and merged; errors name the field."""
    if value is None:
        return ()
    name = "evidence_spans"
    if long_context is None:
        check.error(name, "needs a long_context (the spans are character offsets into it)")
        return ()
    if not isinstance(value, list):
        check.error(name, f"should be a list of [start, end] character offsets, got "
                          f"{type(value).__name__}")
        return ()
    spans = []
    for index, span in enumerate(value):
        if (not isinstance(span, list) or len(span) != 2
                or not all(isinstance(b, int) and not isinstance(b, bool) for b in span)):
            check.error(f"{name}[{index}]", f"should be [start, end] (integers), got {span!r}")
        elif not 0 <= span[0] < span[1] <= len(long_context):
            check.error(f"{name}[{index}]", f"[{span[0]}, {span[1]}] is not a non-empty range "
                                            f"inside long_context ({len(long_context)} characters)")
        else:
            spans.append(tuple(span))
    merged: list = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return tuple(merged)


def _parse_single_turn(check: _Checker, data: dict, long_context: Optional[str],
                       system: Optional[str]):
    prompt_key = "messages" if "messages" in data and "prompt" not in data else "prompt"
    prompt = data.get(prompt_key)
    question, history = None, []
    if prompt is None:
        check.error("prompt", "missing field (a string, or a list of chat messages)")
    elif isinstance(prompt, str):
        if prompt.strip():
            question = prompt
        else:
            check.error("prompt", "is empty")
    else:
        problem = _check_messages(prompt)
        if problem:
            check.error(prompt_key, problem)
        else:
            history = [{"role": m["role"], "content": m["content"]} for m in prompt[:-1]]
            question = prompt[-1]["content"]
            if history and history[0]["role"] == "system":
                if system:
                    check.error("system", f"given twice: as a field and as the first message of "
                                          f"{prompt_key!r}")
                system = history.pop(0)["content"]
    turn = check.turn(data, "", question, long_context)
    return ([turn] if turn else []), history, system


def _parse_turns(check: _Checker, data: dict, long_context: Optional[str]) -> list:
    extra = [name for name in SINGLE_TURN_FIELDS if name in data]
    if extra:
        check.error(extra[0], "a multi-turn record keeps prompt/short_context/chosen/rejected "
                              "inside each of its 'turns', not at the top level")
    turns_value = data["turns"]
    if not isinstance(turns_value, list) or not turns_value:
        check.error("turns", "should be a non-empty list of {prompt, chosen, rejected, "
                             "short_context} objects")
        return []
    turns = []
    for index, item in enumerate(turns_value):
        prefix = f"turns[{index}]."
        if not isinstance(item, dict):
            check.error(f"turns[{index}]", f"should be an object, got {type(item).__name__}")
            continue
        prompt = item.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            check.error(prefix + "prompt", "missing field" if prompt is None
                        else "should be a non-empty string")
            prompt = None
        turn = check.turn(item, prefix, prompt, long_context)
        if turn:
            turns.append(turn)
    with_short = [t.short_context is not None for t in turns]
    if turns and any(with_short) and not all(with_short):
        missing = with_short.index(False)
        check.error(f"turns[{missing}].short_context", "missing while other turns have one (the "
                                                       "short roles need one per turn)")
    return turns
