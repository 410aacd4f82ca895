"""`QuantizedLinear`: a drop-in for `nn.Linear` whose weight is stored as int8 or packed int4.

This is the storage layout and the matmul, nothing else: turning float weights into these
integers (and choosing which layers) is `lmscale.compress.quantize`. The module lives here, in
pure model code, so that `lmscale.checkpoint` (which may import `lmscale.model` but not
`lmscale.compress`) can rebuild a quantized model straight from its stored integers.

Layouts (`out` = out_features, `in` = in_features, `g` = group_size):

    int8  qweight int8  (out, in)        w = qweight * scales[:, None]           symmetric
          scales  float (out,)           one scale per output channel
    int4  qweight uint8 (out, in/2)      two 4-bit values per byte, low nibble first:
                                         byte j of a row holds columns 2j (low) and 2j+1 (high)
          scales  float (out, in/g)      w = (q - zeros) * scales, per group of g input columns
          zeros   uint8 (out, in/g)      the integer that stands for 0.0 (0..15)  asymmetric

NOTE: the kernels are plain PyTorch (dequantize on the fly, then a float matmul), because
torchao is not a dependency here. The int8 path scales the matmul's output rather than the
weight, so only a cast of the int8 weight is made, never a scaled float copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmscale.errors import LmscaleError

METHODS = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)


def pack_int4(values: Tensor) -> Tensor:
    """(rows, cols) uint8 values in 0..15 -> (rows, cols/2) uint8, column 2j low, 2j+1 high."""
    return values[:, 0::2] | (values[:, 1::2] << 4)


def unpack_int4(packed: Tensor) -> Tensor:
    """The inverse of `pack_int4`: (rows, cols/2) uint8 -> (rows, cols) uint8 in 0..15."""
    pairs = torch.stack((packed & 0x0F, packed >> 4), dim=-1)  # (rows, cols/2, 2)
    return pairs.view(packed.shape[0], -1)


class QuantizedLinear(nn.Module):
    """y = x W^T + b with W held as integers and scales (see the module docstring's layouts).

    Args:
        in_features, out_features, bias: as for `nn.Linear`.
        method: "int8" (per output channel, symmetric) or "int4" (group-wise, asymmetric).
        group_size: input columns per int4 group (32, 64 or 128, dividing `in_features`).

    The buffers are allocated empty: `lmscale.compress.quantize` fills them from a float
    weight, and a checkpoint loader assigns the stored tensors.
    """

    def __init__(
        self, in_features: int, out_features: int, method: str, group_size: int | None = None,
        bias: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        check_layout(method, group_size, in_features)
        self.in_features, self.out_features = in_features, out_features
        self.method, self.group_size = method, group_size
        if method == "int8":
            self.register_buffer(
                "qweight", torch.empty(out_features, in_features, dtype=torch.int8)
            )
            self.register_buffer("scales", torch.empty(out_features))
        else:
            n_groups = in_features // group_size
            packed = torch.empty(out_features, in_features // 2, dtype=torch.uint8)
            self.register_buffer("qweight", packed)
            self.register_buffer("scales", torch.empty(out_features, n_groups))
            self.register_buffer("zeros", torch.empty(out_features, n_groups, dtype=torch.uint8))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        if self.method == "int8":
            # (x @ q^T) * s equals x @ (q * s)^T up to rounding: the scale is per output column.
            y = F.linear(x, self.qweight.to(x.dtype)) * self.scales.to(x.dtype)
            return y if self.bias is None else y + self.bias.to(x.dtype)
        return F.linear(x, self.dequantize(x.dtype), self.bias)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The float weight (out, in) these integers stand for, in `dtype` (default: the scales')."""
        dtype = dtype or self.scales.dtype
        if self.method == "int8":
            return self.qweight.to(dtype) * self.scales.to(dtype)[:, None]
        n_groups = self.scales.shape[1]
        q = unpack_int4(self.qweight).view(self.out_features, n_groups, -1)  # (out, ng, g)
        zeros = self.zeros.to(dtype)[..., None]  # (out, ng, 1)
        w = (q.to(dtype) - zeros) * self.scales.to(dtype)[..., None]
        return w.view(self.out_features, self.in_features)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.method == "int4" else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"method={self.method}{group}, bias={self.bias is not None}"
        )


def check_layout(
    method: str, group_size: int | None, in_features: int | None = None, where: str = "the layer"
) -> None:
    """Raise LmscaleError unless (method, group_size) names a layout this module can hold.

    Args:
        method, group_size: the layout (see `QuantizedLinear`).
        in_features: the input width of a layer to hold it, if one is in view.
        where: the layer, named in the message.
    """
    if method not in METHODS:
        raise LmscaleError(f"unknown quantization method '{method}' (choose from int8, int4)")
    if method == "int8":
        if group_size is not None:
            raise LmscaleError("a group size applies to int4 only (int8 is per output channel)")
        return
    if group_size not in GROUP_SIZES:
        raise LmscaleError(f"int4 group size must be 32, 64 or 128, got {group_size}")
    if in_features is not None and in_features % group_size:
        raise LmscaleError(
            f"int4 group size {group_size} does not divide the input width {in_features} of {where}"
        )


def swap_in_quantized_(
    model: nn.Module, names: list[str], method: str, group_size: int | None
) -> nn.Module:
    """Replace the `nn.Linear` at each fully-qualified name by an empty `QuantizedLinear`.

    A loader calls this on a model built on the meta device, then assigns the stored tensors.

    Args:
        model: the model to change in place.
        names: e.g. ["layers.0.attention.wq", ...].
        method, group_size: the layout (see `QuantizedLinear`).

    Returns:
        The same model.
    """
    for name in names:
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            linear = None
        if not isinstance(linear, nn.Linear):
            raise LmscaleError(f"cannot quantize '{name}': the model has no linear layer there")
        quantized = QuantizedLinear(
            linear.in_features, linear.out_features, method, group_size, linear.bias is not None
        )
        model.set_submodule(name, quantized)
    return model
