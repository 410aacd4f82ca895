"""Floating-point operations of a decoder: per token, forward and training, with the attention term.

Counted the way Megatron-LM (Narayanan et al. 2021, eq. 3) and PaLM (Chowdhery et al. 2022,
appendix B) count them: 2 FLOPs per multiply-add of every matrix product, the attention scores
and their weighted sum over the whole sequence (no halving for the causal mask), the output
projection to the vocabulary, and nothing for norms, activations or the softmax. The backward
pass costs twice the forward. Recomputation adds forward work the hardware does but the model
does not need: the *model* FLOPs (what MFU is measured on) exclude it, the *hardware* FLOPs
include it.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmscale.errors import LmscaleError
from lmscale.model.config import ModelConfig

RECOMPUTE = ("none", "selective", "full")
"""Activation recomputation: none; selective (the attention scores, Korthikanti et al. 2022);
full (every block from its input)."""


@dataclass(frozen=True)
class ForwardFlops:
    """Forward FLOPs of one token at a given sequence length, by part."""

    layers: float
    """Matrix products inside the blocks (attention projections and MLP)."""
    attention: float
    """Attention scores (Q K^T) and their weighted sum (A V)."""
    head: float
    """The output projection onto the vocabulary."""

    @property
    def total(self) -> float:
        return self.layers + self.attention + self.head


def layer_matmul_params(model: ModelConfig) -> int:
    """Weights of one block that take part in matrix products (no norms, no biases)."""
    d, kv = model.dim, model.n_kv_heads * model.head_dim
    attention = d * (model.q_dim + 2 * kv) + model.q_dim * d
    mlp = (2 if model.family == "gpt2" else 3) * d * model.hidden_dim
    return attention + mlp


def forward_flops(model: ModelConfig, seq_len: int) -> ForwardFlops:
    """FLOPs of the forward pass per token, each token attending over `seq_len` positions."""
    layers = 2 * model.n_layers * layer_matmul_params(model)
    attention = 2 * 2 * model.n_layers * seq_len * model.q_dim
    head = 2 * model.vocab_size * model.dim
    return ForwardFlops(layers, attention, head)


def training_flops_per_token(
    model: ModelConfig, seq_len: int, recompute: str = "none"
) -> tuple[float, float]:
    """(model FLOPs, hardware FLOPs) of one training token: forward + backward (+ recomputation)."""
    if recompute not in RECOMPUTE:
        raise LmscaleError(f"--recompute must be one of {', '.join(RECOMPUTE)}, got '{recompute}'")
    fwd = forward_flops(model, seq_len)
    model_flops = 3 * fwd.total
    extra = {"none": 0.0, "selective": fwd.attention, "full": fwd.layers + fwd.attention}
    return model_flops, model_flops + extra[recompute]


def training_flops(model: ModelConfig, seq_len: int, tokens: float) -> float:
    """Model FLOPs of training on `tokens` tokens (about 6 N D, plus the attention term)."""
    return training_flops_per_token(model, seq_len)[0] * tokens


def chinchilla_optimal(flops: float, tokens_per_param: float = 20.0) -> tuple[float, float]:
    """(parameters, tokens) that spend `flops` compute-optimally, with C = 6 N D and D = 20 N.

    Hoffmann et al. 2022 ("Training Compute-Optimal Large Language Models"), Approach 1: N and D
    grow as C^0.5 each, about 20 tokens per parameter (their Table 3).
    """
    params = (flops / (6 * tokens_per_param)) ** 0.5
    return params, tokens_per_param * params
