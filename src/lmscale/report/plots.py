"""The report's PNGs: one panel per file, every run overlaid on the same axes in its own colour.

Matplotlib is imported inside `write_plots` (with the Agg backend: no display needed), so the
rest of the report, and `lmscale --help`, never pay for it. A panel no run has data for (no
evaluations, no communication on one process, no memory fields) is left out, not drawn empty.

Loss curves are drawn as TensorBoard draws them: the raw values faint, an exponential moving
average over them (debiased, so the first points are not pulled towards zero) on top.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lmscale.report.numbers import RunNumbers

MiB = 2**20
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf")  # fmt: skip
"""Matplotlib's default cycle (tab10): run i has colour i on every plot and in the page's table."""


@dataclass(frozen=True)
class Figure:
    """One PNG written, with what the page says about it."""

    file: str
    title: str
    caption: str


def smooth(values: list[float], weight: float) -> list[float]:
    """Debiased exponential moving average: `weight` 0 keeps the values, near 1 flattens them."""
    out, average, total = [], 0.0, 0.0
    for value in values:
        average = weight * average + (1 - weight) * value
        total = weight * total + (1 - weight)
        out.append(average / total if total else value)
    return out


def write_plots(runs: list[RunNumbers], out: Path, smoothing: float = 0.6) -> list[Figure]:
    """Draw every panel some run has data for into `out`; returns the figures written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = []
    for file, title, caption, draw in PANELS:
        fig, ax = plt.subplots(figsize=(7.2, 4.2), dpi=110)
        try:
            if not draw(ax, runs, smoothing):
                continue
            ax.set_title(title)
            ax.grid(True, alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
            fig.tight_layout()
            fig.savefig(out / file)
            figures.append(Figure(file, title, caption))
        finally:
            plt.close(fig)
    return figures


def colour(i: int) -> str:
    """The colour of the `i`-th run."""
    return COLOURS[i % len(COLOURS)]


def _column(records: list[dict], key: str, x: str = "step") -> tuple[list, list]:
    rows = [r for r in records if isinstance(r.get(key), (int, float))]
    return [r[x] for r in rows], [r[key] for r in rows]


def _loss(ax, runs: list[RunNumbers], smoothing: float, x: str) -> bool:
    for i, n in enumerate(runs):
        xs, losses = _column(n.run.steps, "loss", x)
        ax.plot(xs, losses, color=colour(i), alpha=0.25, linewidth=1)
        ax.plot(xs, smooth(losses, smoothing), color=colour(i), label=f"{n.run.name} train")
        vx, val = _column(n.run.evals, "val_loss", x)
        if val:
            ax.plot(vx, val, "o--", color=colour(i), markersize=4, label=f"{n.run.name} val")
    ax.set_xlabel("optimizer step" if x == "step" else "tokens trained on")
    ax.set_ylabel("loss (nats per token)")
    if x == "tokens":
        _engineering(ax.xaxis)
    return True


def _loss_steps(ax, runs, smoothing) -> bool:
    return _loss(ax, runs, smoothing, "step")


def _loss_tokens(ax, runs, smoothing) -> bool:
    return _loss(ax, runs, smoothing, "tokens")


def _series(key: str, ylabel: str, scale: float = 1.0, log: bool = False) -> Callable:
    """A panel of one logged field against steps, every run that logged it (from 0, or log)."""

    def draw(ax, runs: list[RunNumbers], _smoothing: float) -> bool:
        drawn = False
        for i, n in enumerate(runs):
            xs, ys = _column(n.run.steps, key)
            if ys:
                ax.plot(xs, [y * scale for y in ys], ".-", color=colour(i), label=n.run.name)
                drawn = True
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        elif drawn:
            ax.set_ylim(bottom=0)
        return drawn

    return draw


def _mfu(ax, runs: list[RunNumbers], _smoothing: float) -> bool:
    drawn = False
    for i, n in enumerate(runs):
        points = [(r["step"], m) for r, m in zip(n.run.steps, n.mfu, strict=True) if m is not None]
        if points and n.device:
            peak = n.device.peak_flops(n.math) * n.n_devices / 1e12
            label = f"{n.run.name} ({n.n_devices} x {n.device.name}, {peak:.3g} TFLOP/s {n.math})"
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, [100 * y for y in ys], ".-", color=colour(i), label=label)
            drawn = True
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("MFU (% of the devices' peak)")
    return drawn


