"""Distributed checkpoints: resharded resumes, a killed worker, a hung rank, exports."""

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from procs import (
    check,
    final_weights,
    lmscale_train,
    start_train,
    step_losses,
    tiny_args,
    worker_env,
    worker_pid,
)

from lmscale.checkpoint import list_checkpoints, load_checkpoint

pytestmark = pytest.mark.slow

# 8 sequences per step at every world size: 2 per rank per micro-batch, accumulation derived.
BATCH = ("--train.batch_size", "2", "--train.global_batch_size", "8")


@pytest.fixture(scope="module")
def fsdp2(shakespeare_dir, tmp_path_factory):
    """8 steps of FSDP on 2 processes, sharded checkpoints at steps 4 and 8."""
    run = tmp_path_factory.mktemp("fsdp2") / "run"
    args = tiny_args(shakespeare_dir, "--out", str(run), "--parallel.strategy", "fsdp", *BATCH)
    check(lmscale_train([*args, "--train.checkpoint_interval", "4"], nproc=2))
    return run


def stopped_at_step_4(run, tmp_path):
    """A copy of `run` as if it had stopped after step 4."""
    copy = tmp_path / "resumed"
    shutil.copytree(run, copy)
    shutil.rmtree(list_checkpoints(copy / "checkpoints")[-1])
    return copy


def assert_same_run(resumed, straight):
    """Steps 5..8 of `resumed` (appended to its log) equal `straight`'s; so do final weights."""
    np.testing.assert_allclose(step_losses(resumed)[-4:], step_losses(straight)[-4:], atol=1e-5)
    want = final_weights(straight)
    for name, tensor in final_weights(resumed).items():
        assert torch.allclose(tensor, want[name], rtol=0, atol=1e-5), name


def test_saved_by_a_pipeline_resumes_on_fsdp(shakespeare_dir, fsdp2, tmp_path):
    run = tmp_path / "run"
    args = tiny_args(shakespeare_dir, "--out", str(run), "--parallel.strategy", "pp", *BATCH)
    check(lmscale_train([*args, "--train.max_steps", "4"], nproc=2))
    resume = ["--out", str(run), "--resume", "--parallel.strategy", "fsdp", "--no-progress"]
    check(lmscale_train([*resume, "--sample-tokens", "0", "--train.max_steps", "8"], nproc=2))
    assert_same_run(run, fsdp2)


@pytest.mark.parametrize(
    "nproc, strategy",
    [(None, "none"), (4, "fsdp"), (2, "tp"), (2, "pp")],
    ids=["1 process", "fsdp on 4", "tp on 2", "pp on 2"],
)
def test_saved_on_2_resumes_on_another_world_size(nproc, strategy, fsdp2, tmp_path):
    resumed = stopped_at_step_4(fsdp2, tmp_path)
    # A save that a kill interrupted: never listed, never resumed from, cleared by the next save.
    crashed = resumed / "checkpoints" / ".tmp-step_00000008-sharded"
    (crashed / "dcp").mkdir(parents=True)
    (crashed / "dcp" / "__0_0.distcp").write_bytes(b"half a shard")
    args = ["--out", str(resumed), "--resume", "--parallel.strategy", strategy, "--no-progress"]
    check(lmscale_train([*args, "--sample-tokens", "0"], nproc=nproc))
    assert_same_run(resumed, fsdp2)
    assert not crashed.exists()


def test_single_process_run_continues_on_2_processes(shakespeare_dir, fsdp2, tmp_path):
    single = tmp_path / "single"
    args = tiny_args(shakespeare_dir, "--out", str(single), *BATCH)
    check(lmscale_train([*args, "--train.max_steps", "4"]))  # native checkpoint at step 4
    args = ["--out", str(single), "--resume", "--parallel.strategy", "ddp", "--no-progress"]
    check(lmscale_train([*args, "--sample-tokens", "0", "--train.max_steps", "8"], nproc=2))
    assert_same_run(single, fsdp2)


def test_sharded_run_exports_to_native_and_hugging_face(fsdp2, tmp_path):
    lmscale = [sys.executable, "-m", "lmscale"]
    for fmt in ("native", "hf"):
        out = tmp_path / fmt
        subprocess.run(
            [*lmscale, "export", fmt, "--model", str(fsdp2), "--out", str(out)],
            check=True, capture_output=True, env=worker_env(),
        )  # fmt: skip
    exported = load_checkpoint(tmp_path / "native").model_state
    for name, tensor in final_weights(fsdp2).items():
        assert torch.equal(exported[name], tensor), name
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert torch.equal(hf.model.embed_tokens.weight, exported["tok_embeddings.weight"])


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


LONG = (
    "--train.max_steps", "30", "--train.checkpoint_interval", "10", "--train.keep_checkpoints", "2",
    "--parallel.timeout_s", "60",
)  # fmt: skip


def test_killed_worker_restarts_and_ends_with_the_uninterrupted_weights(shakespeare_dir, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    common = ("--parallel.strategy", "fsdp", *BATCH, *LONG)
    proc = start_train(tiny_args(shakespeare_dir, "--out", str(killed), *common), 2, max_restarts=1)
    try:
        wait_for(lambda: list_checkpoints(killed / "checkpoints"), 120, "the first checkpoint")
        pid = wait_for(lambda: worker_pid(killed, rank=1), 10, "rank 1's worker")
        os.kill(pid, signal.SIGKILL)
        output, _ = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 0, output[-5000:]
    assert "torchrun restart 1 after a failed worker: resuming from" in output
    assert step_records(killed)[-1] == 30
    check(lmscale_train(tiny_args(shakespeare_dir, "--out", str(straight), *common), nproc=2))
    want = final_weights(straight)
    for name, tensor in final_weights(killed).items():
        assert torch.equal(tensor, want[name]), name


def step_records(run):
    from lmscale.train.metrics import read_metrics

    return [r["step"] for r in read_metrics(run) if "loss" in r]


def test_hung_rank_fails_the_run_within_the_timeout_naming_it(shakespeare_dir, tmp_path):
    run = tmp_path / "hung"
    args = tiny_args(
        shakespeare_dir, "--out", str(run), "--parallel.strategy", "ddp", *BATCH, *LONG,
        "--parallel.timeout_s", "3", "--train.max_steps", "500",
    )  # fmt: skip
    proc = start_train(args, 2)
    pid = None
    try:
        wait_for(lambda: list_checkpoints(run / "checkpoints"), 120, "the first checkpoint")
        pid = wait_for(lambda: worker_pid(run, rank=1), 10, "rank 1's worker")
        os.kill(pid, signal.SIGSTOP)  # hangs: alive, holding its sockets, never arriving
        stopped = time.monotonic()
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "did not join a collective" in line:
                break
        waited = time.monotonic() - stopped
    finally:
        if pid:
            os.kill(pid, signal.SIGCONT)  # let it take torchrun's SIGTERM
        proc.communicate(timeout=120)
    message = next(line for line in lines if "did not join a collective" in line)
    assert message.startswith("lmscale: error: rank 0: step ")
    assert "rank 1 (last finished step" in message and "parallel.timeout_s = 3 s" in message
    assert waited < 30
    assert proc.returncode != 0
