"""The language-modelling loss, summed so that gradient accumulation stays exact.

With k micro-batches, dividing each micro-batch's mean loss by k is wrong whenever the micro-batches
hold different numbers of target tokens (padding, ignored positions): the gradient then differs
from that of the whole batch. Summing the token losses and dividing by the number of target tokens
of the *whole* batch gives exactly the gradient of one big batch.
"""

from __future__ import annotations

import functools

import torch.nn.functional as F
from torch import Tensor, nn

from lmscale.train.fused_loss import IGNORE_INDEX, linear_cross_entropy
from lmscale.train.loss_parallel import is_vocab_sharded, vocab_parallel_cross_entropy

__all__ = ["IGNORE_INDEX", "count_targets", "fused_loss_head", "lm_loss_sum", "logits_loss_sum"]


def count_targets(targets: Tensor) -> int:
    """Number of scored positions in `targets`."""
    return int((targets != IGNORE_INDEX).sum())


def lm_loss_sum(model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
    """Sum of next-token negative log-likelihoods over the scored positions.

    The output projection is fused into the loss (`fused_loss_head`), which runs inside the
    model's `forward`: so it also holds under DDP, FSDP and tensor parallel, whose hooks sit
    around `forward`.

    Args:
        model: a `Transformer`, or a wrapper (DDP, torch.compile) passing `head=` on to one.
        inputs: (B, T) token ids.
        targets: (B, T) next-token ids, IGNORE_INDEX where not scored.

    Returns:
        A scalar fp32 tensor: the summed loss (divide by the batch's target count).
    """
    return model(inputs, head=functools.partial(fused_loss_head, targets=targets))


def fused_loss_head(hidden: Tensor, output: nn.Module, targets: Tensor) -> Tensor:
    """The summed loss from the final hidden states (B, T, dim) and the output layer.

    A plain linear fuses with the cross-entropy (the logits are never held whole); one split by
    vocabulary (tensor parallel) computes it shard by shard (loss parallel); any other output
    layer (an adapter around it, say) computes the full logits.
    """
    hidden, targets = hidden.flatten(0, 1), targets.flatten()
    if type(output) is not nn.Linear:
        return _cross_entropy_sum(output(hidden), targets)
    if is_vocab_sharded(output.weight):
        return vocab_parallel_cross_entropy(hidden, output.weight, targets)
    return linear_cross_entropy(hidden, output.weight, targets)


def logits_loss_sum(model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
    """`lm_loss_sum` through the model's full logits: the reference the fused paths must equal."""
    logits = model(inputs)  # (B, T, vocab)
    return _cross_entropy_sum(logits.flatten(0, 1), targets.flatten())


def _cross_entropy_sum(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
