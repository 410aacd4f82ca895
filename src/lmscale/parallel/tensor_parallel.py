"""Tensor parallelism for lmscale's Transformer, as a DTensor plan (Megatron-LM's layout).

Per block, with sequence parallelism (SP) on:

    residual (B, T/tp, d) ──norm(SP)──> all-gather T ──> wq wk wv (column: heads split)
        ──> attention on local heads ──> wo (row) ──> reduce-scatter to (B, T/tp, d) ──> + residual
    and the same for the MLP: w1 w3 column-wise, w2 row-wise.

Embeddings are split by vocabulary rows; the output projection by vocabulary columns, gathered
to full logits. Without SP the residual stream is replicated and norms are not split.
The model code is unchanged: attention infers its local head count from the tensor's width.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from lmscale.errors import LmscaleError
from lmscale.model import ModelConfig


def apply_tensor_parallel(
    model: nn.Module, mesh: DeviceMesh, sequence_parallel: bool, config: ModelConfig
) -> None:
    """Shard `model`'s layers over the 1-D `mesh`, in place.

    `model` is a `Transformer` or a pipeline stage of one (the parts it holds are sharded).
    """
    check_tp_degree(config, mesh.size())
    residual = Shard(1) if sequence_parallel else Replicate()  # layout between blocks
    root = {}
    if hasattr(model, "tok_embeddings"):
        root["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=residual)
    if hasattr(model, "output"):
        root["output"] = ColwiseParallel(input_layouts=residual, output_layouts=Replicate())
    if hasattr(model, "pos_embeddings"):
        # (T, d) position rows: the sequence is dim 0 here, so it lines up with the tokens' dim 1.
        positions = Shard(0) if sequence_parallel else Replicate()
        root["pos_embeddings"] = RowwiseParallel(
            input_layouts=Replicate(), output_layouts=positions
        )
    if sequence_parallel and hasattr(model, "norm"):
        root["norm"] = SequenceParallel()
    if root:
        parallelize_module(model, mesh, root)
    blocks = model.layers.values() if isinstance(model.layers, nn.ModuleDict) else model.layers
    for block in blocks:
        parallelize_module(block, mesh, _block_plan(config.family, residual, sequence_parallel))
    if config.tie_embeddings and hasattr(model, "tok_embeddings") and hasattr(model, "output"):
        # both are split by vocabulary rows (Shard(0)): one tensor again
        model.output.weight = model.tok_embeddings.weight


def _block_plan(family: str, residual, sequence_parallel: bool) -> dict:
    # NOTE: the gathered input stays a DTensor into the column-parallel layers, so the backward
    # reduces its gradient once (a reduce-scatter), not once per layer that reads it.
    plan = {
        "attention": PrepareModuleInput(
            input_layouts=(residual, None, None),
            desired_input_layouts=(Replicate(), None, None),
        ),  # fmt: skip
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(output_layouts=residual),
        "feed_forward": PrepareModuleInput(
            input_layouts=(residual,), desired_input_layouts=(Replicate(),)
        ),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(output_layouts=residual),
    }
    if family == "llama":
        plan["feed_forward.w3"] = ColwiseParallel()
    if sequence_parallel:
        plan["attention_norm"] = SequenceParallel()
        plan["ffn_norm"] = SequenceParallel()
    return plan


def check_tp_degree(config: ModelConfig, tp: int) -> None:
    """Tensor parallel splits heads and the MLP width: `tp` must divide them."""
    for name in ("n_heads", "n_kv_heads", "hidden_dim"):
        if getattr(config, name) % tp:
            raise LmscaleError(
                f"tensor parallel degree {tp} does not divide model.{name} = {getattr(config, name)}"
            )
