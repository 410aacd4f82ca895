"""Structured pruning: remove whole attention head groups and MLP channels, in place.

Every block loses the same number of units, so the result is a normal, smaller dense model: a
`ModelConfig` with fewer heads and a narrower MLP. The head width stays, so the config then sets
`head_dim` explicitly (n_heads * head_dim < dim). Which units go is chosen per layer.

The units. Attention: a KV group, one kv head with the n_rep query heads that read it (removing
whole groups keeps the grouped-query ratio n_heads / n_kv_heads, and the query-to-kv mapping):

    wq rows, wo columns   [q0 q1 q2 | q3 q4 q5 | q6 q7 q8]   n_rep * head_dim per group
    wk, wv rows           [   k0    |    k1    |    k2   ]   head_dim per group
                               keep      drop       keep

MLP: channel j is row j of w1 (and of w3, SwiGLU) and column j of w2.

Importance: the mean L2 norm of what the unit adds to the residual stream, over the tokens of a
few calibration sequences. It is the unit's slice of the output projection times its slice of
that projection's input, read by hooks on wo and w2:

    head group g:   || wo[:, cols_g] @ y_g ||    y: the attention output entering wo
    MLP channel j:  |a_j| * || w2[:, j] ||       a: the activation entering w2

Without calibration tokens, the input's size is stood in for by the weights that produce it:
||wv rows_g|| for a head group (the values are what the group writes out), ||w1 row j|| (times
||w3 row j|| for SwiGLU) for a channel. That ignores the norms before each sublayer and what the
tokens are, and measures worse (tests/compress/test_smollm2.py prints both).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn

from lmscale.model import Transformer


@torch.no_grad()
def prune_structured_(
    model: Transformer, sparsity: float, calibration: Tensor | None = None, batch_size: int = 4
) -> dict:
    """Remove the fraction `sparsity` of head groups and of MLP channels from every block.

    Counts are rounded to whole units; at least one of each stays. Sparsity 0 removes nothing.

    Args:
        model: a float `Transformer`; its modules and `config` are replaced in place.
        sparsity: in [0, 1).
        calibration: (B, T) token ids for activation-based importance; None: weight norms.
        batch_size: calibration sequences per forward pass.

    Returns:
        {"importance", "before", "after": {n_heads, n_kv_heads, hidden_dim}, "achieved"}, where
        "achieved" is the fraction of the block linears' weights removed.
    """
    config = model.config
    n_rep = config.n_heads // config.n_kv_heads
    keep_groups = max(1, config.n_kv_heads - round(sparsity * config.n_kv_heads))
    keep_channels = max(1, config.hidden_dim - round(sparsity * config.hidden_dim))
    before = block_linear_params(model)
    if calibration is not None:
        scores = activation_scores(model, calibration, batch_size)
    else:
        scores = weight_scores(model)
    for layer, (group_scores, channel_scores) in zip(model.layers, scores, strict=True):
        groups = group_scores.topk(keep_groups).indices.sort().values
        channels = channel_scores.topk(keep_channels).indices.sort().values
        keep_head_groups_(layer.attention, groups, n_rep)
        keep_channels_(layer.feed_forward, channels)
    model.config = config.replace(
        n_heads=keep_groups * n_rep, n_kv_heads=keep_groups, head_dim=config.head_dim,
        hidden_dim=keep_channels,
    )  # fmt: skip
    return {
        "importance": "weight" if calibration is None else "activation",
        "before": _shape(config),
        "after": _shape(model.config),
        "achieved": 1 - block_linear_params(model) / before,
    }


def keep_head_groups_(attention: nn.Module, groups: Tensor, n_rep: int) -> None:
    """Keep only the kv groups `groups` (sorted indices) of an `Attention`."""
    head_dim = attention.head_dim
    attention.wq = keep_rows(attention.wq, _expand(groups, n_rep * head_dim))
    attention.wk = keep_rows(attention.wk, _expand(groups, head_dim))
    attention.wv = keep_rows(attention.wv, _expand(groups, head_dim))
    attention.wo = keep_columns(attention.wo, _expand(groups, n_rep * head_dim))


def keep_channels_(mlp: nn.Module, channels: Tensor) -> None:
    """Keep only the hidden channels `channels` (sorted indices) of a SwiGLU or GELU MLP."""
    mlp.w1 = keep_rows(mlp.w1, channels)
    if hasattr(mlp, "w3"):
        mlp.w3 = keep_rows(mlp.w3, channels)
    mlp.w2 = keep_columns(mlp.w2, channels)


def _expand(units: Tensor, width: int) -> Tensor:
    """Indices of the rows of units of `width` rows each: [1, 3], 2 -> [2, 3, 6, 7]."""
    return (units[:, None] * width + torch.arange(width, device=units.device)).flatten()


def keep_rows(linear: nn.Linear, rows: Tensor) -> nn.Linear:
    """A new `nn.Linear` with only the output features `rows` (and their biases)."""
    out = _linear_like(linear, linear.in_features, len(rows), linear.bias is not None)
    out.weight = nn.Parameter(linear.weight[rows].clone())
    if linear.bias is not None:
        out.bias = nn.Parameter(linear.bias[rows].clone())
    return out


def keep_columns(linear: nn.Linear, columns: Tensor) -> nn.Linear:
    """A new `nn.Linear` with only the input features `columns` (the bias is unchanged)."""
    out = _linear_like(linear, len(columns), linear.out_features, linear.bias is not None)
    out.weight = nn.Parameter(linear.weight[:, columns].clone())
    if linear.bias is not None:
        out.bias = nn.Parameter(linear.bias.clone())
    return out


def _linear_like(linear: nn.Linear, in_features: int, out_features: int, bias: bool) -> nn.Linear:
    with torch.device("meta"):  # every tensor is replaced by the caller
        return nn.Linear(in_features, out_features, bias=bias)


def weight_scores(model: Transformer) -> list[tuple[Tensor, Tensor]]:
    """Per layer, (head group scores (n_kv,), channel scores (hidden,)) from weight norms."""
    scores = []
    for layer in model.layers:
        attention, mlp = layer.attention, layer.feed_forward
        n_kv = attention.wk.out_features // attention.head_dim
        wo = attention.wo.weight.float()  # (dim, nh * hs)
        out_norms = wo.view(wo.shape[0], n_kv, -1).norm(dim=(0, 2))  # (n_kv,)
        value_norms = attention.wv.weight.float().view(n_kv, -1).norm(dim=1)  # (n_kv,)
        channels = mlp.w2.weight.float().norm(dim=0) * mlp.w1.weight.float().norm(dim=1)
        if hasattr(mlp, "w3"):
            channels = channels * mlp.w3.weight.float().norm(dim=1)
        scores.append((out_norms * value_norms, channels))
    return scores


def activation_scores(
    model: Transformer, tokens: Tensor, batch_size: int
) -> list[tuple[Tensor, Tensor]]:
    """Per layer, (head group scores, channel scores): mean contribution norms over `tokens`."""
    n_kv, head_dim = model.config.n_kv_heads, model.config.head_dim
    group_width = model.config.n_heads // n_kv * head_dim
    sums: dict[tuple[str, int], Tensor] = {}
    hooks = []
    for i, layer in enumerate(model.layers):
        hooks += [
            layer.attention.wo.register_forward_pre_hook(
                partial(_accumulate, sums, ("attention", i), group_width)),
            layer.feed_forward.w2.register_forward_pre_hook(
                partial(_accumulate, sums, ("mlp", i), 1)),
        ]  # fmt: skip
    device = next(model.parameters()).device
    try:
        for batch in tokens.split(batch_size):
            model.hidden_states(batch.to(device))  # the hooks read what they need
    finally:
        for hook in hooks:
            hook.remove()
    n = tokens.numel()
    return [(sums["attention", i] / n, sums["mlp", i] / n) for i in range(len(model.layers))]


def _accumulate(sums: dict, key: tuple, width: int, linear: nn.Linear, args: tuple) -> None:
    """Forward pre-hook: add each unit's contribution norms, summed over tokens, to sums[key]."""
    x = args[0].detach().float().flatten(0, -2)  # (N, in)
    weight = linear.weight.detach().float()  # (out, in)
    if width == 1:  # one column per unit: the norm factors
        total = (x.abs() * weight.norm(dim=0)).sum(dim=0)  # (in,)
    else:
        x = x.reshape(x.shape[0], -1, width)  # (N, units, width)
        w = weight.view(weight.shape[0], -1, width)  # (out, units, width)
        total = torch.einsum("nug,oug->nuo", x, w).norm(dim=-1).sum(dim=0)  # (units,)
    sums[key] = sums.get(key, 0) + total


def block_linear_params(model: Transformer) -> int:
    """Weights (not biases) of the linear layers inside the blocks."""
    return sum(
        module.weight.numel() for module in model.layers.modules() if isinstance(module, nn.Linear)
    )


def _shape(config) -> dict:
    return {"n_heads": config.n_heads, "n_kv_heads": config.n_kv_heads,
            "hidden_dim": config.hidden_dim}  # fmt: skip
