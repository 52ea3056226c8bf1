"""The preference record schema and its validation (docs/data.md).

One JSON object per line::

    {"id": "q-17", "prompt": "Who wrote ...?", "long_context": "...", "short_context": "...",
     "chosen": "...", "rejected": "...", "system": "optional", "meta": {"optional": true}}

Chat form: ``prompt`` (or ``messages``) is a list of ``{"role", "content"}`` turns ending with the
user's question; ``chosen``/``rejected`` may be an assistant message ``{"role": "assistant",
"content": ...}`` instead of a string. The context is put before the last user turn's content.
A record may have only a short or only a long context; objectives that need the missing side
refuse it when training starts.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional

RESPONSE_FIELDS = ("chosen", "rejected")
CONTEXT_FIELDS = ("short_context", "long_context")
MESSAGE_ROLES = ("system", "user", "assistant")


@dataclasses.dataclass
class RecordError:
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


@dataclasses.dataclass
class PreferenceRecord:
    id: str
    chosen: str
    rejected: str
    prompt: Optional[str] = None  # plain form
    messages: Optional[list] = None  # chat form: the turns before the answer
    system: Optional[str] = None
    short_context: Optional[str] = None
    long_context: Optional[str] = None
    meta: Optional[dict] = None

    def context(self, kind: str) -> Optional[str]:
        return self.short_context if kind == "short" else self.long_context

    def response(self, kind: str) -> str:
        return self.chosen if kind == "chosen" else self.rejected


def _response_text(value: Any) -> Optional[str]:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and value.get("role") == "assistant" and isinstance(value.get("content"), str):
        return value["content"]
    if (isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict)
            and value[0].get("role") == "assistant" and isinstance(value[0].get("content"), str)):
        return value[0]["content"]
    return None


def _check_messages(value: Any) -> Optional[str]:
    """None if ``value`` is a valid chat prompt, else what is wrong."""
    if not isinstance(value, list) or not value:
        return "should be a non-empty list of {role, content} messages"
    for index, message in enumerate(value):
        if not isinstance(message, dict) or set(message) - {"role", "content"} or \
                not isinstance(message.get("content"), str):
            return f"message {index} should be an object with string 'role' and 'content'"
        if message.get("role") not in MESSAGE_ROLES:
            return f"message {index} has role {message.get('role')!r}; valid: {', '.join(MESSAGE_ROLES)}"
    if value[-1]["role"] != "user":
        return "the last message must be the user's turn (the answer is chosen/rejected)"
    return None


def parse_record(raw: bytes, path: str, line: int) -> tuple[Optional[PreferenceRecord], list[RecordError]]:
    """Parse and validate one JSONL line; returns the record or every error found in it."""
    def error(field, message, record_id=None):
        return RecordError(path, line, record_id, field, message)

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return None, [error(None, f"not valid UTF-8 (byte {err.start}: {err.reason})")]
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        return None, [error(None, f"invalid JSON: {err.msg} (column {err.colno})")]
    if not isinstance(data, dict):
        return None, [error(None, f"a record must be a JSON object, got {type(data).__name__}")]
    errors: list[RecordError] = []
    record_id = data.get("id")
    if record_id is None:
        errors.append(error("id", "missing field"))
    elif isinstance(record_id, bool) or not isinstance(record_id, (str, int)) or str(record_id) == "":
        errors.append(error("id", f"should be a non-empty string (or integer), got {record_id!r}"))
        record_id = None
    else:
        record_id = str(record_id)

    fields: dict[str, Any] = {}
    prompt_key = "messages" if "messages" in data and "prompt" not in data else "prompt"
    prompt = data.get(prompt_key)
    if prompt is None:
        errors.append(error("prompt", "missing field (a string, or a list of chat messages)", record_id))
    elif isinstance(prompt, str):
        fields["prompt"] = prompt
        if not prompt.strip():
            errors.append(error("prompt", "is empty", record_id))
    else:
        problem = _check_messages(prompt)
        if problem:
            errors.append(error(prompt_key, problem, record_id))
        else:
            fields["messages"] = prompt
    for name in RESPONSE_FIELDS:
        if name not in data:
            errors.append(error(name, "missing field", record_id))
            continue
        text_value = _response_text(data[name])
        if text_value is None:
            errors.append(error(name, "should be a string or an assistant message, got "
                                      f"{type(data[name]).__name__}", record_id))
        elif not text_value.strip():
            errors.append(error(name, "empty response", record_id))
        else:
            fields[name] = text_value
    if "chosen" in fields and fields.get("chosen") == fields.get("rejected"):
        errors.append(error("rejected", "chosen and rejected are identical", record_id))
    for name in CONTEXT_FIELDS:
        value = data.get(name)
        if value is not None and not isinstance(value, str):
            errors.append(error(name, f"should be a string, got {type(value).__name__}", record_id))
        elif value:
            fields[name] = value
    if not any(name in fields for name in CONTEXT_FIELDS) and not any(
            e.field in CONTEXT_FIELDS for e in errors):
        errors.append(error("long_context", "a record needs short_context or long_context", record_id))
    if "short_context" in fields and "long_context" in fields and \
            len(fields["short_context"]) > len(fields["long_context"]):
        errors.append(error("short_context", f"is longer than long_context "
                                             f"({len(fields['short_context'])} > "
                                             f"{len(fields['long_context'])} characters)", record_id))
    system = data.get("system")
    if system is not None and not isinstance(system, str):
        errors.append(error("system", f"should be a string, got {type(system).__name__}", record_id))
    elif system:
        fields["system"] = system
    meta = data.get("meta")
    if meta is not None and not isinstance(meta, dict):
        errors.append(error("meta", f"should be an object, got {type(meta).__name__}", record_id))
    elif meta is not None:
        fields["meta"] = meta
    if errors:
        return None, errors
    return PreferenceRecord(id=record_id, **fields), []
