"""`lmscale plan --calibrate`: the planner's memory prediction against real `lmscale train` runs
(real processes, the CPU here; a CUDA run where a GPU is present), within 20%."""

import json
import subprocess
import sys

import pytest
import torch

from lmscale.plan.calibrate import TOLERANCE, calibrate

SHAPE = ["--model.family", "llama", "--model.dim", "256", "--model.n_layers", "4",
         "--model.n_heads", "4", "--model.n_kv_heads", "2", "--model.hidden_dim", "768",
         "--model.max_seq_len", "256"]  # fmt: skip
GPT2 = ["--model.family", "gpt2", "--model.dim", "512", "--model.n_layers", "4",
        "--model.n_heads", "8", "--model.n_kv_heads", "8", "--model.hidden_dim", "2048",
        "--model.max_seq_len", "256"]  # fmt: skip


def train_run(data, out, *args, nproc=None, steps=3, batch=16):
    command = [sys.executable, "-m", "lmscale", "train", "--config", "configs/tiny.toml",
               "--out", str(out), "--data.path", str(data), "--train.max_steps", str(steps),
               "--train.batch_size", str(batch), "--train.log_interval", "1", "--train.eval_interval",
               "0", "--train.checkpoint_interval", "0", "--sample-tokens", "0", "--no-progress",
               *args]  # fmt: skip
    if nproc:
        command += ["--nproc", str(nproc)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.parametrize(
    "name, args, nproc",
    [
        ("llama-bf16-autocast", [*SHAPE, "--train.dtype", "bfloat16"], None),
        ("gpt2-fp32-accumulation", [*GPT2, "--train.grad_accum_steps", "2",
                                    "--train.batch_size", "8"], None),
        ("gpt2-fp32-recompute", [*GPT2, "--train.activation_checkpointing", "true"], None),
        ("llama-bf16-ddp-2-processes", [*SHAPE, "--train.dtype", "bfloat16",
                                        "--parallel.strategy", "ddp"], 2),
    ],
)  # fmt: skip
def test_predicted_memory_is_within_20_percent_of_a_cpu_run(
    name, args, nproc, shakespeare_dir, tmp_path
):
    run = train_run(shakespeare_dir, tmp_path / name, *args, nproc=nproc)
    result = calibrate(run)
    assert result.device.name.startswith("cpu:")
    assert result.info["world_size"] == (nproc or 1)
    assert abs(result.memory_error) <= TOLERANCE, (
        f"{name}: predicted {result.memory.peak / 2**20:.0f} MiB, measured "
        f"{result.measured_peak / 2**20:.0f} MiB"
    )
    assert result.measured_held >= 0.8 * result.measured_peak  # the process holds what it allocates
    assert result.measured_step_s > 0 and result.measured_mfu > 0


def test_calibrate_cli_prints_prediction_beside_measurement(shakespeare_dir, tmp_path):
    run = train_run(shakespeare_dir, tmp_path / "run", *SHAPE, steps=2)
    out = subprocess.run([sys.executable, "-m", "lmscale", "plan", "--calibrate", str(run)],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert "predicted" in out and "measured" in out and "(within 20%)" in out
    data = json.loads(subprocess.run(
        [sys.executable, "-m", "lmscale", "plan", "--calibrate", str(run), "--json"],
        capture_output=True, text=True, check=True).stdout)  # fmt: skip
    assert data["memory_agrees"] and data["precision"] == "fp32"


def test_calibrate_refuses_a_folder_that_is_not_a_finished_run(tmp_path):
    (tmp_path / "config.toml").write_text("[model]\n")
    out = subprocess.run([sys.executable, "-m", "lmscale", "plan", "--calibrate", str(tmp_path)],
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 2
    assert "no run_info.json, metrics.jsonl there" in out.stderr and out.stderr.count("\n") == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_predicted_memory_is_within_20_percent_of_a_gpu_run(shakespeare_dir, tmp_path):
    run = train_run(shakespeare_dir, tmp_path / "gpu", *SHAPE, "--train.dtype", "bfloat16",
                    "--train.device", "cuda")  # fmt: skip
    result = calibrate(run)
    assert result.info["device"] == "cuda"
    assert abs(result.memory_error) <= TOLERANCE
