"""MFU in metrics.jsonl: train's copy of the FLOPs formula and its small table of GPU peaks."""

import pytest
import torch

from lmscale.model import preset
from lmscale.plan.flops import training_flops_per_token as planner_flops
from lmscale.plan.hardware import accelerator
from lmscale.train.mfu import mfu_fields, peak_flops, training_flops_per_token


@pytest.mark.parametrize("name", ["tiny", "tiny-gpt2", "gpt2-124m", "llama-135m"])
@pytest.mark.parametrize("seq_len", [64, 1024])
def test_flops_per_token_match_the_planner(name, seq_len):
    model = preset(name)
    assert training_flops_per_token(model, seq_len) == planner_flops(model, seq_len)[0]


def test_gpt2_124m_costs_about_6n_plus_attention_per_token():
    model = preset("gpt2-124m")
    n = model.num_params(embeddings=False) + model.vocab_size * model.dim
    approx = 6 * n + 12 * model.n_layers * model.dim * 1024
    assert training_flops_per_token(model, 1024) == pytest.approx(approx, rel=0.01)


@pytest.mark.parametrize(
    ("device_name", "catalog"),
    [("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"),
     ("NVIDIA A100-SXM4-80GB", "a100")],
)  # fmt: skip
def test_peaks_agree_with_the_planner_catalog(device_name, catalog):
    entry = accelerator(catalog)
    assert peak_flops(device_name, "bfloat16") == entry.peak_flops("bf16")
    assert peak_flops(device_name, "float32") == entry.peak_flops("fp32")


def test_pcie_parts_and_unknown_devices():
    assert peak_flops("NVIDIA H100 PCIe", "bfloat16") == 756e12
    assert peak_flops("NVIDIA GeForce RTX 3090", "bfloat16") is None


def test_no_mfu_on_the_cpu():
    assert mfu_fields(preset("tiny"), 64, "float32", torch.device("cpu"), 1, 1e6) == {}


def test_a_cpu_run_logs_no_mfu(shakespeare_dir, tmp_path):
    from lmscale.train import load_run_config, train
    from lmscale.train.metrics import read_metrics

    args = ["--data.path", str(shakespeare_dir), "--train.max_steps", "2", "--train.log_interval", "1",
            "--train.device", "cpu"]  # fmt: skip
    train(load_run_config("configs/tiny.toml", args), tmp_path / "run", progress=False)
    records = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert len(records) == 2 and not any("mfu" in r for r in records)
