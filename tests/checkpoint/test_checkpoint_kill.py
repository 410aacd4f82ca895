"""The kill test: SIGKILL a process mid-save, again and again; every listed checkpoint is whole.

A real child process saves checkpoints of ~90 MB (three 30 MB tensors, distinct values per step,
plus a tied alias and a train state) in a loop. The parent kills it at a different moment each
round, then loads every checkpoint `list_checkpoints` reports and checks each value.
"""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from lmscale.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint

N = 7_500_000  # float32 elements: 30 MB a tensor; arange stays exact below 2**24
CHILD = """
import sys, torch
from lmscale.checkpoint import save_checkpoint
directory, step, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
while True:
    step += 1
    state = {f"t{i}": torch.arange(n, dtype=torch.float32) + 1000 * step + i for i in range(3)}
    state["tied"] = state["t0"]
    train = {"step": step, "rng": (step, [torch.full((100,), step)])}
    save_checkpoint(directory, step, state, {"step": step}, str(step), train, keep=3)
"""


def expected(step: int, i: int) -> torch.Tensor:
    return torch.arange(N, dtype=torch.float32) + 1000 * step + i


def latest_step(directory: Path) -> int:
    latest = latest_checkpoint(directory)
    return int(latest.name.split("_")[1]) if latest else 0


def run_and_kill(directory: Path, delay: float) -> None:
    """Start the writer, wait for one new checkpoint, then SIGKILL it after `delay` seconds."""
    start = latest_step(directory)
    env = os.environ | {"PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(directory), str(start), str(N)], env=env
    )
    try:
        deadline = time.monotonic() + 60
        while latest_step(directory) <= start:
            assert child.poll() is None, "the writer died on its own"
            assert time.monotonic() < deadline, "the writer made no checkpoint in 60 s"
            time.sleep(0.01)
        time.sleep(delay)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()


def check_whole(directory: Path) -> None:
    """Every listed checkpoint loads with its step's exact values; nothing else looks like one."""
    listed = list_checkpoints(directory)
    assert listed, "no checkpoint survived"
    for path in listed:
        checkpoint = load_checkpoint(path)
        step = checkpoint.step
        assert path.name == f"step_{step:08d}" and checkpoint.config == {"step": step}
        assert checkpoint.tokenizer_json == str(step)
        for i in range(3):
            assert torch.equal(checkpoint.model_state[f"t{i}"], expected(step, i)), (path, i)
        assert checkpoint.model_state["tied"] is checkpoint.model_state["t0"]
        assert checkpoint.train_state["step"] == step
        assert torch.equal(checkpoint.train_state["rng"][1][0], torch.full((100,), step))
    for entry in directory.iterdir():
        assert entry in listed or entry.name.startswith("."), entry


def test_sigkill_mid_save_never_leaves_a_broken_checkpoint(tmp_path):
    rng = random.Random(0)
    leftovers = 0
    for _ in range(8):
        run_and_kill(tmp_path, delay=rng.uniform(0.0, 0.6))
        check_whole(tmp_path)
        leftovers += any(entry.name.startswith(".") for entry in tmp_path.iterdir())
    print(f"rounds that left a partial save behind: {leftovers}/8")
    save_checkpoint(tmp_path, 10_000, {"w": torch.ones(1)}, {})
    assert all(not entry.name.startswith(".") for entry in tmp_path.iterdir())
    assert len(list_checkpoints(tmp_path)) >= 2
