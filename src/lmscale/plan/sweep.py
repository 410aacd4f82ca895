"""The scaling study: train a sweep of model sizes in a wall-clock budget, then fit the laws.

    lmscale scaling --data data/shakespeare --sizes 0.5M,1M,2M,4M,8M --minutes 20 --out scaling/

Every size is a llama-family shape whose non-embedding parameter count N is close to its
target. A short probe of each size measures its step time; the remaining budget is then split
so that steps are proportional to N: every size trains on the same tokens per parameter. The
learning rate is constant after warm-up, so each evaluation along a run is a fair sample of
loss at (N, D) for the tokens D seen so far, not a point on a schedule that ends elsewhere.

OUT holds `study.json` (settings and the plan), `runs/SIZE/` (each a run directory of the
trainer, with `result.json` once finished), `results.json` and `scaling.png`. Rerun with the
same OUT and settings, a study reuses the finished sizes and resumes an interrupted one.

The trainer (torch) is imported inside the functions that train: importing this module is free.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lmscale.errors import LmscaleError
from lmscale.model.config import ModelConfig
from lmscale.plan.flops import training_flops_per_token
from lmscale.plan.units import fmt_count

STUDY_FILE = "study.json"
RESULT_FILE = "result.json"
RUNS = "runs"
PROBE = "probe"


@dataclass
class ScalingConfig:
    """A scaling study: what to train, for how long, and how."""

    data: str
    """A folder written by `lmscale prepare` (manifest.json, shards, tokenizer.json)."""
    out: str
    """The study's folder: runs, results.json and scaling.png go here."""
    sizes: list[float] = field(default_factory=lambda: [0.5e6, 1e6, 2e6, 4e6, 8e6])
    """Target non-embedding parameter counts, one run each."""
    minutes: float = 20.0
    """Wall-clock budget of the whole study, probes and evaluations included."""
    budget_flops: float | None = None
    """The compute to name the optimal size for; None means 100x the study's own."""
    context: int = 128
    """Tokens per training sequence (and the models' max_seq_len)."""
    batch_size: int = 8
    """Sequences per step, the same for every size."""
    seed: int = 0
    """Seed of the weights and of the data order."""
    lr: float | None = None
    """Learning rate, constant after warm-up; None: Kaplan et al.'s rule for each size,
    0.003239 - 0.0001395 ln N (about 1.4e-3 at 0.5M, 1.0e-3 at 8M)."""
    warmup_fraction: float = 0.1
    """Share of each run's steps spent warming the learning rate up."""
    evals: int = 10
    """Evaluations per run, evenly spaced (the last at the end)."""
    eval_tokens: int = 16384
    """Validation tokens scored per evaluation: the same first tokens for every run."""
    probe_steps: int = 6
    """Steps of each size's throughput probe (the first is not timed)."""
    aspect_ratio: float = 32.0
    """Target width per layer (dim / n_layers) of the shapes."""

    def __post_init__(self) -> None:
        if len(set(self.sizes)) < 3:
            raise LmscaleError(
                f"--sizes needs at least 3 different sizes for a fit, got {len(set(self.sizes))}"
            )
        if not self.minutes > 0:
            raise LmscaleError(f"--minutes must be positive, got {self.minutes}")
        if self.budget_flops is not None and not self.budget_flops > 0:
            raise LmscaleError(f"--budget-flops must be positive, got {self.budget_flops}")
        for name in ("context", "batch_size", "evals", "eval_tokens", "probe_steps"):
            if getattr(self, name) < (2 if name in ("context", "probe_steps") else 1):
                raise LmscaleError(
                    f"--{name.replace('_', '-')} is too small: {getattr(self, name)}"
                )
        if self.lr is not None and not self.lr > 0:
            raise LmscaleError(f"--lr must be positive, got {self.lr}")
        if not 0 <= self.warmup_fraction < 1 or not self.aspect_ratio > 0:
            raise LmscaleError("aspect_ratio must be positive and warmup_fraction in [0, 1)")
        self.sizes = sorted(set(self.sizes))

    def lr_for(self, params: float) -> float:
        """The learning rate of the run of a model with `params` non-embedding parameters."""
        return self.lr or kaplan_lr(params)

    def warmup_for(self, steps: int) -> int:
        return round(self.warmup_fraction * steps)

    def run_settings(self) -> dict:
        """The settings that shape the runs (a rerun must match them to reuse finished runs)."""
        return {k: v for k, v in asdict(self).items() if k not in ("out", "budget_flops")}


