"""Captions -> token ids. Real runs use the pretrained text encoder's tokenizer; a text encoder with random
weights (the demo, tests) gets a word vocabulary built from the training captions, stored with the checkpoint."""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch

__all__ = ["SPECIAL_TOKENS", "build_word_vocab", "make_tokenizer", "tokenize"]

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build_word_vocab(captions: Iterable[str]) -> list[str]:
    """BERT's special tokens, then every lower-cased word and punctuation mark of the captions, sorted."""
    words = {w for c in captions for w in re.findall(r"\w+|[^\w\s]", c.lower())}
    return SPECIAL_TOKENS + sorted(words)


def make_tokenizer(pretrained: str | None, vocab: list[str] | None = None):
    from transformers import AutoTokenizer, BertTokenizer

    if vocab is not None:
        return BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    if pretrained is None:
        raise ValueError("no tokenizer: set model.tokenizer (or model.text.pretrained), or build a word vocabulary")
    return AutoTokenizer.from_pretrained(pretrained)


def tokenize(tokenizer, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    out = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}
