"""The run configuration: one object with sections `model`, `data`, `train` and `parallel`.

Loaded from a TOML file in `configs/`, with any field overridable as `--section.field value`,
and saved whole into the run directory as `config.toml`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lmscale.config import from_dict, parse_overrides, read_toml, to_dict, to_toml
from lmscale.errors import LmscaleError
from lmscale.model import PRESETS, ModelConfig
from lmscale.parallel.config import ParallelConfig


@dataclass
class DataConfig:
    """Where the tokens come from."""

    path: str = "data/shakespeare"
    """A folder written by `lmscale prepare` (manifest.json, shards, tokenizer.json)."""
    seed: int = 0
    """Seed of the loader's window order (independent of the model's initialisation)."""


@dataclass
class TrainConfig:
    """How to train."""

    seed: int = 1337
    """Seed of the weight initialisation and of dropout."""
    max_steps: int = 1000
    """Optimizer steps to run."""
    batch_size: int = 16
    """Sequences per micro-batch on each data-parallel rank."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step (derived instead when global_batch_size is set)."""
    global_batch_size: int | None = None
    """Sequences per optimizer step over all ranks; fixes the run's batch at any world size."""
    context: int | None = None
    """Tokens per training sequence; None means the model's max_seq_len."""
    optimizer: Literal["adamw", "sgd"] = "adamw"
    """adamw (fused where available) or sgd (with momentum)."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """The cosine schedule ends at lr * min_lr_ratio."""
    warmup_steps: int = 100
    """Steps of linear warm-up."""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices (not on biases or norms)."""
    beta1: float = 0.9
    """AdamW's first-moment decay."""
    beta2: float = 0.95
    """AdamW's second-moment decay."""
    momentum: float = 0.9
    """SGD momentum."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Compute precision: float32, or autocast to bfloat16 (CPU, CUDA) or float16 (CUDA)."""
    device: str = "auto"
    """auto (CUDA when present, else CPU), cpu, cuda, or cuda:N."""
    compile: bool = False
    """torch.compile the model."""
    meta_init: bool = True
    """Build a fresh model on the meta device, so each rank allocates and initialises only its
    part; false builds the whole model on every rank first (the same weights, more memory)."""
    float8: bool = False
    """Train the block linears in float8 through torchao (CUDA, compute capability 8.9+, e.g.
    H100); the output head and layers with dims not multiples of 16 stay as they are. Pair it
    with train.compile: uncompiled, the float8 casts cost more than they save."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass to save memory."""
    log_interval: int = 10
    """Write a metrics line every this many steps."""
    eval_interval: int = 100
    """Evaluate on the validation split every this many steps (and at the end); 0 disables."""
    eval_max_tokens: int | None = None
    """Score at most this many validation tokens per evaluation; None scores the whole split."""
    checkpoint_interval: int = 500
    """Save a checkpoint every this many steps (and at the end)."""
    keep_checkpoints: int = 3
    """How many of the newest checkpoints to keep."""
    init_from: str | None = None
    """Start from this model's weights and shape (a run, model folder, .gguf or bundled name)
    instead of a random init; [model] is then ignored. Fine-tuning, pruning recovery."""
    freeze_zeros: bool = False
    """Weights of the block linears that are exactly zero at the start stay zero (their gradient
    is masked): fine-tuning keeps a magnitude or 2:4 pruned model's sparsity."""

    def __post_init__(self) -> None:
        positive = (
            "max_steps",
            "batch_size",
            "grad_accum_steps",
            "log_interval",
            "keep_checkpoints",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise LmscaleError(f"train.{name} must be positive, got {getattr(self, name)}")
        if self.lr <= 0:
            raise LmscaleError(f"train.lr must be positive, got {self.lr}")
        if self.global_batch_size is not None and self.global_batch_size <= 0:
            raise LmscaleError(
                f"train.global_batch_size must be positive, got {self.global_batch_size}"
            )
        if self.context is not None and self.context < 2:
            raise LmscaleError(f"train.context must be at least 2, got {self.context}")
        for name in ("warmup_steps", "eval_interval", "checkpoint_interval", "grad_clip"):
            if getattr(self, name) < 0:
                raise LmscaleError(f"train.{name} must not be negative, got {getattr(self, name)}")

    def accumulation_steps(self, dp_size: int) -> int:
        """Micro-batches per step on each of `dp_size` data-parallel ranks."""
        if self.global_batch_size is None:
            return self.grad_accum_steps
        per_pass = self.batch_size * dp_size
        if self.global_batch_size % per_pass:
            raise LmscaleError(
                f"train.global_batch_size {self.global_batch_size} is not a multiple of "
                f"batch_size {self.batch_size} x {dp_size} data-parallel ranks"
            )
        return self.global_batch_size // per_pass


@dataclass
class DistillConfig:
    """Distillation from a frozen teacher (off while `teacher` is unset)."""

    teacher: str | None = None
    """The teacher: a bundled name, .gguf, HF folder or run dir, with the data's tokenizer."""
    temperature: float = 2.0
    """Softens teacher and student distributions in the KL term (scaled back by T^2)."""
    alpha: float = 0.5
    """Weight of the KL term; 1 - alpha weighs the cross-entropy on the data."""
    teacher_dtype: str | None = None
    """float32, bfloat16 or float16 for the teacher's weights; None keeps the saved dtype."""

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise LmscaleError(f"distill.temperature must be positive, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise LmscaleError(f"distill.alpha must be in [0, 1], got {self.alpha}")
        if self.teacher_dtype not in (None, "float32", "bfloat16", "float16"):
            raise LmscaleError(
                f"distill.teacher_dtype must be float32, bfloat16 or float16, got "
                f"'{self.teacher_dtype}'"
            )


@dataclass
class RunConfig:
    """Everything a training run needs; saved as the run directory's config.toml."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def to_toml(self) -> str:
        return to_toml({f.name: to_dict(getattr(self, f.name)) for f in dataclasses.fields(self)})


def load_run_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a TOML run config and apply `--section.field value` overrides.

    The `[model]` table may name a preset (`preset = "shakespeare-10m"`); its other keys replace
    the preset's fields.
    """
    tables = read_toml(path) if path is not None else {}
    for section, values in parse_overrides(overrides or []).items():
        tables.setdefault(section, {}).update(values)
    known = {f.name for f in dataclasses.fields(RunConfig)}
    for section in tables:
        if section not in known:
            raise LmscaleError(
                f"unknown config section '{section}' (known: {', '.join(sorted(known))})"
            )
    tables["model"] = _expand_preset(dict(tables.get("model", {})))
    return from_dict(RunConfig, tables)


def _expand_preset(model: dict[str, Any]) -> dict[str, Any]:
    name = model.pop("preset", None)
    if name is None:
        return model
    if name not in PRESETS:
        raise LmscaleError(f"unknown model preset '{name}' (known: {', '.join(PRESETS)})")
    return PRESETS[name] | model
