"""Supervised fine-tuning of a LoRA (or QLoRA) adapter on chat data.

The pieces are the training loop's: its optimizer (over the parameters that require grad:
here the adapter's A and B only), its warm-up + cosine schedule, autocast and gradient
scaling, its summed token loss with IGNORE_INDEX, and its metrics log. What differs from
`lmscale.train.loop` is the strategy: which parameters train (the adapter), the data (packed
chat rows whose targets are the assistant's tokens) and what is saved (the adapter folder).

Under torchrun (`lmscale finetune lora --nproc N`) the same loop runs on every process with the
model parallelized by `lmscale.parallel` (ddp, fsdp or hsdp: see `finetune.distributed`).
`batch_size` stays the global number of rows per step: every rank draws the same rows in the
same order and trains on its own slice of each batch, the loss is summed over ranks and divided
by the global count of scored tokens, so N processes take the steps one process would.
Only rank 0 prints, logs and writes the adapter (gathered whole from FSDP's shards).
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from lmscale.checkpoint import load_pretrained
from lmscale.compress.quantize import QuantConfig, quantize_
from lmscale.errors import LmscaleError
from lmscale.finetune.adapter import WEIGHTS, adapter_record, write_adapter
from lmscale.finetune.distributed import adapter_strategy, barrier, full_adapter_state
from lmscale.finetune.lora import LoRAConfig, apply_lora_
from lmscale.finetune.sft_data import Example, RowLoader, build_rows, read_chat_jsonl
from lmscale.finetune.shakespeare_chat import NAME as SHAKESPEARE_SPEAKERS
from lmscale.finetune.shakespeare_chat import speaker_conversations
from lmscale.model import Transformer
from lmscale.model.quantized import QuantizedLinear
from lmscale.parallel import (
    ParallelConfig,
    Ranks,
    destroy_process_group,
    device_for,
    init_process_group,
    ranks_from_env,
)
from lmscale.parallel.grads import clip_grad_norm_
from lmscale.parallel.parallelize import Parallel, parallelize
from lmscale.train.loss import count_targets, lm_loss_sum
from lmscale.train.metrics import MetricsLog
from lmscale.train.optim import build_optimizer, lr_at
from lmscale.train.precision import DTYPES, autocast, grad_scaler, resolve_device


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
    """Packed rows per step, over all processes (each data-parallel rank trains on its share)."""
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
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """The strategy under torchrun (ddp, fsdp or hsdp); one process ignores it."""

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
    strategy: str = "none"
    processes: int = 1
    is_main: bool = True
    """False on every rank but 0 of a distributed run, which alone reports."""

    def as_dict(self) -> dict:
        out = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}
        del out["is_main"]
        return out


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
    ranks = ranks_from_env()
    strategy = adapter_strategy(config.parallel, ranks.world_size)
    device = device_for(ranks, resolve_device(config.device))
    model, rows, pad_id = _adapted_model(config, lora, device)
    record = adapter_record(  # hashes the base while it is whole (before FSDP shards it)
        model, lora, extra={"base_model": config.model, "training": asdict(config)}
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters()) + _buffer_weights(model)
    if strategy != "none":
        init_process_group(ranks, device, config.parallel.backend, config.parallel.timeout_s)
    finished = False
    try:
        parallel = parallelize(model, config.parallel, ranks, device, DTYPES[config.dtype])
        torch.manual_seed(config.seed + parallel.dp_rank)  # each rank its own dropout masks
        loader = RowLoader(
            rows, config.batch_size, pad_id, config.seed, parallel.dp_rank, parallel.dp_size
        )
        losses, times = _train_logged(parallel, loader, config, ranks, out, progress)
        state = full_adapter_state(parallel.module)  # all ranks: gathers FSDP's shards
        if ranks.is_main:
            write_adapter(out, state, record)
        finished = True
    finally:
        _teardown(strategy, finished)
    tokens = config.batch_size * statistics.median(len(r.inputs) for r in rows)
    return SFTSummary(
        out, config.steps, losses[0], losses[-1], trainable, total, len(rows),
        tokens / statistics.median(times), strategy, ranks.world_size, ranks.is_main,
    )  # fmt: skip


def _adapted_model(
    config: SFTConfig, lora: LoRAConfig, device: torch.device
) -> tuple[Transformer, list[Example], int]:
    """The base with its fresh adapter (the same on every rank), the packed rows, the pad id."""
    conversations = _conversations(config.data)  # a bad file fails before the model loads
    model, tokenizer = load_pretrained(config.model, device)
    rows = build_rows(tokenizer, conversations, config.max_length, config.packing)
    torch.manual_seed(config.seed)
    if config.quantize:
        quantize_(model, QuantConfig(config.quantize, config.group_size))
    apply_lora_(model, lora)
    return model, rows, tokenizer.pad_id or 0


def _teardown(strategy: str, finished: bool) -> None:
    if strategy == "none":
        return
    if finished:  # rank 0 has written the adapter before any rank reports
        barrier()
    destroy_process_group()


def _conversations(data: str) -> list:
    if data == SHAKESPEARE_SPEAKERS:
        return speaker_conversations()
    return read_chat_jsonl(data)


def _train_logged(
    parallel: Parallel, loader: RowLoader, config: SFTConfig, ranks: Ranks, out: Path,
    progress: bool,
) -> tuple[list[float], list[float]]:  # fmt: skip
    """`_train` with rank 0's metrics log in `out` (the folder stays a small artifact)."""
    if not ranks.is_main:
        return _train(parallel, loader, config, None, progress=False)
    out.mkdir(parents=True, exist_ok=True)
    metrics = MetricsLog(out, tensorboard=False)
    try:
        return _train(parallel, loader, config, metrics, progress)
    finally:
        metrics.close()