# --- shapes ----------------------------------------------------------------------------------


def shape_for(
    params: float, vocab_size: int, context: int, aspect_ratio: float = 32.0
) -> ModelConfig:
    """A llama-family shape with about `params` non-embedding parameters.

    A block holds about 12 dim^2 weights (4 dim^2 of attention, 3 dim hidden of SwiGLU MLP at
    hidden = 8/3 dim), so with dim = aspect_ratio * n_layers the depth is
    (params / (12 aspect_ratio^2))^(1/3). The width is a multiple of 32 (heads of 32, or of 64
    from 256 on); the MLP width (a multiple of 32, between 2 and 4 dim) takes up the rest.
    """
    n_layers = max(1, round((params / (12 * aspect_ratio**2)) ** (1 / 3)))
    dim = 32 * max(1, round(math.sqrt(params / (12 * n_layers)) / 32))
    head_dim = 64 if dim >= 256 and dim % 64 == 0 else 32
    per_layer = params / n_layers - 4 * dim * dim - 2 * dim  # what the MLP may hold
    hidden = min(4 * dim, max(2 * dim, 32 * round(per_layer / (3 * dim) / 32)))
    return ModelConfig(
        family="llama", vocab_size=vocab_size, dim=dim, n_layers=n_layers,
        n_heads=dim // head_dim, hidden_dim=hidden, max_seq_len=context, tie_embeddings=True,
    )  # fmt: skip


def kaplan_lr(params: float) -> float:
    """The learning rate Kaplan et al. (2020, eq. D.1) fit for N non-embedding parameters."""
    return 0.003239 - 0.0001395 * math.log(params)


def size_label(params: float) -> str:
    """The folder name of a size: 500K, 2M, 1.5M."""
    return fmt_count(params)


def describe_shape(model: ModelConfig) -> dict:
    keys = ("dim", "n_layers", "n_heads", "head_dim", "hidden_dim", "vocab_size", "max_seq_len")
    return {key: getattr(model, key) for key in keys}


# --- the plan: steps per size ----------------------------------------------------------------


def plan_steps(
    params: list[float], step_s: list[float], overhead_s: list[float], seconds: float,
    min_steps: int = 1,
) -> list[int]:  # fmt: skip
    """Steps of each size that fill `seconds` with steps proportional to the sizes.

    Args:
        params: non-embedding parameters of each size.
        step_s: measured seconds per training step of each size.
        overhead_s: seconds each run spends beside its steps (evaluations, checkpoints, setup).
        seconds: the wall-clock time left for the runs.
        min_steps: the fewest steps of a run; a budget too short for it is overrun, keeping the
            steps proportional to the sizes.

    Returns:
        steps_i = k * params_i, with k such that sum(steps_i * step_s_i) + overheads = seconds.
    """
    train_s = seconds - sum(overhead_s)
    k = max(0.0, train_s / sum(n * t for n, t in zip(params, step_s, strict=True)))
    k = max(k, min_steps / min(params))
    return [max(min_steps, round(k * n)) for n in params]


def planned_seconds(steps: list[int], step_s: list[float], overhead_s: list[float]) -> float:
    """The run time a plan should take."""
    return sum(n * t for n, t in zip(steps, step_s, strict=True)) + sum(overhead_s)


# --- running the study -----------------------------------------------------------------------


@dataclass
class Size:
    """One size of the study and where its run lives."""

    target: float
    model: ModelConfig
    run_dir: Path

    @property
    def label(self) -> str:
        return size_label(self.target)

    @property
    def params(self) -> int:
        return self.model.num_params(embeddings=False)


