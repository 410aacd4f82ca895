"""The distillation loss: soft teacher targets mixed with the hard next token, summed per token.

For every scored position, with student logits z, teacher logits t and temperature T:

    loss = alpha * T^2 * KL(softmax(t / T) || softmax(z / T)) + (1 - alpha) * CE(z, target)

(Hinton et al., 2015). The T^2 keeps the soft term's gradient, T * (softmax(z/T) - softmax(t/T)),
on the scale of the hard term's as T changes. The sum over scored tokens is returned, like
`lm_loss_sum`, so the loop's division by the step's target count keeps gradient accumulation exact.

`linear_distill_loss` is the fused form the loop uses (as the model's `head`, so under DDP and
FSDP too): like `fused_loss`, it
computes each chunk of rows' logits (student and teacher), loss and gradients at once, so neither
(N, vocab) logits tensor is ever held whole (49152 x 2048 fp32 logits are 400 MB each):

    hidden (N, d) --chunk--> z (n, V), t (n, V) -> loss_n,
        dz = (1 - alpha) * (softmax(z) - onehot) + alpha * T * (softmax(z/T) - softmax(t/T))
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from lmscale.train.fused_loss import CHUNK_ELEMENTS, IGNORE_INDEX


def distill_loss_sum(
    student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, temperature: float,
    alpha: float,
) -> Tensor:  # fmt: skip
    """The summed distillation loss from full logits (the reference, and the wrapped-model path).

    Args:
        student_logits: (N, vocab) logits of the model being trained.
        teacher_logits: (N, vocab) logits of the frozen teacher (any float dtype).
        targets: (N,) next-token ids, IGNORE_INDEX where not scored (no loss, no gradient).
        temperature: T > 0, softens both distributions of the KL term.
        alpha: weight of the KL term in [0, 1]; 1 - alpha weighs the cross-entropy.

    Returns:
        A scalar fp32 tensor: the sum over scored positions of the per-token loss.
    """
    z, t = student_logits.float(), teacher_logits.float()
    scored = targets != IGNORE_INDEX
    ce = F.cross_entropy(z, targets, ignore_index=IGNORE_INDEX, reduction="none")  # (N,)
    log_p_student = F.log_softmax(z / temperature, dim=-1)
    log_p_teacher = F.log_softmax(t / temperature, dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)  # (N,)
    per_token = alpha * temperature**2 * kl + (1 - alpha) * ce
    return (per_token * scored).sum()


def linear_distill_loss(
    hidden: Tensor, weight: Tensor, teacher_hidden: Tensor, teacher_weight: Tensor,
    targets: Tensor, temperature: float, alpha: float,
) -> Tensor:  # fmt: skip
    """`distill_loss_sum(hidden @ weight.T, teacher_hidden @ teacher_weight.T, ...)`, chunked.

    Args:
        hidden: (N, dim) the student's final hidden states.
        weight: (vocab, dim) the student's output projection.
        teacher_hidden: (N, teacher_dim) the teacher's final hidden states (no gradient).
        teacher_weight: (vocab, teacher_dim) the teacher's output projection.
        targets, temperature, alpha: as in `distill_loss_sum`.

    Returns:
        A scalar fp32 tensor; gradients flow to `hidden` and `weight` only.
    """
    device_type = hidden.device.type
    compute_dtype = hidden.dtype
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    teacher = (teacher_hidden.detach(), teacher_weight.detach())
    return _LinearDistill.apply(
        hidden, weight, *teacher, targets, compute_dtype, float(temperature), float(alpha)
    )


class _LinearDistill(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, teacher_hidden, teacher_weight, targets, dtype, temp, alpha):
        with torch.autocast(hidden.device.type, enabled=False):
            need_grads = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
            loss, grad_hidden, grad_weight = _chunked(
                hidden.to(dtype), weight.to(dtype), teacher_hidden, teacher_weight, targets,
                temp, alpha, need_grads,
            )  # fmt: skip
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        grads = (
            (grad_hidden * grad_loss).to(hidden_dtype),
            (grad_weight * grad_loss).to(weight_dtype),
        )
        return (*grads, None, None, None, None, None, None)


def _chunked(h, w, teacher_h, teacher_w, targets, temp, alpha, need_grads):
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
        teacher_logits = (teacher_h[start : start + rows] @ teacher_w.T).float()  # (n, V)
        # The soft term first: it needs the logits before they are overwritten below.
        log_q = torch.log_softmax(logits / temp, dim=-1)  # student at T
        log_p = torch.log_softmax(teacher_logits / temp, dim=-1)  # teacher at T
        p = log_p.exp()
        kl = (p * (log_p - log_q)).sum(-1)  # (n,)
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # (n, 1)
        picked = logits.gather(1, safe_targets)
        ce = (lse - picked).squeeze(1)
        loss += (((1 - alpha) * ce + alpha * temp**2 * kl) * scored).sum()
        if not need_grads:
            continue
        # d/dz: (1 - alpha) * (softmax(z) - onehot) + alpha * T * (softmax(z/T) - softmax(t/T)).
        probs = logits.sub_(lse).exp_()
        probs.scatter_add_(1, safe_targets, torch.full_like(picked, -1.0))
        soft = log_q.exp_().sub_(p).mul_(alpha * temp)
        grad_logits = probs.mul_(1 - alpha).add_(soft).mul_(scored[:, None]).to(h.dtype)
        grad_h[start : start + rows] = grad_logits @ w
        grad_w += (grad_logits.T @ h_chunk).float()
    return loss, grad_h, grad_w


@dataclass
class DistillLoss:
    """The loop's loss function when a teacher is set: `(model, inputs, targets) -> summed loss`.

    The teacher is frozen: eval mode, no gradients, run under `torch.no_grad`.
    """

    teacher: nn.Module
    temperature: float = 2.0
    alpha: float = 0.5

    def __call__(self, model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
        with torch.no_grad():
            teacher_hidden = self.teacher.hidden_states(inputs)  # (B, T, teacher_dim)
        head = functools.partial(self._head, teacher_hidden=teacher_hidden, targets=targets)
        return model(inputs, head=head)  # inside forward, where DDP's and FSDP's hooks run

    def _head(self, hidden: Tensor, output: nn.Module, teacher_hidden: Tensor, targets: Tensor):
        hidden, teacher_hidden, targets = (
            t.flatten(0, 1) for t in (hidden, teacher_hidden, targets)
        )
        if type(output) is nn.Linear and not isinstance(output.weight, DTensor):
            return linear_distill_loss(
                hidden, output.weight, teacher_hidden, self.teacher.output.weight, targets,
                self.temperature, self.alpha,
            )  # fmt: skip
        # An adapted or vocabulary-split output layer: full logits (tensor parallel gathers them).
        with torch.no_grad():
            teacher_logits = self.teacher.output(teacher_hidden)
        return distill_loss_sum(
            output(hidden), teacher_logits, targets, self.temperature, self.alpha
        )
