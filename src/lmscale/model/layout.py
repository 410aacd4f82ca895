"""Weight layouts and matmul forms: the same values computed the way a workload runs fastest."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MATVEC_MAX_ROWS = 4
"""Up to this many rows, a compiled CPU linear layer runs as `matvec` (see there)."""


def decode_layout_(model: nn.Module) -> nn.Module:
    """Store every float32 `nn.Linear` weight column-major, in place, for faster eager decoding.

    Decoding multiplies one token's vector by every weight matrix, a matrix-vector product bound
    by reading the weights from memory. With the weight (out, in) stored column-major (its
    transpose contiguous), `F.linear` runs the product as a sum of contiguous weight rows scaled
    by the input, which the CPU BLAS streams 1.3-1.7x faster in float32 than one dot product per
    output row (measured on an AMD EPYC; bfloat16 is the other way round, so it is left alone).
    The values are unchanged; results differ only by float32 summation order. A tied output
    projection moves its embedding table too (a token's embedding is then a strided read).

    NOTE: the compiled decode step wants the opposite (row-major, for `matvec`); use this only
    for the eager path.

    Args:
        model: any module; its float32 linear weights are re-laid out.

    Returns:
        The same module.
    """
    with torch.no_grad():
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if isinstance(module, nn.Linear) and weight.dtype == torch.float32:
                # NOTE: assign .data so a tied parameter (the same object elsewhere) follows.
                weight.data = weight.data.t().contiguous().t()
    return model


def matvec(x: Tensor, weight: Tensor) -> Tensor:
    """x @ weight^T written as an elementwise product summed over the input features.

    Under `torch.compile` on a CPU, inductor turns this into one vectorised reduction per output
    row, split across the cores, that streams a row-major weight at close to the memory
    bandwidth: ~28 GB/s on the 2-core AMD EPYC, where MKL's matrix-vector product of the same
    weights reaches ~12 GB/s (fp32; bf16 22 vs 9). Nothing (rows, out, in) is materialised.
    Accumulates in fp32, as the BLAS does. Eagerly it would materialise that product: use it
    only inside a compiled graph (see `CompiledLinear`).

    Args:
        x: (..., in) activations, a few rows.
        weight: (out, in) row-major.

    Returns:
        (..., out) in x's dtype.
    """
    return (x.float()[..., None, :] * weight.float()).sum(-1).to(x.dtype)


def realized(x: Tensor) -> Tensor:
    """`x` itself, but computed into memory first inside a compiled graph (compiled only).

    Inductor inlines a pointwise producer (an RMSNorm, SiLU(a) * b) into the reduction that
    reads it; in `matvec` that reduction broadcasts x over every output row, so the producer
    would be recomputed for each weight element. For int8 codes (more arithmetic per byte
    read) that costs: the 49152-row output projection after the final norm took 5.3 ms
    inlined, 2.3 ms with the normalised vector realised (1 thread), and int4 SmolLM2 decoded
    18% faster. (float32 `matvec` is left inlined: realised, whole-model decode was no faster.)
    `inductor_force_stride_order` is the barrier. NOTE: looked up on use: `torch.ops.prims`
    holds it only once inductor is imported (as compiling does).
    """
    return torch.ops.prims.inductor_force_stride_order(x, x.stride())


class CompiledLinear(nn.Linear):
    """`nn.Linear` that, inside a compiled CPU graph of at most `MATVEC_MAX_ROWS` rows, runs
    as `matvec`; everywhere else it is `nn.Linear` (same parameters, same state dict)."""

    def forward(self, x: Tensor) -> Tensor:
        rows = x.numel() // self.in_features
        if torch.compiler.is_compiling() and x.device.type == "cpu" and rows <= MATVEC_MAX_ROWS:
            y = matvec(x, self.weight)
            return y if self.bias is None else y + self.bias.to(y.dtype)
        return F.linear(x, self.weight, self.bias)


def compiled_layout_(model: nn.Module) -> nn.Module:
    """Prepare a model's linear layers for the compiled decode step, in place.

    Every plain `nn.Linear` becomes a `CompiledLinear` (a class swap: parameters, tied weights
    and the state dict are untouched) with a row-major weight, undoing `decode_layout_`;
    quantized layers derive their kernels' packed weights (a compiled graph cannot).

    Returns:
        The same module.
    """
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "prepare_kernel"):  # a quantized layer: pack its weights now
                module.prepare_kernel()
            if type(module) is nn.Linear:
                module.__class__ = CompiledLinear
                if not module.weight.is_contiguous():
                    module.weight.data = module.weight.data.contiguous()
    return model
