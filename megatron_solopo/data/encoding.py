"""From a validated record to its token sequences by role, with response spans and the over-long
policies (docs/data.md "Tokenization").

A record yields, for each requested role it has, in ``ALL_ROLES`` order:

- short roles: one sequence per turn (``system + short_context_k + question_k -> answer_k``);
  a single-turn record has exactly one;
- long roles: one sequence holding every turn (``system + long_context + question_1 -> answer_1,
  question_2 -> answer_2, ...``), whose response spans cover all the answers (LongPO multi-turn).

Chosen and rejected sequences of one context share the same (possibly truncated) context, so a
preference pair always compares answers to the same prompt. A record's ``evidence_spans`` (parts
of the long context that hold what the answers need) are never cut: truncation takes only text
outside them, or drops the record.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

from megatron_solopo.data.schema import PreferenceRecord
from megatron_solopo.data.tokenizers import PreferenceTokenizer, TemplateError, user_text
from megatron_solopo.roles import ALL_ROLES, Role

OVERLONG_POLICIES = ("truncate-middle", "truncate-left", "drop")
# Re-encoding a cut context can come out a few tokens longer than planned (merges at the cut);
# each retry removes the overshoot too. Two or three attempts suffice in practice.
_MAX_TRUNCATION_ATTEMPTS = 8


@dataclasses.dataclass
class LengthLimits:
    """``--max-short-length`` / ``--max-long-length`` (tokens per sequence, prompt + responses)
    and ``--overlong``: what to do with a longer sequence."""

    max_short_length: Optional[int] = None
    max_long_length: Optional[int] = None
    overlong: str = "truncate-middle"

    def __post_init__(self):
        if self.overlong not in OVERLONG_POLICIES:
            raise ValueError(f"--overlong {self.overlong!r}; valid: {', '.join(OVERLONG_POLICIES)}")
        for flag, value in (("--max-short-length", self.max_short_length),
                            ("--max-long-length", self.max_long_length)):
            if value is not None and value < 2:
                raise ValueError(f"{flag} must be >= 2, got {value}")

    def limit(self, context: str) -> Optional[int]:
        return self.max_short_length if context == "short" else self.max_long_length


@dataclasses.dataclass
class EncodedSequence:
    role: Role
    tokens: list  # list[int]
    spans: list  # list[(start, end)]: the response tokens, one span per turn

    def response_mask(self) -> list[bool]:
        mask = [False] * len(self.tokens)
        for start, end in self.spans:
            mask[start:end] = [True] * (end - start)
        return mask


@dataclasses.dataclass
class EncodedRecord:
    record_id: str
    sequences: list  # list[EncodedSequence], ALL_ROLES order, short roles turn by turn
    truncated: tuple = ()  # context kinds ("short", "long") whose context was cut
    dropped: Optional[str] = None  # why the record is not written ("overlong: ...", "no roles: ...")


class _Overlong(Exception):
    pass


def encode_record(tokenizer: PreferenceTokenizer, record: PreferenceRecord,
                  roles: Sequence[Role], limits: LengthLimits) -> EncodedRecord:
    """The record's sequences for the requested ``roles`` it has."""
    wanted = [role for role in ALL_ROLES if role in roles and record.has_context(role.context)]
    if not wanted:
        have = ", ".join(str(role) for role in record.roles)
        return EncodedRecord(record.id, [], dropped=f"no roles: it has {have}, none of which "
                                                    f"was requested")
    by_role: dict = {role: [] for role in wanted}
    truncated = []
    try:
        for context in ("short", "long"):
            kinds = [role.response for role in wanted if role.context == context]
            if not kinds:
                continue
            # One long sequence holds every turn; each turn has its own short sequence.
            turn_indices = [None] if context == "long" else range(len(record.turns))
            for turn in turn_indices:
                sequences, was_cut = _fit_context(tokenizer, record, context, turn, kinds, limits)
                if was_cut and context not in truncated:
                    truncated.append(context)
                for kind, (tokens, spans) in sequences.items():
                    role = Role(f"{context}/{kind}")
                    by_role[role].append(EncodedSequence(role, tokens, spans))
    except _Overlong as err:
        return EncodedRecord(record.id, [], dropped=f"overlong: {err}")
    except TemplateError as err:
        raise ValueError(f"record {record.id!r}: {err}") from None
    return EncodedRecord(record.id, [seq for role in wanted for seq in by_role[role]],
                         tuple(truncated))


