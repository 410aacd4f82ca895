"""The training loop: one loop for every run, on one process.

A run directory holds `config.toml`, `metrics.jsonl`, TensorBoard events and `checkpoints/`.
Resuming restores weights, optimizer, loader position and RNG state, so a run stopped at step N
and resumed reaches the same weights as one never stopped.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from lmscale.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from lmscale.config import to_dict
from lmscale.data import Loader, TokenDataset
from lmscale.errors import LmscaleError
from lmscale.model import Transformer
from lmscale.tokenizer import Tokenizer
from lmscale.train.config import RunConfig, load_run_config
from lmscale.train.evaluate import EvalResult, evaluate, unigram_loss
from lmscale.train.loss import count_targets, lm_loss_sum
from lmscale.train.metrics import MetricsLog
from lmscale.train.optim import build_optimizer, lr_at
from lmscale.train.precision import autocast, grad_scaler, peak_memory_bytes, resolve_device

CHECKPOINTS = "checkpoints"


class NonFiniteLoss(LmscaleError):
    """The loss became NaN or infinite; the run stopped without saving over good checkpoints."""


@dataclass
class TrainSummary:
    """What a finished run reports."""

    run_dir: Path
    steps: int
    loss: float
    tokens_per_s: float
    """Median training throughput over the steps of this session."""
    val: EvalResult | None = None
    unigram: EvalResult | None = None
    checkpoint: Path | None = None

    def as_dict(self) -> dict:
        out = {"run_dir": str(self.run_dir), "steps": self.steps, "loss": self.loss}
        out["tokens_per_s"] = self.tokens_per_s
        out["checkpoint"] = str(self.checkpoint) if self.checkpoint else None
        if self.val:
            out |= {"val_loss": self.val.loss, "val_ppl": self.val.perplexity}
        if self.unigram:
            out |= {
                "unigram_val_loss": self.unigram.loss,
                "unigram_val_ppl": self.unigram.perplexity,
            }
        return out


@dataclass
class Run:
    """The live objects of a run, built by `setup`."""

    config: RunConfig
    run_dir: Path
    device: torch.device
    model: Transformer
    """The plain model: what checkpoints save."""
    optimizer: torch.optim.Optimizer
    loader: Loader
    train_data: TokenDataset
    val_data: TokenDataset | None
    tokenizer: Tokenizer
    context: int
    step: int = 0
    step_times: list[float] = field(default_factory=list)
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] = lm_loss_sum
    """Summed loss of a micro-batch: `lm_loss_sum`, compiled (with the model inside) if asked."""


def train(
    config: RunConfig, run_dir: str | Path, resume: bool = False, progress: bool = True
) -> TrainSummary:
    """Train `config` into `run_dir` (resuming from its latest checkpoint if `resume`)."""
    run = setup(config, Path(run_dir), resume)
    metrics = MetricsLog(run.run_dir)
    cfg = run.config.train
    unigram = _unigram_baseline(run)
    if unigram and progress:
        tqdm.write(
            f"unigram baseline: val loss {unigram.loss:.4f} | val ppl {unigram.perplexity:.2f}"
        )
    bar = tqdm(
        total=cfg.max_steps, initial=run.step, disable=not progress, unit="step", dynamic_ncols=True
    )
    val, ckpt, loss = None, None, math.nan
    try:
        while run.step < cfg.max_steps:
            loss = train_step(run)
            bar.update(1)
            bar.set_postfix(
                loss=f"{loss:.4f}", tok_s=f"{_tokens_per_step(run) / run.step_times[-1]:,.0f}"
            )
            _log_step(run, metrics, loss)
            last = run.step == cfg.max_steps
            if cfg.eval_interval and run.val_data and (run.step % cfg.eval_interval == 0 or last):
                val = _evaluate(run, metrics, progress)
            if last or (cfg.checkpoint_interval and run.step % cfg.checkpoint_interval == 0):
                ckpt = save(run)
    finally:
        bar.close()
        metrics.close()
    median = statistics.median(run.step_times) if run.step_times else math.nan
    tokens_per_s = _tokens_per_step(run) / median if run.step_times else math.nan
    ckpt = ckpt or latest_checkpoint(run.run_dir / CHECKPOINTS)
    return TrainSummary(run.run_dir, run.step, loss, tokens_per_s, val, unigram, ckpt)


def setup(config: RunConfig, run_dir: Path, resume: bool) -> Run:
    """Build data, model, optimizer and loader; restore them from the latest checkpoint if resuming."""
    ckpt_path = latest_checkpoint(run_dir / CHECKPOINTS) if run_dir.exists() else None
    if ckpt_path and not resume:
        raise LmscaleError(
            f"{run_dir} already holds checkpoints: pass --resume, or choose another --out"
        )
    if resume and ckpt_path is None:
        raise LmscaleError(f"nothing to resume: no checkpoint in {run_dir}")
    device = resolve_device(config.train.device)
    train_data = TokenDataset(config.data.path, "train")
    val_data = TokenDataset(config.data.path, "val")
    val_data = val_data if len(val_data) >= 2 else None
    # Training from scratch: the vocabulary is the data's, whatever the preset said.
    config.model = config.model.replace(vocab_size=train_data.manifest.vocab_size)
    context = config.train.context or config.model.max_seq_len
    if context > config.model.max_seq_len:
        raise LmscaleError(
            f"train.context {context} exceeds model.max_seq_len {config.model.max_seq_len}"
        )
    torch.manual_seed(config.train.seed)
    model = Transformer(config.model).to(device)
    cfg = config.train
    optimizer = build_optimizer(
        model, cfg.optimizer, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.momentum
    )
    loader = Loader(train_data, cfg.batch_size, context, seed=config.data.seed)
    run = Run(
        config, run_dir, device, model, optimizer, loader, train_data, val_data,
        Tokenizer.load(train_data.tokenizer_path), context,
    )  # fmt: skip
    if ckpt_path is not None:
        _restore(run, ckpt_path)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(config.to_toml())
    _apply_speedups(run)
    return run


def train_step(run: Run) -> float:
    """One optimizer step over `grad_accum_steps` micro-batches; returns the mean token loss.

    NOTE: each micro-batch's summed loss is divided by the target count of the whole step, so the
    accumulated gradient equals that of one batch holding every micro-batch.
    """
    cfg = run.config.train
    start = time.perf_counter()
    lr = lr_at(run.step, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    batches = [run.loader.next_batch() for _ in range(cfg.grad_accum_steps)]
    n_targets = sum(count_targets(targets) for _, targets in batches)
    scaler = grad_scaler(run.device, cfg.dtype)
    total = torch.zeros((), device=run.device)
    for inputs, targets in batches:
        inputs, targets = inputs.to(run.device), targets.to(run.device)
        with autocast(run.device, cfg.dtype):
            loss_sum = run.loss_fn(run.model, inputs, targets)
        scaled = loss_sum / n_targets
        (scaler.scale(scaled) if scaler else scaled).backward()
        total += loss_sum.detach()
    loss = total.item() / n_targets
    if not math.isfinite(loss):
        run.optimizer.zero_grad(set_to_none=True)
        saved = latest_checkpoint(run.run_dir / CHECKPOINTS)
        raise NonFiniteLoss(
            f"loss is {loss} at step {run.step + 1}; stopped (last good checkpoint: {saved or 'none'})"
        )
    _optimizer_step(run, scaler)
    run.step += 1
    run.step_times.append(time.perf_counter() - start)
    return loss


def _optimizer_step(run: Run, scaler: torch.amp.GradScaler | None) -> None:
    clip = run.config.train.grad_clip
    if scaler:
        scaler.unscale_(run.optimizer)
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), clip)
    if scaler:
        scaler.step(run.optimizer)
        scaler.update()
    else:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)


def save(run: Run) -> Path:
    """Checkpoint everything `--resume` needs to continue exactly."""
    train_state = {
        "optimizer": run.optimizer.state_dict(),
        "loader": run.loader.state_dict(),
        "rng": _rng_state(),
    }
    # NOTE: the tokenizer's settings (special tokens, chat template) travel in config.json:
    # tokenizer.json itself has no place for them.
    config = {
        "model": to_dict(run.config.model),
        "run": to_dict(run.config),
        "tokenizer": run.tokenizer.settings,
    }
    return save_checkpoint(
        run.run_dir / CHECKPOINTS, run.step, run.model.state_dict(), config,
        tokenizer_json=run.tokenizer.to_json(), train_state=train_state,
        keep=run.config.train.keep_checkpoints,
    )  # fmt: skip


def _restore(run: Run, path: Path) -> None:
    ckpt = load_checkpoint(path)
    run.model.load_state_dict(ckpt.model_state)
    run.optimizer.load_state_dict(ckpt.train_state["optimizer"])
    run.loader.load_state_dict(ckpt.train_state["loader"])
    _set_rng_state(ckpt.train_state["rng"])
    run.step = ckpt.step


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _apply_speedups(run: Run) -> None:
    """Activation checkpointing, then compilation, in torchtitan's order."""
    if run.config.train.activation_checkpointing:
        apply_activation_checkpointing(run.model)
    if run.config.train.compile:
        # The model and the fused loss compile as one graph; the plain model stays what is saved.
        run.loss_fn = torch.compile(lm_loss_sum)


