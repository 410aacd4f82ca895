"""The training loop: one loop for every run, on one process or many.

On many processes (torchrun), `lmscale.parallel` applies the configured strategy and the loop
stays the same: each data-parallel rank reads its own rows of every global batch, gradient
communication is skipped on all but the last micro-batch, the loss and token counts are summed
across ranks, and only rank 0 prints and writes logs. Distributed runs checkpoint with DCP
(any world size can resume them); after a killed worker torchrun restarts the group, which
resumes from the latest checkpoint.

A run directory holds `config.toml`, `metrics.jsonl`, TensorBoard events and `checkpoints/`.
Resuming restores weights, optimizer, loader position and RNG state, so a run stopped at step N
and resumed reaches the same weights as one never stopped.
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lmscale.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    load_pretrained,
    save_checkpoint,
)
from lmscale.checkpoint.sharded import is_sharded
from lmscale.config import to_dict
from lmscale.data import Loader, TokenDataset, data_tokenizer
from lmscale.errors import LmscaleError
from lmscale.model import Transformer
from lmscale.parallel import (
    Ranks,
    destroy_process_group,
    device_for,
    init_process_group,
    ranks_from_env,
    restart_count,
)
from lmscale.parallel.checkpoint import load_full_state, load_sharded, save_sharded
from lmscale.parallel.faults import Heartbeat
from lmscale.parallel.grads import clip_grad_norm_
from lmscale.parallel.parallelize import Parallel, parallelize
from lmscale.tokenizer import Tokenizer
from lmscale.train.config import RunConfig, load_run_config
from lmscale.train.distill_loss import DistillLoss
from lmscale.train.evaluate import EvalResult, evaluate, unigram_loss
from lmscale.train.float8 import apply_float8_training
from lmscale.train.loss import count_targets, fused_loss_head, lm_loss_sum
from lmscale.train.memory import MemoryMeter
from lmscale.train.metrics import MetricsLog
from lmscale.train.mfu import mfu_fields
from lmscale.train.optim import build_optimizer, lr_at
from lmscale.train.precision import (
    DTYPES,
    autocast,
    grad_scaler,
    resolve_device,
)
from lmscale.train.run_info import describe_machine, write_run_info

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
    """Median training throughput (all ranks together) over the steps of this session."""
    val: EvalResult | None = None
    unigram: EvalResult | None = None
    checkpoint: Path | None = None
    is_main: bool = True
    """False on every rank but 0 of a distributed run, which alone reports."""

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
    """The model under lmscale's names (sharded in place under FSDP/TP): what checkpoints save."""
    optimizer: torch.optim.Optimizer
    loader: Loader
    train_data: TokenDataset
    val_data: TokenDataset | None
    tokenizer: Tokenizer
    context: int
    parallel: Parallel
    """The strategy applied: `parallel.model` is what the loop calls (DDP's wrapper, say)."""
    ranks: Ranks = field(default_factory=Ranks)
    grad_accum: int = 1
    """Micro-batches per optimizer step on each rank."""
    heartbeat: Heartbeat | None = None
    memory: MemoryMeter | None = None
    """Measures each step's peak memory (held and allocated) for metrics.jsonl."""
    comm_bytes: int | None = None
    """DDP: bytes this rank handed to gradient all-reduces in the last step."""
    step: int = 0
    step_times: list[float] = field(default_factory=list)
    step_seconds: float = 0.0
    """Seconds spent in this session's training steps (logged as `elapsed_s`: what energy needs)."""
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] = lm_loss_sum
    """Summed loss of a micro-batch: `lm_loss_sum`, compiled (with the model inside) if asked."""

    @property
    def is_main(self) -> bool:
        return self.ranks.is_main


