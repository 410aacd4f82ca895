"""Loss and perplexity, with one fixed definition used everywhere in lmscale.

The text is tokenized once and cut into non-overlapping windows of `context` tokens. Every token
of a window except its first is scored (predicted from the tokens before it in the same window);
a trailing window shorter than `context` counts the same way when it holds at least two tokens.
Perplexity is exp(mean negative log-likelihood over all scored tokens).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class EvalResult:
    loss: float
    """Mean negative log-likelihood per scored token (nats)."""
    tokens: int
    """Number of scored tokens."""

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else math.inf

    def as_dict(self) -> dict[str, float | int]:
        return {"loss": self.loss, "perplexity": self.perplexity, "tokens": self.tokens}


def windows(tokens: np.ndarray, context: int, max_tokens: int | None = None) -> list[np.ndarray]:
    """Non-overlapping windows of at most `context` tokens, each with at least two tokens."""
    if max_tokens is not None:
        tokens = tokens[: max_tokens + 1]
    cuts = range(0, len(tokens), context)
    return [tokens[i : i + context] for i in cuts if len(tokens[i : i + context]) >= 2]


@torch.no_grad()
def evaluate(
    model: nn.Module, tokens: np.ndarray, context: int, batch_size: int = 8,
    autocast: contextlib.AbstractContextManager | None = None, max_tokens: int | None = None,
    length_multiple: int = 1,
    loss_sum: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> EvalResult:  # fmt: skip
    """Mean NLL of `model` on a token stream, by the definition in this module's docstring.

    Args:
        model: maps (B, T) token ids to (B, T, vocab) logits.
        tokens: the token ids of the text, 1-D.
        context: window length in tokens.
        batch_size: windows per forward pass.
        autocast: a context manager for mixed precision, or None.
        max_tokens: score only the first windows covering this many tokens.
        length_multiple: pad inputs on the right to a multiple of this (sequence-parallel
            models split the sequence evenly); causal attention keeps the scores unchanged.
        loss_sum: `(inputs, targets) -> summed NLL` in place of the model's logits (a pipeline,
            whose logits exist only on its last stage).
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    chunks = windows(np.asarray(tokens), context, max_tokens)
    try:
        for full in _batches_of_equal_length(chunks, batch_size):
            batch = torch.from_numpy(np.stack(full).astype(np.int64)).to(device)
            inputs = batch[:, :-1]
            pad = -inputs.shape[1] % length_multiple
            with autocast or contextlib.nullcontext():
                if loss_sum is not None:
                    nll = loss_sum(inputs, batch[:, 1:])
                else:
                    logits = model(F.pad(inputs, (0, pad)) if pad else inputs)
                    nll = F.cross_entropy(
                        logits[:, : inputs.shape[1]].flatten(0, 1).float(), batch[:, 1:].flatten(),
                        reduction="sum",
                    )  # fmt: skip
            total += nll.item()
            count += batch[:, 1:].numel()
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("nothing to evaluate: the text has fewer than two tokens")
    return EvalResult(loss=total / count, tokens=count)


def _batches_of_equal_length(chunks: list[np.ndarray], batch_size: int):
    """Group windows into batches; the short trailing window (if any) goes in a batch alone."""
    full = [c for c in chunks if len(c) == len(chunks[0])]
    for i in range(0, len(full), batch_size):
        yield full[i : i + batch_size]
    if len(full) < len(chunks):
        yield chunks[len(full) :]


def unigram_loss(
    train_tokens: np.ndarray, eval_tokens: np.ndarray, vocab_size: int, context: int,
    max_tokens: int | None = None,
) -> EvalResult:  # fmt: skip
    """The same measure for a unigram model fitted on `train_tokens` (add-one smoothing).

    This is the bar a language model must clear: it knows token frequencies and nothing else.
    """
    counts = np.bincount(np.asarray(train_tokens, dtype=np.int64), minlength=vocab_size) + 1.0
    log_probs = np.log(counts / counts.sum())
    scored = np.concatenate([w[1:] for w in windows(np.asarray(eval_tokens), context, max_tokens)])
    return EvalResult(loss=float(-log_probs[scored.astype(np.int64)].mean()), tokens=len(scored))
