"""Tokenizers with Megatron's type names, and the templates that turn a turn into token ids.

A sequence is ``prompt + response`` (multi-turn: ``prompt_1 + response_1 + user_2 + response_2
...``). The prompt is the whole user turn (system text, context, question) in the model's chat
format, ending where the assistant's answer starts. A response is the answer's tokens followed by
exactly one end-of-sequence token, which belongs to the response: the model learns to stop, and
the loss mask covers it. Prompt and response are tokenized separately (as TRL does), so a BPE merge
across their boundary never hides where the response starts.

Templates:

- ``chat`` (a ``HuggingFaceTokenizer`` whose tokenizer has a ``chat_template``): the prompt is
  ``apply_chat_template([system?, *history, user], add_generation_prompt=True)`` rendered to text
  and tokenized without adding special tokens (exactly what ``apply_chat_template(tokenize=True)``
  does). Turn ``k > 1`` of a multi-turn sequence is the text the template adds after
  ``... + response_{k-1} + eos_token``; a template that does not render an assistant turn as its
  content followed by ``eos_token`` is refused for multi-turn records.
- ``plain`` (``SentencePieceTokenizer``, or a Hugging Face tokenizer without a chat template)::

      [bos] [system "\\n\\n"] [history contents, each + "\\n\\n"] user "\\n"   <- prompt
      response <eos>                                                         <- response
      user_2 "\\n"                                                           <- next turn

  where ``user`` is ``context + "\\n\\n" + question`` (just the question without a context).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional, Sequence

TOKENIZER_TYPES = ("HuggingFaceTokenizer", "SentencePieceTokenizer")
CONTEXT_SEPARATOR = "\n\n"


def files_fingerprint(files: dict) -> str:
    """sha256 over ``{name: path}`` tokenizer files, by name (identity, independent of where the
    files are)."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0")
        digest.update(Path(files[name]).read_bytes())
    return digest.hexdigest()


def user_text(context: Optional[str], question: str) -> str:
    """The user turn: the context before the question."""
    return f"{context}{CONTEXT_SEPARATOR}{question}" if context else question


class TemplateError(ValueError):
    """The tokenizer's chat template cannot express what a record needs (the caller adds the
    record id)."""


class PreferenceTokenizer:
    """The interface the data pipeline uses (see the module docstring for the templates)."""

    tokenizer_type: str
    model_path: str
    vocab_size: int  # unpadded: every id the tokenizer can produce is below it
    eos_id: int
    pad_id: int  # the tokenizer's pad token, else EOS (pads are masked out anyway)
    bos_id: Optional[int]
    template: str  # "chat" or "plain"
    eos_text: str = ""  # the EOS token as text (what a chat template writes after an answer)
    _fingerprint: Optional[str] = None

    @property
    def name(self) -> str:
        """``<type>:<basename of --tokenizer-model>``, for people; identity is ``fingerprint()``."""
        return f"{self.tokenizer_type}:{os.path.basename(os.path.normpath(self.model_path))}"

    def fingerprint(self) -> str:
        """sha256 of the tokenizer's files: equal for copies of the same tokenizer anywhere."""
        if self._fingerprint is None:
            self._fingerprint = files_fingerprint(self._files())
        return self._fingerprint

    def _files(self) -> dict:
        """``{name: path}`` of the files that define the tokenizer."""
        raise NotImplementedError

    def encode_text(self, text: str) -> list[int]:
        """Plain text to ids, no special tokens added."""
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    # -- templates ---------------------------------------------------------------------------
    def encode_prompt(self, system: Optional[str], context: Optional[str], prompt: str) -> list[int]:
        """The whole first user turn (context before the question), ending where the answer
        starts (chat: with the generation prompt)."""
        return self.encode_first_turn(system, [], user_text(context, prompt))

    def encode_messages(self, messages: Sequence[dict]) -> list[int]:
        """A chat prompt given as messages (an optional leading system message, history, and the
        user's turn last), ending where the answer starts."""
        messages = list(messages)
        system = messages.pop(0)["content"] if messages and messages[0]["role"] == "system" else None
        return self.encode_first_turn(system, messages[:-1], messages[-1]["content"])

    def encode_first_turn(self, system: Optional[str], history: Sequence[dict], user: str) -> list[int]:
        if self.template == "chat":
            return self.encode_text(self._render(self._messages(system, history, [user], []), True))
        parts = ([system] if system else []) + [message["content"] for message in history]
        text = "".join(part + CONTEXT_SEPARATOR for part in parts) + user + "\n"
        return ([self.bos_id] if self.bos_id is not None else []) + self.encode_text(text)

    def encode_followup(self, system: Optional[str], history: Sequence[dict],
                        users: Sequence[str], responses: Sequence[str]) -> list[int]:
        """Ids between ``response_{k-1}`` (its EOS included) and ``response_k`` of a multi-turn
        sequence: the next user turn. ``users`` has ``k + 1`` items, ``responses`` ``k``."""
        assert len(users) == len(responses) + 1 and responses
        if self.template != "chat":
            return self.encode_text(users[-1] + "\n")
        before = self._render(self._messages(system, history, users[:-1], responses[:-1]), True)
        before += responses[-1] + self.eos_text
        full = self._render(self._messages(system, history, users, responses), True)
        if not full.startswith(before):
            raise TemplateError(
                f"the chat template of {self.model_path} does not render an assistant turn as its "
                f"content followed by eos_token {self.eos_text!r}, so the turns of a multi-turn "
                f"record cannot be masked exactly; use single-turn records (or a template that "
                f"does)")
        return self.encode_text(full[len(before):])

    def encode_response(self, text: str) -> list[int]:
        """The answer's ids followed by exactly one EOS (not doubled if the text already ends
        with the EOS token)."""
        ids = self.encode_text(text)
        if not ids or ids[-1] != self.eos_id:
            ids.append(self.eos_id)
        return ids

    @staticmethod
    def _messages(system, history, users, responses) -> list[dict]:
        messages = [{"role": "system", "content": system}] if system else []
        messages += [dict(message) for message in history]
        for index, user in enumerate(users):
            messages.append({"role": "user", "content": user})
            if index < len(responses):
                messages.append({"role": "assistant", "content": responses[index]})
        return messages

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        raise NotImplementedError

    def describe(self) -> dict:
        """What the sidecar records about the tokenizer."""
        return {"type": self.tokenizer_type, "name": self.name, "model": str(self.model_path),
                "fingerprint": self.fingerprint(), "vocab_size": self.vocab_size,
                "eos_id": self.eos_id, "pad_id": self.pad_id, "bos_id": self.bos_id,
                "template": self.template}


