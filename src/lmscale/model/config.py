"""`ModelConfig`: the shape of a decoder, and the named presets.

One config expresses both families. GPT-2: learned positions, LayerNorm, GELU MLP, biases, tied
embeddings. Llama: RoPE, RMSNorm, SwiGLU, grouped-query attention, tied or untied embeddings.
The `family` field picks the defaults; the individual switches stay overridable.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from lmscale.errors import LmscaleError

Family = Literal["gpt2", "llama"]


@dataclass
class ModelConfig:
    """The shape of a decoder-only Transformer."""

    family: Family = "llama"
    """gpt2: learned positions, LayerNorm, GELU, biases. llama: RoPE, RMSNorm, SwiGLU."""
    vocab_size: int = 4096
    """Number of token ids; training from scratch takes it from the data's tokenizer."""
    dim: int = 384
    """Width of the residual stream."""
    n_layers: int = 6
    """Number of Transformer blocks."""
    n_heads: int = 6
    """Number of query heads."""
    n_kv_heads: int | None = None
    """Number of key/value heads (grouped-query attention); None means n_heads."""
    head_dim: int | None = None
    """Width of one attention head; None means dim // n_heads (a head-pruned model sets it)."""
    hidden_dim: int | None = None
    """Width of the MLP; None means 4*dim (gpt2) or 8/3*dim rounded up to 64 (llama)."""
    max_seq_len: int = 256
    """Longest sequence the model accepts (and the size of the learned position table)."""
    rope_theta: float = 10000.0
    """RoPE base frequency (llama family)."""
    norm_eps: float = 1e-5
    """Epsilon of LayerNorm / RMSNorm."""
    tie_embeddings: bool = True
    """Share the token embedding with the output projection."""
    bias: bool | None = None
    """Biases on every linear layer and norm; None means True for gpt2, False for llama."""
    qkv_bias: bool = False
    """Biases on the query, key and value projections only (as Qwen2 has them)."""
    dropout: float = 0.0
    """Dropout on attention weights and residual branches while training."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation."""

    def __post_init__(self) -> None:
        if self.family not in ("gpt2", "llama"):
            raise LmscaleError(f"model.family must be gpt2 or llama, got '{self.family}'")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.bias is None:
            self.bias = self.family == "gpt2"
        if self.hidden_dim is None:
            self.hidden_dim = 4 * self.dim if self.family == "gpt2" else _swiglu_width(self.dim)
        for name in (
            "vocab_size",
            "dim",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "hidden_dim",
            "max_seq_len",
        ):
            if getattr(self, name) <= 0:
                raise LmscaleError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise LmscaleError(
                    f"model.dim ({self.dim}) must be divisible by model.n_heads ({self.n_heads})"
                )
            self.head_dim = self.dim // self.n_heads
        if self.head_dim <= 0:
            raise LmscaleError(f"model.head_dim must be positive, got {self.head_dim}")
        if self.n_heads % self.n_kv_heads:
            raise LmscaleError(
                f"model.n_heads ({self.n_heads}) must be divisible by model.n_kv_heads ({self.n_kv_heads})"
            )
        if self.family == "llama" and self.head_dim % 2:
            raise LmscaleError(f"RoPE needs an even head dimension, got {self.head_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise LmscaleError(f"model.dropout must be in [0, 1), got {self.dropout}")

    @property
    def q_dim(self) -> int:
        """Width of all query heads together: dim, unless `head_dim` was set apart from it."""
        return self.n_heads * self.head_dim

    def num_params(self, embeddings: bool = True) -> int:
        """Parameter count computed from the shape (no model needed)."""
        d, h, kv, q = self.dim, self.hidden_dim, self.n_kv_heads * self.head_dim, self.q_dim
        attn = d * (q + 2 * kv) + q * d
        mlp = (2 if self.family == "gpt2" else 3) * d * h
        norms = 2 * d * (2 if self.bias else 1)
        biases = (q + 2 * kv + d + h + d) if self.bias else 0
        if self.qkv_bias and not self.bias:
            biases = q + 2 * kv
        total = self.n_layers * (attn + mlp + norms + biases) + d * (2 if self.bias else 1)
        if embeddings:
            total += self.vocab_size * d * (1 if self.tie_embeddings else 2)
            if self.family == "gpt2":
                total += self.max_seq_len * d
        return total

    def replace(self, **changes) -> ModelConfig:
        """A copy with `changes`; a head width derived from dim // n_heads is derived anew."""
        if "head_dim" not in changes and self.head_dim == self.dim // self.n_heads:
            changes["head_dim"] = None
        return dataclasses.replace(self, **changes)


def _swiglu_width(dim: int, multiple: int = 64) -> int:
    """8/3 of dim (the SwiGLU width with the parameter count of a 4x GELU MLP), rounded up."""
    width = int(8 * dim / 3)
    return multiple * ((width + multiple - 1) // multiple)


# Presets are data: the shapes people ask for by name.
PRESETS: dict[str, dict] = {
    # Seconds-fast shapes for tests.
    "tiny": dict(family="llama", vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                 hidden_dim=128, max_seq_len=128),
    "tiny-gpt2": dict(family="gpt2", vocab_size=512, dim=64, n_layers=2, n_heads=4,
                      hidden_dim=256, max_seq_len=128),
    # The default model of `make run`: about 10M parameters (9.4M without the embedding).
    "shakespeare-10m": dict(family="llama", vocab_size=4096, dim=384, n_layers=6, n_heads=6,
                            n_kv_heads=2, hidden_dim=1024, max_seq_len=256),
    # GPT-2 small.
    "gpt2-124m": dict(family="gpt2", vocab_size=50257, dim=768, n_layers=12, n_heads=12,
                      hidden_dim=3072, max_seq_len=1024),
    # The SmolLM2-135M shape.
    "llama-135m": dict(family="llama", vocab_size=49152, dim=576, n_layers=30, n_heads=9,
                       n_kv_heads=3, hidden_dim=1536, max_seq_len=8192, rope_theta=100000.0),
}  # fmt: skip


def preset(name: str, **overrides) -> ModelConfig:
    """The named preset, with any field replaced by `overrides`."""
    if name not in PRESETS:
        raise LmscaleError(f"unknown model preset '{name}' (known: {', '.join(PRESETS)})")
    return ModelConfig(**(PRESETS[name] | overrides))