def _memory(ax, runs: list[RunNumbers], _smoothing: float) -> bool:
    drawn = False
    for i, n in enumerate(runs):
        for key, style, what in (("peak_mem_bytes", "-", "held"),
                                 ("peak_alloc_bytes", "--", "allocated")):  # fmt: skip
            xs, ys = _column(n.run.steps, key)
            if ys:
                ax.plot(xs, [y / MiB for y in ys], style, color=colour(i),
                        label=f"{n.run.name} {what}")  # fmt: skip
                drawn = True
        if n.prediction:
            ax.axhline(n.prediction["peak_with_baseline_bytes"] / MiB, color=colour(i),
                       linestyle=":", label=f"{n.run.name} predicted allocated")  # fmt: skip
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("peak memory of the step (MiB)")
    return drawn


def _step_time(ax, runs: list[RunNumbers], smoothing: float) -> bool:
    # Log scale: step 1's warm-up and a prediction far below the measurement both stay readable.
    drawn = _series("step_time_s", "step time (ms, log scale)", 1000, log=True)(ax, runs, smoothing)
    for i, n in enumerate(runs):
        if drawn and n.prediction:
            ax.axhline(1000 * n.prediction["step_s"], color=colour(i), linestyle=":",
                       label=f"{n.run.name} predicted")  # fmt: skip
    return drawn


def _energy(ax, runs: list[RunNumbers], _smoothing: float) -> bool:
    measured = [(i, n) for i, n in enumerate(runs) if n.energy]
    if not measured:
        return False
    largest = max(n.energy["kwh"] for _, n in measured)
    factor, unit = next(((f, u) for f, u in ((1, "kWh"), (1e3, "Wh"), (1e6, "mWh"))
                         if largest * f >= 1), (1e6, "mWh"))  # fmt: skip
    names = [n.run.name for _, n in measured]
    values = [n.energy["kwh"] * factor for _, n in measured]
    bars = ax.barh(names, values, color=[colour(i) for i, _ in measured])
    labels = [f"{v:.3g} {unit}, {_grams(n.energy['kg_co2e'])} CO2e"
              for v, (_, n) in zip(values, measured, strict=True)]  # fmt: skip
    ax.bar_label(bars, labels, padding=3, fontsize=8)
    ax.set_xlim(0, max(values) * 1.6)
    ax.invert_yaxis()
    ax.set_xlabel(f"energy of the training steps ({unit})")
    return True


def _grams(kg: float) -> str:
    for factor, unit in ((1, "kg"), (1e3, "g"), (1e6, "mg")):
        if kg * factor >= 1:
            return f"{kg * factor:.3g} {unit}"
    return f"{kg * 1e6:.3g} mg"


def _engineering(axis) -> None:
    from matplotlib.ticker import EngFormatter

    axis.set_major_formatter(EngFormatter())


PANELS: list[tuple[str, str, str, Callable]] = [
    ("loss_steps.png", "Loss against steps",
     "Training loss (faint: as logged; solid: smoothed) and validation loss (dots)", _loss_steps),
    ("loss_tokens.png", "Loss against tokens",
     "The same losses against the tokens trained on (all data-parallel ranks)", _loss_tokens),
    ("throughput.png", "Throughput", "Tokens per second of each logged step, all ranks together",
     _series("tokens_per_s", "tokens per second")),
    ("mfu.png", "Model FLOPs utilisation",
     "Model FLOPs per second over the peak of the planner's catalog entry for the devices",
     _mfu),
    ("memory.png", "Memory",
     "Each logged step's peak: held (reserved / resident), allocated, and the planner's "
     "prediction of allocated (dotted, with the memory in use before the model was built)",
     _memory),
    ("step_time.png", "Step time",
     "Seconds per optimizer step, and the planner's prediction (dotted)", _step_time),
    ("comm.png", "Communication",
     "Bytes each rank handed to gradient all-reduces per step (distributed runs)",
     _series("comm_bytes", "communication per step and rank (MiB)", 1 / MiB)),
    ("lr.png", "Learning rate", "The learning rate of each logged step",
     _series("lr", "learning rate")),
    ("energy.png", "Energy", "Seconds of training steps x devices x catalog power; CO2e at the "
     "grid intensity stated above", _energy),
]  # fmt: skip