def train(
    config: RunConfig, run_dir: str | Path, resume: bool = False, progress: bool = True
) -> TrainSummary:
    """Train `config` into `run_dir` (resuming from its latest checkpoint if `resume`)."""
    run = setup(config, Path(run_dir), resume)
    progress = progress and run.is_main
    metrics = MetricsLog(run.run_dir) if run.is_main else None
    cfg = run.config.train
    unigram = _unigram_baseline(run) if run.is_main else None
    if unigram and progress:
        tqdm.write(
            f"unigram baseline: val loss {unigram.loss:.4f} | val ppl {unigram.perplexity:.2f}"
        )
    bar = tqdm(
        total=cfg.max_steps, initial=run.step, disable=not progress, unit="step", dynamic_ncols=True
    )
    val, ckpt, loss, finished = None, None, math.nan, False
    try:
        while run.step < cfg.max_steps:
            loss = _explained(train_step, run)
            bar.update(1)
            bar.set_postfix(
                loss=f"{loss:.4f}", tok_s=f"{_tokens_per_step(run) / run.step_times[-1]:,.0f}"
            )
            _log_step(run, metrics, loss)
            last = run.step == cfg.max_steps
            if cfg.eval_interval and run.val_data and (run.step % cfg.eval_interval == 0 or last):
                val = _evaluate(run, metrics, progress)
            if last or (cfg.checkpoint_interval and run.step % cfg.checkpoint_interval == 0):
                ckpt = _explained(save, run)
        finished = True
    finally:
        bar.close()
        if metrics:
            metrics.close()
        _teardown(run, finished)
    median = statistics.median(run.step_times) if run.step_times else math.nan
    tokens_per_s = _tokens_per_step(run) / median if run.step_times else math.nan
    ckpt = ckpt or latest_checkpoint(run.run_dir / CHECKPOINTS)
    return TrainSummary(
        run.run_dir, run.step, loss, tokens_per_s, val, unigram, ckpt, is_main=run.is_main
    )


def setup(config: RunConfig, run_dir: Path, resume: bool) -> Run:
    """Build data, model, optimizer and loader; restore them from the latest checkpoint if resuming.

    Under torchrun this joins the process group and applies `config.parallel`'s strategy. After
    torchrun restarted the group (a worker died), a run with checkpoints resumes by itself.
    """
    ckpt_path = _checkpoint_to_resume(run_dir, resume)
    ranks, device, strategy = _join_process_group(config)
    train_data = TokenDataset(config.data.path, "train")
    val_data = TokenDataset(config.data.path, "val")
    val_data = val_data if len(val_data) >= 2 else None
    torch.manual_seed(config.train.seed)  # every rank builds the same initial weights
    meter = MemoryMeter(
        device, track_tensors=strategy in ("none", "ddp") and not config.train.compile
    )
    baseline = meter.baseline()  # what is not the training's: interpreter, libraries, data
    model = _initial_model(config, train_data, device)
    apply_float8_training(model, device, config.train.float8)
    context = config.train.context or config.model.max_seq_len
    if context > config.model.max_seq_len:
        raise LmscaleError(
            f"train.context {context} exceeds model.max_seq_len {config.model.max_seq_len}"
        )
    cfg = config.train
    if cfg.freeze_zeros:
        freeze_zeros_(model)
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    if strategy.startswith("pp") and config.distill.teacher is not None:
        raise LmscaleError("distillation does not run under pipeline parallel yet: use fsdp or ddp")
    if strategy.startswith("pp") and cfg.dtype == "float16":
        raise LmscaleError(
            "pipeline parallel trains in float32 or bfloat16 (float16's loss scaling is not "
            "supported across stages)"
        )
    parallel = parallelize(
        model, config.parallel, ranks, device, DTYPES[cfg.dtype],
        compile_blocks=cfg.compile and strategy != "none", seed=cfg.seed,
        batch_size=cfg.batch_size,
    )  # fmt: skip
    optimizer = build_optimizer(
        parallel.module, cfg.optimizer, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2),
        cfg.momentum,
    )  # fmt: skip
    if context % parallel.sequence_multiple:
        raise LmscaleError(
            f"train.context {context} must be a multiple of the tensor-parallel degree "
            f"{parallel.tp_size} with parallel.sequence_parallel on"
        )
    loader = Loader(
        train_data, cfg.batch_size, context, seed=config.data.seed,
        rank=parallel.dp_rank, world_size=parallel.dp_size,
    )  # fmt: skip
    run = Run(
        config, run_dir, device, parallel.module, optimizer, loader, train_data, val_data,
        data_tokenizer(train_data.data_dir), context, parallel, ranks,
        cfg.accumulation_steps(parallel.dp_size), memory=meter,
    )  # fmt: skip
    # NOTE: before anything is written, so that a teacher that does not fit leaves no trace.
    distill_loss = _distill_loss(run) if config.distill.teacher is not None else None
    if ckpt_path is not None:
        _restore(run, ckpt_path)
    if run.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.toml").write_text(config.to_toml())
        layout = {"world_size": ranks.world_size, "strategy": parallel.strategy,
                  "dp_size": parallel.dp_size, "tp_size": parallel.tp_size,
                  "pp_size": parallel.pp_size,
                  "grad_accum": run.grad_accum}  # fmt: skip
        write_run_info(run_dir, describe_machine(device) | baseline | layout)
    if parallel.distributed:
        run.heartbeat = Heartbeat(config.parallel.timeout_s)
        run.heartbeat.beat(run.step)
    elif cfg.compile:
        # The model and the fused loss compile as one graph; the plain model stays what is saved.
        run.loss_fn = torch.compile(lm_loss_sum)
    if distill_loss is not None:
        run.loss_fn = distill_loss
    return run


