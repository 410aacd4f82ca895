"""Three real short runs for the report tests: two settings on one process, and DDP on two."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny.toml")


def train_args(data_dir, out, *overrides: str) -> list[str]:
    """The tiny config on the CPU: 24 steps, every other one logged, evaluated every 6."""
    return [
        "--config", TINY, "--out", str(out), "--data.path", str(data_dir),
        "--train.max_steps", "24", "--train.log_interval", "2", "--train.eval_interval", "6",
        "--train.eval_max_tokens", "2048", "--train.checkpoint_interval", "0",
        "--train.device", "cpu", "--sample-tokens", "0", "--no-progress", *overrides,
    ]  # fmt: skip


def lmscale_train(args: list[str], nproc: int | None = None) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    if nproc:
        env["OMP_NUM_THREADS"] = "1"  # the processes share this machine's cores
        args = [*args, "--nproc", str(nproc)]
    command = [sys.executable, "-m", "lmscale", "train", *args]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.fixture(scope="session")
def report_runs(shakespeare_dir, tmp_path_factory) -> list[Path]:
    """[baseline, smaller batch and lower learning rate, DDP on 2 processes] run folders."""
    root = tmp_path_factory.mktemp("runs")
    settings = {
        "base": ([], None),
        "small-batch": (["--train.batch_size", "4", "--train.lr", "1e-3"], None),
        "ddp": (["--parallel.strategy", "ddp"], 2),
    }
    for name, (overrides, nproc) in settings.items():
        lmscale_train(train_args(shakespeare_dir, root / name, *overrides), nproc)
    return [root / name for name in settings]
