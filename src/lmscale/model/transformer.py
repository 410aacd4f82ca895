"""The decoder-only Transformer, both families in one plain single-device `nn.Module`.

Module names follow the torchtitan spelling (`tok_embeddings`, `layers.N.attention.wq`,
`layers.N.feed_forward.w1`, `norm`, `output`) so parallel plans and checkpoint maps can address
them by fully-qualified name. Nothing here knows about files, processes or the command line.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmscale.model.config import ModelConfig
from lmscale.model.kv_cache import KVCache, LayerCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # NOTE: normalise in fp32 like the reference implementations, then cast back.
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).type_as(x)


def make_norm(config: ModelConfig) -> nn.Module:
    if config.family == "gpt2":
        return nn.LayerNorm(config.dim, eps=config.norm_eps, bias=config.bias)
    return RMSNorm(config.dim, config.norm_eps)


def rope_tables(config: ModelConfig) -> tuple[Tensor, Tensor]:
    """cos and sin of every position and frequency, each (max_seq_len, head_dim/2), fp32."""
    half = config.head_dim // 2
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(half, dtype=torch.float64) / half)
    angles = torch.outer(torch.arange(config.max_seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def rope_factors(cos: Tensor, sin: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Full-width factors for `apply_rope`, built once per forward pass.

    cos_full = [cos, cos] and sin_signed = [-sin, sin], so that rotating is two multiplies and an add.
    Tables of (T, hs/2) give factors (T, 1, hs) shared by the batch; per-row tables (B, T, hs/2)
    give (B, T, 1, hs). Either broadcasts against (B, T, H, hs).
    """
    cos_full = torch.cat((cos, cos), dim=-1)[..., None, :].to(dtype)
    sin_signed = torch.cat((-sin, sin), dim=-1)[..., None, :].to(dtype)
    return cos_full, sin_signed


def apply_rope(x: Tensor, cos_full: Tensor, sin_signed: Tensor) -> Tensor:
    """Rotate (B, T, H, hs) by the angles of its positions; the factors come from `rope_factors`.

    The "half-split" convention: dimension i pairs with i + hs/2 (as in Hugging Face Llama):
        out = [x1 * cos - x2 * sin, x2 * cos + x1 * sin] = x * [cos, cos] + [x2, x1] * [-sin, sin]
    """
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos_full + torch.cat((x2, x1), dim=-1) * sin_signed


def decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """Attention of one new query per sequence over every cached key, as two small matmuls.

    For a single query, SDPA's CPU kernels cost several times more than this (~10x in bf16).
    The query heads of a group become the rows of one matmul, so each kv head is read once:

        q (B, nkv, n_rep, hs) @ k^T (B, nkv, hs, S) -> scores (B, nkv, n_rep, S) -> @ v

    Scores and softmax are computed in fp32, as SDPA's math does.

    Args:
        q: (B, nh, 1, hs) queries.
        k: (B, nkv, S, hs) keys; v likewise.
        mask: optional boolean (B, 1, 1, S), True where a key may be seen: sequences of different
            lengths padded to one S (a paged cache's batch) hide their padding with it.

    Returns:
        (B, nh, 1, hs) attention outputs.
    """
    B, n_heads, _, head_dim = q.shape
    q = q.reshape(B, k.shape[1], -1, head_dim)  # (B, nkv, n_rep, hs)
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * head_dim**-0.5  # (B, nkv, n_rep, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    y = torch.matmul(scores.softmax(dim=-1).to(v.dtype), v)  # (B, nkv, n_rep, hs)
    return y.view(B, n_heads, 1, head_dim)


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads.

    Grouped-query attention: n_heads query heads share n_kv_heads key/value heads.

        q heads:  q0 q1 q2 | q3 q4 q5      (n_heads = 6)
                   \\ | /      \\ | /
        kv heads:    kv0   |    kv1       (n_kv_heads = 2, each serves 3 query heads)
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.head_dim = config.head_dim
        self.n_rep = config.n_heads // config.n_kv_heads
        kv_dim = config.n_kv_heads * config.head_dim
        self.wq = nn.Linear(config.dim, config.q_dim, bias=config.bias or config.qkv_bias)
        self.wk = nn.Linear(config.dim, kv_dim, bias=config.bias or config.qkv_bias)
        self.wv = nn.Linear(config.dim, kv_dim, bias=config.bias or config.qkv_bias)
        self.wo = nn.Linear(config.q_dim, config.dim, bias=config.bias)
        self.dropout = config.dropout

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor] | None, cache: LayerCache | None
    ) -> Tensor:
        B, T, _ = x.shape
        # NOTE: -1 heads, not n_heads, so tensor parallel can shard heads without touching this code.
        q = self.wq(x).view(B, T, -1, self.head_dim)  # (B, T, nh, hs)
        k = self.wk(x).view(B, T, -1, self.head_dim)  # (B, T, nkv, hs)
        v = self.wv(x).view(B, T, -1, self.head_dim)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, hs)
        mask, is_causal = None, T > 1
        if cache is not None:
            k, v, mask = cache.update(k, v)  # k, v: (B, nkv, S, hs) with S = cached + T
            is_causal = T > 1 and mask is None  # a first chunk is causal within itself
            if T == 1:
                y = decode_attention(q, k, v, mask)  # (B, nh, 1, hs)
                return self.wo(y.transpose(1, 2).reshape(B, T, -1))
        # NOTE: enable_gqa lets SDPA read each kv head for its query group without copying it
        # n_rep times (repeat_interleave), which also saves the backward's reduction of the copies.
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=self.n_rep > 1,
        )  # fmt: skip
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, nh * hs)
        return self.wo(y)


