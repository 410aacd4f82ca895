"""Weight-only quantization: `quantize_(model, QuantConfig(...))`, in place, in the torchao manner.

Round-to-nearest (RTN), no calibration data:

    int8  per output channel, symmetric:  s = max|w_row| / 127,  q = round(w / s) in -127..127
    int4  per group of g input columns, asymmetric, range widened to hold 0.0:
          lo = min(w_grp, 0), hi = max(w_grp, 0), s = (hi - lo) / 15,
          z = round(-lo / s) in 0..15,  q = clamp(round(w / s) + z, 0, 15)

Either way |w - dequantized w| <= s / 2 for every element: the grid covers the whole range, and
an integer zero point only shifts it by under half a step, which the clamp then absorbs.

What is quantized by default: every `nn.Linear` inside the Transformer blocks (attention
wq/wk/wv/wo, MLP w1/w2/w3), ~80% of SmolLM2-135M's weights. The token embedding and the output
head stay in float: in SmolLM2 (and GPT-2) the head *is* the embedding table (tied), a lookup
table gains no matmul speed from integers, and the logits are where rounding hurts quality most
(llama.cpp likewise keeps them at higher precision). A `filter_fn(module, fqn)` picks others.

NOTE: the layouts and the matmul (`QuantizedLinear`) are in `lmscale.model.quantized` so that
checkpoint loading can rebuild them without importing this package; its kernels are plain
PyTorch, because torchao is not a dependency here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lmscale.errors import LmscaleError
from lmscale.model.quantized import QuantizedLinear, check_layout, pack_int4

FilterFn = Callable[[nn.Module, str], bool]


@dataclass
class QuantConfig:
    """How to quantize a model's weights."""

    method: str = "int8"
    """int8 (per output channel, symmetric) or int4 (group-wise, asymmetric)."""
    group_size: int | None = None
    """int4 only: input columns sharing one scale and zero point (32, 64 or 128; default 32)."""

    def __post_init__(self) -> None:
        if self.method == "int4" and self.group_size is None:
            self.group_size = 32
        check_layout(self.method, self.group_size)

    def as_dict(self) -> dict:
        return {"method": self.method, "group_size": self.group_size}


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel int8 of a (out, in) weight.

    Returns:
        (qweight int8 (out, in), scales float32 (out,)).
    """
    w = weight.detach().float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # (out,); an all-zero row stays zero
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def quantize_int4(weight: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric group-wise int4 of a (out, in) weight, packed two values per byte.

    Returns:
        (qweight uint8 (out, in/2), scales float32 (out, in/g), zeros uint8 (out, in/g)).
    """
    out_features, in_features = weight.shape
    w = weight.detach().float().view(out_features, in_features // group_size, group_size)
    lo = w.amin(dim=-1).clamp(max=0.0)  # (out, ng)
    hi = w.amax(dim=-1).clamp(min=0.0)
    scales = ((hi - lo) / 15).clamp(min=1e-12)
    zeros = torch.round(-lo / scales).clamp(0, 15)
    q = (torch.round(w / scales[..., None]) + zeros[..., None]).clamp(0, 15)  # (out, ng, g)
    packed = pack_int4(q.view(out_features, in_features).to(torch.uint8))
    return packed, scales, zeros.to(torch.uint8)


def _int8_linear(linear: nn.Linear, config: QuantConfig) -> QuantizedLinear:
    module = _empty_like(linear, config)
    module.qweight, module.scales = quantize_int8(linear.weight)
    return module


def _int4_linear(linear: nn.Linear, config: QuantConfig) -> QuantizedLinear:
    module = _empty_like(linear, config)
    module.qweight, module.scales, module.zeros = quantize_int4(linear.weight, config.group_size)
    return module


def _empty_like(linear: nn.Linear, config: QuantConfig) -> QuantizedLinear:
    with torch.device("meta"):  # every buffer is replaced at once; bias copied below
        module = QuantizedLinear(
            linear.in_features, linear.out_features, config.method, config.group_size,
            bias=linear.bias is not None,
        )  # fmt: skip
    if linear.bias is not None:
        module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return module


HANDLERS: dict[str, Callable[[nn.Linear, QuantConfig], QuantizedLinear]] = {
    "int8": _int8_linear,
    "int4": _int4_linear,
}
"""One function per method: a float `nn.Linear` in, its `QuantizedLinear` out."""


def in_blocks(module: nn.Module, fqn: str) -> bool:
    """The default filter: linear layers of the Transformer blocks (not embedding, not head)."""
    return isinstance(module, nn.Linear) and fqn.startswith("layers.")


@torch.no_grad()
def quantize_(model: nn.Module, config: QuantConfig, filter_fn: FilterFn = in_blocks) -> list[str]:
    """Replace the chosen `nn.Linear` modules of `model` by `QuantizedLinear`, in place.

    The quantized modules keep the device of the float weights; scales are float32.

    Args:
        model: a float model, e.g. `lmscale.model.Transformer`.
        config: the method and group size.
        filter_fn: `(module, fully-qualified name) -> bool`; only `nn.Linear` modules qualify.

    Returns:
        The fully-qualified names of the replaced modules, in model order.

    Raises:
        LmscaleError: the model is already quantized, or the group size does not divide a
            chosen layer's input width (nothing is changed then).
    """
    already = quantization_of(model)
    if already is not None:
        raise LmscaleError(
            f"the model is already quantized ({describe(already)}); quantize its float original"
        )
    names = [
        name for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and filter_fn(module, name)
    ]  # fmt: skip
    for name in names:
        width = model.get_submodule(name).in_features
        check_layout(config.method, config.group_size, width, where=f"'{name}'")
    handler = HANDLERS[config.method]
    for name in names:
        model.set_submodule(name, handler(model.get_submodule(name), config))
    return names


def quantization_of(model: nn.Module) -> dict | None:
    """The `{"method", "group_size", "modules"}` record of a quantized model, or None.

    This is what a saved model's config.json holds under "quantization".
    """
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    if not found:
        return None
    first = found[0][1]
    return {
        "method": first.method,
        "group_size": first.group_size,
        "modules": [n for n, _ in found],
    }


def describe(quantization: dict) -> str:
    """E.g. "int4, group size 32, 210 layers"."""
    group = f", group size {quantization['group_size']}" if quantization["group_size"] else ""
    return f"{quantization['method']}{group}, {len(quantization['modules'])} layers"
