"""Pipeline parallel on `torch.distributed.pipelining`: the model cut into stages by layers.

    stage 0: tok_embeddings (+ pos_embeddings) + layers 0..k-1
    stage i: layers ...                                        (one rank of the `pp` dim each,
    stage S-1: layers ... + norm + output                       or v stages each: interleaved)

Blocks are split as evenly as possible; when they do not divide, the middle stages take the
extra ones, since the first stage also embeds and the last one also projects onto the vocabulary.
Each stage keeps the whole model's parameter names (`layers.7.attention.wq.weight` stays that on
whatever stage holds block 7), so checkpoints are the same at every pipeline size and DCP
reshards them onto any other strategy.

The last stage returns the final normalised hidden states; the schedule's loss function applies
the training loss's `head` (the fused projection + cross-entropy) to them. Tied embeddings live
on two stages when the first is not the last: both copies start equal, and their gradients are
summed over the pipeline before every optimizer step (Megatron-LM's rule), so they stay equal.

Schedules: GPipe (all forwards, then all backwards: m micro-batches of activations held), 1F1B
(at most p in flight on the first stage) and interleaved 1F1B (v stages per rank: the bubble
shrinks by v, for v times the point-to-point traffic).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
)
from torch.distributed.tensor import DTensor

from lmscale.errors import LmscaleError
from lmscale.model.config import ModelConfig
from lmscale.model.transformer import Transformer, rope_factors, rope_tables

SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b")
IGNORE_INDEX = -100
"""Target id that is not scored (the training loss's convention): padding rows for evaluation."""

Head = Callable[[Tensor, nn.Module, Tensor], Tensor]
"""`head(hidden (B, T, dim), output layer, targets (B, T)) -> summed loss`: the training loss."""


class StageModule(nn.Module):
    """One pipeline stage: consecutive blocks, the embeddings on the first, the head on the last."""

    def __init__(
        self, model: Transformer, layer_ids: range, first: bool, last: bool, sequence_split: int
    ):
        super().__init__()
        config = model.config
        self.family = config.family
        self.first, self.last = first, last
        self.sequence_split = sequence_split
        """Blocks see 1/sequence_split of the sequence (sequence parallel): the rest is elsewhere."""
        self.max_seq_len = config.max_seq_len
        if first:
            self.tok_embeddings = model.tok_embeddings
            if config.family == "gpt2":
                self.pos_embeddings = model.pos_embeddings
        self.dropout = model.dropout
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layer_ids})
        if last:
            self.norm = model.norm
            self.output = model.output
        if config.family != "gpt2":
            shape = model.rope_cos.shape
            self.register_buffer("rope_cos", torch.empty(shape, device="meta"), persistent=False)
            self.register_buffer("rope_sin", torch.empty(shape, device="meta"), persistent=False)
            self._config = config
            if not model.rope_cos.is_meta:
                self.init_rope(model.rope_cos.device)

    def init_rope(self, device: torch.device | str) -> None:
        if self.family != "gpt2":
            self.rope_cos, self.rope_sin = (t.to(device) for t in rope_tables(self._config))

    def forward(self, x: Tensor) -> Tensor:
        """Token ids (B, T) on the first stage, else the previous stage's hidden states."""
        if self.first:
            T = x.shape[1]
            positions = torch.arange(T, device=x.device)
            h = self.tok_embeddings(x)
            if self.family == "gpt2":
                h = h + self.pos_embeddings(positions)
            h = self.dropout(h)
        else:
            h = x
            T = _local(h).shape[1] * self.sequence_split
        rope = None
        if self.family != "gpt2":
            dtype = (
                torch.get_autocast_dtype(h.device.type)
                if torch.is_autocast_enabled(h.device.type)
                else self.rope_cos.dtype
            )
            rope = rope_factors(self.rope_cos[:T], self.rope_sin[:T], dtype)
        for block in self.layers.values():
            h = block(h, rope)
        return self.norm(h) if self.last else h