class GeluMLP(nn.Module):
    """GPT-2's MLP: up-projection, tanh-approximated GELU, down-projection."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.hidden_dim, bias=config.bias)
        self.w2 = nn.Linear(config.hidden_dim, config.dim, bias=config.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.gelu(self.w1(x), approximate="tanh"))


class SwiGLU(nn.Module):
    """Llama's MLP: w2(silu(w1 x) * w3 x)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.hidden_dim, bias=config.bias)  # gate
        self.w2 = nn.Linear(config.hidden_dim, config.dim, bias=config.bias)  # down
        self.w3 = nn.Linear(config.dim, config.hidden_dim, bias=config.bias)  # up

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attention_norm = make_norm(config)
        self.attention = Attention(config)
        self.ffn_norm = make_norm(config)
        self.feed_forward = GeluMLP(config) if config.family == "gpt2" else SwiGLU(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None, cache: LayerCache | None = None
    ) -> Tensor:
        x = x + self.dropout(self.attention(self.attention_norm(x), rope, cache))
        return x + self.dropout(self.feed_forward(self.ffn_norm(x)))


def initial_value(config: ModelConfig, name: str, shape: torch.Size, seed: int) -> Tensor:
    """The initial fp32 value (on the CPU) of the parameter called `name`, for `seed`.

    Linears and embeddings are N(0, init_std), the residual projections (wo, w2) scaled by
    1/sqrt(2 * n_layers) (GPT-2); norm gains are 1, biases 0. The generator is seeded by `seed`
    and a hash of `name`: the same name gets the same values whichever process draws them.
    """
    if name == "output.weight" and config.tie_embeddings:  # a pipeline's last stage holds a copy
        name = "tok_embeddings.weight"
    if name.endswith("bias"):
        return torch.zeros(shape)
    if "norm" in name.rsplit(".", 2)[-2]:  # attention_norm, ffn_norm, norm
        return torch.ones(shape)
    std = config.init_std
    if name.endswith(("wo.weight", "w2.weight")):
        std /= math.sqrt(2 * config.n_layers)
    generator = torch.Generator().manual_seed(
        (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63
    )
    return torch.empty(shape).normal_(0.0, std, generator=generator)


class Transformer(nn.Module):
    """A decoder-only language model: token ids (B, T) in, next-token logits (B, T, vocab) out."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        if config.family == "gpt2":
            self.pos_embeddings = nn.Embedding(config.max_seq_len, config.dim)
        else:
            shape = (config.max_seq_len, config.head_dim // 2)  # filled by `init_rope`
            self.register_buffer("rope_cos", torch.empty(shape), persistent=False)
            self.register_buffer("rope_sin", torch.empty(shape), persistent=False)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = make_norm(config)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.init_weights()

    def init_weights(self, seed: int | None = None) -> None:
        """GPT-2 initialisation: N(0, std), residual projections scaled by 1/sqrt(2 * n_layers).

        Each parameter is drawn from its own generator, seeded by `seed` and its name
        (`initial_value`), so a part of the model built alone (a shard, a pipeline stage)
        receives exactly the values the whole model would.

        Args:
            seed: None draws one from torch's global generator (so `torch.manual_seed` decides).
        """
        self.init_rope()
        if self.tok_embeddings.weight.is_meta:  # built only to receive loaded or sharded weights
            return
        if seed is None:
            seed = int(torch.randint(2**62, ()))
        with torch.no_grad():
            for name, param in self.named_parameters():  # a tied weight once, as tok_embeddings
                param.copy_(initial_value(self.config, name, param.shape, seed))

    def init_rope(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the RoPE tables: non-persistent buffers, so no state dict carries them.

        Args:
            device: where to put them; None keeps their device (on meta they stay empty).
        """
        if self.config.family != "gpt2" and (device is not None or not self.rope_cos.is_meta):
            device = device or self.rope_cos.device
            self.rope_cos, self.rope_sin = (t.to(device) for t in rope_tables(self.config))

    def forward(
        self, tokens: Tensor, cache: KVCache | None = None, positions: Tensor | None = None,
        head: Callable[[Tensor, nn.Linear], Tensor] | None = None,
    ) -> Tensor:  # fmt: skip
        """Logits for every position (or what `head` makes of the final hidden states).

        Args:
            tokens: (B, T) token ids. With a `cache`, they continue the cached sequence.
            cache: a KV cache to read and extend (incremental decoding); None for a plain pass.
                Any object with the same `layer(i).update(k, v)` and `advance(n)` methods will do.
            positions: (B, T) position of each token, for a batch whose rows are at different
                lengths (its cache then masks each row to its own keys); None means every row
                starts at the cache's `length` (or 0).

            head: replaces the output projection: `head(hidden (B, T, dim), self.output)`. A
                training loss that fuses the projection into itself passes one, so that it runs
                inside `forward`, where wrappers (DDP, FSDP, tensor parallel) hook in.

        Returns:
            (B, T, vocab_size) logits, or `head`'s result.
        """
        hidden = self.hidden_states(tokens, cache, positions)
        return self.output(hidden) if head is None else head(hidden, self.output)

    def hidden_states(
        self, tokens: Tensor, cache: KVCache | None = None, positions: Tensor | None = None
    ) -> Tensor:
        """The final normalised hidden states (B, T, dim), before the output projection."""
        B, T = tokens.shape
        if positions is None:
            start = cache.length if cache is not None else 0
            positions = torch.arange(start, start + T, device=tokens.device)  # (T,)
            end = start + T
        elif torch.compiler.is_compiling():
            end = 0  # NOTE: the caller of a compiled step checks its positions (no graph break)
        else:
            end = int(positions.max()) + 1  # positions: (B, T)
        if end > self.config.max_seq_len:
            raise ValueError(
                f"sequence of {end} tokens exceeds max_seq_len {self.config.max_seq_len}"
            )
        h = self.tok_embeddings(tokens)  # (B, T, dim)
        rope = None
        if self.config.family == "gpt2":
            h = h + self.pos_embeddings(positions)  # (T, dim) or (B, T, dim)
        else:
            dtype = (
                torch.get_autocast_dtype(h.device.type)
                if torch.is_autocast_enabled(h.device.type)
                else h.dtype
            )
            rope = rope_factors(self.rope_cos[positions], self.rope_sin[positions], dtype)
        h = self.dropout(h)
        for i, layer in enumerate(self.layers):
            h = layer(h, rope, cache.layer(i) if cache is not None else None)
        if cache is not None:
            cache.advance(T)
        return self.norm(h)

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty KV cache on this model's device and dtype."""
        param = self.tok_embeddings.weight
        return KVCache(
            self.config.n_layers, batch_size, self.config.n_kv_heads, self.config.head_dim,
            max_len or self.config.max_seq_len, dtype=param.dtype, device=param.device,
        )  # fmt: skip
