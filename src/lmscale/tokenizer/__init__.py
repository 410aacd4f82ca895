"""Byte-level BPE tokenizers (Hugging Face `tokenizers` underneath)."""

from lmscale.tokenizer.bpe import BOS, EOS, MIN_VOCAB_SIZE, PAD, SPECIAL_TOKENS, Tokenizer

__all__ = ["BOS", "EOS", "MIN_VOCAB_SIZE", "PAD", "SPECIAL_TOKENS", "Tokenizer"]
