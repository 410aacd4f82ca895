"""Serving memory and speed: weights in each dtype, the KV cache, how many sequences fit, and the
decode rate memory bandwidth allows.

    KV bytes per token = 2 (keys and values) x layers x kv_heads x head_dim x bytes per element
    decode step        = (weights + KV read by every active sequence) / bandwidth   (a ceiling:
                         every byte read once per step at the data-sheet bandwidth), or the
                         step's 2 x N x batch FLOPs at peak when that is longer
    prefill            = (2 N + 2 L s d_q) FLOPs per prompt token at peak x MFU

Weights: block matrices in the dtype, embeddings and the output projection in 16-bit as GPTQ,
AWQ and lmscale's own int4 checkpoints keep them; int4 and int8 carry one fp16 scale per group
(int8: per output channel).
"""

from __future__ import annotations

from dataclasses import dataclass

from lmscale.errors import LmscaleError
from lmscale.model.config import ModelConfig
from lmscale.plan.flops import forward_flops, layer_matmul_params
from lmscale.plan.hardware import Accelerator

WEIGHT_BITS = {"fp32": 32, "bf16": 16, "fp16": 16, "fp8": 8, "int8": 8, "int4": 4}
KV_BITS = {"fp32": 32, "bf16": 16, "fp16": 16, "fp8": 8, "int8": 8}
MEMORY_UTILIZATION = 0.9
"""Share of device memory the server may use (vLLM's default gpu_memory_utilization)."""
WORKSPACE_TOKENS = 2048
"""Tokens of one prefill chunk: sizes the activation workspace beside weights and cache."""


@dataclass
class ServePlan:
    """What serving one model on `devices` devices of one kind needs and allows."""

    dtype: str
    kv_dtype: str
    context: int
    devices: int
    weights_bytes: dict[str, float]
    """Weights in every dtype (all devices together)."""
    kv_bytes_per_token: float
    kv_bytes_per_sequence: float
    workspace_bytes: float
    kv_budget_bytes: float
    """Memory left for the KV cache, all devices together."""
    max_sequences: int
    """Sequences of `context` tokens that fit at once."""
    decode_tokens_per_s_single: float
    """One sequence at full context: tokens per second, bandwidth ceiling."""
    decode_tokens_per_s_batch: float
    """All `max_sequences` decoding together: tokens per second over all of them."""
    batch_bound: str
    prefill_seconds: float
    """Time to prefill one prompt of `context` tokens."""

    @property
    def weights(self) -> float:
        return self.weights_bytes[self.dtype]


def weight_bytes(model: ModelConfig, dtype: str, group_size: int = 128) -> float:
    """Bytes of the weights with block matrices in `dtype` (see the module docstring)."""
    if dtype not in WEIGHT_BITS:
        raise LmscaleError(f"--dtype must be one of {', '.join(WEIGHT_BITS)}, got '{dtype}'")
    matrices = model.n_layers * layer_matmul_params(model)
    rest = model.num_params() - matrices  # embeddings, output, norms, biases
    bits = WEIGHT_BITS[dtype]
    scales = 0.0
    if dtype == "int4":
        scales = matrices / group_size * 2
    elif dtype == "int8":
        scales = model.n_layers * _output_channels(model) * 2
    rest_bytes = rest * (4 if dtype == "fp32" else 2)
    return matrices * bits / 8 + scales + rest_bytes


def _output_channels(model: ModelConfig) -> int:
    kv = model.n_kv_heads * model.head_dim
    mlp = (1 if model.family == "gpt2" else 2) * model.hidden_dim
    return model.q_dim + 2 * kv + model.dim + mlp + model.dim


def kv_bytes_per_token(model: ModelConfig, kv_dtype: str) -> float:
    if kv_dtype not in KV_BITS:
        raise LmscaleError(f"--kv-dtype must be one of {', '.join(KV_BITS)}, got '{kv_dtype}'")
    return 2 * model.n_layers * model.n_kv_heads * model.head_dim * KV_BITS[kv_dtype] / 8


def serve_plan(
    model: ModelConfig, device: Accelerator, context: int, dtype: str = "bf16",
    kv_dtype: str = "bf16", devices: int = 1, mfu: float | None = None,
) -> ServePlan:  # fmt: skip
    """Memory, concurrency and speed of serving `model` at `context` tokens per sequence."""
    if context < 1:
        raise LmscaleError(f"--context must be positive, got {context}")
    if devices < 1:
        raise LmscaleError(f"--gpus must be positive, got {devices}")
    if devices > 1 and model.n_heads % devices:
        raise LmscaleError(
            f"serving on {devices} devices splits the {model.n_heads} attention heads over them: "
            "use a --gpus that divides the heads"
        )
    chosen = weight_bytes(model, dtype)  # checks the dtype before anything else
    weights = {name: weight_bytes(model, name) for name in WEIGHT_BITS} | {dtype: chosen}
    per_token = kv_bytes_per_token(model, kv_dtype)
    per_sequence = per_token * context
    workspace = devices * device.reserve_gib * 2**30 + _workspace(model)
    budget = devices * device.memory_bytes * MEMORY_UTILIZATION - weights[dtype] - workspace
    if budget < per_sequence:
        raise LmscaleError(
            f"{model.num_params() / 1e9:.3g}B parameters in {dtype} ({weights[dtype] / 2**30:.1f} "
            f"GiB) leave {max(budget, 0) / 2**30:.1f} GiB on {devices} x {device.name}, less than "
            f"one sequence of {context} tokens needs ({per_sequence / 2**30:.2f} GiB): use a "
            "smaller --dtype, a shorter --context or more --gpus"
        )
    max_sequences = int(budget // per_sequence)
    bandwidth = devices * device.bandwidth_gbs * 1e9
    single = bandwidth / (weights[dtype] + per_sequence)
    memory_step = (weights[dtype] + max_sequences * per_sequence) / bandwidth
    fwd = forward_flops(model, context)
    compute_step = max_sequences * (fwd.layers + fwd.head) / (devices * device.peak_flops("bf16"))
    step = max(memory_step, compute_step)
    bound = "memory bandwidth" if memory_step >= compute_step else "compute"
    prefill = context * forward_flops(model, context).total / 2  # causal: half the scores
    efficiency = mfu if mfu is not None else device.mfu
    prefill_s = prefill / (devices * device.peak_flops("bf16") * efficiency)
    return ServePlan(
        dtype, kv_dtype, context, devices, weights, per_token, per_sequence, workspace, budget,
        max_sequences, single, max_sequences / step, bound, prefill_s,
    )  # fmt: skip


def _workspace(model: ModelConfig) -> float:
    """Activations of one prefill chunk in 16-bit: a block's widest tensors and the logits."""
    widest = 4 * model.dim + 3 * model.hidden_dim
    return WORKSPACE_TOKENS * (widest * 2 + model.vocab_size * 4)
