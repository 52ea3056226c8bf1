"""Text handling shared by the pipelines: prompt templates (replaceable files), paragraph
splitting and greedy chunking, parsing of generated questions, and the answer filters."""

from __future__ import annotations

import collections
import re
from importlib import resources
from pathlib import Path
from typing import Callable, Optional, Sequence

TEMPLATE_FILES = ("longpo_questions.txt", "longpo_reference_phrases.txt", "refusal_phrases.txt",
                  "solopo_question.txt")


class Templates:
    """The shipped prompt templates (``construct/templates/``), each replaceable by a file of the
    same name in ``override_dir`` (``--templates DIR``). Placeholders are ``{context}``,
    ``{question}``, ``{num_questions}``; other braces are left alone (LaTeX, code)."""

    def __init__(self, override_dir: Optional[str] = None):
        self.override_dir = Path(override_dir) if override_dir else None
        if self.override_dir is not None:
            if not self.override_dir.is_dir():
                raise ValueError(f"--templates {override_dir}: not a directory")
            unknown = sorted(p.name for p in self.override_dir.iterdir()
                             if p.suffix == ".txt" and p.name not in TEMPLATE_FILES)
            if unknown:
                raise ValueError(f"--templates {override_dir}: unknown template file(s) "
                                 f"{', '.join(unknown)}; known: {', '.join(TEMPLATE_FILES)}")

    def text(self, name: str) -> str:
        if self.override_dir is not None and (self.override_dir / name).is_file():
            return (self.override_dir / name).read_text(encoding="utf-8")
        return resources.files("megatron_solopo.construct").joinpath("templates", name) \
            .read_text(encoding="utf-8")

    def lines(self, name: str) -> list[str]:
        """Non-empty, non-comment lines (phrase lists)."""
        return [line.strip() for line in self.text(name).splitlines()
                if line.strip() and not line.lstrip().startswith("#")]

    def fill(self, name: str, **values) -> str:
        text = self.text(name).strip("\n")
        for key in ("context", "question", "num_questions"):
            placeholder = "{" + key + "}"
            if key in values:
                if placeholder not in text:
                    raise ValueError(f"template {name} has no {placeholder} placeholder")
                text = text.replace(placeholder, str(values[key]))
        return text

    def describe(self) -> dict:
        """Template texts, for the settings fingerprint (a changed template is a new run)."""
        return {name: self.text(name) for name in TEMPLATE_FILES}


# ----------------------------------------------------------------------------------------------
# Paragraphs and chunks
# ----------------------------------------------------------------------------------------------
SPLIT_RULES = ("auto", "blank-lines", "latex-sections")
_LATEX_SECTION = re.compile(r"(?=\\(?:sub)*section\*?\{)")
_BLANK_LINES = re.compile(r"\n[ \t]*\n")


def split_paragraphs(text: str, rule: str = "auto") -> list[str]:
    """Paragraphs of ``text`` (stripped, non-empty). Rules: ``blank-lines``; ``latex-sections``
    (before each ``\\section{``/``\\subsection{``, arXiv); ``auto`` (latex-sections when the text
    has a ``\\section{``, else blank lines); ``regex:PATTERN`` (split where PATTERN matches)."""
    if rule == "auto":
        rule = "latex-sections" if "\\section{" in text else "blank-lines"
    if rule == "blank-lines":
        parts = _BLANK_LINES.split(text)
    elif rule == "latex-sections":
        parts = _LATEX_SECTION.split(text)
    elif rule.startswith("regex:"):
        try:
            parts = re.split(rule[len("regex:"):], text)
        except re.error as err:
            raise ValueError(f"--split-rule {rule!r}: invalid regular expression ({err})") from None
    else:
        raise ValueError(f"--split-rule {rule!r}; valid: {', '.join(SPLIT_RULES)}, regex:PATTERN")
    return [part.strip() for part in parts if part and part.strip()]


PARAGRAPH_JOIN = "\n\n"


def group_chunks(paragraphs: Sequence[str], count_tokens: Callable[[str], int], min_tokens: int,
                 max_tokens: int) -> tuple[list[str], int]:
    """Greedily group consecutive paragraphs into chunks of at most ``max_tokens`` tokens; a chunk
    is closed when the next paragraph would not fit, and kept if it has at least ``min_tokens``.
    Returns ``(kept chunks, number of chunks dropped as out of range)``. Token counts are summed
    per paragraph (a close, cheap estimate of the chunk's own count)."""
    chunks, dropped = [], 0
    current: list[str] = []
    current_tokens = 0

    def close():
        nonlocal dropped
        if current:
            if min_tokens <= current_tokens <= max_tokens:
                chunks.append(PARAGRAPH_JOIN.join(current))
            else:
                dropped += 1

    for paragraph in paragraphs:
        tokens = count_tokens(paragraph)
        if current and current_tokens + tokens > max_tokens:
            close()
            current, current_tokens = [], 0
        current.append(paragraph)
        current_tokens += tokens
    close()
    return chunks, dropped


# ----------------------------------------------------------------------------------------------
# Parsing generated questions
# ----------------------------------------------------------------------------------------------
_NUMBERED = re.compile(r"^\s*(?:[#*\-]+\s*)?(?:\*\*)?(?:q(?:uestion)?\s*)?(\d{1,2})\s*[.):：]"
                       r"\s*(?:\*\*)?\s*(.+?)\s*(?:\*\*)?\s*$", re.IGNORECASE)


def parse_questions(text: str, expected: int = 0) -> list[str]:
    """The questions of a numbered list (``1. ...``, ``2) ...``, ``Q3: ...``, ``**4.** ...``),
    in order; numbering must run 1, 2, 3, ... (a list that restarts or skips is cut there).
    When one question is ``expected`` and the text has no numbered line, its first non-empty
    line is the question."""
    questions = []
    for line in text.splitlines():
        match = _NUMBERED.match(line)
        if not match:
            continue
        number, question = int(match.group(1)), match.group(2).strip().strip("*").strip()
        if number != len(questions) + 1:
            break
        if question:
            questions.append(question)
    if expected == 1 and not questions:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        questions = lines[:1]
    return questions


# ----------------------------------------------------------------------------------------------
# Answer filters
# ----------------------------------------------------------------------------------------------
def repeated_word_ratio(text: str) -> float:
    """``1 - distinct words / words``: near 1 for an answer that repeats a few words."""
    words = text.split()
    return 1.0 - len(set(words)) / len(words) if words else 0.0


class AnswerFilter:
    """LongPO's answer filters (official code): empty; "meaningless" (repeated-word ratio above
    ``max_repetition``, or fewer than 2 words of 3+ characters); a refusal phrase (case
    insensitive). ``reason(text)`` is None for a kept answer, else the reason's name."""

    def __init__(self, refusal_phrases: Sequence[str], max_repetition: float,
                 min_long_words: int = 2):
        self.refusals = [p.lower() for p in refusal_phrases]
        self.max_repetition = max_repetition
        self.min_long_words = min_long_words

    def reason(self, text: str) -> Optional[str]:
        if not text or not text.strip():
            return "empty"
        words = text.split()
        if repeated_word_ratio(text) > self.max_repetition or \
                sum(len(word) >= 3 for word in words) < self.min_long_words:
            return "repetitive"
        lowered = text.lower()
        if any(phrase in lowered for phrase in self.refusals):
            return "refusal"
        return None


class Counts(collections.Counter):
    """Dropped items by reason (JSON-able)."""
