"""Supervised fine-tuning of a LoRA (or QLoRA) adapter on chat data.

The pieces are the training loop's: its optimizer (over the parameters that require grad:
here the adapter's A and B only), its warm-up + cosine schedule, autocast and gradient
scaling, its summed token loss with IGNORE_INDEX, and its metrics log. What differs from
`lmscale.train.loop` is the strategy: which parameters train (the adapter), the data (packed
chat rows whose targets are the assistant's tokens) and what is saved (the adapter folder).

NOTE: this runs on one process. Under torchrun it is refused for now rather than letting
every rank train and write the same adapter.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from lmscale.checkpoint import load_pretrained
from lmscale.compress.quantize import QuantConfig, quantize_
from lmscale.errors import LmscaleError
from lmscale.finetune.adapter import WEIGHTS, save_adapter
from lmscale.finetune.lora import LoRAConfig, LoRALinear, apply_lora_
from lmscale.finetune.sft_data import RowLoader, build_rows, read_chat_jsonl
from lmscale.finetune.shakespeare_chat import NAME as SHAKESPEARE_SPEAKERS
from lmscale.finetune.shakespeare_chat import speaker_conversations
from lmscale.model.quantized import QuantizedLinear
from lmscale.train.loss import count_targets, lm_loss_sum, logits_loss_sum
from lmscale.train.metrics import MetricsLog
from lmscale.train.optim import build_optimizer, lr_at
from lmscale.train.precision import autocast, grad_scaler, resolve_device


@dataclass
class SFTConfig:
    """How to fine-tune (the adapter's shape is a `LoRAConfig`)."""

    model: str = "smollm2-135m-instruct"
    """The base: a bundled name, .gguf, Hugging Face folder or run/model directory."""
    data: str = SHAKESPEARE_SPEAKERS
    """A JSONL file of {"messages": [...]}, or `shakespeare-speakers` (bundled)."""
    steps: int = 100
    """Optimizer steps."""
    batch_size: int = 4
    """Packed rows per step."""
    max_length: int = 512
    """Tokens per row; longer conversations are truncated."""
    packing: bool = True
    """Lay short conversations end to end in a row (see `sft_data`)."""
    lr: float = 2e-4
    """Peak learning rate of the adapter."""
    warmup_steps: int = 10
    """Steps of linear warm-up, then cosine decay to lr / 10."""
    weight_decay: float = 0.0
    """AdamW weight decay on the adapter matrices."""
    grad_clip: float = 1.0
    """Clip the adapter's gradient norm to this (0: off)."""
    quantize: str | None = None
    """QLoRA: quantize the frozen base to int4 or int8 before adding the adapter."""
    group_size: int | None = None
    """int4 group size (32, 64 or 128; default 32)."""
    dtype: str = "float32"
    """Autocast dtype: float32, bfloat16 (CPU or CUDA) or float16 (CUDA)."""
    device: str = "auto"
    """auto, cpu, cuda or cuda:N."""
    seed: int = 0
    """Seed of the adapter's initialisation, dropout and the row order."""
    log_interval: int = 10
    """Print and log the loss every this many steps."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "max_length", "log_interval"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                flag = "--" + name.replace("_", "-")
                raise LmscaleError(f"{flag} must be a positive integer, got {getattr(self, name)}")
        if not self.lr > 0:
            raise LmscaleError(f"--lr must be positive, got {self.lr}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise LmscaleError(f"--dtype must be float32, bfloat16 or float16, got '{self.dtype}'")
        if self.quantize is not None:
            QuantConfig(self.quantize, self.group_size)  # validates method and group size


@dataclass
class SFTSummary:
    """What a finished fine-tuning run reports."""

    out: Path
    steps: int
    first_loss: float
    loss: float
    """Mean assistant-token loss of the last step."""
    trainable_params: int
    total_params: int
    rows: int
    """Packed training rows."""
    tokens_per_s: float
    """Median over steps, counting every (padded) input token."""

    def as_dict(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


def finetune_lora(
    config: SFTConfig, lora: LoRAConfig, out: str | Path, progress: bool = True
) -> SFTSummary:
    """Train a LoRA adapter of `config.model` on chat data and save it to the folder `out`.

    Args:
        config: model, data and optimisation settings.
        lora: the adapter's rank, alpha, dropout and target layers.
        out: the adapter folder (adapter_model.safetensors, adapter_config.json,
            metrics.jsonl); one that already holds an adapter is refused.
        progress: show a progress bar and the loss every `log_interval` steps.

    Returns:
        The summary (also the last line of metrics.jsonl).
    """
    out = Path(out)
    if (out / WEIGHTS).exists():
        raise LmscaleError(f"{out} already holds an adapter: choose a new --out")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise LmscaleError("finetune lora runs on one process for now; start it without torchrun")
    device = resolve_device(config.device)
    conversations = _conversations(config.data)  # a bad file fails before the model loads
    model, tokenizer = load_pretrained(config.model, device)
    rows = build_rows(tokenizer, conversations, config.max_length, config.packing)
    torch.manual_seed(config.seed)
    if config.quantize:
        quantize_(model, QuantConfig(config.quantize, config.group_size))
    apply_lora_(model, lora)
    loader = RowLoader(rows, config.batch_size, tokenizer.pad_id or 0, config.seed)
    out.mkdir(parents=True, exist_ok=True)
    metrics = MetricsLog(out, tensorboard=False)  # the folder stays a small artifact
    try:
        losses, times = _train(model, loader, config, device, metrics, progress)
    finally:
        metrics.close()
    save_adapter(model, out, lora, extra={"base_model": config.model, "training": asdict(config)})
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters()) + _buffer_weights(model)
    tokens = config.batch_size * statistics.median(len(r.inputs) for r in rows)
    return SFTSummary(
        out, config.steps, losses[0], losses[-1], trainable, total, len(rows),
        tokens / statistics.median(times),
    )  # fmt: skip


def _conversations(data: str) -> list:
    if data == SHAKESPEARE_SPEAKERS:
        return speaker_conversations()
    return read_chat_jsonl(data)


def _train(
    model: nn.Module, loader: RowLoader, config: SFTConfig, device: torch.device,
    metrics: MetricsLog, progress: bool,
) -> tuple[list[float], list[float]]:  # fmt: skip
    """Run `config.steps` optimizer steps; returns the loss and duration of each."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, "adamw", config.lr, config.weight_decay, (0.9, 0.999))
    scaler = grad_scaler(device, config.dtype)
    # The fused loss reads `model.output.weight`: an adapted output head needs the plain path.
    loss_fn = logits_loss_sum if isinstance(model.output, LoRALinear) else lm_loss_sum
    model.train()
    losses, times = [], []
    bar = tqdm(total=config.steps, disable=not progress, unit="step", dynamic_ncols=True)
    for step in range(config.steps):
        start = time.perf_counter()
        lr = lr_at(step, config.lr, config.warmup_steps, config.steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        inputs, targets = (t.to(device) for t in loader.next_batch())
        with autocast(device, config.dtype):
            loss = loss_fn(model, inputs, targets) / count_targets(targets)
        (scaler.scale(loss) if scaler else loss).backward()
        _step(optimizer, params, scaler, config.grad_clip)
        losses.append(loss.item())
        times.append(time.perf_counter() - start)
        if not math.isfinite(losses[-1]):
            raise LmscaleError(f"loss is {losses[-1]} at step {step + 1}; try a lower --lr")
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if (step + 1) % config.log_interval == 0 or step + 1 in (1, config.steps):
            metrics.log(step + 1, loss=losses[-1], lr=lr, step_time_s=times[-1])
            if progress:
                tqdm.write(f"step {step + 1}: loss {losses[-1]:.4f}")
    bar.close()
    model.eval()
    return losses, times


def _step(optimizer, params, scaler, clip: float) -> None:
    if scaler:
        scaler.unscale_(optimizer)
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(params, clip)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _buffer_weights(model: nn.Module) -> int:
    """Weights held as integers in buffers rather than parameters (a QLoRA base)."""
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    return sum(m.in_features * m.out_features for m in layers)
