"""Quality of a served model, measured while it serves: a probe text's perplexity, and how well
the model knows the prompts it is sent.

Both are work for the engine thread's idle moments (see `AsyncEngine`): a `QualityMonitor` hands
out one small forward pass at a time, so a request that arrives meanwhile waits for at most one
window of `window` tokens, never for a whole probe.

- **The probe.** A fixed text the operator chose (`lmscale serve --probe FILE`), scored at start
  and every `every_s` seconds. A reload to other weights shows up as a step in its perplexity.
- **The prompts.** Each admitted prompt (its first `window` tokens, the latest `max_pending`
  kept) is scored once when the engine is idle: the mean per-token loss of the traffic. A rise
  means the traffic has moved away from what the model knows.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmscale.errors import LmscaleError
from lmscale.model import Transformer


@torch.inference_mode()
def window_loss(model: Transformer, tokens: Sequence[int]) -> tuple[float, int]:
    """Summed next-token loss (nats) over one window of token ids, and how many tokens it scored.

    A plain forward without a cache: the serving engine's KV pool is never touched.
    """
    if len(tokens) < 2:
        return 0.0, 0
    device = model.tok_embeddings.weight.device
    ids = torch.tensor([list(tokens)], device=device)  # (1, T)
    logits = model(ids[:, :-1]).float()  # (1, T-1, vocab)
    loss = F.cross_entropy(logits[0], ids[0, 1:], reduction="sum")
    return float(loss), len(tokens) - 1


def windows(tokens: Sequence[int], size: int) -> Iterator[Sequence[int]]:
    """`tokens` cut into windows of `size`, each overlapping the last by one token, so every
    token after the first is predicted exactly once."""
    for start in range(0, max(len(tokens) - 1, 0), size - 1):
        yield tokens[start : start + size]


def check_forward(model: Transformer, tokens: Sequence[int]) -> float:
    """The mean loss of `tokens` under `model`; raises if the forward pass is not finite.

    A reload runs this on the new weights before they serve anything.
    """
    total, n = window_loss(model, list(tokens)[: model.config.max_seq_len])
    if n == 0:
        raise LmscaleError("the check needs at least two tokens")
    mean = total / n
    if not math.isfinite(mean):
        raise LmscaleError(f"the model's loss on the check text is {mean}: its weights are broken")
    return mean


@dataclass
class QualitySnapshot:
    """What `/metrics` exports."""

    probe_loss: float | None = None
    """Mean per-token loss (nats) of the probe text at its latest scoring; None before one."""
    probe_timestamp: float | None = None
    """Unix time the latest scoring finished."""
    probe_runs: int = 0
    """Complete scorings of the probe since the engine started."""
    prompt_loss_nats: float = 0.0
    """Summed loss of every prompt token scored since the engine started."""
    prompt_loss_tokens: int = 0
    """Prompt tokens scored since the engine started."""
    recent_prompt_loss: float | None = None
    """Mean per-token loss of the latest `recent` scored prompts; None before any."""


class QualityMonitor:
    """Scores the probe text and recent prompts under `model`, one window per `work()` call.

    Args:
        model: the served model (called only from the engine thread).
        probe: the probe text's token ids, or None for no probe.
        every_s: seconds between the end of one probe scoring and the start of the next.
        window: tokens per forward pass (also the most of each prompt that is scored).
        score_prompts: whether prompts are scored at all.
        max_pending: prompts kept for scoring; older ones are dropped unscored under load.
        recent: prompts averaged in `recent_prompt_loss`.
    """

    def __init__(
        self, model: Transformer, probe: Sequence[int] | None = None, every_s: float = 600.0,
        window: int = 256, score_prompts: bool = True, max_pending: int = 32, recent: int = 32,
    ):  # fmt: skip
        if probe is not None and len(probe) < 2:
            raise LmscaleError("the probe text must hold at least two tokens")
        if every_s <= 0:
            raise LmscaleError(f"the probe interval must be positive, got {every_s}")
        self.model, self.every_s = model, every_s
        self.window = max(2, min(window, model.config.max_seq_len))
        self.probe = list(probe) if probe is not None else None
        self.score_prompts = score_prompts
        self._pending: deque[list[int]] = deque(maxlen=max_pending)
        self._recent: deque[tuple[float, int]] = deque(maxlen=recent)
        self._probe_windows: Iterator[Sequence[int]] | None = None
        self._probe_sum, self._probe_n = 0.0, 0
        self._next_probe = time.monotonic() if self.probe else math.inf
        self.snapshot = QualitySnapshot()

    def record_prompt(self, prompt_ids: Sequence[int]) -> None:
        """Keep a prompt to score when the engine is next idle (engine thread)."""
        if self.score_prompts and len(prompt_ids) >= 2:
            self._pending.append(list(prompt_ids[: self.window]))

    def seconds_until_work(self) -> float:
        """0 if there is work now; else how long until the next probe is due (inf: none)."""
        if self._probe_windows is not None or self._pending:
            return 0.0
        return max(0.0, self._next_probe - time.monotonic())

    def work(self) -> None:
        """One forward pass of pending work: the next probe window, else one prompt."""
        if self._probe_windows is None and time.monotonic() >= self._next_probe:
            self._probe_windows = windows(self.probe, self.window)
            self._probe_sum, self._probe_n = 0.0, 0
        if self._probe_windows is not None:
            self._probe_step()
        elif self._pending:
            self._score_prompt(self._pending.popleft())

    def _probe_step(self) -> None:
        window = next(self._probe_windows, None)
        if window is not None:
            total, n = window_loss(self.model, window)
            self._probe_sum, self._probe_n = self._probe_sum + total, self._probe_n + n
            return
        s = self.snapshot
        s.probe_loss, s.probe_timestamp = self._probe_sum / self._probe_n, time.time()
        s.probe_runs += 1
        self._probe_windows = None
        self._next_probe = time.monotonic() + self.every_s

    def _score_prompt(self, prompt: list[int]) -> None:
        total, n = window_loss(self.model, prompt)
        s = self.snapshot
        s.prompt_loss_nats += total
        s.prompt_loss_tokens += n
        self._recent.append((total, n))
        s.recent_prompt_loss = sum(t for t, _ in self._recent) / sum(k for _, k in self._recent)
