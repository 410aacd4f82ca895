"""Weight-only quantization: `quantize_(model, QuantConfig(...))`, in place, in the torchao manner.

Round-to-nearest (RTN), no calibration data:

    int8  per output channel, symmetric:  s = max|w_row| / 127,  q = round(w / s) in -127..127
    int4  per group of g input columns, asymmetric, range widened to hold 0.0:
          lo = min(w_grp, 0), hi = max(w_grp, 0), s = (hi - lo) / 15,
          z = round(-lo / s) in 0..15,  q = clamp(round(w / s) + z, 0, 15)

Either way |w - dequantized w| <= s / 2 for every element: the grid covers the whole range, and
an integer zero point only shifts it by under half a step, which the clamp then absorbs.

Scales are rounded to float16 (the on-disk dtype) before the integers are chosen, so the bound
holds for the stored scale and a saved model computes exactly what the in-memory one does.

"int8-dynamic" stores the int8 weights; its layers also quantize activations at run time.

What is quantized: every `nn.Linear` inside the Transformer blocks (attention wq/wk/wv/wo,
MLP w1/w2/w3), ~80% of SmolLM2-135M's weights, and, with `embeddings="int8"|"int4"`, the token
embedding table too. In SmolLM2 (and GPT-2) the output head *is* that table (tied): it then
becomes the embedding's `QuantizedLinear`, one copy of the integers for the lookup and the
logits. An untied head is quantized with the embedding's layout. A `filter_fn(module, fqn)`
picks other linear layers.

NOTE: the layouts and the matmul (`QuantizedLinear`) are in `lmscale.model.quantized` so that
checkpoint loading can rebuild them without importing this package.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lmscale.errors import LmscaleError
from lmscale.model.quantized import (
    EMBEDDING_METHODS,
    QuantizedEmbedding,
    QuantizedLinear,
    check_layout,
    pack_int4,
    pack_zeros,
)

FilterFn = Callable[[nn.Module, str], bool]


@dataclass
class QuantConfig:
    """How to quantize a model's weights."""

    method: str = "int8"
    """int8 (per output channel, symmetric), int8-dynamic (the same, int8 activations at run
    time) or int4 (group-wise, asymmetric)."""
    group_size: int | None = None
    """int4 only: input columns sharing one scale and zero point (32, 64 or 128; default 32)."""
    embeddings: str = "float"
    """The token embedding (and a tied or untied output head): float, int8 or int4 (int4 uses
    `group_size`, or 32 when the method is not int4)."""

    def __post_init__(self) -> None:
        if self.method == "int4" and self.group_size is None:
            self.group_size = 32
        check_layout(self.method, self.group_size)
        if self.embeddings != "float" and self.embeddings not in EMBEDDING_METHODS:
            raise LmscaleError(
                f"unknown --embeddings '{self.embeddings}' (choose from float, int8, int4)"
            )

    @property
    def embedding_group_size(self) -> int | None:
        if self.embeddings != "int4":
            return None
        return self.group_size if self.method == "int4" else 32

    def as_dict(self) -> dict:
        return {"method": self.method, "group_size": self.group_size,
                "embeddings": self.embeddings}  # fmt: skip


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel int8 of a (out, in) weight.

    Returns:
        (qweight int8 (out, in), scales float32 (out,)).
    """
    w = weight.detach().float()
    scales = as_float16(w.abs().amax(dim=1) / 127)  # (out,); an all-zero row stays zero
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def quantize_int4(weight: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric group-wise int4 of a (out, in) weight, packed two values per byte.

    Returns:
        (qweight uint8 (out, in/2), scales float32 (out, in/g), zeros uint8 (out, in/g));
        the zeros are unpacked here (`pack_zeros` packs them for the module).
    """
    out_features, in_features = weight.shape
    w = weight.detach().float().view(out_features, in_features // group_size, group_size)
    lo = w.amin(dim=-1).clamp(max=0.0)  # (out, ng)
    hi = w.amax(dim=-1).clamp(min=0.0)
    scales = as_float16((hi - lo) / 15)
    zeros = torch.round(-lo / scales).clamp(0, 15)
    q = (torch.round(w / scales[..., None]) + zeros[..., None]).clamp(0, 15)  # (out, ng, g)
    packed = pack_int4(q.view(out_features, in_features).to(torch.uint8))
    return packed, scales, zeros.to(torch.uint8)


def as_float16(scales: Tensor) -> Tensor:
    """Scales rounded UP to float16 (as they are saved), in float32, never 0.

    Up, so the grid still spans the whole range (127 or 15 steps cover it) and the half-step
    bound holds for the stored scale. The smallest float16 (2**-24) is the floor: a group whose
    range is below it (an all-zero row) is all zeros.
    """
    scales = scales.clamp(min=2**-24, max=65504)
    half = scales.half()
    up = torch.nextafter(half, torch.tensor(float("inf"), dtype=torch.float16))
    return torch.where(half.float() < scales, up, half).float()


def _int8_linear(linear: nn.Linear, config: QuantConfig) -> QuantizedLinear:
    module = _empty_like(linear, config)
    module.qweight, module.scales = quantize_int8(linear.weight)
    return module


def _int4_linear(linear: nn.Linear, config: QuantConfig) -> QuantizedLinear:
    module = _empty_like(linear, config)
    module.qweight, module.scales, zeros = quantize_int4(linear.weight, config.group_size)
    module.zeros = pack_zeros(zeros)
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
    "int8-dynamic": _int8_linear,
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
    quantize_embeddings_(model, config)
    return names


def quantize_embeddings_(model: nn.Module, config: QuantConfig) -> None:
    """Quantize `model.tok_embeddings` (and `model.output`: tied, it becomes the same table).

    Does nothing when `config.embeddings` is "float".
    """
    if config.embeddings == "float":
        return
    embedding = getattr(model, "tok_embeddings", None)
    if not isinstance(embedding, nn.Embedding):
        raise LmscaleError("the model has no token embedding (tok_embeddings) to quantize")
    table_config = QuantConfig(config.embeddings, config.embedding_group_size)
    check_layout(table_config.method, table_config.group_size, embedding.embedding_dim,
                 where="'tok_embeddings'")  # fmt: skip
    output = getattr(model, "output", None)
    tied = isinstance(output, nn.Linear) and output.weight is embedding.weight
    table = nn.Linear(embedding.embedding_dim, embedding.num_embeddings, bias=False,
                      device="meta")  # fmt: skip
    table.weight = embedding.weight  # (vocab, dim): the layout of a (dim -> vocab) head
    quantized = QuantizedEmbedding(embedding.num_embeddings, embedding.embedding_dim,
                                   table_config.method, table_config.group_size)  # fmt: skip
    quantized.table = HANDLERS[table_config.method](table, table_config)
    model.tok_embeddings = quantized
    if tied:
        model.output = quantized.table
    elif isinstance(output, nn.Linear):
        model.output = HANDLERS[table_config.method](output, table_config)


def quantization_of(model: nn.Module) -> dict | None:
    """The `{"method", "group_size", "modules", "embeddings"}` record of a quantized model.

    None for a float model. This is what a saved model's config.json holds under
    "quantization". "modules" lists the block layers; "embeddings" is None (float) or
    `{"method", "group_size", "tied"}` for a `QuantizedEmbedding` (and its head).
    """
    embedding = getattr(model, "tok_embeddings", None)
    table = embedding.table if isinstance(embedding, QuantizedEmbedding) else None
    found = [
        (n, m) for n, m in model.named_modules()
        if isinstance(m, QuantizedLinear) and m is not table
        and not (table is not None and n == "output")
    ]  # fmt: skip
    if not found and table is None:
        return None
    first = found[0][1] if found else table
    embeddings = None
    if table is not None:
        tied = getattr(model, "output", None) is table
        embeddings = {"method": table.method, "group_size": table.group_size, "tied": tied}
    return {
        "method": first.method,
        "group_size": first.group_size,
        "modules": [n for n, _ in found],
        "embeddings": embeddings,
    }


def describe(quantization: dict) -> str:
    """E.g. "int4, group size 32, 210 layers" (+ ", int8 embeddings")."""
    group = f", group size {quantization['group_size']}" if quantization["group_size"] else ""
    embeddings = quantization.get("embeddings")
    extra = f", {embeddings['method']} embeddings" if embeddings else ""
    return f"{quantization['method']}{group}, {len(quantization['modules'])} layers{extra}"
