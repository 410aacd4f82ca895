"""Under FSDP each rank holds 1/N of the state; DDP's compression hooks send fewer bytes."""

import json
import subprocess
import sys

import pytest
from procs import REPO, worker_env

pytestmark = pytest.mark.slow
WORKER = str(REPO / "tests" / "parallel" / "shard_worker.py")


def run_worker(nproc: int, *args: str, out) -> list[dict]:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={nproc}", WORKER, *args[:2], str(out), *args[2:],
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=worker_env())
    assert result.returncode == 0, result.stderr[-5000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


@pytest.mark.parametrize("nproc, dtype", [(2, "bfloat16"), (4, "float32")])
def test_fsdp_rank_holds_a_1_over_n_share(nproc, dtype, shakespeare_dir, tmp_path):
    held = run_worker(nproc, "shards", str(shakespeare_dir), "fsdp", dtype, out=tmp_path)
    total = held[0]["total_params"]
    for rank in held:
        # Shards are padded to equal sizes: at most one row of each tensor over 1/N.
        assert total / nproc <= rank["params"] <= total / nproc * 1.05, rank
        assert rank["grads"] == rank["params"]
        assert rank["optimizer"] == 2 * rank["params"]  # AdamW's two moments, sharded alike
    assert sum(r["params"] for r in held) >= total
    # bf16 compute through FSDP's policy: sharded weights, gradients and moments stay fp32.
    assert held[0]["dtypes"] == ["torch.float32"]
    assert held[0]["mixed_precision"] == (dtype == "bfloat16")


def test_ddp_compression_hooks_send_fewer_bytes(shakespeare_dir, tmp_path):
    sent = run_worker(2, "comm", str(shakespeare_dir), out=tmp_path)[0]
    full = sent["none"]["bytes"]
    assert len(set(full)) == 1 and full[0] > 0
    assert sent["bf16"]["bytes"] == [b // 2 for b in full]
    powersgd = sent["powersgd"]["bytes"]
    assert powersgd[0] == full[0]  # plain all-reduce before parallel.powersgd_start_step
    assert powersgd[-1] < full[0] / 4  # rank-1 factors of every matrix
    for hook in sent.values():  # still training: the loss after 4 steps is sane
        assert 0 < hook["loss"] < 7
