"""Distillation and pruning recovery on the bundled Shakespeare, with SmolLM2-135M.

1. `lmscale distill --baseline`: the ~28M student of configs/student-30m.toml trained from
   SmolLM2-135M-Instruct (KL at temperature T mixed with cross-entropy), and the same student
   trained without the teacher for the same steps (same seed, same data order).
2. `lmscale prune --method structured --sparsity 0.25 --recover-steps N`: the pruned SmolLM2's
   validation perplexity before and after N steps of fine-tuning.

Every perplexity is on the same held-out plays, in windows of --context tokens. The commands
run as a user runs them (subprocesses); their wall time is printed with the table.

    python bench/distill.py --steps 40 --recover-steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEACHER = "smollm2-135m-instruct"


def lmscale(*args: str) -> tuple[dict, float]:
    """Run `lmscale ARGS --json`; its JSON answer and wall seconds."""
    env = os.environ | {"PYTHONPATH": str(ROOT / "src")}
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "lmscale.cli.main", *args, "--json"],
        capture_output=True, text=True, cwd=ROOT, env=env,
    )  # fmt: skip
    if out.returncode:
        sys.exit(f"lmscale {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.splitlines()[-1]), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="student steps (0 skips)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--recover-steps", type=int, default=20, help="0 skips the recovery")
    parser.add_argument("--eval-tokens", type=int, default=8192, help="val tokens scored")
    parser.add_argument("--dtype", default="bfloat16", help="training precision (autocast)")
    parser.add_argument("--out", help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="lmscale-distill-"))
    common = [
        "--train.batch_size", str(args.batch_size), "--train.context", str(args.context),
        "--train.eval_max_tokens", str(args.eval_tokens), "--train.dtype", args.dtype,
    ]  # fmt: skip
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"batch {args.batch_size} x {args.context} tokens, {args.dtype}\n")  # fmt: skip
    if args.steps > 0:
        distillation(args, out, common)
    if args.recover_steps > 0:
        recovery(args, out, common)


def distillation(args: argparse.Namespace, out: Path, common: list[str]) -> None:
    distilled, distill_s = lmscale(
        "distill", "--teacher", TEACHER, "--student-config", "configs/student-30m.toml",
        "--data", "shakespeare", "--out", str(out / "student"), "--baseline",
        "--temperature", str(args.temperature), "--alpha", str(args.alpha),
        "--train.max_steps", str(args.steps), "--train.warmup_steps", str(max(1, args.steps // 10)),
        "--train.eval_interval", str(args.steps), "--train.checkpoint_interval", str(args.steps),
        *common,
    )  # fmt: skip
    print(f"## distillation ({args.steps} steps, T={args.temperature}, alpha={args.alpha}; "
          f"both students + teacher eval: {distill_s / 60:.1f} min)\n")  # fmt: skip
    print("| model | params | val loss | val ppl |\n|---|---|---|---|")
    print(f"| teacher {TEACHER} | 135M | {distilled['teacher']['loss']:.4f} | "
          f"{distilled['teacher']['perplexity']:.2f} |")  # fmt: skip
    for name in ("student", "baseline"):
        run = distilled[name]
        label = "student, distilled" if name == "student" else "student, no teacher"
        print(f"| {label} | 28M | {run['val_loss']:.4f} | {run['val_ppl']:.2f} |")


def recovery(args: argparse.Namespace, out: Path, common: list[str]) -> None:
    prepared = out / "student" / "data"  # the distillation's, tokenized with SmolLM2's tokenizer
    pruned, prune_s = lmscale(
        "prune", "--model", TEACHER, "--method", "structured", "--sparsity", "0.25",
        "--out", str(out / "pruned"), "--recover-steps", str(args.recover_steps),
        "--recover-data", str(prepared if prepared.is_dir() else "shakespeare"), *common[:-2],
    )  # fmt: skip
    recovery = pruned["recovery"]
    print(f"\n## structured 25% pruning + {args.recover_steps} recovery steps "
          f"({prune_s / 60:.1f} min)\n")  # fmt: skip
    print("| model | params | val ppl |\n|---|---|---|")
    print(f"| pruned | {pruned['params'] / 1e6:.0f}M | {recovery['before_val_ppl']:.2f} |")
    print(
        f"| pruned + recovered | {pruned['params'] / 1e6:.0f}M | {recovery['after_val_ppl']:.2f} |"
    )


if __name__ == "__main__":
    main()
