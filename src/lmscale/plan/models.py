"""Model shapes by name, or built from a parameter count and whatever of the shape is known.

A shape is lmscale's own `ModelConfig` (its parameter count is the one the trainer builds), so a
plan for a preset describes exactly the model `lmscale train` would train.
"""

from __future__ import annotations

import math

from lmscale.errors import LmscaleError
from lmscale.model.config import PRESETS, ModelConfig


def _llama(vocab, dim, layers, heads, kv, ffn, seq, tied=False, head_dim=None, theta=10000.0):
    return dict(family="llama", vocab_size=vocab, dim=dim, n_layers=layers, n_heads=heads,
                n_kv_heads=kv, hidden_dim=ffn, max_seq_len=seq, tie_embeddings=tied,
                head_dim=head_dim, rope_theta=theta)  # fmt: skip


def _gpt2(dim, layers, heads, seq=1024, vocab=50257):
    return dict(family="gpt2", vocab_size=vocab, dim=dim, n_layers=layers, n_heads=heads,
                max_seq_len=seq)  # fmt: skip


# Published shapes (the papers' and model cards' configurations). Data, not code.
NAMED: dict[str, dict] = {
    "gpt2": _gpt2(768, 12, 12),
    "gpt2-medium": _gpt2(1024, 24, 16),
    "gpt2-large": _gpt2(1280, 36, 20),
    "gpt2-xl": _gpt2(1600, 48, 25),
    "gpt3-175b": _gpt2(12288, 96, 96, seq=2048),
    "llama2-7b": _llama(32000, 4096, 32, 32, 32, 11008, 4096),
    "llama2-13b": _llama(32000, 5120, 40, 40, 40, 13824, 4096),
    "llama2-70b": _llama(32000, 8192, 80, 64, 8, 28672, 4096),
    "llama3-8b": _llama(128256, 4096, 32, 32, 8, 14336, 8192, theta=500000.0),
    "llama3-70b": _llama(128256, 8192, 80, 64, 8, 28672, 8192, theta=500000.0),
    "smollm2-135m": _llama(49152, 576, 30, 9, 3, 1536, 8192, tied=True, theta=100000.0),
    "smollm2-360m": _llama(49152, 960, 32, 15, 5, 2560, 8192, tied=True, theta=100000.0),
    "smollm2-1.7b": _llama(49152, 2048, 24, 32, 32, 8192, 8192, tied=True, theta=130000.0),
    # PaLM 540B: multi-query attention, 256-wide heads, SwiGLU at 4x, shared embeddings.
    "palm-540b": _llama(256000, 18432, 118, 48, 1, 73728, 2048, tied=True, head_dim=256),
}  # fmt: skip
ALIASES = {"llama-7b": "llama2-7b", "llama-13b": "llama2-13b", "llama-70b": "llama2-70b",
           "gpt2-124m-hf": "gpt2", "gpt3": "gpt3-175b"}  # fmt: skip


def known_models() -> list[str]:
    """Every name `named_model` accepts, the lmscale presets last."""
    return [*NAMED, *ALIASES, *PRESETS]


def named_model(name: str) -> ModelConfig:
    """A published shape or an lmscale preset, by name."""
    key = ALIASES.get(name.lower(), name.lower())
    if key in NAMED:
        return ModelConfig(**NAMED[key])
    if name in PRESETS:
        return ModelConfig(**PRESETS[name])
    raise LmscaleError(f"unknown --model '{name}' (known: {', '.join(known_models())})")


def model_from_params(
    params: float,
    *,
    family: str = "llama",
    n_layers: int | None = None,
    dim: int | None = None,
    n_heads: int | None = None,
    n_kv_heads: int | None = None,
    hidden_dim: int | None = None,
    vocab_size: int = 32000,
    max_seq_len: int = 4096,
    tie_embeddings: bool = False,
) -> ModelConfig:
    """A shape with about `params` parameters: what is given is kept, the rest is derived.

    With no width, the width follows the ratio of published models (dim close to 2 * N^(1/3), a
    multiple of 128; 128-wide heads); with no depth, the depth that meets `params`; with depth and
    width but no MLP width, the MLP width that meets `params` (a multiple of 256).
    """
    if dim is None:
        dim = max(128, 128 * round(2 * params ** (1 / 3) / 128))
    if n_heads is None:
        n_heads = max(1, dim // 128)
    if dim % n_heads:
        raise LmscaleError(
            f"--hidden {dim} must be divisible by --heads {n_heads} (pick heads that divide it)"
        )
    shape = dict(family=family, vocab_size=vocab_size, dim=dim, n_heads=n_heads,
                 n_kv_heads=n_kv_heads, max_seq_len=max_seq_len, tie_embeddings=tie_embeddings)  # fmt: skip
    if n_layers is None:
        per_layer = ModelConfig(**shape, n_layers=1, hidden_dim=hidden_dim)
        embed = per_layer.num_params() - per_layer.num_params(embeddings=False)
        layer = per_layer.num_params(embeddings=False)
        n_layers = max(1, round((params - embed) / layer))
    elif hidden_dim is None:
        hidden_dim = _mlp_width_for(params, shape | {"n_layers": n_layers})
    return ModelConfig(**shape, n_layers=n_layers, hidden_dim=hidden_dim)


def _mlp_width_for(params: float, shape: dict) -> int:
    """The MLP width (a multiple of 256) that brings the model closest to `params`."""
    one = ModelConfig(**shape, hidden_dim=256).num_params()
    two = ModelConfig(**shape, hidden_dim=512).num_params()
    per_256 = two - one  # parameters are linear in the MLP width
    steps = (params - one) / per_256
    if steps < 0:
        raise LmscaleError(
            f"--params {params:.3g} is smaller than the attention and embeddings of this shape "
            f"alone ({one:.3g}): use fewer --layers or a smaller --hidden"
        )
    return 256 * (1 + max(0, math.floor(steps + 0.5)))
