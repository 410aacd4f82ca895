"""Model FLOPs utilisation (MFU) of training steps, for metrics.jsonl.

    MFU = tokens/s x model FLOPs per token / (devices x one device's peak FLOP/s)

Model FLOPs per token are counted as `lmscale.plan.flops` counts them (Megatron-LM, PaLM): 2 per
multiply-add of every matrix product, the attention scores and their weighted sum over the whole
sequence, the output head; backward twice the forward; no recomputation.
NOTE: the formula is repeated here rather than imported, because `lmscale.train` sits below
`lmscale.plan` in DESIGN.md's import order; tests/train/test_mfu.py checks that the two agree.

Peaks are the data sheets' dense figures for the GPUs we train on; a device not listed here
(and the CPU, whose peak depends on cores and clocks) logs no MFU. `lmscale report` derives
MFU for any device from the planner's larger catalog.
"""

from __future__ import annotations

import torch

from lmscale.model import ModelConfig

# Data, not code: (fragment of torch.cuda.get_device_name, 16-bit tensor-core TFLOP/s,
# FP32 TFLOP/s), dense, first match wins (so the PCIe and NVL parts come before "H100").
PEAK_TFLOPS: tuple[tuple[str, float, float], ...] = (
    ("H100 PCIe", 756.0, 51.0),
    ("H100 NVL", 835.0, 60.0),
    ("H100", 989.0, 67.0),  # SXM5: "NVIDIA H100 80GB HBM3"
    ("H200", 989.0, 67.0),
    ("A100", 312.0, 19.5),
)


def training_flops_per_token(model: ModelConfig, seq_len: int) -> float:
    """Model FLOPs of one training token (forward + backward) at sequence length `seq_len`."""
    d, kv = model.dim, model.n_kv_heads * model.head_dim
    mlp = (2 if model.family == "gpt2" else 3) * d * model.hidden_dim
    layer_weights = d * (model.q_dim + 2 * kv) + model.q_dim * d + mlp
    layers = 2 * model.n_layers * layer_weights
    attention = 2 * 2 * model.n_layers * seq_len * model.q_dim  # Q K^T and A V
    head = 2 * model.vocab_size * model.dim
    return 3 * (layers + attention + head)


def peak_flops(device_name: str, dtype: str) -> float | None:
    """One device's dense peak FLOP/s for `dtype` math (float32, or a 16-bit type); None if unknown.

    NOTE: float8 runs are measured against the 16-bit peak too, so their MFU compares with bf16
    runs of the same model (a higher MFU is then the float8 speed-up).
    """
    for fragment, half, single in PEAK_TFLOPS:
        if fragment.lower() in device_name.lower():
            return (single if dtype == "float32" else half) * 1e12
    return None


def mfu_fields(
    model: ModelConfig, seq_len: int, dtype: str, device: torch.device, n_devices: int,
    tokens_per_s: float,
) -> dict[str, float]:  # fmt: skip
    """`{"mfu": ...}` for a metrics line, or `{}` where the device's peak is not known.

    Args:
        tokens_per_s: throughput of all `n_devices` devices together.
    """
    if device.type != "cuda":
        return {}
    peak = peak_flops(torch.cuda.get_device_name(device), dtype)
    if peak is None:
        return {}
    return {"mfu": tokens_per_s * training_flops_per_token(model, seq_len) / (n_devices * peak)}
