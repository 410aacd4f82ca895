"""Weight-only quantization: `quantize_(model, QuantConfig(...))`, in place, in the torchao manner.

Round-to-nearest (RTN), no calibration data:

    int8  per output channel, symmetric:  s = max|w_row| / 127,  q = round(w / s) in -127..127
    int4  per group of g input columns, asymmetric, range widened to hold 0.0:
          lo = min(w_grp, 0), hi = max(w_grp, 0), s = (hi - lo) / 15,
          z = round(-lo / s) in 0..15,  q = clamp(round(w / s) + z, 0, 15)

    int4, zero_point="float" (llama.cpp's Q4_1): the group's own range, a float minimum:
          m = min(w_grp) (float16, rounded down), s = (max(w_grp) - m) / 15,
          q = clamp(round((w - m) / s), 0, 15),  w ~ q * s + m

Either way |w - dequantized w| <= s / 2 for every element: the grid covers the whole range, and
an integer zero point only shifts it by under half a step, which the clamp then absorbs.

The float minimum needs no 0.0 on the grid and no shift, so its step is never wider (a group
all of one sign gets the full 16 levels), and a weight that already lies on a Q4_1 grid (as
SmolLM2's bundled weights do: a dequantized GGUF Q4_1) is reproduced exactly.

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
    ZERO_POINTS,
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
    zero_point: str = "int"
    """int4 (layers and an int4 embedding): "int", an integer zero point in 0..15, or "float",
    a float16 group minimum (llama.cpp's Q4_1)."""

    def __post_init__(self) -> None:
        if self.method == "int4" and self.group_size is None:
            self.group_size = 32
        if self.zero_point not in ZERO_POINTS:
            raise LmscaleError(f"unknown --zero-point '{self.zero_point}' (choose from int, float)")
        if self.zero_point == "float" and "int4" not in (self.method, self.embeddings):
            raise LmscaleError("--zero-point float applies to int4 only (int8 is symmetric)")
        if self.method != "int4" and self.group_size is not None:
            # NOTE: grouped int8 is a layout a GGUF's Q8_0 loads into, not a quantizer of ours
            raise LmscaleError("a group size applies to int4 only (int8 is per output channel)")
        check_layout(self.method, self.group_size, zero_point=self.layer_zero_point)
        if self.embeddings != "float" and self.embeddings not in EMBEDDING_METHODS:
            raise LmscaleError(
                f"unknown --embeddings '{self.embeddings}' (choose from float, int8, int4)"
            )

    @property
    def embedding_group_size(self) -> int | None:
        if self.embeddings != "int4":
            return None
        return self.group_size if self.method == "int4" else 32

    @property
    def layer_zero_point(self) -> str:
        """The block layers' zero point: "int" unless they are int4 with a float one."""
        return self.zero_point if self.method == "int4" else "int"

    @property
    def embedding_zero_point(self) -> str:
        return self.zero_point if self.embeddings == "int4" else "int"

    def as_dict(self) -> dict:
        return {"method": self.method, "group_size": self.group_size,
                "embeddings": self.embeddings, "zero_point": self.zero_point}  # fmt: skip


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


def quantize_int4_float(weight: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Group-wise int4 of a (out, in) weight with a float minimum (Q4_1), packed two per byte.

    The minimum is rounded DOWN to float16 (a float16 minimum, as Q4_1's, stays itself) and the
    scale to the NEAREST float16, so a weight already on a Q4_1 grid gets its own d and m back;
    the scale goes up one float16 step only where nearest would leave the top of the range more
    than half a step off the grid (tiny, subnormal scales).

    Returns:
        (qweight uint8 (out, in/2), scales float32 (out, in/g), mins float32 (out, in/g)),
        w ~ q * scales + mins; both float32 tensors hold float16 values.
    """
    out_features, in_features = weight.shape
    w = weight.detach().float().view(out_features, in_features // group_size, group_size)
    mins = _float16_down(w.amin(dim=-1))  # (out, ng)
    top = w.amax(dim=-1)
    span = top - mins
    scales = (span / 15).clamp(min=2**-24, max=65504).half().float()
    short = mins + 15.5 * scales < top  # nearest rounding left the top uncovered
    scales = torch.where(short, as_float16(span / 15), scales)
    q = torch.round((w - mins[..., None]) / scales[..., None]).clamp(0, 15)
    packed = pack_int4(q.view(out_features, in_features).to(torch.uint8))
    return packed, scales, mins


def _float16_down(values: Tensor) -> Tensor:
    """The largest float16 <= each value, in float32 (clamped to float16's range)."""
    values = values.clamp(min=-65504, max=65504)
    half = values.half()
    down = torch.nextafter(half, torch.tensor(float("-inf"), dtype=torch.float16))
    return torch.where(half.float() > values, down, half).float()


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
    if config.layer_zero_point == "float":
        module.qweight, module.scales, module.mins = quantize_int4_float(
            linear.weight, config.group_size
        )
        return module
    module.qweight, module.scales, zeros = quantize_int4(linear.weight, config.group_size)
    module.zeros = pack_zeros(zeros)
    return module


def _empty_like(linear: nn.Linear, config: QuantConfig) -> QuantizedLinear:
    with torch.device("meta"):  # every buffer is replaced at once; bias copied below
        module = QuantizedLinear(
            linear.in_features, linear.out_features, config.method, config.group_size,
            bias=linear.bias is not None, zero_point=config.layer_zero_point,
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
    table_config = QuantConfig(config.embeddings, config.embedding_group_size,
                               zero_point=config.embedding_zero_point)  # fmt: skip
    check_layout(table_config.method, table_config.group_size, embedding.embedding_dim,
                 where="'tok_embeddings'", zero_point=table_config.zero_point)  # fmt: skip
    output = getattr(model, "output", None)
    tied = isinstance(output, nn.Linear) and output.weight is embedding.weight
    table = nn.Linear(embedding.embedding_dim, embedding.num_embeddings, bias=False,
                      device="meta")  # fmt: skip
    table.weight = embedding.weight  # (vocab, dim): the layout of a (dim -> vocab) head
    quantized = QuantizedEmbedding(embedding.num_embeddings, embedding.embedding_dim,
                                   table_config.method, table_config.group_size,
                                   table_config.zero_point)  # fmt: skip
    quantized.table = HANDLERS[table_config.method](table, table_config)
    model.tok_embeddings = quantized
    if tied:
        model.output = quantized.table
    elif isinstance(output, nn.Linear):
        model.output = HANDLERS[table_config.method](output, table_config)


def quantization_of(model: nn.Module) -> dict | None:
    """The `{"method", "group_size", "zero_point", "modules", "embeddings"}` record of a model.

    None for a float model. This is what a saved model's config.json holds under
    "quantization". "modules" lists the block layers; "embeddings" is None (float) or
    `{"method", "group_size", "tied", "zero_point"}` for a `QuantizedEmbedding` (and its head).
    "zero_point" is "int" or "float" (int4's; a record without it, from before, means "int").
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
    layouts = {(m.method, m.group_size, m.zero_point) for _, m in found}
    if len(layouts) > 1:  # e.g. a GGUF kept quantized with Q4_K and Q8_0 layers
        raise LmscaleError(
            f"the model's layers mix quantized layouts {sorted(layouts, key=str)}: one "
            "quantization record (lmscale's saved format) holds a single layout"
        )
    embeddings = None
    if table is not None:
        tied = getattr(model, "output", None) is table
        embeddings = {"method": table.method, "group_size": table.group_size, "tied": tied,
                      "zero_point": table.zero_point}  # fmt: skip
    return {
        "method": first.method,
        "group_size": first.group_size,
        "zero_point": first.zero_point,
        "modules": [n for n, _ in found],
        "embeddings": embeddings,
    }


def describe(quantization: dict) -> str:
    """E.g. "int4, group size 32, 210 layers" (+ ", int8 embeddings")."""
    group = f", group size {quantization['group_size']}" if quantization["group_size"] else ""
    if quantization.get("zero_point") == "float":
        group += ", float zero point"
    embeddings = quantization.get("embeddings")
    extra = f", {embeddings['method']} embeddings" if embeddings else ""
    return f"{quantization['method']}{group}, {len(quantization['modules'])} layers{extra}"