def _train(
    parallel: Parallel, loader: RowLoader, config: SFTConfig, metrics: MetricsLog | None,
    progress: bool,
) -> tuple[list[float], list[float]]:  # fmt: skip
    """Run `config.steps` optimizer steps; returns the loss and duration of each."""
    model = parallel.module
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, "adamw", config.lr, config.weight_decay, (0.9, 0.999))
    scaler = grad_scaler(device, config.dtype)
    model.train()
    losses, times = [], []
    bar = tqdm(total=config.steps, disable=not progress, unit="step", dynamic_ncols=True)
    for step in range(config.steps):
        start = time.perf_counter()
        lr = lr_at(step, config.lr, config.warmup_steps, config.steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        inputs, targets = (t.to(device) for t in loader.next_batch())
        n_targets = parallel.dp_sum(torch.tensor(float(count_targets(targets)), device=device))
        with _precision(parallel, device, config.dtype):
            loss_sum = lm_loss_sum(parallel.model, inputs, targets)
        # DDP and FSDP average gradients over the ranks; the loss is a sum over all: undo it.
        scaled = loss_sum / n_targets * parallel.dp_size
        (scaler.scale(scaled) if scaler else scaled).backward()
        _step(optimizer, params, scaler, config.grad_clip, parallel.distributed)
        losses.append((parallel.dp_sum(loss_sum.detach()) / n_targets).item())
        times.append(time.perf_counter() - start)
        if not math.isfinite(losses[-1]):
            raise LmscaleError(f"loss is {losses[-1]} at step {step + 1}; try a lower --lr")
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if metrics and ((step + 1) % config.log_interval == 0 or step + 1 in (1, config.steps)):
            scored = int(n_targets.item())  # assistant tokens of the step, over all ranks
            metrics.log(step + 1, loss=losses[-1], lr=lr, targets=scored, step_time_s=times[-1])
            if progress:
                tqdm.write(f"step {step + 1}: loss {losses[-1]:.4f}")
    bar.close()
    model.eval()
    return losses, times


def _precision(parallel: Parallel, device: torch.device, dtype: str):
    # FSDP's mixed-precision policy casts the parameters itself; autocast on top would be redundant.
    return contextlib.nullcontext() if parallel.mixed_precision else autocast(device, dtype)


def _step(optimizer, params, scaler, clip: float, distributed: bool) -> None:
    if scaler:
        scaler.unscale_(optimizer)
    if clip > 0:
        clip_fn = clip_grad_norm_ if distributed else torch.nn.utils.clip_grad_norm_
        clip_fn(params, clip)  # DTensor-aware under FSDP
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
