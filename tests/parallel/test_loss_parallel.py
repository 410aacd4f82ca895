"""Loss parallel on real gloo processes: the vocabulary-split fused loss equals the full one."""

import json
import subprocess
import sys

import pytest
from procs import REPO, worker_env

WORKER = str(REPO / "tests" / "parallel" / "loss_worker.py")


@pytest.mark.parametrize("vocab", [64, 61])  # 61 rows split unevenly over 2 ranks: 31 + 30
def test_vocab_parallel_loss_and_gradients_equal_the_full_logits(vocab, tmp_path):
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        WORKER, str(tmp_path), str(vocab),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=worker_env())
    assert result.returncode == 0, result.stderr[-5000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert sum(r["local_rows"] for r in ranks) == vocab
    for report in ranks:
        assert report["loss"] == pytest.approx(report["reference"], rel=1e-5)
        assert report["hidden_grad_err"] < 1e-4
        assert report["weight_grad_err"] < 1e-4
    assert ranks[0]["loss"] == ranks[1]["loss"]  # every rank holds the same loss