def _initial_model(config: RunConfig, train_data: TokenDataset, device) -> Transformer:
    """A fresh model of `config.model` on the meta device (its vocabulary the data's), or
    `train.init_from`'s on `device`.

    Either way `config.model` ends up describing the model, so the saved config rebuilds it.
    """
    vocab = train_data.manifest.vocab_size
    if config.train.init_from is None:
        config.model = config.model.replace(vocab_size=vocab)
        # On the meta device: `parallelize` allocates and initialises only this rank's part.
        with torch.device("meta" if config.train.meta_init else device):
            model = Transformer(config.model)
        if not config.train.meta_init:
            model.init_weights(config.train.seed)  # the values meta init gives
        return model
    model, _ = load_pretrained(config.train.init_from, device, dtype="float32")
    if model.config.vocab_size != vocab:
        raise LmscaleError(
            f"train.init_from {config.train.init_from} has a vocabulary of "
            f"{model.config.vocab_size}, the data {train_data.data_dir} of {vocab}"
        )
    config.model = model.config
    return model.train()


def freeze_zeros_(model: Transformer) -> None:
    """Mask the gradient of every exactly-zero weight of the block linears, so it stays zero.

    With a zero gradient, SGD, momentum and AdamW (moments 0, decay of a 0 weight is 0) all
    leave the weight at 0. NOTE: the hooks sit on the parameters: one process or DDP; FSDP2
    and tensor parallel replace the parameters and drop them.
    """
    for module in model.layers.modules():
        if isinstance(module, nn.Linear) and bool((module.weight == 0).any()):
            keep = (module.weight != 0).detach()
            module.weight.register_hook(lambda grad, keep=keep: grad * keep)


def _distill_loss(run: Run) -> DistillLoss:
    """The teacher named in `[distill]`, frozen on the run's device, as the loop's loss."""
    cfg = run.config.distill
    teacher, tokenizer = load_pretrained(cfg.teacher, run.device, cfg.teacher_dtype)
    student_vocab = run.config.model.vocab_size
    if teacher.config.vocab_size != student_vocab:
        raise LmscaleError(
            f"teacher {cfg.teacher} has a vocabulary of {teacher.config.vocab_size}, the student "
            f"{student_vocab}: distillation needs the same tokenizer (prepare the data with the "
            "teacher's)"
        )
    if json.loads(tokenizer.to_json()) != json.loads(run.tokenizer.to_json()):
        raise LmscaleError(
            f"the data {run.config.data.path} was tokenized with another tokenizer than the "
            f"teacher {cfg.teacher}'s (prepare it with the teacher's)"
        )
    teacher.requires_grad_(False)
    return DistillLoss(teacher.eval(), cfg.temperature, cfg.alpha)


def _checkpoint_to_resume(run_dir: Path, resume: bool) -> Path | None:
    """The checkpoint to continue from: None for a new run; refuses to train over a saved run."""
    ckpt_path = latest_checkpoint(run_dir / CHECKPOINTS) if run_dir.exists() else None
    if restart_count() and ranks_from_env().is_main:
        what = f"resuming from {ckpt_path}" if ckpt_path else "starting over (no checkpoint yet)"
        tqdm.write(f"torchrun restart {restart_count()} after a failed worker: {what}", sys.stderr)
    resume = resume or (restart_count() > 0 and ckpt_path is not None)
    if ckpt_path and not resume:
        raise LmscaleError(
            f"{run_dir} already holds checkpoints: pass --resume, or choose another --out"
        )
    if resume and ckpt_path is None:
        raise LmscaleError(f"nothing to resume: no checkpoint in {run_dir}")
    return ckpt_path


