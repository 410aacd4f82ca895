"""Quantized linear layers as onnxruntime's `MatMulNBits` (com.microsoft), integers kept.

MatMulNBits computes y = x @ dequant(B)^T (+ bias), dequant = (code - zero_point) * scale per
block of `block_size` input columns. Its inputs (onnxruntime's contrib-op spec):

    B            uint8 (N, k_blocks, block_size * bits / 8)  codes packed low-first along K
    scales       float (N * k_blocks)
    zero_points  uint8 (N * ceil(k_blocks * bits / 8))       packed like B (bits=4: two a byte)
                 or the scales' float type (N * k_blocks)      any real zero point, unpacked

int4 with a float zero point (`zero_point="float"`, w = q * scale + min) exports as float32
zero points -min / scale: onnxruntime (1.32, CPU) computes (code - zero_point) * scale with them
too (checked by tests/export/test_onnx.py).

int4 (group-wise, asymmetric) maps onto it with block_size = group size; int8 (per output
channel, symmetric) with bits=8, codes shifted to uint8 (q + 128, zero point 128) and the channel's
scale repeated over its blocks. For export, each `QuantizedLinear` is swapped for `NBitsLinear`,
whose forward is one custom op that the exporter translates to a single MatMulNBits node.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lmscale.model.quantized import QuantizedEmbedding, QuantizedLinear

DOMAIN = "com.microsoft"


def codes(layer: QuantizedLinear) -> tuple[Tensor, Tensor, Tensor | None]:
    """(q, scales, zeros) of a layer, unpacked (`QuantizedLinear.codes`), scales in float32."""
    q, scales, zeros = layer.codes()
    return q, scales.float(), None if zeros is None else zeros.float()


def _pack(values: Tensor, bits: int) -> Tensor:
    """(rows, cols) uint8 codes -> (rows, cols * bits / 8) bytes, low bits first."""
    if bits == 8:
        return values
    if values.shape[1] % 2:
        values = torch.cat((values, values.new_zeros(values.shape[0], 1)), dim=1)
    return values[:, 0::2] | (values[:, 1::2] << 4)


def _block_size(in_features: int) -> int:
    for size in (128, 64, 32, 16):
        if in_features % size == 0:
            return size
    raise ValueError(f"no MatMulNBits block size divides {in_features} input columns")


def nbits_tensors(layer: QuantizedLinear) -> dict:
    """MatMulNBits' inputs and attributes for `layer` (see the module docstring)."""
    q, scales, zeros = codes(layer)
    N, K = q.shape
    if layer.method != "int4":  # int8 and int8-dynamic share the weight layout
        q = (q.to(torch.int16) + 128).to(torch.uint8)
        if scales.dim() == 2:  # grouped int8 (a GGUF's Q8_0): one scale per block already
            bits, block = 8, K // scales.shape[1]
        else:
            bits, block = 8, _block_size(K)
            scales = scales[:, None].expand(N, K // block)
        zeros = torch.full((N, K // block), 128, dtype=torch.uint8)
    else:
        bits, block = 4, K // scales.shape[1]
        if layer.zero_point != "float":
            rounded = zeros.round()
            if not torch.equal(rounded, zeros) or rounded.min() < 0 or rounded.max() > 15:
                raise ValueError("int4 zero points must be integers in 0..15 for MatMulNBits")
            zeros = rounded.to(torch.uint8)
    k_blocks = K // block
    packed = _pack(q, bits).reshape(N, k_blocks, block * bits // 8).contiguous()
    if zeros.is_floating_point():  # float zero points: one per block, not packed
        zero_points = zeros.reshape(-1).contiguous()
    else:
        zero_points = _pack(zeros, bits).reshape(-1).contiguous()
    return {
        "packed": packed,
        "scales": scales.reshape(-1).contiguous(),
        "zero_points": zero_points,
        "K": K, "N": N, "bits": bits, "block_size": block,
    }  # fmt: skip


def dequantize_nbits(packed: Tensor, scales: Tensor, zero_points: Tensor, K: int, N: int,
                     bits: int, block_size: int) -> Tensor:  # fmt: skip
    """The (N, K) float weight MatMulNBits' inputs stand for (the op's eager reference)."""
    k_blocks = K // block_size
    if bits == 4:
        q = torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(N, k_blocks, block_size)
    else:
        q = packed.reshape(N, k_blocks, block_size)
    if bits == 4 and not zero_points.is_floating_point():
        zp = torch.stack((zero_points & 0x0F, zero_points >> 4), dim=-1).reshape(N, -1)
    else:  # 8-bit codes, or real zero points: one per block, unpacked
        zp = zero_points.reshape(N, -1)
    zp = zp[:, :k_blocks, None].to(scales.dtype)
    w = (q.to(scales.dtype) - zp) * scales.reshape(N, k_blocks, 1)
    return w.reshape(N, K)


@torch.library.custom_op("lmscale_export::matmul_nbits", mutates_args=())
def matmul_nbits(
    x: Tensor, packed: Tensor, scales: Tensor, zero_points: Tensor, bias: Tensor | None,
    K: int, N: int, bits: int, block_size: int,
) -> Tensor:  # fmt: skip
    weight = dequantize_nbits(packed, scales, zero_points, K, N, bits, block_size)
    return torch.nn.functional.linear(x, weight.to(x.dtype), bias)


@matmul_nbits.register_fake
def _(x, packed, scales, zero_points, bias, K, N, bits, block_size):
    return x.new_empty(*x.shape[:-1], N)


def matmul_nbits_onnx(x, packed, scales, zero_points, bias, K, N, bits, block_size):
    """The ONNX translation of `matmul_nbits`: one com.microsoft MatMulNBits node."""
    from onnxscript.values import Op, Opset

    op = Op(Opset(DOMAIN, 1), "MatMulNBits", _matmul_nbits_schema())
    inputs = (x, packed, scales, zero_points) + ((None, bias) if bias is not None else ())
    return op(*inputs, K=K, N=N, bits=bits, block_size=block_size)


def _matmul_nbits_schema():
    """MatMulNBits' signature (onnx itself has no schemas of onnxruntime's contrib ops)."""
    from onnx.defs import OpSchema

    def param(name: str, type_str: str, optional: bool = False) -> OpSchema.FormalParameter:
        option = OpSchema.FormalParameterOption.Optional if optional else None
        return OpSchema.FormalParameter(
            name, type_str, "", **({"param_option": option} if optional else {})
        )

    ints = [
        OpSchema.Attribute(n, OpSchema.AttrType.INT, "") for n in ("K", "N", "bits", "block_size")
    ]
    return OpSchema(
        "MatMulNBits", DOMAIN, 1,
        inputs=[param("A", "T1"), param("B", "T2"), param("scales", "T1"),
                param("zero_points", "T3", True), param("g_idx", "T4", True),
                param("bias", "T1", True)],
        outputs=[param("Y", "T1")],
        type_constraints=[("T1", ["tensor(float)", "tensor(float16)"], ""),
                          ("T2", ["tensor(uint8)"], ""),
                          ("T3", ["tensor(uint8)", "tensor(float)", "tensor(float16)"], ""),
                          ("T4", ["tensor(int32)"], "")],
        attributes=ints,
    )  # fmt: skip


class NBitsLinear(nn.Module):
    """A `QuantizedLinear` in MatMulNBits' layout, for export only (forward: one custom op)."""

    def __init__(self, layer: QuantizedLinear):
        super().__init__()
        tensors = nbits_tensors(layer)
        for name in ("packed", "scales", "zero_points"):
            self.register_buffer(name, tensors.pop(name))
        self.attrs = tensors
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().float())

    def forward(self, x: Tensor) -> Tensor:
        return matmul_nbits(x, self.packed, self.scales, self.zero_points, self.bias, **self.attrs)


def swap_to_nbits_(model: nn.Module) -> int:
    """Replace every `QuantizedLinear` matmul in `model` by an `NBitsLinear`; returns how many.

    A quantized token embedding becomes a float `nn.Embedding` of its dequantized table (its
    unpacking does not export cleanly to ONNX types yet, so the lookup costs the float table's
    bytes); a tied output head keeps the integers, under the name `output`.
    """
    embedding = getattr(model, "tok_embeddings", None)
    if isinstance(embedding, QuantizedEmbedding):
        model.tok_embeddings = nn.Embedding.from_pretrained(embedding.dequantize(torch.float32))
    names = [
        name
        for name, m in model.named_modules(remove_duplicate=False)
        if isinstance(m, QuantizedLinear) and not name.startswith("tok_embeddings.")
    ]
    for name in names:
        model.set_submodule(name, NBitsLinear(model.get_submodule(name)))
    return len(names)


def matmul_nbits_op():
    """The exporter's key for `matmul_nbits`: its default overload."""
    return torch.ops.lmscale_export.matmul_nbits.default
