"""`lmscale finetune lora --nproc 2` on real torchrun processes over gloo trains as one process does.

The same global batch (4 rows a step, 2 per rank) in fp32 with no dropout: the per-step losses
and the saved adapter must match a single-process run, under DDP over a QLoRA (int8) base and
under FSDP2 with the output head adapted too (a trainable adapter in FSDP's root group).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lmscale.cli.main import main
from lmscale.errors import LmscaleError
from lmscale.finetune.adapter import CONFIG, WEIGHTS
from lmscale.finetune.lora import LoRAConfig
from lmscale.finetune.sft import SFTConfig, finetune_lora
from lmscale.finetune.sft_data import Example, RowLoader
from lmscale.parallel import ParallelConfig

ROOT = Path(__file__).resolve().parents[2]

# strategy -> (quantize, targets): each case also covers one of the harder bases.
CASES = {"ddp": ("int8", "q,v,down"), "fsdp": (None, "all-linear,output")}


def settings(model_dir, data, quantize, targets) -> list[str]:
    return [
        "--model", str(model_dir), "--data", str(data), "--rank", "4", "--alpha", "8",
        "--targets", targets, "--steps", "3", "--batch-size", "4", "--max-length", "64",
        "--lr", "5e-3", "--warmup-steps", "1", "--log-interval", "1", "--device", "cpu",
        *(["--quantize", quantize] if quantize else []),
    ]  # fmt: skip


def logged(adapter: Path, key: str) -> list:
    lines = (adapter / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)[key] for line in lines]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", CASES)
def test_two_processes_match_one(strategy, tiny_model_dir, chat_jsonl, tmp_path):
    quantize, targets = CASES[strategy]
    args = settings(tiny_model_dir, chat_jsonl, quantize, targets)
    single, multi = tmp_path / "single", tmp_path / "multi"
    config = SFTConfig(
        model=str(tiny_model_dir), data=str(chat_jsonl), steps=3, batch_size=4, max_length=64,
        lr=5e-3, warmup_steps=1, log_interval=1, device="cpu", quantize=quantize,
    )  # fmt: skip
    finetune_lora(config, LoRAConfig(4, 8.0, 0.0, targets), single, progress=False)

    env = os.environ | {"PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "lmscale", "finetune", "lora", *args, "--out", str(multi)]
    command += ["--json", "--nproc", "2", "--parallel.strategy", strategy]
    out = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=240)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]

    reports = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 1  # rank 0 alone reports ...
    assert reports[0]["strategy"] == strategy and reports[0]["processes"] == 2
    assert sorted(p.name for p in multi.iterdir()) == sorted([CONFIG, WEIGHTS, "metrics.jsonl"])
    assert len(logged(multi, "loss")) == 3  # ... and logs (it appends: a second writer doubles it)
    # each rank read its own share: together, the scored tokens of the one-process batch
    assert logged(multi, "targets") == logged(single, "targets")
    np.testing.assert_allclose(logged(multi, "loss"), logged(single, "loss"), rtol=0, atol=1e-5)
    want, got = load_file(single / WEIGHTS), load_file(multi / WEIGHTS)
    assert got.keys() == want.keys()
    if strategy == "fsdp":
        assert "output.lora_A.weight" in got
    for key, tensor in got.items():
        assert (want[key] - tensor).abs().max() <= 1e-5, key
    assert all(got[key].abs().max() > 0 for key in got if "lora_B" in key)  # B left zero: trained
    saved = json.loads((multi / CONFIG).read_text())
    assert saved["base"] == json.loads((single / CONFIG).read_text())["base"]
    assert saved["training"]["parallel"]["strategy"] == strategy


def test_rank_shares_make_the_one_process_batch():
    rows = [Example([i] * (1 + i % 4), [i] * (1 + i % 4)) for i in range(11)]
    for batch in (4, 5):
        one = RowLoader(rows, batch, seed=3)
        ranks = [RowLoader(rows, batch, seed=3, rank=r, world_size=2) for r in range(2)]
        for _ in range(5):  # past the end of a pass: the reshuffle agrees too
            inputs, _ = one.next_batch()
            shares = [loader.next_batch()[0] for loader in ranks]
            assert [len(s) for s in shares] == [batch // 2, batch - batch // 2]
            got = [row[row != 0].tolist() for share in shares for row in share]
            assert got == [row[row != 0].tolist() for row in inputs]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--parallel.strategy", "tp"], "parallel.strategy tp is not supported for LoRA"),
        (["--parallel.strategy", "fsdp+tp"], "parallel.strategy fsdp+tp is not supported"),
        (["--parallel.strategy", "none"], "parallel.strategy none runs on one process"),
        (["--batch-size", "1"], "--batch-size 1 (rows per step) is fewer than --nproc 2"),
        (["--parallel.stratgy", "ddp"], "unknown option 'parallel.stratgy'"),
        (["--train.steps", "3"], "unrecognized option '--train.steps'"),
    ],
)
def test_unsupported_runs_are_refused_before_starting(
    extra, message, tiny_model_dir, chat_jsonl, tmp_path, capsys
):
    args = ["finetune", "lora", "--model", str(tiny_model_dir), "--data", str(chat_jsonl)]
    code = main([*args, "--out", str(tmp_path / "ad"), "--nproc", "2", *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "ad").exists()


def test_a_worker_refuses_tensor_parallel_too(tiny_model_dir, chat_jsonl, tmp_path):
    """Not only the launcher: `python -m lmscale.finetune` under torchrun checks as well."""
    config = SFTConfig(
        model=str(tiny_model_dir), data=str(chat_jsonl), steps=1, device="cpu",
        parallel=ParallelConfig(strategy="tp"),
    )  # fmt: skip
    with pytest.raises(LmscaleError, match="not supported for LoRA"):
        finetune_lora(config, LoRAConfig(), tmp_path / "ad")
    assert not torch.distributed.is_initialized()
