"""What one client does in a round: train the shared tensors on its own text, and measure.

The model is any lmscale `Transformer`; what trains (and so what crosses the wire) is the set of
parameters that require grad: the LoRA adapters' A and B of a pretrained model, or every weight
of one trained from scratch. The data is the client's token stream cut into full windows of
`context + 1` tokens (inputs and their next tokens); a local step takes `batch_size` of them in a
seeded order, so a round is reproducible from (seed, round, client).

The loss of a step is the mean next-token loss over the batch's tokens, plus FedProx's proximal
term mu/2 ||w - w_global||^2 over the shared tensors (Li et al., 2018: it keeps a client's
model near the global one when the clients' data differ). With mu = 0 the step is FedAvg's.

With `dp_noise` set, the steps are DP-SGD (Abadi et al., 2016) through Opacus: each window is
drawn independently with probability batch_size / windows (Poisson sampling, which the
accountant assumes), its gradient clipped to `dp_clip`, and Gaussian noise of std
dp_noise * dp_clip added to the sum. The client's epsilon follows from its step count.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from lmscale.errors import LmscaleError
from lmscale.train.evaluate import EvalResult, evaluate
from lmscale.train.loss import lm_loss_sum


@dataclass
class LocalConfig:
    """How a client trains in one round."""

    steps: int = 20
    """Local optimizer steps per round."""
    batch_size: int = 4
    """Windows per step (the expected number under DP-SGD's Poisson sampling)."""
    context: int = 256
    """Tokens per window."""
    lr: float = 2e-4
    optimizer: str = "adamw"
    """adamw (a fresh one each round, as in FlowerTune) or sgd (plain steps)."""
    mu: float = 0.0
    """FedProx's proximal weight (0: FedAvg)."""
    grad_clip: float = 1.0
    """Clip the gradient norm of a step to this (0: off; DP-SGD clips per sample instead)."""
    dp_noise: float | None = None
    """Sample-level DP-SGD: the noise multiplier (None: off)."""
    dp_clip: float = 1.0
    """Sample-level DP-SGD: the per-window gradient norm bound."""
    eval_tokens: int = 4096
    """Score at most this many held-out tokens per evaluation (the first windows)."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "context", "eval_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                flag = "--" + name.replace("_", "-").replace("steps", "local-steps")
                raise LmscaleError(f"{flag} must be a positive integer, got {value}")
        if self.optimizer not in ("adamw", "sgd"):
            raise LmscaleError(f"optimizer must be adamw or sgd, got {self.optimizer!r}")
        if not self.lr > 0:
            raise LmscaleError(f"--lr must be positive, got {self.lr}")
        if self.mu < 0:
            raise LmscaleError(f"--mu must be non-negative, got {self.mu}")
        if self.dp_noise is not None and not (self.dp_noise > 0 and self.dp_clip > 0):
            raise LmscaleError("sample-level DP needs a positive noise multiplier and clip norm")


@dataclass
class LocalResult:
    """What a round of local training reports (it is sent with the tensors)."""

    loss: float
    """Mean training loss over the round's steps."""
    examples: int
    """Training windows the client holds: FedAvg's weight."""
    steps: int


def token_windows(tokens: np.ndarray, context: int) -> Tensor:
    """The full windows of `context + 1` tokens of a stream, (n, context + 1) int64."""
    n = (len(tokens) - 1) // context
    if n < 1:
        raise LmscaleError(f"a client has {len(tokens)} tokens: fewer than one window of {context}")
    starts = np.arange(n) * context
    idx = starts[:, None] + np.arange(context + 1)[None, :]
    return torch.from_numpy(np.asarray(tokens, dtype=np.int64)[idx])


def shared_state(model: nn.Module) -> dict[str, Tensor]:
    """The tensors a client trains and sends: the parameters that require grad, by name."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def load_shared_(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy `state` (the global model's shared tensors) into `model`'s parameters."""
    params = dict(model.named_parameters())
    expected = {name for name, p in params.items() if p.requires_grad}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise LmscaleError(f"shared tensors do not match the model: missing {missing[:3]}, "
                           f"unexpected {extra[:3]}")  # fmt: skip
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(torch.as_tensor(value))


def batch_order(n: int, batch_size: int, steps: int, seed: int) -> list[Tensor]:
    """The windows of each step: consecutive slices of seeded permutations of range(n)."""
    g = torch.Generator().manual_seed(seed)
    if batch_size >= n:  # a full batch every step
        return [torch.arange(n) for _ in range(steps)]
    order: list[Tensor] = []
    perm, at = torch.randperm(n, generator=g), 0
    for _ in range(steps):
        if at + batch_size > n:
            perm, at = torch.randperm(n, generator=g), 0
        order.append(perm[at : at + batch_size])
        at += batch_size
    return order


def train_round(model: nn.Module, windows: Tensor, config: LocalConfig, seed: int) -> LocalResult:
    """`config.steps` local steps on `windows` (see the module docstring)."""
    if config.dp_noise is not None:
        return _train_round_dp(model, windows, config, seed)
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if config.mu > 0 else []
    optimizer = _optimizer(params, config)
    model.train()
    losses = []
    for idx in batch_order(len(windows), config.batch_size, config.steps, seed):
        batch = windows[idx]
        inputs, targets = batch[:, :-1], batch[:, 1:]
        loss = lm_loss_sum(model, inputs, targets) / targets.numel()
        losses.append(loss.item())
        if anchor:
            loss = loss + config.mu / 2 * sum(
                (p - a).pow(2).sum() for p, a in zip(params, anchor, strict=True)
            )
        loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    _check_finite(losses)
    return LocalResult(float(np.mean(losses)), len(windows), config.steps)


def _train_round_dp(model: nn.Module, windows: Tensor, config: LocalConfig, seed: int):
    """DP-SGD steps through Opacus: per-window clipping and Gaussian noise."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if config.mu > 0 else []
    sampled = GradSampleModule(model, loss_reduction="mean")
    optimizer = DPOptimizer(
        _optimizer(params, config), noise_multiplier=config.dp_noise,
        max_grad_norm=config.dp_clip, expected_batch_size=config.batch_size,
        loss_reduction="mean", generator=torch.Generator().manual_seed(seed + 1),
    )  # fmt: skip
    draw = torch.Generator().manual_seed(seed)
    rate = min(1.0, config.batch_size / len(windows))
    model.train()
    losses = []
    try:
        # Opacus's hooks warn that no module input requires grad: the frozen base's activations
        # do not; the adapters' weights, which do, get their per-sample gradients all the same.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            for _ in range(config.steps):
                batch = windows[torch.rand(len(windows), generator=draw) < rate]
                if len(batch):
                    losses.append(_dp_backward(sampled, batch, config.batch_size))
                else:  # Poisson sampling drew nothing: the step is noise alone
                    for p in params:
                        p.grad_sample = torch.zeros(0, *p.shape, dtype=p.dtype)
                optimizer.pre_step()  # clip per sample, add noise, scale
                if anchor:  # the proximal term depends on no sample: added after the noise
                    with torch.no_grad():
                        for p, a in zip(params, anchor, strict=True):
                            p.grad.add_(config.mu * (p - a))
                optimizer.original_optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    finally:
        sampled._close()
    model.eval()
    _check_finite(losses)
    return LocalResult(float(np.mean(losses)) if losses else math.nan, len(windows), config.steps)


def _dp_backward(sampled: nn.Module, batch: Tensor, expected_batch: int) -> float:
    """Backward of the batch's per-window mean losses summed over the expected batch size
    (Opacus clips each window's gradient, then scales the sum by 1 / expected_batch)."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    logits = sampled(inputs)
    per_token = nn.functional.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), reduction="none"
    ).view_as(targets)
    (per_token.mean(1).sum() / expected_batch).backward()
    return per_token.mean().item()


def _optimizer(params: list[Tensor], config: LocalConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)


def _check_finite(losses: list[float]) -> None:
    if losses and not all(math.isfinite(x) for x in losses):
        raise LmscaleError("a client's loss is not finite; try a lower --lr")


def evaluate_tokens(model: nn.Module, tokens: np.ndarray, config: LocalConfig) -> EvalResult:
    """Held-out loss and perplexity (lmscale's one definition) on the first `eval_tokens`."""
    return evaluate(model, tokens, config.context, batch_size=4, max_tokens=config.eval_tokens)
