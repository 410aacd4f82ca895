"""A contiguous KV cache for incremental decoding of a batch of sequences of equal length.

Keys and values of every layer are preallocated as (B, n_kv_heads, max_len, head_dim); a forward
pass writes its new positions after the `length` already cached and attends over everything
cached so far. (The serving engine's paged pool is a different structure with the same role.)
"""

from __future__ import annotations

import torch
from torch import Tensor


class LayerCache:
    """One layer's view of a `KVCache`."""

    def __init__(self, owner: KVCache, index: int):
        self.owner, self.index = owner, index

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Store the new (B, nkv, T, hs) keys and values after the cached ones.

        Returns:
            All keys and values so far, (B, nkv, S, hs) with S = cached + T, and the boolean
            attention mask (T, S) that lets new query i see cached positions and new ones up to i
            (None when T == 1: a single new token may see everything; None too when nothing was
            cached: the mask is then plain causal, which attention kernels handle faster).
        """
        start, T = self.owner.length, k.shape[2]
        end = start + T
        if end > self.owner.max_len:
            raise ValueError(f"KV cache holds {self.owner.max_len} positions, asked for {end}")
        self.owner.k[self.index][:, :, start:end] = k
        self.owner.v[self.index][:, :, start:end] = v
        keys, values = self.owner.k[self.index][:, :, :end], self.owner.v[self.index][:, :, :end]
        if T == 1 or start == 0:
            return keys, values, None
        query_pos = torch.arange(start, end, device=k.device)[:, None]  # (T, 1)
        key_pos = torch.arange(end, device=k.device)[None, :]  # (1, S)
        return keys, values, key_pos <= query_pos


class KVCache:
    """Keys and values of every layer for a batch of sequences that advance together."""

    def __init__(
        self, n_layers: int, batch_size: int, n_kv_heads: int, head_dim: int, max_len: int,
        dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
    ):  # fmt: skip
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0

    def layer(self, index: int) -> LayerCache:
        return LayerCache(self, index)

    def advance(self, n: int) -> None:
        """Mark `n` more positions as cached (called once per forward pass, after every layer)."""
        self.length += n

    def reset(self) -> None:
        self.length = 0