def _join_process_group(config: RunConfig) -> tuple[Ranks, torch.device, str]:
    """This process's ranks, device and strategy; joins the process group when distributed."""
    ranks = ranks_from_env()
    strategy = config.parallel.resolved_strategy(ranks.world_size)
    device = device_for(ranks, resolve_device(config.train.device))
    if strategy != "none":
        init_process_group(ranks, device, config.parallel.backend, config.parallel.timeout_s)
    return ranks, device, strategy


def train_step(run: Run) -> float:
    """One optimizer step over `run.grad_accum` micro-batches; returns the mean token loss.

    NOTE: each micro-batch's summed loss is divided by the target count of the whole step, so the
    accumulated gradient equals that of one batch holding every micro-batch.
    """
    run.memory.start_step(logged=_logs_step(run, run.step + 1))
    try:
        loss = _step(run)
    finally:
        run.memory.end_step()
    if run.heartbeat:
        run.heartbeat.beat(run.step)
    return loss


def _step(run: Run) -> float:
    cfg = run.config.train
    start = time.perf_counter()
    lr = lr_at(run.step, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    parallel = run.parallel
    batches = [run.loader.next_batch() for _ in range(run.grad_accum)]
    local_targets = sum(count_targets(targets) for _, targets in batches)
    n_targets = round(float(parallel.dp_sum(torch.tensor(float(local_targets)))))
    scaler = grad_scaler(run.device, cfg.dtype)
    total = torch.zeros((), device=run.device)
    # DDP and FSDP average gradients over the data-parallel ranks: the scale undoes it.
    scale = parallel.dp_size / n_targets
    for i, (inputs, targets) in enumerate(batches):
        inputs, targets = inputs.to(run.device), targets.to(run.device)
        if parallel.pipeline is not None:  # forward and backward, stage by stage
            with _precision(run):
                total += parallel.pipeline.step(inputs, targets, fused_loss_head, scale)
            continue
        with parallel.gradient_sync(i == len(batches) - 1):
            with _precision(run):
                loss_sum = run.loss_fn(parallel.model, inputs, targets)
            scaled = loss_sum * scale
            (scaler.scale(scaled) if scaler else scaled).backward()
        total += loss_sum.detach()
    loss = parallel.loss_sum(total).item() / n_targets
    if not math.isfinite(loss):
        run.optimizer.zero_grad(set_to_none=True)
        saved = latest_checkpoint(run.run_dir / CHECKPOINTS)
        raise NonFiniteLoss(
            f"loss is {loss} at step {run.step + 1}; stopped (last good checkpoint: {saved or 'none'})"
        )
    _optimizer_step(run, scaler)
    run.step += 1
    run.step_times.append(time.perf_counter() - start)
    run.step_seconds += run.step_times[-1]
    if parallel.comm is not None:
        run.comm_bytes = parallel.comm.take()
    return loss


def _precision(run: Run) -> contextlib.AbstractContextManager:
    # FSDP's mixed-precision policy casts the parameters itself; autocast on top would be redundant.
    if run.parallel.mixed_precision:
        return contextlib.nullcontext()
    return autocast(run.device, run.config.train.dtype)


def _explained(fn: Callable[[Run], Any], run: Run) -> Any:
    """Call fn(run); a collective that timed out becomes an error naming the ranks behind."""
    try:
        return fn(run)
    except RuntimeError as error:
        explained = run.heartbeat.explain(error, run.step) if run.heartbeat else None
        if explained is None:
            raise
        raise explained from error


def _teardown(run: Run, finished: bool) -> None:
    if not run.parallel.distributed:
        return
    if finished:  # let every rank finish its last save before the group goes away
        torch.distributed.barrier()
    destroy_process_group()


def _optimizer_step(run: Run, scaler: torch.amp.GradScaler | None) -> None:
    clip = run.config.train.grad_clip
    if scaler:
        scaler.unscale_(run.optimizer)
    if run.parallel.pipeline is not None:
        run.parallel.pipeline.sync_tied_gradients()
    if clip > 0 and run.parallel.distributed:  # DTensor-aware, summed over pipeline stages
        clip_grad_norm_(
            run.model.parameters(), clip, run.parallel.norm_group,
            run.parallel.uncounted_parameters(),
        )  # fmt: skip
    elif clip > 0:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), clip)
    if scaler:
        scaler.step(run.optimizer)
        scaler.update()
    else:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)