def apply_activation_checkpointing(model: Transformer) -> None:
    """Recompute each block in the backward pass instead of storing its activations.

    The block's forward is wrapped on the instance, so parameter names (and checkpoints) are
    unchanged.
    """
    from torch.utils.checkpoint import checkpoint

    for block in model.layers:
        inner = block.forward
        block.forward = lambda *args, _inner=inner: checkpoint(_inner, *args, use_reentrant=False)


def _tokens_per_step(run: Run) -> int:
    cfg = run.config.train
    return cfg.batch_size * cfg.grad_accum_steps * run.context


def _log_step(run: Run, metrics: MetricsLog, loss: float) -> None:
    cfg = run.config.train
    if run.step % cfg.log_interval and run.step not in (1, cfg.max_steps):
        return
    step_time = run.step_times[-1]
    metrics.log(
        run.step, loss=loss, lr=run.optimizer.param_groups[0]["lr"],
        tokens_per_s=_tokens_per_step(run) / step_time, step_time_s=step_time,
        peak_mem_bytes=peak_memory_bytes(run.device),
    )  # fmt: skip


def _evaluate(run: Run, metrics: MetricsLog, progress: bool) -> EvalResult:
    cfg = run.config.train
    result = evaluate(
        run.model, run.val_data.tokens, run.context, cfg.batch_size,
        autocast(run.device, cfg.dtype), cfg.eval_max_tokens,
    )  # fmt: skip
    metrics.log(run.step, val_loss=result.loss, val_ppl=result.perplexity)
    if progress:
        tqdm.write(f"step {run.step}: val loss {result.loss:.4f} | val ppl {result.perplexity:.2f}")
    return result


def _unigram_baseline(run: Run) -> EvalResult | None:
    if run.val_data is None:
        return None
    vocab = run.config.model.vocab_size
    tokens = run.train_data.tokens, run.val_data.tokens
    return unigram_loss(*tokens, vocab, run.context, run.config.train.eval_max_tokens)


def resume_config(run_dir: str | Path, overrides: list[str]) -> RunConfig:
    """The saved config of a run, with `overrides` applied (e.g. a larger train.max_steps)."""
    path = Path(run_dir) / "config.toml"
    if not path.is_file():
        raise LmscaleError(f"nothing to resume: {path} not found")
    return load_run_config(path, overrides)
