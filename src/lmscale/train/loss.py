"""The language-modelling loss, summed so that gradient accumulation stays exact.

With k micro-batches, dividing each micro-batch's mean loss by k is wrong whenever the micro-batches
hold different numbers of target tokens (padding, ignored positions): the gradient then differs
from that of the whole batch. Summing the token losses and dividing by the number of target tokens
of the *whole* batch gives exactly the gradient of one big batch.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from lmscale.model import Transformer
from lmscale.train.fused_loss import IGNORE_INDEX, linear_cross_entropy

__all__ = ["IGNORE_INDEX", "count_targets", "lm_loss_sum", "logits_loss_sum"]


def count_targets(targets: Tensor) -> int:
    """Number of scored positions in `targets`."""
    return int((targets != IGNORE_INDEX).sum())


def lm_loss_sum(model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
    """Sum of next-token negative log-likelihoods over the scored positions.

    Args:
        model: maps (B, T) token ids to (B, T, vocab) logits.
        inputs: (B, T) token ids.
        targets: (B, T) next-token ids, IGNORE_INDEX where not scored.

    Returns:
        A scalar fp32 tensor: the summed loss (divide by the batch's target count).
    """
    if isinstance(model, Transformer):  # the fused path: never materialises the logits
        hidden = model.hidden_states(inputs)  # (B, T, dim)
        return linear_cross_entropy(hidden.flatten(0, 1), model.output.weight, targets.flatten())
    return logits_loss_sum(model, inputs, targets)


def logits_loss_sum(model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
    """`lm_loss_sum` through the model's own forward and full logits.

    Wrapped models (DDP, FSDP, tensor parallel) need this: their hooks run around `forward`, which
    the fused path goes around.
    """
    logits = model(inputs)  # (B, T, vocab)
    return F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
