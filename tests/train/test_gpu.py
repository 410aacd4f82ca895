"""The GPU speed path (issue 19): bf16 + torch.compile on CUDA, float8, and bench/train_gpu.py.

The CUDA tests skip without a GPU; the CPU ones check what a user without one meets (the
one-line float8 error) and that the benchmark script runs end to end in its smoke mode.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lmscale.model import Transformer
from lmscale.train import load_run_config, train
from lmscale.train.metrics import read_metrics
from lmscale.train.mfu import peak_flops

ROOT = Path(__file__).resolve().parents[2]
ENV = os.environ | {"PYTHONPATH": str(ROOT / "src")}
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def gpu_config(data_dir, *overrides):
    args = ["--data.path", str(data_dir), "--train.log_interval", "1", "--train.device", "cuda",
            "--train.dtype", "bfloat16", "--train.compile", "true", "--train.max_steps", "40",
            *overrides]  # fmt: skip
    return load_run_config("configs/tiny.toml", args)


def assert_trained(run_dir):
    records = [r for r in read_metrics(run_dir) if "loss" in r]
    losses = [r["loss"] for r in records]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5
    if peak_flops(torch.cuda.get_device_name(), "bfloat16") is not None:
        assert all(0 < r["mfu"] < 1 for r in records)
    return records


@cuda
@pytest.mark.gpu
def test_bf16_compiled_training_on_cuda_logs_mfu(shakespeare_dir, tmp_path):
    summary = train(gpu_config(shakespeare_dir), tmp_path / "run", progress=False)
    assert_trained(tmp_path / "run")
    assert summary.val.perplexity < summary.unigram.perplexity


@cuda
@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
    reason="float8 needs compute capability 8.9+",
)
def test_float8_training_on_cuda_saves_plain_weights(shakespeare_dir, tmp_path):
    pytest.importorskip("torchao.float8")
    summary = train(
        gpu_config(shakespeare_dir, "--train.float8", "true"), tmp_path / "run", progress=False
    )
    assert_trained(tmp_path / "run")
    from lmscale.checkpoint import load_pretrained

    model, _ = load_pretrained(str(summary.checkpoint), "cpu")
    assert type(model) is Transformer


def test_float8_on_the_cpu_fails_in_one_line_through_the_cli(shakespeare_dir, tmp_path):
    cmd = [sys.executable, "-m", "lmscale", "train", "--config", "configs/tiny.toml",
           "--out", str(tmp_path / "run"), "--data.path", str(shakespeare_dir),
           "--train.device", "cpu", "--train.float8", "true"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=120)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmscale: error: train.float8 needs a CUDA GPU")
    assert not (tmp_path / "run").exists()  # refused before anything was written


# A stand-in with nanoGPT's interface (GPTConfig, GPT(config), forward(idx, targets) ->
# (logits, loss), configure_optimizers), so the smoke run also exercises `--nanogpt PATH`.
FAKE_NANOGPT = """
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmscale.model import ModelConfig, Transformer


@dataclass
class GPTConfig:
    block_size: int
    vocab_size: int
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float
    bias: bool


class GPT(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.net = Transformer(ModelConfig(family="gpt2", vocab_size=c.vocab_size, dim=c.n_embd,
                                           n_layers=c.n_layer, n_heads=c.n_head,
                                           max_seq_len=c.block_size))

    def forward(self, idx, targets):
        logits = self.net(idx)
        return logits, F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        return torch.optim.AdamW(self.parameters(), lr=learning_rate, betas=betas)
"""


def test_the_gpu_bench_runs_end_to_end_in_smoke_mode(tmp_path):
    model_py = tmp_path / "model.py"
    model_py.write_text(FAKE_NANOGPT)
    cmd = [sys.executable, "bench/train_gpu.py", "--smoke", "--float8", "--nanogpt", str(model_py)]
    env = ENV | {"OUT": str(tmp_path / "out"), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "out" / "train_gpu.json").read_text())
    gpt2, llama = summary["models"]["tiny-gpt2"], summary["models"]["tiny"]
    for model in (gpt2, llama):
        for label in ("lmscale fsdp", "lmscale single", "transformers"):
            result = model["results"][label]
            assert result["tokens_per_s"] > 0 and np.isfinite(result["loss_last"]), label
        assert (
            "train.float8 needs a CUDA GPU"
            in model["results"]["lmscale single float8"]["not_measured"]
        )
        assert model["ratios"]["lmscale single / transformers"] > 0
    assert gpt2["results"]["nanoGPT"]["tokens_per_s"] > 0
    assert "GPT-2 only" in llama["results"]["nanoGPT"]["not_measured"]
    assert "lmscale single" in proc.stdout and "tokens/s" in proc.stdout
