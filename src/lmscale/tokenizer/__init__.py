"""Byte-level BPE tokenizers (Hugging Face `tokenizers` underneath) and chat templates."""

from lmscale.tokenizer.bpe import (
    BOS,
    END_OF_TURN_TOKENS,
    EOS,
    MIN_VOCAB_SIZE,
    PAD,
    SPECIAL_TOKENS,
    Tokenizer,
)
from lmscale.tokenizer.chat import render_chat

__all__ = [
    "BOS",
    "END_OF_TURN_TOKENS",
    "EOS",
    "MIN_VOCAB_SIZE",
    "PAD",
    "SPECIAL_TOKENS",
    "Tokenizer",
    "render_chat",
]