def run_study(config: ScalingConfig, progress: bool = True) -> dict:
    """Probe, plan and train every size (reusing finished ones), fit, and write the results.

    Returns:
        The content of OUT/results.json (see `lmscale.plan.scaling_report.build_results`).
    """
    from lmscale.plan.scaling_plot import plot_study
    from lmscale.plan.scaling_report import build_results

    start = time.perf_counter()
    out = Path(config.out)
    vocab_size = read_vocab_size(config.data)
    sizes = [
        Size(
            n,
            shape_for(n, vocab_size, config.context, config.aspect_ratio),
            out / RUNS / size_label(n),
        )
        for n in config.sizes
    ]
    if len({size.params for size in sizes}) < 3:
        raise LmscaleError(
            f"--sizes {','.join(s.label for s in sizes)} give fewer than 3 different model shapes: "
            "choose sizes further apart"
        )
    study = _load_or_plan(config, sizes, start, progress)
    records = []
    for i, size in enumerate(sizes, 1):
        steps = study["plan"][size.label]
        _say(progress, f"[{i}/{len(sizes)}] {size.label}: {_shape_text(size.model)}, {steps} steps")
        records.append(_train_size(config, size, steps, progress))
    results = build_results(config, records, study, time.perf_counter() - start)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    plot_study(results, out / "scaling.png")
    return results


def read_vocab_size(data: str) -> int:
    """The vocabulary of a prepared data folder, from its manifest (no shard is read)."""
    path = Path(data) / "manifest.json"
    if not path.is_file():
        raise LmscaleError(f"--data {data}: no prepared data there (run `lmscale prepare` first)")
    try:
        return int(json.loads(path.read_text())["vocab_size"])
    except (ValueError, KeyError, TypeError):
        raise LmscaleError(f"--data {data}: {path} is not a prepared data manifest") from None


def _load_or_plan(config: ScalingConfig, sizes: list[Size], start: float, progress: bool) -> dict:
    """The study's plan: read from OUT/study.json when its settings match, else probed anew."""
    path = Path(config.out) / STUDY_FILE
    if path.is_file():
        study = json.loads(path.read_text())
        saved = study["settings"]
        for key, value in config.run_settings().items():
            if saved.get(key) != value:
                raise LmscaleError(
                    f"--out {config.out} holds a study with {key} = {saved.get(key)}, not {value}: "
                    "rerun with its settings, or choose another --out"
                )
        _say(progress, f"reusing the plan in {path}")
        return study
    if Path(config.out, RUNS).exists():
        raise LmscaleError(
            f"--out {config.out} holds runs but no {STUDY_FILE}: choose another --out"
        )
    probes = [_probe(config, size, progress) for size in sizes]
    left = config.minutes * 60 - (time.perf_counter() - start)
    step_s = [p["step_s"] for p in probes]
    overhead = [config.evals * p["overhead_s"] for p in probes]
    steps = plan_steps([s.params for s in sizes], step_s, overhead, left, 2 * config.evals)
    expected = planned_seconds(steps, step_s, overhead)
    listed = ", ".join(f"{s.label} {n} steps" for s, n in zip(sizes, steps, strict=True))
    _say(progress, f"plan: {listed}; about {expected / 60:.1f} min of training")
    if expected > 1.1 * left:
        _say(
            progress,
            f"note: --minutes {config.minutes:g} is too short for these sizes: every run trains "
            f"its minimum (the smallest {2 * config.evals} steps), about {expected / 60:.1f} min",
        )
    study = {
        "settings": config.run_settings(),
        "plan": {s.label: n for s, n in zip(sizes, steps, strict=True)},
        "probes": {s.label: p for s, p in zip(sizes, probes, strict=True)},
        "planned_s": expected,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(study, indent=1) + "\n")
    return study


def _probe(config: ScalingConfig, size: Size, progress: bool) -> dict:
    """Seconds per step (the fastest after the first) and per run beside the steps, of one size."""
    from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (imported before timing)

    from lmscale.train.loop import train
    from lmscale.train.metrics import read_metrics

    run_dir = Path(config.out) / PROBE / size.label
    shutil.rmtree(run_dir, ignore_errors=True)
    _say(progress, f"probing {size.label} ({_shape_text(size.model)})")
    begin = time.perf_counter()
    train(_run_config(config, size, config.probe_steps, probe=True), run_dir, progress=False)
    wall = time.perf_counter() - begin
    times = [r["step_time_s"] for r in read_metrics(run_dir) if "step_time_s" in r]
    shutil.rmtree(run_dir.parent)
    step_s = min(times[1:])  # NOTE: the least disturbed by other jobs on the machine
    return {"step_s": step_s, "overhead_s": max(0.0, wall - sum(times)), "wall_s": wall}


