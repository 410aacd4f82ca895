"""Starting real training processes for the parallel tests, and finding them again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from lmscale.checkpoint import load_checkpoint
from lmscale.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny.toml")


def tiny_args(data_dir, *overrides: str) -> list[str]:
    """The tiny config in fp32 with every step logged, no evaluation, one checkpoint at the end."""
    return [
        "--config", TINY, "--data.path", str(data_dir), "--train.log_interval", "1",
        "--train.eval_interval", "0", "--train.checkpoint_interval", "0", "--train.max_steps", "8",
        "--train.dtype", "float32", "--train.device", "cpu", "--sample-tokens", "0",
        "--no-progress", *overrides,
    ]  # fmt: skip


def lmscale_train(args: list[str], nproc: int | None = None, timeout: float = 240, **popen):
    """`lmscale train ARGS [--nproc N]` as a user runs it; returns the CompletedProcess."""
    command = [sys.executable, "-m", "lmscale", "train", *args]
    if nproc is not None:
        command += ["--nproc", str(nproc)]
    return subprocess.run(
        command,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=worker_env(),
        **popen,
    )


def start_train(args: list[str], nproc: int, max_restarts: int = 0) -> subprocess.Popen:
    """The same, in the background, its output merged into one text stream."""
    command = [sys.executable, "-m", "lmscale", "train", *args, "--nproc", str(nproc)]
    command += ["--max-restarts", str(max_restarts)]
    return subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=worker_env(),
    )  # fmt: skip


def worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"  # 2 to 4 processes share this machine's cores
    return env


def check(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def step_losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir, with_train_state=False).model_state


def worker_pid(run_dir: Path, rank: int) -> int | None:
    """The pid of the training worker of `rank` writing `run_dir` (torchrun's child), if alive."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"lmscale.train" in cmdline and str(run_dir).encode() in cmdline:
            if f"RANK={rank}".encode() in environ and b"TORCHELASTIC_RUN_ID" in b"".join(environ):
                return int(entry.name)
    return None


def read_json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]
