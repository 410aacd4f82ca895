"""Pipeline parallel and meta-device setup on real gloo processes.

Each schedule and composition that fits 4 processes trains exactly as one process does (fp32);
a model built on the meta device gets the single-process initial weights while each rank
allocates only its part.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from procs import REPO, check, final_weights, lmscale_train, step_losses, tiny_args, worker_env

from lmscale.checkpoint import load_pretrained
from lmscale.cli.main import main
from lmscale.data import TokenDataset
from lmscale.train.evaluate import evaluate
from lmscale.train.metrics import read_metrics

pytestmark = pytest.mark.slow
LAYERS = ("--model.n_layers", "4")  # interleaved 1F1B on 2 ranks needs 4 stages
INIT_WORKER = str(REPO / "tests" / "parallel" / "init_worker.py")


@pytest.fixture(scope="module")
def single4(shakespeare_dir, tmp_path_factory):
    """One process, 4 layers, batch 8: the reference run."""
    run = tmp_path_factory.mktemp("single4") / "run"
    args = tiny_args(shakespeare_dir, "--out", str(run), "--train.batch_size", "8", *LAYERS)
    check(lmscale_train(args))
    return run


# strategy, processes, per-rank batch (8 sequences per step in every case), extra overrides
CASES = {
    "pp 1f1b": ("pp", 2, 8, ["--train.eval_interval", "8"]),
    "pp gpipe": (
        "pp",
        2,
        8,
        ["--parallel.pp_schedule", "gpipe", "--parallel.pp_microbatches", "4"],
    ),
    "pp interleaved": (
        "pp",
        2,
        8,
        ["--parallel.pp_schedule", "interleaved-1f1b", "--parallel.pp_microbatches", "4"],
    ),  # fmt: skip
    "pp+fsdp 2x2": ("pp+fsdp", 4, 4, ["--parallel.pp", "2"]),
    "pp+tp 2x2": ("pp+tp", 4, 8, ["--parallel.tp", "2"]),
}


@pytest.mark.parametrize("case", CASES)
def test_pipeline_matches_one_process(case, single4, shakespeare_dir, tmp_path):
    strategy, nproc, batch, extra = CASES[case]
    run = tmp_path / "run"
    args = tiny_args(
        shakespeare_dir, "--out", str(run), "--parallel.strategy", strategy,
        "--train.batch_size", str(batch), *LAYERS, *extra,
    )  # fmt: skip
    result = check(lmscale_train(args, nproc=nproc))
    assert result.stdout.count("run: ") == 1
    np.testing.assert_allclose(step_losses(run), step_losses(single4), rtol=0, atol=1e-5)
    want = final_weights(single4)
    got = final_weights(run)  # the stages' DCP shards, gathered by one process
    assert set(got) == set(want)
    for name, tensor in got.items():
        assert torch.allclose(tensor, want[name], rtol=0, atol=1e-5), name
    if "--train.eval_interval" in extra:  # evaluated through the pipeline, as one process would
        logged = [r["val_loss"] for r in read_metrics(run) if "val_loss" in r][-1]
        model, _ = load_pretrained(run)
        val = TokenDataset(shakespeare_dir, "val")
        direct = evaluate(model, val.tokens, 64, 8, max_tokens=4096)
        assert logged == pytest.approx(direct.loss, abs=1e-5)


def test_bad_pipeline_plans_fail_in_one_line(shakespeare_dir, tmp_path, capsys):
    base = tiny_args(shakespeare_dir, "--out", str(tmp_path / "r"))
    cases = {
        ("--parallel.strategy", "pp+fsdp"): "needs parallel.pp",
        ("--parallel.strategy", "pp", "--parallel.pp_schedule", "interleaved-1f1b"): "stages",
        ("--parallel.strategy", "pp", "--parallel.pp_schedule", "zb"): "must be one of gpipe",
    }
    # The first case as a user runs it; the others in process through the entry point's
    # main(argv): each would only import torch again in a fresh interpreter.
    (first, message), *others = cases.items()
    result = lmscale_train([*base, *first], nproc=2)
    assert result.returncode != 0
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("lmscale: error:") and message in error, result.stderr[-2000:]
    for extra, message in others:
        assert main(["train", *base, *extra, "--nproc", "2"]) == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.startswith("lmscale: error:") and message in error, error
    assert not (tmp_path / "r").exists()


def run_init_worker(nproc: int, data_dir, out, strategy: str, *overrides: str) -> list[dict]:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        INIT_WORKER, str(data_dir), str(out), strategy, *overrides,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=worker_env())
    assert result.returncode == 0, result.stderr[-5000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


@pytest.mark.parametrize("strategy, nproc", [("fsdp", 2), ("tp", 2), ("pp", 2)])
def test_meta_init_equals_the_single_process_init(strategy, nproc, shakespeare_dir, tmp_path):
    reports = run_init_worker(nproc, shakespeare_dir, tmp_path, strategy)
    for report in reports:
        assert report["max_diff"] == 0.0
    names = set().union(*(r["compared"] for r in reports))
    assert "layers.1.feed_forward.w2.weight" in names and "norm.weight" in names


def test_meta_setup_peak_per_rank_is_near_its_share(shakespeare_dir, tmp_path):
    """A 134 MB model on 2 FSDP ranks: each rank's setup peak stays near half of it."""
    bigger = ("--model.dim", "512", "--model.n_layers", "8", "--model.hidden_dim", "2048",
              "--model.n_heads", "8", "--model.n_kv_heads", "4")  # fmt: skip
    reports = run_init_worker(2, shakespeare_dir, tmp_path, "fsdp", *bigger)
    for report in reports:
        assert report["model_bytes"] > 120e6
        assert report["setup_peak_growth"] < 0.65 * report["model_bytes"], report
