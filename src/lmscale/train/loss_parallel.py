"""Loss parallel: the fused output projection + cross-entropy with the vocabulary sharded.

Under tensor parallel the output projection's weight is split by vocabulary rows over the `tp`
ranks (`Shard(0)`). Gathering the full (N, vocab) logits onto every rank would undo the split;
instead each rank computes its shard's logits a chunk of rows at a time, and only two numbers per
row cross the ranks: the shard's log-sum-exp and its logit of the target (zero when the target
lies in another shard). Megatron-LM's vocab-parallel cross-entropy, fused with the projection
like `fused_loss`:

    rank r: hidden (N, d) replicated, W_r (V/tp, d)
        chunk -> z_r (n, V/tp) -> [lse_r, picked_r] --all-gather--> lse = logsumexp_r(lse_r),
                                                                     picked = sum_r(picked_r)
        loss_n = lse - picked;  dz_r = softmax_r - onehot_r   (softmax_r = exp(z_r - lse))
        dW_r += dz_r^T @ hidden;  dhidden += dz_r @ W_r  --all-reduce (once, after the loop)-->

Every rank ends with the same loss and the same full gradient of the hidden states.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate, Shard

from lmscale.train.fused_loss import (
    CHUNK_ELEMENTS,
    IGNORE_INDEX,
    PrecomputedGradients,
    compute_dtype,
)


def is_vocab_sharded(weight: Tensor) -> bool:
    """Whether `weight` is an output projection split by vocabulary rows (tensor parallel)."""
    return isinstance(weight, DTensor) and tuple(weight.placements) == (Shard(0),)


def vocab_parallel_cross_entropy(hidden: Tensor, weight: DTensor, targets: Tensor) -> Tensor:
    """Summed cross-entropy of `hidden @ weight.T` against `targets`, the logits never gathered.

    Args:
        hidden: (N, dim) final hidden states, equal on every rank of the weight's mesh (a
            DTensor sharded along the sequence is gathered first).
        weight: (vocab, dim) DTensor sharded by rows over a 1-D mesh.
        targets: (N,) token ids, IGNORE_INDEX where not scored.

    Returns:
        A scalar fp32 tensor, the same on every rank: the sum of the scored tokens' NLL.
    """
    if isinstance(hidden, DTensor):
        hidden = hidden.redistribute(placements=[Replicate()] * hidden.device_mesh.ndim).to_local()
    mesh = weight.device_mesh
    group, rank, size = mesh.get_group(), mesh.get_local_rank(), mesh.size()
    vocab = weight.shape[0]
    start = min(rank * math.ceil(vocab / size), vocab)  # torch.chunk's split, as DTensor's Shard
    compute = functools.partial(_chunked, group=group, start=start, vocab=vocab)
    return PrecomputedGradients.apply(
        hidden, weight.to_local(), targets, compute_dtype(hidden), compute
    )


def _chunked(
    hidden: Tensor, local_weight: Tensor, targets: Tensor, dtype: torch.dtype, need_grads: bool,
    *, group: dist.ProcessGroup, start: int, vocab: int,
) -> tuple[Tensor, Tensor | None, Tensor | None]:  # fmt: skip
    h, w = hidden.to(dtype), local_weight.to(dtype)
    n_rows, local_vocab = h.shape[0], w.shape[0]
    # NOTE: from the global vocabulary, so every rank cuts the same chunks and the collectives
    # pair up even when the shards are uneven.
    rows = max(64, CHUNK_ELEMENTS * dist.get_world_size(group) // vocab)
    loss = torch.zeros((), dtype=torch.float32, device=h.device)
    grad_h = torch.empty_like(h) if need_grads else None
    grad_w = torch.zeros(w.shape, dtype=torch.float32, device=h.device) if need_grads else None
    for first in range(0, n_rows, rows):
        h_chunk, t_chunk = h[first : first + rows], targets[first : first + rows]
        scored = t_chunk != IGNORE_INDEX
        local = (t_chunk >= start) & (t_chunk < start + local_vocab) & scored
        local_targets = torch.where(local, t_chunk - start, 0)[:, None]  # (n, 1)
        logits = (h_chunk @ w.T).float()  # (n, V/tp)
        stats = torch.stack(  # (n, 2): this shard's log-sum-exp and its logit of the target
            (torch.logsumexp(logits, dim=-1), logits.gather(1, local_targets).squeeze(1) * local),
            dim=1,
        )
        gathered = [torch.empty_like(stats) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, stats, group=group)
        every = torch.stack(gathered)  # (tp, n, 2)
        lse = torch.logsumexp(every[..., 0], dim=0)  # (n,)
        picked = every[..., 1].sum(0)
        loss += ((lse - picked) * scored).sum()
        if not need_grads:
            continue
        probs = logits.sub_(lse[:, None]).exp_()  # this shard's part of the softmax
        probs.scatter_add_(1, local_targets, -local[:, None].to(probs.dtype))
        probs.mul_(scored[:, None])
        grad_logits = probs.to(dtype)
        grad_h[first : first + rows] = grad_logits @ w
        grad_w += (grad_logits.T @ h_chunk).float()
    if need_grads:  # each shard's share of d loss / d hidden, summed: the full gradient everywhere
        dist.all_reduce(grad_h, group=group)
    return loss, grad_h, grad_w
