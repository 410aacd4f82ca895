"""Gradient-norm clipping that works on plain tensors and on DTensors of any mesh."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor


def clip_grad_norm_(
    parameters: Iterable[Tensor], max_norm: float, group: dist.ProcessGroup | None = None,
    uncounted: Iterable[Tensor] = (),
) -> Tensor:  # fmt: skip
    """Scale gradients so their global L2 norm is at most `max_norm`; returns that norm.

    Gradients are grouped by mesh (plain tensors form one group) because a norm of DTensors is
    only complete after a reduction over their own mesh; the groups' norms then combine.

    Args:
        group: ranks holding other parameters of the same model (pipeline stages): their
            squared norms are summed in too.
        uncounted: among `parameters`, copies of parameters counted on another rank (a tied
            embedding's second copy): scaled, but left out of the norm.
    """
    skip = {id(p) for p in uncounted}
    params = [p for p in parameters if p.grad is not None]
    groups: dict[object, list[Tensor]] = defaultdict(list)
    counted: dict[object, list[Tensor]] = defaultdict(list)
    for p in params:
        mesh = p.grad.device_mesh if isinstance(p.grad, DTensor) else None
        groups[mesh].append(p.grad)
        if id(p) not in skip:
            counted[mesh].append(p.grad)
    squares = []
    for grads in counted.values():
        norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        squares.append(norm.float() ** 2)
    total = torch.stack(squares).sum() if squares else torch.zeros(())
    if group is not None:
        dist.all_reduce(total, group=group)
    total = total.sqrt()
    # A Python float multiplies DTensors and plain tensors alike (a tensor would not mix).
    coef = max_norm / (float(total) + 1e-6)
    if coef < 1.0:
        for grads in groups.values():
            torch._foreach_mul_(grads, coef)
    return total