class SentencePieceTokenizer(PreferenceTokenizer):
    """A SentencePiece ``.model`` file; the plain template."""

    tokenizer_type = "SentencePieceTokenizer"
    template = "plain"

    def __init__(self, model_path: str):
        import sentencepiece

        if not Path(model_path).is_file():
            raise ValueError(f"--tokenizer-model {model_path}: no SentencePiece model file there")
        self.model_path = str(model_path)
        self.processor = sentencepiece.SentencePieceProcessor(model_file=self.model_path)
        self.vocab_size = int(self.processor.get_piece_size())
        if self.processor.eos_id() < 0:
            raise ValueError(f"{model_path}: the SentencePiece model has no EOS piece")
        self.eos_id = int(self.processor.eos_id())
        self.bos_id = int(self.processor.bos_id()) if self.processor.bos_id() >= 0 else None
        pad = self.processor.pad_id()
        self.pad_id = int(pad) if pad >= 0 else self.eos_id
        self.eos_text = self.processor.id_to_piece(self.eos_id)

    def _files(self) -> dict:
        return {"sentencepiece.model": self.model_path}  # any file name: the bytes are the model

    def encode_text(self, text: str) -> list[int]:
        return self.processor.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.processor.decode([int(i) for i in ids])


class HuggingFaceTokenizer(PreferenceTokenizer):
    """A directory loadable offline by ``transformers.AutoTokenizer``; the chat template when the
    tokenizer has one, else the plain template."""

    tokenizer_type = "HuggingFaceTokenizer"
    _FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt", "added_tokens.json",
              "chat_template.jinja", "chat_template.json")

    def __init__(self, model_path: str):
        from transformers import AutoTokenizer

        if not Path(model_path).is_dir():
            raise ValueError(f"--tokenizer-model {model_path}: not a directory with Hugging Face "
                             f"tokenizer files")
        self.model_path = str(model_path)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        if self.tokenizer.eos_token_id is None:
            raise ValueError(f"{model_path}: the tokenizer has no eos_token; set one in "
                             f"tokenizer_config.json (for a chat model: its end-of-turn token)")
        self.vocab_size = len(self.tokenizer)
        self.eos_id = int(self.tokenizer.eos_token_id)
        self.eos_text = str(self.tokenizer.eos_token)
        self.bos_id = (int(self.tokenizer.bos_token_id)
                       if self.tokenizer.bos_token_id is not None else None)
        self.pad_id = int(self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                          else self.eos_id)
        self.template = "chat" if getattr(self.tokenizer, "chat_template", None) else "plain"

    def _files(self) -> dict:
        files = {name: Path(self.model_path) / name for name in self._FILES}
        return {name: path for name, path in files.items() if path.is_file()}

    def encode_text(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids])

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)


def build_tokenizer(tokenizer_type: str, tokenizer_model: str) -> PreferenceTokenizer:
    """``--tokenizer-type`` (Megatron's names) and ``--tokenizer-model`` (an HF tokenizer
    directory, or a SentencePiece ``.model`` file)."""
    if tokenizer_type == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(tokenizer_model)
    if tokenizer_type == "SentencePieceTokenizer":
        return SentencePieceTokenizer(tokenizer_model)
    raise ValueError(f"--tokenizer-type {tokenizer_type!r} is not supported; valid: "
                     f"{', '.join(TOKENIZER_TYPES)}")