class PipelineParts(nn.Module):
    """This rank's stages together under the model's parameter names: what checkpoints and the
    optimizer see (the stages share these modules)."""

    def __init__(self, stages: list[StageModule]):
        super().__init__()
        self.layers = nn.ModuleDict()
        for stage in stages:
            for name in ("tok_embeddings", "pos_embeddings", "norm", "output"):
                if hasattr(stage, name):
                    setattr(self, name, getattr(stage, name))
            self.layers.update(stage.layers)


@dataclass
class Pipeline:
    """The stages of this rank and the schedule that drives them."""

    stages: list[StageModule]
    schedule: object
    group: dist.ProcessGroup
    n_microbatches: int
    tied: bool
    """Tied embeddings held on two stages: their gradients are summed before each step."""
    _head: Head | None = None
    _scale: float = 1.0
    _shape: tuple[int, int] | None = None
    """(rows, length) of the training batches: the shape the stages' buffers were built for."""
    _stage_objects: list[PipelineStage] = field(default_factory=list)

    @property
    def has_last_stage(self) -> bool:
        return any(stage.last for stage in self.stages)

    @property
    def has_first_stage(self) -> bool:
        return any(stage.first for stage in self.stages)

    def step(self, inputs: Tensor, targets: Tensor, head: Head, scale: float) -> Tensor:
        """Forward and backward of one batch, in micro-batches; gradients accumulate.

        Args:
            head: the training loss applied on the last stage.
            scale: each micro-batch's summed loss is multiplied by this before its backward.

        Returns:
            The summed (unscaled) loss on the rank holding the last stage, 0 elsewhere.
        """
        self._head, self._scale = head, scale
        self._shape = tuple(inputs.shape)
        losses: list[Tensor] = []
        first = self.has_first_stage
        self.schedule.step(
            *((inputs,) if first else ()), target=targets, losses=losses, return_outputs=False
        )
        return self._total(losses, targets.device)

    @torch.no_grad()
    def loss_sum(self, inputs: Tensor, targets: Tensor, head: Head) -> Tensor:
        """The summed loss of a batch, forward only; every rank of the pipeline gets it.

        The stages exchange buffers of the shape the training steps used, so the batch is cut
        and padded (unscored) to it; causal attention keeps the padding out of the scores.
        """
        if self._shape is None:
            raise LmscaleError("a pipeline evaluates after its first training step")
        rows, length = self._shape
        if inputs.shape[1] > length:
            raise LmscaleError(
                f"evaluation windows of {inputs.shape[1]} exceed the {length} trained"
            )
        self._head, self._scale = head, 1.0
        total = torch.zeros((), device=targets.device)
        for start in range(0, inputs.shape[0], rows):
            part, scored = inputs[start : start + rows], targets[start : start + rows]
            pad_rows, pad_cols = rows - part.shape[0], length - part.shape[1]
            part = F.pad(part, (0, pad_cols, 0, pad_rows))
            scored = F.pad(scored, (0, pad_cols, 0, pad_rows), value=IGNORE_INDEX)
            losses: list[Tensor] = []
            first = self.has_first_stage
            self.schedule.eval(*((part,) if first else ()), target=scored, losses=losses)
            total += self._total(losses, targets.device)
        dist.all_reduce(total, group=self.group)
        return total

    def _loss(self, hidden: Tensor, targets: Tensor) -> Tensor:
        return self._head(hidden, self.stages[-1].output, targets) * self._scale

    def _total(self, losses: list[Tensor], device: torch.device) -> Tensor:
        if not self.has_last_stage:
            return torch.zeros((), device=device)
        return torch.stack([loss.detach().float() for loss in losses]).sum() / self._scale

    def sync_tied_gradients(self) -> None:
        """Sum the gradients of the two copies of a tied embedding (first and last stage).

        With pp = 2 (the only size tied embeddings allow) every rank holds exactly one copy.
        """
        if not self.tied:
            return
        for stage in self.stages:
            if stage.first or stage.last:
                weight = stage.tok_embeddings.weight if stage.first else stage.output.weight
                if isinstance(weight, DTensor) and weight.grad.placements != weight.placements:
                    # NOTE: DTensor's embedding backward leaves a replicated gradient of a
                    # vocabulary-split weight; both copies must hold the same layout to add up.
                    weight.grad = weight.grad.redistribute(placements=weight.placements)
                dist.all_reduce(_local(weight.grad), group=self.group)
                return

    def tied_copies(self) -> list[Tensor]:
        """The last stage's copy of a tied embedding (the first stage's counts in norms)."""
        return [s.output.weight for s in self.stages if self.tied and s.last and not s.first]


