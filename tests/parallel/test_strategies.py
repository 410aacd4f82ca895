"""Each strategy, on real processes over gloo, trains exactly as one process does (fp32)."""

import numpy as np
import pytest
import torch
from procs import check, final_weights, lmscale_train, step_losses, tiny_args

from lmscale.train import load_run_config
from lmscale.train.metrics import read_metrics

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def single(shakespeare_dir, tmp_path_factory):
    """One process, batch 8: the reference run."""
    run = tmp_path_factory.mktemp("single") / "run"
    check(lmscale_train(tiny_args(shakespeare_dir, "--out", str(run), "--train.batch_size", "8")))
    return run


# strategy, processes, per-rank batch (8 sequences per step in every case), extra overrides
CASES = {
    "ddp": ("ddp", 2, 4, []),
    "fsdp": ("fsdp", 2, 4, []),
    "fsdp, no reshard": ("fsdp", 2, 4, ["--parallel.reshard_after_forward", "false"]),
    "tp": ("tp", 2, 8, []),
    "fsdp+tp 2x2": ("fsdp+tp", 4, 4, ["--parallel.tp", "2"]),
    "hsdp 2x2": ("hsdp", 4, 2, ["--parallel.dp_shard", "2"]),
}


@pytest.mark.parametrize("case", CASES)
def test_strategy_matches_one_process(case, single, shakespeare_dir, tmp_path):
    strategy, nproc, batch, extra = CASES[case]
    run = tmp_path / "run"
    args = tiny_args(
        shakespeare_dir, "--out", str(run), "--parallel.strategy", strategy,
        "--train.batch_size", str(batch), *extra,
    )  # fmt: skip
    result = check(lmscale_train(args, nproc=nproc))
    assert result.stdout.count("run: ") == 1  # rank 0 alone reports
    records = read_metrics(run)
    if strategy == "ddp":  # every fp32 gradient (a tied embedding once), once per step
        n_params = load_run_config(run / "config.toml").model.num_params()
        assert all(r["comm_bytes"] == 4 * n_params for r in records)
    expected, got = step_losses(single), step_losses(run)
    assert len(got) == len(expected) == 8
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    want = final_weights(single)  # gathered from the DCP shards by one process
    for name, tensor in final_weights(run).items():
        assert torch.allclose(tensor, want[name], rtol=0, atol=1e-5), name
