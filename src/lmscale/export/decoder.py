"""A functional-cache wrapper around `Transformer`: past keys/values in, present ones out.

An exported graph cannot hold state, so the wrapper hands the model a cache object (the model's
documented `layer(i).update(k, v)` / `advance(n)` interface) that concatenates each layer's past
with the new keys and values and remembers the results as outputs. Positions follow from the past
length (`past + 0..T-1`, the same for every row), so the graph has no data-dependent shapes and
one graph serves both prefill (past length 0) and decode (T = 1).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lmscale.model import Transformer


def input_names(n_layers: int) -> list[str]:
    past = [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", *past]


def output_names(n_layers: int) -> list[str]:
    return ["logits", *(f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value"))]


class _PastLayer:
    def __init__(self, owner: _PastCache, index: int):
        self.owner, self.index = owner, index

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        past_k, past_v = self.owner.past[self.index]
        keys, values = torch.cat((past_k, k), dim=2), torch.cat((past_v, v), dim=2)
        self.owner.present.append((keys, values))
        return keys, values, self.owner.mask


class _PastCache:
    """The model's cache interface over explicit tensors; `length` is the past's (symbolic) size."""

    def __init__(self, past: list[tuple[Tensor, Tensor]], mask: Tensor):
        self.past, self.mask, self.present = past, mask, []
        self.length = past[0][0].shape[2]

    def layer(self, index: int) -> _PastLayer:
        return _PastLayer(self, index)

    def advance(self, n: int) -> None:
        pass  # the caller sees the new length in the present tensors' shapes


class PastKeyValuesDecoder(nn.Module):
    """(input_ids, attention_mask, *past) -> (logits, *present), Optimum's decoder signature.

    input_ids (B, T) int64; attention_mask (B, P + T) int64, 0 hides a key (left padding);
    past_key_values.N.key / .value (B, n_kv_heads, P, head_dim); logits (B, T, vocab);
    present.N.key / .value (B, n_kv_heads, P + T, head_dim).
    """

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor, *past: Tensor) -> tuple:
        T, S = input_ids.shape[1], attention_mask.shape[1]
        query_pos = torch.arange(S - T, S, device=input_ids.device)[:, None]  # (T, 1)
        key_pos = torch.arange(S, device=input_ids.device)[None, :]  # (1, S)
        causal = (key_pos <= query_pos)[None, None]  # (1, 1, T, S)
        mask = causal & attention_mask.bool()[:, None, None, :]  # (B, 1, T, S)
        cache = _PastCache([(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)], mask)
        logits = self.model(input_ids, cache)
        return (logits, *(t for pair in cache.present for t in pair))
