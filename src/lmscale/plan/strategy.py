"""How a training job is spread over devices: data, tensor and pipeline parallel degrees, the ZeRO
stage, sequence parallelism, recomputation and the micro-batch; and which of them can run.

    devices = dp x tp x pp           tp innermost (inside a node), then pp, then dp
    pipeline schedules: gpipe, 1f1b, interleaved-1f1b (v model chunks per rank; see pipeline.py)
    ZeRO-1 shards optimizer states over dp, ZeRO-2 gradients too, ZeRO-3 (FSDP) parameters too
"""

from __future__ import annotations

from dataclasses import dataclass

from lmscale.errors import LmscaleError
from lmscale.model.config import ModelConfig
from lmscale.plan.flops import RECOMPUTE
from lmscale.plan.pipeline import INTERLEAVED, SCHEDULES
from lmscale.plan.workload import Workload

NAMED_STRATEGIES = {
    "ddp": dict(zero=0),
    "zero1": dict(zero=1),
    "zero2": dict(zero=2),
    "zero3": dict(zero=3),
    "fsdp": dict(zero=3),
}


@dataclass(frozen=True)
class Strategy:
    """One way to run a job on `dp * tp * pp` devices."""

    dp: int = 1
    tp: int = 1
    pp: int = 1
    zero: int = 0
    """0 (plain data parallel), 1 (optimizer states sharded), 2 (+ gradients), 3 (+ parameters)."""
    sp: bool = False
    """Sequence parallel: norms, dropout and residuals sharded along the sequence over tp."""
    recompute: str = "none"
    micro_batch: int = 1
    """Sequences per forward pass on one data-parallel rank."""
    pp_schedule: str = "1f1b"
    """How a pipeline orders its micro-batches: gpipe, 1f1b or interleaved-1f1b."""
    virtual_stages: int = 1
    """Model chunks per pipeline rank: above 1 only with interleaved-1f1b."""

    @property
    def n_devices(self) -> int:
        return self.dp * self.tp * self.pp

    def micro_batches(self, workload: Workload) -> int:
        """Micro-batches per optimizer step on each data-parallel rank (each pipeline).

        NOTE: the global batch is rounded to a whole number of micro-batches per rank, so that
        4M tokens (976.6 sequences of 4096) still split over 64 ranks; `step_tokens` says what
        is actually trained per step.
        """
        return max(1, round(workload.global_batch / (self.dp * self.micro_batch)))

    def step_tokens(self, workload: Workload) -> int:
        """Tokens of one optimizer step after rounding the batch to whole micro-batches."""
        return self.micro_batches(workload) * self.dp * self.micro_batch * workload.seq_len

    @property
    def family(self) -> str:
        """The kind of strategy, degrees left out: `TP+SP x PP x ZeRO-1`."""
        parts = []
        if self.tp > 1:
            parts.append("TP+SP" if self.sp else "TP")
        if self.pp > 1:
            parts.append("PP")
        if self.dp > 1 or not parts:
            parts.append(("DDP", "ZeRO-1", "ZeRO-2", "FSDP/ZeRO-3")[self.zero])
        return " x ".join(parts)

    @property
    def label(self) -> str:
        """Every degree: `tp8 sp x pp2 x dp4 zero1, recompute full`."""
        parts = []
        if self.tp > 1:
            parts.append(f"tp{self.tp}" + (" sp" if self.sp else ""))
        if self.pp > 1:
            parts.append(f"pp{self.pp}" + self._schedule_label())
        parts.append(f"dp{self.dp}" + (f" zero{self.zero}" if self.zero else ""))
        text = " x ".join(parts)
        if self.recompute != "none":
            text += f", recompute {self.recompute}"
        return text

    def _schedule_label(self) -> str:
        """`` for the default 1F1B, ` gpipe`, ` interleaved v2`."""
        if self.pp_schedule == INTERLEAVED:
            return f" interleaved v{self.virtual_stages}"
        return "" if self.pp_schedule == "1f1b" else f" {self.pp_schedule}"


def check_strategy(strategy: Strategy, workload: Workload) -> None:
    """Raise a one-line `LmscaleError` saying what to change if `strategy` cannot run `workload`."""
    reason = strategy_problem(strategy, workload)
    if reason:
        raise LmscaleError(reason)