def _sequences(tokenizer: PreferenceTokenizer, record: PreferenceRecord, context_kind: str,
               turn: Optional[int], kinds: Sequence[str], context: Optional[str]) -> dict:
    """``{response kind: (tokens, spans)}`` with ``context`` as the context text."""
    turns = record.turns if turn is None else [record.turns[turn]]
    users = [user_text(context, turns[0].prompt)] + [t.prompt for t in turns[1:]]
    # The first prompt (usually almost all of the long context's tokens) is shared by both answers.
    first = tokenizer.encode_first_turn(record.system, record.history, users[0])
    out = {}
    for kind in kinds:
        responses = [t.response(kind) for t in turns]
        tokens, spans = list(first), []
        for index, response in enumerate(responses):
            if index:
                tokens += tokenizer.encode_followup(record.system, record.history,
                                                    users[:index + 1], responses[:index])
            ids = tokenizer.encode_response(response)
            spans.append((len(tokens), len(tokens) + len(ids)))
            tokens += ids
        out[kind] = (tokens, spans)
    return out


def _fit_context(tokenizer, record, context_kind, turn, kinds, limits: LengthLimits):
    """The sequences, with the context cut (never the question, the template or a response)
    until the longest fits ``limits``; raises _Overlong for ``drop``, or when the rest of the
    sequence alone does not fit."""
    context = record.long_context if context_kind == "long" else record.turns[turn].short_context
    build: Callable[[str], dict] = lambda text: _sequences(
        tokenizer, record, context_kind, turn, kinds, text)
    sequences = build(context)
    limit = limits.limit(context_kind)
    longest = max(len(tokens) for tokens, _ in sequences.values())
    if limit is None or longest <= limit:
        return sequences, False
    where = context_kind + (f" (turn {turn})" if turn is not None and len(record.turns) > 1 else "")
    flag = f"--max-{context_kind}-length={limit}"
    if limits.overlong == "drop":
        raise _Overlong(f"{where} sequence of {longest} tokens exceeds {flag}")
    evidence = record.evidence_spans if context_kind == "long" else ()
    if evidence:
        return _fit_keeping_evidence(tokenizer, context, evidence, build, limit, longest, limits,
                                     where, flag)
    context_ids = tokenizer.encode_text(context)
    excess = longest - limit
    for _ in range(_MAX_TRUNCATION_ATTEMPTS):
        keep = len(context_ids) - excess
        if keep <= 0:  # a prompt without its context is no training example: drop it
            raise _Overlong(f"{where} sequence of {longest} tokens, about {len(context_ids)} of "
                            f"them context, cannot fit {flag} by cutting the context")
        if limits.overlong == "truncate-middle":
            head = keep // 2
            kept = context_ids[:head] + context_ids[len(context_ids) - (keep - head):]
        else:  # truncate-left: the end of the context (nearest the question) is kept
            kept = context_ids[len(context_ids) - keep:]
        sequences = build(tokenizer.decode(kept))
        longest = max(len(tokens) for tokens, _ in sequences.values())
        if longest <= limit:
            return sequences, True
        excess += longest - limit
    raise _Overlong(f"{where} context could not be cut to fit {flag}")


def _fit_keeping_evidence(tokenizer, context: str, evidence, build, limit: int, longest: int,
                          limits: LengthLimits, where: str, flag: str):
    """``_fit_context`` for a long context with evidence spans: only the text between the spans
    is cut (their own text is kept verbatim), the tokens nearest the middle of the context first
    (``truncate-middle``) or the earliest first (``truncate-left``); a record whose evidence
    alone does not fit is dropped."""
    pieces, cursor = [], 0  # (text, is evidence)
    for start, end in evidence:
        if start > cursor:
            pieces.append((context[cursor:start], False))
        pieces.append((context[max(start, cursor):end], True))
        cursor = max(cursor, end)
    if cursor < len(context):
        pieces.append((context[cursor:], False))
    encoded = [(tokenizer.encode_text(text), is_evidence) for text, is_evidence in pieces]
    # Removable tokens as (piece, index in piece, position in the whole context).
    removable, position = [], 0
    for number, (ids, is_evidence) in enumerate(encoded):
        if not is_evidence:
            removable += [(number, i, position + i) for i in range(len(ids))]
        position += len(ids)
    middle = position / 2
    if limits.overlong == "truncate-middle":
        removable.sort(key=lambda item: (abs(item[2] + 0.5 - middle), item[2]))
    excess = longest - limit
    for _ in range(_MAX_TRUNCATION_ATTEMPTS):
        if excess > len(removable):
            raise _Overlong(f"{where} sequence of {longest} tokens cannot fit {flag} without "
                            f"cutting its evidence spans (only {len(removable)} context tokens "
                            f"lie outside them)")
        removed = {(number, i) for number, i, _ in removable[:excess]}
        text = "".join(
            pieces[number][0] if is_evidence else tokenizer.decode(
                [t for i, t in enumerate(ids) if (number, i) not in removed])
            for number, (ids, is_evidence) in enumerate(encoded))
        sequences = build(text)
        longest_now = max(len(tokens) for tokens, _ in sequences.values())
        if longest_now <= limit:
            return sequences, True
        excess += longest_now - limit
    raise _Overlong(f"{where} context could not be cut to fit {flag} keeping its evidence spans")
