"""The report page: one HTML file that opens from disk with nothing else running.

Each PNG is embedded as a base64 data URI (the page alone is the whole report: mail it, attach
it) and linked to the same file beside the page (to open one plot full size, or paste it).
No scripts, no fonts or styles from elsewhere.
"""

from __future__ import annotations

import base64
import datetime
from html import escape
from pathlib import Path
from typing import Any

from lmscale.report.numbers import RunNumbers
from lmscale.report.plots import Figure, colour
from lmscale.report.summary import summary

MiB = 2**20

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1500px; color: #222;
       padding: 0 1em; }
h1 { margin-bottom: 0.2em; } .meta { color: #666; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
.figures { display: grid; grid-template-columns: repeat(auto-fill, minmax(640px, 1fr));
           gap: 1.5em; }
figure { margin: 0; } figure img { width: 100%; border: 1px solid #eee; }
.swatch { display: inline-block; width: 0.8em; height: 0.8em; margin-right: 0.4em; }
figcaption { font-size: 0.85em; color: #555; } .notes { color: #a15c00; }
"""


def write_page(
    runs: list[RunNumbers], figures: list[Figure], out: Path, grid_kg_per_kwh: float
) -> Path:
    """Write `out/report.html` for `runs`, with `figures` (already written to `out`)."""
    when = datetime.datetime.now().isoformat(timespec="seconds")
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>lmscale report: {escape(', '.join(n.run.name for n in runs))}</title>",
        f"<style>{STYLE}</style></head><body>",
        "<h1>lmscale run report</h1>",
        f'<p class="meta">{len(runs)} run(s), made {when}. Energy counts the devices\' catalog '
        f"power over the seconds of the training steps (no PUE, no evaluation or checkpoint "
        f"time); CO2e at a grid intensity of {grid_kg_per_kwh:g} kg per kWh.</p>",
        "<h2>Summary</h2>", _table(runs), "<h2>Runs</h2>", _details(runs),
        "<h2>Plots</h2>", '<div class="figures">', *(_figure(f, out) for f in figures), "</div>",
        "</body></html>",
    ]  # fmt: skip
    page = out / "report.html"
    page.write_text("\n".join(parts) + "\n")
    return page


COLUMNS = [
    "run", "steps", "tokens", "final loss", "val loss (ppl), final", "val loss (ppl), best",
    "tokens/s (median)", "step time: measured / predicted", "MFU (median)", "peak held",
    "peak allocated: measured / predicted", "comm per step", "energy", "CO2e",
]  # fmt: skip


def _table(runs: list[RunNumbers]) -> str:
    head = "".join(f"<th>{escape(c)}</th>" for c in COLUMNS)
    rows = []
    for i, n in enumerate(runs):
        name, *cells = (escape(v) for v in _row(n))
        swatch = f'<span class="swatch" style="background:{colour(i)}"></span>'
        rows.append(f"<tr><td>{swatch}{name}</td>{''.join(f'<td>{c}</td>' for c in cells)}</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _row(n: RunNumbers) -> list[str]:
    s = summary(n)
    final = best = "-"
    if "final_val_loss" in s:
        final = f"{_f(s['final_val_loss'])} ({_f(s['final_val_ppl'], 1)})"
        best = f"{_f(s['best_val_loss'])} ({_f(s['best_val_ppl'], 1)}) at {s['best_val_step']}"
    return [
        n.run.name, f"{s['steps']:,}", _count(s["tokens"]), _f(s["final_loss"]), final, best,
        _count(s["median_tokens_per_s"]),
        f"{_ms(s['median_step_time_s'])} / {_ms(s.get('predicted_step_time_s'))}",
        "-" if s["median_mfu"] is None else f"{100 * s['median_mfu']:.2f}%",
        _mib(s["peak_mem_bytes"]),
        f"{_mib(s['peak_alloc_bytes'])} / {_mib(s.get('predicted_peak_alloc_bytes'))}",
        _mib(s["comm_bytes_per_step"]),
        "-" if "energy_kwh" not in s else f"{s['energy_kwh'] * 1000:.3g} Wh",
        "-" if "kg_co2e" not in s else f"{s['kg_co2e'] * 1000:.3g} g",
    ]  # fmt: skip


def _details(runs: list[RunNumbers]) -> str:
    items = []
    for n in runs:
        info, device = n.run.info, n.device
        where = (f"{n.n_devices} x {device.name} ({device.description}; "
                 f"{device.peak_flops(n.math) / 1e12:.3g} TFLOP/s {n.math} peak, "
                 f"{device.power_w:g} W)") if device else "device not in the catalog"  # fmt: skip
        facts: dict[str, Any] = {
            "folder": n.run.path, "measured on": info.get("device_name", "?"), "catalog": where,
            "strategy": info.get("strategy", "?"), "tokens per step": f"{n.run.tokens_per_step:,}",
        }  # fmt: skip
        if n.energy:
            e = n.energy
            facts["energy"] = (
                f"{e['seconds']:.1f} s of steps ({e['seconds_from']}) x {e['devices']} device(s) "
                f"x {e['device_power_w']:g} W"
            )
        lines = "".join(f"<li>{escape(k)}: {escape(str(v))}</li>" for k, v in facts.items())
        notes = "".join(f'<li class="notes">{escape(note)}</li>' for note in n.notes)
        items.append(f"<li><b>{escape(n.run.name)}</b><ul>{lines}{notes}</ul></li>")
    return f"<ul>{''.join(items)}</ul>"


def _figure(figure: Figure, out: Path) -> str:
    data = base64.b64encode((out / figure.file).read_bytes()).decode("ascii")
    return (
        f'<figure><a href="{escape(figure.file)}"><img src="data:image/png;base64,{data}" '
        f'alt="{escape(figure.title)}" data-file="{escape(figure.file)}"></a>'
        f"<figcaption><b>{escape(figure.title)}.</b> {escape(figure.caption)}</figcaption>"
        "</figure>"
    )


def _f(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _count(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1000 * seconds:.1f} ms"


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value / MiB:,.1f} MiB"