def save(run: Run) -> Path:
    """Checkpoint everything `--resume` needs to continue exactly (a collective when distributed)."""
    config = {
        "model": to_dict(run.config.model),
        "run": to_dict(run.config),
        "tokenizer": run.tokenizer.settings,
    }
    if run.parallel.distributed:
        return save_sharded(
            run.run_dir / CHECKPOINTS, run.step, run.model, run.optimizer, config,
            run.tokenizer.to_json(), {"loader": run.loader.state_dict(),
                                      "strategy": run.parallel.strategy},
            keep=run.config.train.keep_checkpoints,
        )  # fmt: skip
    train_state = {
        "optimizer": run.optimizer.state_dict(),
        "loader": run.loader.state_dict(),
        "rng": _rng_state(),
    }
    # NOTE: the tokenizer's settings (special tokens, chat template) travel in config.json:
    # tokenizer.json itself has no place for them.
    return save_checkpoint(
        run.run_dir / CHECKPOINTS, run.step, run.model.state_dict(), config,
        tokenizer_json=run.tokenizer.to_json(), train_state=train_state,
        keep=run.config.train.keep_checkpoints,
    )  # fmt: skip


def _restore(run: Run, path: Path) -> None:
    if is_sharded(path):  # saved by a distributed run, at any world size
        state = load_sharded(path, run.model, run.optimizer)
        run.loader.load_state_dict(state["loader"])
        run.step = int(state["step"])
        return
    ckpt = load_checkpoint(path)
    if run.parallel.distributed:  # a single-process run continued on many processes
        load_full_state(run.model, run.optimizer, ckpt.model_state, ckpt.train_state["optimizer"])
    else:
        run.model.load_state_dict(ckpt.model_state)
        run.optimizer.load_state_dict(ckpt.train_state["optimizer"])
        _set_rng_state(ckpt.train_state["rng"])
    run.loader.load_state_dict(ckpt.train_state["loader"])
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
    """Tokens of one optimizer step, over all data-parallel ranks."""
    return run.config.train.batch_size * run.grad_accum * run.parallel.dp_size * run.context


def _logs_step(run: Run, step: int) -> bool:
    """Whether step `step` (1-based) writes a metrics line."""
    cfg = run.config.train
    return step % cfg.log_interval == 0 or step in (1, cfg.max_steps)


def _log_step(run: Run, metrics: MetricsLog | None, loss: float) -> None:
    if metrics is None or not _logs_step(run, run.step):
        return
    step_time = run.step_times[-1]
    tokens_per_s = _tokens_per_step(run) / step_time
    mfu = mfu_fields(run.config.model, run.context, run.config.train.dtype, run.device,
                     run.ranks.world_size, tokens_per_s)  # fmt: skip
    metrics.log(
        run.step, loss=loss, lr=run.optimizer.param_groups[0]["lr"],
        tokens_per_s=tokens_per_s, step_time_s=step_time,
        elapsed_s=run.step_seconds, **run.memory.peaks(),
        **({"comm_bytes": run.comm_bytes} if run.comm_bytes is not None else {}), **mfu,
    )  # fmt: skip


def _evaluate(run: Run, metrics: MetricsLog | None, progress: bool) -> EvalResult:
    # Every rank evaluates (sharded models need all ranks in each forward); rank 0 reports.
    cfg = run.config.train
    pipeline = run.parallel.pipeline
    result = evaluate(
        run.model, run.val_data.tokens, run.context, cfg.batch_size,
        _precision(run), cfg.eval_max_tokens, run.parallel.sequence_multiple,
        loss_sum=(lambda x, y: pipeline.loss_sum(x, y, fused_loss_head)) if pipeline else None,
    )  # fmt: skip
    if metrics:
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
