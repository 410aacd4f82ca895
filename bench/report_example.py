"""The README's run-report picture: three short real runs, their report, and chromium's screenshot.

    python bench/report_example.py [--steps 200] [--out report-example] [--png docs/report.png]

Trains the tiny preset on the bundled plays three ways (learning rate 3e-3; 1e-3 with half the
batch; DDP on 2 processes), writes `lmscale report` for them into --out, and saves a full-page
screenshot of report.html taken by Debian's chromium (through Playwright) as --png.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def train(data: Path, out: Path, steps: int, *overrides: str, nproc: int | None = None) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    if nproc:
        env["OMP_NUM_THREADS"] = "1"
        overrides = (*overrides, "--nproc", str(nproc))
    command = [
        sys.executable, "-m", "lmscale", "train", "--config", str(REPO / "configs" / "tiny.toml"),
        "--out", str(out), "--data.path", str(data), "--train.max_steps", str(steps),
        "--train.log_interval", "5", "--train.eval_interval", str(max(steps // 8, 1)),
        "--train.checkpoint_interval", "0", "--train.device", "cpu", "--sample-tokens", "0",
        "--no-progress", *overrides,
    ]  # fmt: skip
    subprocess.run(command, check=True, env=env, capture_output=True)


def screenshot(page: Path, png: Path) -> None:
    from PIL import Image
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        tab = browser.new_page(viewport={"width": 1400, "height": 900})
        tab.goto(page.resolve().as_uri())
        tab.wait_for_function("[...document.images].every(img => img.complete)")
        tab.screenshot(path=str(png), full_page=True)
        browser.close()
    with Image.open(png) as image:  # a palette PNG: a quarter of the size, the same to the eye
        image.convert("RGB").quantize(colors=256).save(png, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", default="report-example")
    parser.add_argument("--png", default=str(REPO / "docs" / "report.png"))
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "src"))
    from lmscale.data import prepare
    from lmscale.report import report

    with tempfile.TemporaryDirectory() as tmp:
        data, runs = Path(tmp) / "shakespeare", Path(tmp) / "runs"
        prepare("shakespeare", data, vocab_size=512)
        train(data, runs / "tiny-lr3e-3", args.steps)
        train(data, runs / "tiny-lr1e-3-batch4", args.steps, "--train.lr", "1e-3",
              "--train.batch_size", "4")  # fmt: skip
        train(data, runs / "tiny-ddp-2", args.steps, "--parallel.strategy", "ddp", nproc=2)
        result = report(sorted(runs.iterdir()), args.out)
    screenshot(result.page, Path(args.png))
    print(f"{result.page} ({len(result.pngs)} plots); screenshot: {args.png}")


if __name__ == "__main__":
    main()
