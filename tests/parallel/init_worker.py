"""Run under torchrun by test_pipeline.py: meta-device setup, its memory and initial weights.

init_worker.py DATA_DIR OUT_DIR STRATEGY [OVERRIDES...]   each rank writes rank{r}.json
"""

import json
import resource
import sys
import tempfile
from pathlib import Path

import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from lmscale.model import Transformer
from lmscale.train.config import load_run_config
from lmscale.train.loop import _teardown, setup

REPO = Path(__file__).resolve().parents[2]


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def main(data_dir: str, out_dir: str, strategy: str, *overrides: str) -> None:
    config = load_run_config(
        REPO / "configs" / "tiny.toml",
        ["--data.path", data_dir, "--train.batch_size", "2", "--train.eval_interval", "0",
         "--parallel.strategy", strategy, *overrides],
    )  # fmt: skip
    # The process group and a first setup of the tiny model come before the baseline: what is
    # measured is then what the model's size adds.
    warm = load_run_config(REPO / "configs" / "tiny.toml", ["--data.path", data_dir])
    warm.parallel.strategy = strategy
    _teardown_after_warm_up = setup(warm, Path(tempfile.mkdtemp()) / "warm", resume=False)
    del _teardown_after_warm_up
    before = peak_rss_bytes()
    run = setup(config, Path(tempfile.mkdtemp()) / "run", resume=False)
    growth = peak_rss_bytes() - before
    report = {"setup_peak_growth": growth, "model_bytes": 4 * config.model.num_params()}
    full = {}
    for module in [run.model]:
        full |= get_model_state_dict(module, options=StateDictOptions(full_state_dict=True))
    # Every rank gathers; pipeline stages each hold part: compare what this rank has.
    reference = Transformer(config.model)
    reference.init_weights(config.train.seed)
    want = reference.state_dict()
    report["compared"] = sorted(full)
    report["max_diff"] = max((full[name].float() - want[name]).abs().max().item() for name in full)
    Path(out_dir, f"rank{run.ranks.rank}.json").write_text(json.dumps(report))
    dist.barrier()
    _teardown(run, finished=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