def split_layers(n_layers: int, n_stages: int) -> list[range]:
    """Consecutive runs of blocks, one per stage, the extra blocks on the middle stages."""
    if n_layers < n_stages:
        raise LmscaleError(
            f"{n_stages} pipeline stages need at least as many layers; the model has {n_layers}"
        )
    base, extra = divmod(n_layers, n_stages)
    middle = list(range(1, n_stages - 1)) or list(range(n_stages))
    sizes = [base] * n_stages
    for i in range(extra):
        sizes[middle[i % len(middle)]] += 1
    starts = [sum(sizes[:i]) for i in range(n_stages)]
    return [range(start, start + size) for start, size in zip(starts, sizes, strict=True)]


def check_pipeline(config: ModelConfig, pp: int, schedule: str, virtual_stages: int) -> None:
    """Fail early on a pipeline the model cannot be cut into."""
    per_rank = virtual_stages if schedule == "interleaved-1f1b" else 1
    if schedule == "interleaved-1f1b" and virtual_stages < 2:
        raise LmscaleError("interleaved-1f1b needs parallel.pp_virtual_stages >= 2")
    split_layers(config.n_layers, pp * per_rank)
    if config.tie_embeddings and pp > 2:
        raise LmscaleError(
            "tied embeddings under pipeline parallel need parallel.pp <= 2 (the first and last "
            "stages share the embedding's gradient)"
        )


def build_stages(
    model: Transformer, pp_mesh: DeviceMesh, schedule: str, virtual_stages: int,
    sequence_split: int,
) -> list[StageModule]:  # fmt: skip
    """This rank's stage modules (1, or `virtual_stages` for interleaved 1F1B), in order."""
    pp, rank = pp_mesh.size(), pp_mesh.get_local_rank()
    check_pipeline(model.config, pp, schedule, virtual_stages)
    per_rank = virtual_stages if schedule == "interleaved-1f1b" else 1
    n_stages = pp * per_rank
    layer_runs = split_layers(model.config.n_layers, n_stages)
    indices = [rank + k * pp for k in range(per_rank)]  # interleaved: stages loop over ranks
    return [
        StageModule(model, layer_runs[i], i == 0, i == n_stages - 1, sequence_split)
        for i in indices
    ]


def build_pipeline(
    stages: list[StageModule], pp_mesh: DeviceMesh, schedule: str, n_microbatches: int,
    device: torch.device, tied: bool,
) -> Pipeline:  # fmt: skip
    pp, rank = pp_mesh.size(), pp_mesh.get_local_rank()
    group = pp_mesh.get_group()
    n_stages = pp * len(stages)
    indices = [rank + k * pp for k in range(len(stages))]
    stage_objects = [
        PipelineStage(stage, index, n_stages, device, group=group)
        for stage, index in zip(stages, indices, strict=True)
    ]
    pipeline = Pipeline(stages, None, group, n_microbatches, tied and n_stages > 1)
    pipeline._stage_objects = stage_objects
    # scale_grads=False: the loop scales each loss itself (by the step's target count), so that
    # gradient accumulation stays exact, as on one process.
    if schedule == "interleaved-1f1b":
        pipeline.schedule = ScheduleInterleaved1F1B(
            stage_objects, n_microbatches, loss_fn=pipeline._loss, scale_grads=False
        )
    else:
        cls = ScheduleGPipe if schedule == "gpipe" else Schedule1F1B
        pipeline.schedule = cls(
            stage_objects[0], n_microbatches, loss_fn=pipeline._loss, scale_grads=False
        )
    return pipeline


def _local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t