def _run_config(config: ScalingConfig, size: Size, steps: int, probe: bool = False):
    from lmscale.train.config import DataConfig, RunConfig, TrainConfig

    interval = steps if probe else max(1, steps // config.evals)
    train = TrainConfig(
        seed=config.seed, max_steps=steps, batch_size=config.batch_size, context=config.context,
        lr=config.lr_for(size.params), min_lr_ratio=1.0, warmup_steps=config.warmup_for(steps),
        log_interval=1 if probe else max(1, interval // 4), eval_interval=interval,
        eval_max_tokens=config.eval_tokens, checkpoint_interval=interval, keep_checkpoints=1,
    )  # fmt: skip
    return RunConfig(model=size.model, data=DataConfig(config.data, config.seed), train=train)


def _train_size(config: ScalingConfig, size: Size, steps: int, progress: bool) -> dict:
    """The run of one size: trained (or resumed) unless already finished; its record."""
    from lmscale.checkpoint import latest_checkpoint
    from lmscale.train.loop import CHECKPOINTS, train

    done = size.run_dir / RESULT_FILE
    if done.is_file():
        _say(progress, f"  reusing the finished run in {size.run_dir}")
        return json.loads(done.read_text()) | {"reused": True}
    resume = size.run_dir.exists() and latest_checkpoint(size.run_dir / CHECKPOINTS) is not None
    if size.run_dir.exists() and not resume:
        shutil.rmtree(size.run_dir)  # stopped before its first checkpoint: nothing to keep
    begin = time.perf_counter()
    summary = train(
        _run_config(config, size, steps), size.run_dir, resume=resume, progress=progress
    )
    record = run_record(config, size, steps, summary.tokens_per_s, time.perf_counter() - begin)
    done.write_text(json.dumps(record, indent=1) + "\n")
    return record | {"reused": False}


def run_record(
    config: ScalingConfig, size: Size, steps: int, tokens_per_s: float, wall_s: float
) -> dict:
    """What results.json keeps of one run: shape, counts, compute and its evaluation curve."""
    import torch

    from lmscale.train.metrics import read_metrics

    tokens_per_step = config.batch_size * config.context
    flops_per_token = training_flops_per_token(size.model, config.context)[0]
    evals = {r["step"]: r["val_loss"] for r in read_metrics(size.run_dir) if "val_loss" in r}
    curve = [
        {"step": step, "tokens": step * tokens_per_step,
         "flops": step * tokens_per_step * flops_per_token, "val_loss": loss}
        for step, loss in sorted(evals.items())
    ]  # fmt: skip
    tokens = steps * tokens_per_step
    return {
        "label": size.label, "target_params": size.target, "params": size.params,
        "params_total": size.model.num_params(), "shape": describe_shape(size.model),
        "lr": config.lr_for(size.params), "steps": steps,
        "warmup_steps": config.warmup_for(steps), "tokens": tokens,
        "tokens_per_param": tokens / size.params, "flops_per_token": flops_per_token,
        "flops": tokens * flops_per_token, "tokens_per_s": tokens_per_s, "wall_s": wall_s,
        "torch_threads": torch.get_num_threads(),
        "final_loss": curve[-1]["val_loss"], "curve": curve,
    }  # fmt: skip


def _shape_text(model: ModelConfig) -> str:
    return (
        f"{fmt_count(model.num_params(embeddings=False))} non-embedding, dim {model.dim} x "
        f"{model.n_layers} layers, {model.n_heads} heads of {model.head_dim}, "
        f"MLP {model.hidden_dim}"
    )


def _say(progress: bool, line: str) -> None:
    if progress:
        print(line, file=sys.stderr, flush=True)
