"""Adapters from long-context QA datasets to one item type, ``QAItem`` (docs/data_construction.md
shows both layouts):

- ``musique`` (MuSiQue): ``{"id", "question", "answer", "answer_aliases": [...], "answerable",
  "paragraphs": [{"idx", "title", "paragraph_text", "is_supporting"}]}``; unanswerable records
  (``"answerable": false``) are skipped;
- ``hotpotqa`` (HotpotQA, distractor setting): ``{"_id", "question", "answer", "context":
  [[title, [sentence, ...]], ...], "supporting_facts": [[title, sentence index], ...]}``; a
  paragraph is supporting when a supporting fact names its title.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from megatron_solopo.construct.inputs import field

QA_FORMATS = ("musique", "hotpotqa")


@dataclasses.dataclass
class Paragraph:
    title: str
    text: str
    is_supporting: bool

    def render(self) -> str:
        return f"Title: {self.title}\n{self.text}" if self.title else self.text


@dataclasses.dataclass
class QAItem:
    question: str
    answers: list  # the answer and its aliases
    paragraphs: list  # list[Paragraph]
    skip: Optional[str] = None  # why the record cannot be used (counted, not an error)


def parse_musique(row, where: str):
    item_id = str(field(row, "id", where, (str, int)))
    question = field(row, "question", where)
    answer = field(row, "answer", where)
    aliases = field(row, "answer_aliases", where, list, required=False) or []
    if not all(isinstance(a, str) for a in aliases):
        raise ValueError(f"{where}: field 'answer_aliases': should be a list of strings")
    paragraphs = []
    for number, paragraph in enumerate(field(row, "paragraphs", where, list)):
        here = f"{where}: paragraphs[{number}]"
        paragraphs.append(Paragraph(field(paragraph, "title", here, required=False) or "",
                                    field(paragraph, "paragraph_text", here),
                                    bool(field(paragraph, "is_supporting", here, bool))))
    skip = "unanswerable" if row.get("answerable") is False else None
    return item_id, QAItem(question, [answer, *aliases], paragraphs, skip)


def parse_hotpotqa(row, where: str):
    raw_id = field(row, "_id", where, (str, int), required=False)
    item_id = str(raw_id if raw_id is not None else field(row, "id", where, (str, int)))
    question = field(row, "question", where)
    answer = field(row, "answer", where)
    facts = field(row, "supporting_facts", where, list)
    supporting = set()
    for number, fact in enumerate(facts):
        if not isinstance(fact, (list, tuple)) or not fact or not isinstance(fact[0], str):
            raise ValueError(f"{where}: field 'supporting_facts[{number}]': should be "
                             f"[title, sentence index]")
        supporting.add(fact[0])
    paragraphs = []
    for number, entry in enumerate(field(row, "context", where, list)):
        if (not isinstance(entry, (list, tuple)) or len(entry) != 2 or not isinstance(entry[0], str)
                or not isinstance(entry[1], list)):
            raise ValueError(f"{where}: field 'context[{number}]': should be [title, [sentence, "
                             f"...]]")
        title, sentences = entry
        paragraphs.append(Paragraph(title, "".join(str(s) for s in sentences).strip(),
                                    title in supporting))
    return item_id, QAItem(question, [answer], paragraphs)


PARSERS = {"musique": parse_musique, "hotpotqa": parse_hotpotqa}


def qa_parser(name: str):
    if name not in PARSERS:
        raise ValueError(f"--format {name!r}; valid: {', '.join(QA_FORMATS)}")
    return PARSERS[name]
