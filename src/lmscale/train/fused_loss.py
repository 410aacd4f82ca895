"""Output projection and cross-entropy fused, a chunk of rows at a time.

The plain path materialises the (N, vocab) logits, an fp32 copy of them, their log-softmax, and in
the backward a zero-filled (N, vocab) gradient: several passes over a buffer that is the largest
in the whole step for a small model (4096 tokens x 4096 vocab x 4 bytes = 64 MiB). Here each chunk
of rows computes its logits, its loss and *its gradients* at once, while the chunk is still in
cache, and only the gradients with respect to the hidden states (N, dim) and the weight
(vocab, dim) are kept for the backward. The loss is a scalar, so the backward only scales them.

    hidden (N, d) --chunk--> logits (n, V) -> loss_n, dlogits = softmax - onehot
                                                   |-> dhidden[n] = dlogits @ W
                                                   '-> dW       += dlogits^T @ hidden[n]

Same result as `F.cross_entropy(hidden @ W.T, targets, reduction="sum")` up to rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE_INDEX = -100
"""Target id that is not scored (padding, prompt tokens in supervised fine-tuning)."""
CHUNK_ELEMENTS = 2**20
"""Logit elements per chunk (4 MiB in fp32): small enough to stay in cache."""


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    """Summed cross-entropy of `hidden @ weight.T` against `targets`, without keeping the logits.

    Args:
        hidden: (N, dim) final hidden states.
        weight: (vocab, dim) output projection.
        targets: (N,) token ids, IGNORE_INDEX where not scored.

    Returns:
        A scalar fp32 tensor: the sum of the scored tokens' negative log-likelihoods. Under
        autocast the matrix products run in the autocast dtype, the softmax in fp32.
    """
    return PrecomputedGradients.apply(hidden, weight, targets, compute_dtype(hidden), _chunked)


def compute_dtype(hidden: Tensor) -> torch.dtype:
    """The dtype the projection's matrix products run in: autocast's, else the hidden states'."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return hidden.dtype


class PrecomputedGradients(torch.autograd.Function):
    """A summed loss whose gradients are computed with it in the forward (by `compute`), so the
    backward only scales them: what the fused losses here and in `loss_parallel` share.

    `compute(hidden, weight, targets, dtype, need_grads) -> (loss, grad_hidden, grad_weight)`.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, dtype: torch.dtype, compute):
        with torch.autocast(hidden.device.type, enabled=False):
            need_grads = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
            loss, grad_hidden, grad_weight = compute(hidden, weight, targets, dtype, need_grads)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        return (
            (grad_hidden * grad_loss).to(hidden_dtype),
            (grad_weight * grad_loss).to(weight_dtype),
            None,
            None,
            None,
        )


def _chunked(
    hidden: Tensor, weight: Tensor, targets: Tensor, dtype: torch.dtype, need_grads: bool
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    h, w = hidden.to(dtype), weight.to(dtype)
    n_rows, vocab = h.shape[0], w.shape[0]
    rows = max(64, CHUNK_ELEMENTS // vocab)
    loss = torch.zeros((), dtype=torch.float32, device=h.device)
    grad_h = torch.empty_like(h) if need_grads else None
    grad_w = torch.zeros(w.shape, dtype=torch.float32, device=h.device) if need_grads else None
    for start in range(0, n_rows, rows):
        h_chunk, t_chunk = h[start : start + rows], targets[start : start + rows]
        scored = t_chunk != IGNORE_INDEX
        safe_targets = torch.where(scored, t_chunk, 0)[:, None]  # (n, 1)
        logits = (h_chunk @ w.T).float()  # (n, V)
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # (n, 1)
        picked = logits.gather(1, safe_targets)
        loss += ((lse - picked).squeeze(1) * scored).sum()
        if not need_grads:
            continue
        # d(sum NLL)/d logits = softmax - onehot, zero on unscored rows; reuse the logits buffer.
        probs = logits.sub_(lse).exp_()
        probs.scatter_add_(1, safe_targets, torch.full_like(picked, -1.0))
        probs.mul_(scored[:, None])
        grad_logits = probs.to(dtype)
        grad_h[start : start + rows] = grad_logits @ w
        grad_w += (grad_logits.T @ h_chunk).float()
    return loss, grad_h, grad_w
