"""Run under torchrun by test_memory_and_comm.py: what each rank holds, and what DDP sends.

shard_worker.py shards DATA_DIR OUT_DIR STRATEGY DTYPE  one step of the loop; what is held
shard_worker.py comm DATA_DIR OUT_DIR                    DDP gradient bytes per step, per hook
"""

import json
import os
import sys
import tempfile
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from lmscale.train.config import load_run_config
from lmscale.train.loop import _teardown, setup, train_step

REPO = Path(__file__).resolve().parents[2]


def local_numel(tensor: torch.Tensor) -> int:
    return (tensor.to_local() if isinstance(tensor, DTensor) else tensor).numel()


def run_for(data_dir: str, *overrides: str):
    config = load_run_config(
        REPO / "configs" / "tiny.toml",
        ["--data.path", data_dir, "--train.batch_size", "2", "--train.eval_interval", "0",
         "--train.checkpoint_interval", "0", *overrides],
    )  # fmt: skip
    return setup(config, Path(tempfile.mkdtemp()) / "run", resume=False)


def shards(data_dir: str, strategy: str, dtype: str) -> dict:
    run = run_for(data_dir, "--parallel.strategy", strategy, "--train.dtype", dtype)
    run.optimizer.zero_grad = lambda set_to_none=True: None  # keep the step's gradients to count
    train_step(run)
    params = {id(p): p for p in run.model.parameters()}.values()
    held = {
        "params": sum(local_numel(p) for p in params),
        "grads": sum(local_numel(p.grad) for p in params if p.grad is not None),
        "optimizer": sum(
            local_numel(v) for s in run.optimizer.state.values() for k, v in s.items()
            if k in ("exp_avg", "exp_avg_sq")
        ),
        "total_params": run.config.model.num_params(),
        "dtypes": sorted({str(t.dtype) for p in params for t in (p, p.grad)}),
        "mixed_precision": run.parallel.mixed_precision,
    }  # fmt: skip
    _teardown(run, finished=True)
    return held


def comm(data_dir: str) -> dict:
    sent = {}
    for hook in ("none", "bf16", "powersgd"):
        run = run_for(
            data_dir, "--parallel.strategy", "ddp", "--parallel.ddp_comm_hook", hook,
            "--parallel.powersgd_start_step", "2",
        )  # fmt: skip
        per_step = []
        for _ in range(4):
            loss = train_step(run)
            per_step.append(run.comm_bytes)
        sent[hook] = {"bytes": per_step, "loss": loss}
    _teardown(run, finished=True)
    return sent


if __name__ == "__main__":
    mode, data_dir, out = sys.argv[1:4]
    result = shards(data_dir, *sys.argv[4:6]) if mode == "shards" else comm(data_dir)
    rank = int(os.environ["RANK"])
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))
