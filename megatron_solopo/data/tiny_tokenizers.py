"""Tiny tokenizers trained on the synthetic tasks' vocabulary, for tests and the demo (no
downloads, about a second each).

- ``train_sentencepiece_tokenizer``: a BPE SentencePiece ``.model`` (``--tokenizer-type
  SentencePieceTokenizer``); ids: pad 0, bos 1, eos 2, unk 3.
- ``make_hf_tokenizer``: a byte-level BPE ``PreTrainedTokenizerFast`` directory with bos/eos/pad
  tokens and a small chat template (``--tokenizer-type HuggingFaceTokenizer``), loadable offline
  with ``transformers.AutoTokenizer.from_pretrained(output_dir)``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

# <|role|> headers; an assistant turn is its content followed by eos_token, which is what
# multi-turn masking needs (tokenizers.py).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")


def _default_texts() -> list[str]:
    from megatron_solopo.data.synthetic import corpus

    return corpus()


def train_sentencepiece_tokenizer(output_dir: str, vocab_size: int = 256,
                                  texts: Optional[Sequence[str]] = None) -> str:
    """A BPE SentencePiece model trained on ``texts`` (default: the synthetic tasks' corpus);
    returns the path of ``<output_dir>/tokenizer.model``."""
    import sentencepiece

    Path(output_dir).mkdir(parents=True, exist_ok=True)
    prefix = os.path.join(output_dir, "tokenizer")
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts or _default_texts()), model_prefix=prefix,
        vocab_size=vocab_size, model_type="bpe", character_coverage=1.0, pad_id=0, bos_id=1,
        eos_id=2, unk_id=3, byte_fallback=False, num_threads=1, minloglevel=2,
        hard_vocab_limit=False)
    return prefix + ".model"


def make_hf_tokenizer(output_dir: str, vocab_size: int = 300,
                      texts: Optional[Sequence[str]] = None) -> str:
    """A byte-level BPE ``PreTrainedTokenizerFast`` with bos/eos/pad tokens and ``CHAT_TEMPLATE``,
    saved to ``output_dir`` (returned)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts or _default_texts(), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>",
                                      eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    wrapped.chat_template = CHAT_TEMPLATE
    wrapped.save_pretrained(output_dir)
    return output_dir