def strategy_problem(strategy: Strategy, workload: Workload) -> str | None:
    """Why `strategy` cannot run `workload` at all (before memory is looked at), or None."""
    model, s = workload.model, strategy
    for name in ("dp", "tp", "pp", "micro_batch", "virtual_stages"):
        if getattr(s, name) < 1:
            return f"--{name.replace('_', '-')} must be positive, got {getattr(s, name)}"
    if s.zero not in (0, 1, 2, 3):
        return f"--zero must be 0, 1, 2 or 3, got {s.zero}"
    if s.recompute not in RECOMPUTE:
        return f"--recompute must be one of {', '.join(RECOMPUTE)}, got '{s.recompute}'"
    return (
        _tensor_parallel_problem(model, s.tp, s.sp)
        or _pipeline_problem(model, s)
        or _batch_problem(workload, s)
        or _schedule_problem(workload, s)
    )


def _tensor_parallel_problem(model: ModelConfig, tp: int, sp: bool) -> str | None:
    if sp and tp == 1:
        return "sequence parallel shards over tensor-parallel ranks: it needs --tp above 1"
    if tp == 1:
        return None
    if tp > model.n_heads:
        return (
            f"tensor parallel {tp} is larger than the {model.n_heads} attention heads: "
            f"use --tp at most {model.n_heads} (and a divisor of it)"
        )
    if model.n_heads % tp:
        return (
            f"tensor parallel {tp} does not divide the {model.n_heads} attention heads: "
            f"use --tp {_divisors_text(model.n_heads)}"
        )
    kv = model.n_kv_heads
    if kv % tp and tp % kv:
        return (
            f"tensor parallel {tp} neither divides the {kv} key/value heads nor is a multiple of "
            f"them (to replicate them): use --tp {_divisors_text(kv)} or a multiple of {kv}"
        )
    if model.hidden_dim % tp:
        return f"tensor parallel {tp} does not divide the MLP width {model.hidden_dim}"
    return None


def _pipeline_problem(model: ModelConfig, s: Strategy) -> str | None:
    if s.pp == 1:
        return None
    if s.pp > model.n_layers:
        return (
            f"pipeline parallel {s.pp} has more stages than the {model.n_layers} layers: "
            f"use --pp at most {model.n_layers}"
        )
    if model.n_layers % s.pp:
        return (
            f"pipeline parallel {s.pp} does not divide the {model.n_layers} layers: "
            f"use --pp {_divisors_text(model.n_layers)}"
        )
    if s.zero >= 2:
        return (
            f"ZeRO-{s.zero} shards gradients that pipeline parallelism accumulates over "
            "micro-batches (DeepSpeed and Megatron-LM pair pipelines with ZeRO-1): use --zero 1"
        )
    return None


def _schedule_problem(workload: Workload, s: Strategy) -> str | None:
    """What interleaving needs (Narayanan et al. 2021; Megatron-LM checks the same)."""
    if s.pp_schedule not in SCHEDULES:
        return f"--pp-schedule must be one of {', '.join(SCHEDULES)}, got '{s.pp_schedule}'"
    if s.pp_schedule != INTERLEAVED and s.virtual_stages > 1:
        return "--virtual-stages above 1 needs --pp-schedule interleaved-1f1b"
    if s.pp == 1 and (s.pp_schedule != "1f1b" or s.virtual_stages > 1):
        return f"--pp-schedule {s.pp_schedule} orders a pipeline's micro-batches: it needs --pp above 1"
    if s.pp_schedule != INTERLEAVED:
        return None
    if s.virtual_stages < 2:
        return "--pp-schedule interleaved-1f1b needs --virtual-stages 2 or more"
    n_layers, chunks = workload.model.n_layers, s.pp * s.virtual_stages
    if n_layers % chunks:
        return (
            f"pp x virtual stages = {s.pp} x {s.virtual_stages} = {chunks} model chunks do not "
            f"divide the {n_layers} layers: choose --virtual-stages so that they do"
        )
    micro = s.micro_batches(workload)
    if micro % s.pp:
        return (
            f"interleaved 1F1B runs micro-batches in groups of --pp {s.pp}, but each pipeline gets "
            f"{micro}: choose --global-batch-tokens or --micro-batch to give a multiple of {s.pp}"
        )
    return None


def _batch_problem(workload: Workload, s: Strategy) -> str | None:
    per_pass = s.dp * s.micro_batch
    if workload.global_batch < per_pass:
        return (
            f"the global batch of {workload.global_batch} sequences cannot give {s.dp} "
            f"data-parallel ranks a micro-batch of {s.micro_batch} each: use fewer devices for "
            "data parallel (more tp or pp), a smaller --micro-batch, or more --global-batch-tokens"
        )
    return None


def _divisors_text(n: int) -> str:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return ", ".join(map(str, divisors[:-1])) + f" or {divisors[-1]}" if len(divisors) > 1 else "1"
