"""Sampling parameters and the choice of the next token from logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lmscale.errors import LmscaleError


@dataclass
class SamplingParams:
    """How to pick each next token."""

    temperature: float = 1.0
    """Softmax temperature; 0 means greedy (always the most likely token)."""
    top_k: int | None = None
    """Sample only among the k most likely tokens."""
    top_p: float | None = None
    """Sample only among the smallest set of tokens whose probabilities sum to at least p."""
    max_new_tokens: int = 256
    """Stop after this many generated tokens."""
    stop: list[str] | None = None
    """Stop when the generated text contains any of these strings (not included in the output)."""
    seed: int | None = None
    """Seed of the sampler, for reproducible output."""

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise LmscaleError(f"temperature must not be negative, got {self.temperature}")
        if self.top_k is not None and self.top_k <= 0:
            raise LmscaleError(f"top-k must be positive, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise LmscaleError(f"top-p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 0:
            raise LmscaleError(f"max-new-tokens must not be negative, got {self.max_new_tokens}")


def sample_next(
    logits: Tensor, params: SamplingParams, generator: torch.Generator | None = None
) -> Tensor:
    """Next token ids (B,) from last-position logits (B, vocab)."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / params.temperature
    if params.top_k is not None:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1:
        logits = _top_p_filter(logits, params.top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """Keep the most likely tokens until their mass reaches top_p (always at least one)."""
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # mass of strictly more likely tokens
    sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
