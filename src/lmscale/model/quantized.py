"""`QuantizedLinear` / `QuantizedEmbedding`: int8 or packed int4 weights, and their fast kernels.

This is the storage layout and the matmul, nothing else: turning float weights into these
integers (and choosing which layers) is `lmscale.compress.quantize`. The modules live here, in
pure model code, so that `lmscale.checkpoint` (which may import `lmscale.model` but not
`lmscale.compress`) can rebuild a quantized model straight from its stored integers.

Layouts (`out` = out_features, `in` = in_features, `g` = group_size, `ng` = in/g):

    int8  qweight int8  (out, in)        w = qweight * scales[:, None]           symmetric
          scales  float (out,)           one scale per output channel
    int8, group_size g                   llama.cpp's Q8_0 (g = 32): one scale per group
          scales  float (out, ng)        w = qweight * scales, per group of g input columns
    int8-dynamic                         the int8 layout; activations are quantized too (below)
    int4  qweight uint8 (out, in/2)      two 4-bit values per byte, low nibble first:
                                         byte j of a row holds columns 2j (low) and 2j+1 (high)
          scales  float (out, ng)        w = (q - zeros) * scales, per group of g input columns
          zeros   uint8 (out, ceil(ng/2)) the integer that stands for 0.0 (0..15), packed as
                                         qweight is (a row with an odd ng ends in a zero nibble)
    int4, zero_point="float"             llama.cpp's Q4_1: a float minimum, not an integer zero
          qweight uint8 (out, in/2)      as above
          scales  float (out, ng)        w = q * scales + mins, per group of g input columns
          mins    float (out, ng)        the group's value at q = 0 (no `zeros` buffer)

The float layout exists because an integer zero point cannot hold a Q4_1 model: SmolLM2 as
bundled is a dequantized GGUF Q4_1 (group 32, w = q * d + m, float16 d and m), and only a float
minimum puts its grid back exactly (perplexity on 2,048 Hamlet tokens: float = float-zero RTN
g32, while integer-zero RTN g32 costs +25.7%). `codes()` still returns (q, scales, zeros) with
dequantized = (q - zeros) * scales: for the float layout zeros = -mins / scales (not integers).

Scales (and mins) are held in the model's float dtype and written to disk as float16 (`compress.save`);
`lmscale.compress.quantize` rounds them to float16 first, so a saved model equals the in-memory
one. The saved layout is the portable one; each kernel derives its own packed form of the same
integers once, on first use (`_kernel_state`, rebuilt when the buffers, dtype or device change).

Kernels (CPU; any other device runs the reference: dequantize, then `F.linear`):

    lmscale's own  up to `lmscale.kernels.MAX_ROWS` (8) rows, int8 of both layouts and int4 of
                  both zero points, eager and compiled: `torch.ops.lmscale.int4_matvec` /
                  `int8_matvec` over the stored codes (see `lmscale.kernels`; on an AVX-512
                  VNNI CPU they round the activations to int8 per 32 columns). Where they could
                  not be built, the kernels below serve every row count.

    compiled, a few rows  inside a compiled CPU graph of at most `MATVEC_MAX_ROWS` rows (the
                  decode step), int8 of both layouts runs as a product summed over the input
                  (`lmscale.model.layout.matvec`'s form, in float32): inductor streams the int8
                  codes at close to the memory bandwidth, where the bf16 kernel reads them at
                  about half of it

    int8          per-channel: `torch._weight_int8pack_mm` on bfloat16 activations (its float32
                  path is ~10x slower than a float32 matmul here; float16 has no fast CPU path
                  either); grouped: no eager kernel, the reference (a block of rows at a time)
    int8-dynamic  each token (row of x) is quantized to int8 at run time (symmetric, its own
                  scale), then `torch._int_mm` (int8 x int8 -> int32) and one rescale. NOTE:
                  fbgemm's `quantized::linear_dynamic` was tried first: it uses ONE scale for
                  the whole input, and SmolLM2's outlier activations then cost perplexity
                  17.7 -> 28.8 (reduce_range=True: 56.5) on 1,024 Hamlet tokens
    int4          `torch._weight_int4pack_mm_for_cpu` on bfloat16 activations; its contract
                  (checked by tests): weight = `_convert_weight_to_int4pack_for_cpu(q int32
                  (N, K) in 0..15, inner_k_tiles)`, N a multiple of 16 (we pad), group 32..256
                  dividing K, scales_and_zeros (K/g, N, 2) in x's dtype with
                  w = (q - 8) * scale + zero, so zero = (8 - our zero point) * scale,
                  or, for the float layout, zero = min + 8 * scale

Float32 activations are cast to bfloat16 for the int8/int4 kernels and the result cast back:
that bfloat16 rounding is the only difference from the reference (tests bound it; the
perplexity cost on SmolLM2 is in BENCHMARKS.md / bench/compress.py).

NOTE: torchao is not used; it gives no speed on the CPU here. Tried (torchao 0.18, torch 2.13,
2-core AMD EPYC with AVX-512 BF16/VNNI; 40 linears 576 -> 1536 at batch 1, 2 threads, busy
machine; float32 34 ms per pass, bf16 145 ms):
    Int8WeightOnlyConfig (bf16)                    236 ms   (Int8Tensor subclass, eager dispatch)
    Int8WeightOnlyConfig (fp32)                    564 ms
    Int8DynamicActivationInt8WeightConfig (fp32)  1153 ms
    Int4WeightOnlyConfig(group_size=32)            ImportError: requires mslk >= 1.0.0 (a GPU
                                                   kernel library); int4_packing_format="opaque"
                                                   (its former CPU format) is "Unsupported"
while the raw ops it wraps (`torch._weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`) beat
float32 in whole-model decoding (bench/compress.py). So the raw ops are called directly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmscale import kernels
from lmscale.errors import LmscaleError
from lmscale.model.layout import MATVEC_MAX_ROWS, realized

METHODS = ("int8", "int8-dynamic", "int4")
EMBEDDING_METHODS = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)
ZERO_POINTS = ("int", "float")
"""int4's zero point: an integer in 0..15 (packed `zeros`) or a float minimum (`mins`)."""

_KERNEL_DTYPE = torch.bfloat16
"""The activation dtype of the CPU weight-only kernels (the only one they are fast in)."""

use_kernels = True
"""Set False to run every quantized layer through the reference path (tests, benchmarks)."""


def pack_int4(values: Tensor) -> Tensor:
    """(rows, cols) uint8 values in 0..15 -> (rows, cols/2) uint8, column 2j low, 2j+1 high."""
    return values[:, 0::2] | (values[:, 1::2] << 4)


def unpack_int4(packed: Tensor) -> Tensor:
    """The inverse of `pack_int4`: (rows, cols/2) uint8 -> (rows, cols) uint8 in 0..15."""
    pairs = torch.stack((packed & 0x0F, packed >> 4), dim=-1)  # (rows, cols/2, 2)
    return pairs.view(packed.shape[0], -1)


def pack_zeros(zeros: Tensor) -> Tensor:
    """(out, ng) zero points in 0..15 -> (out, ceil(ng/2)) bytes (an odd ng padded with 0)."""
    if zeros.shape[1] % 2:
        zeros = F.pad(zeros, (0, 1))
    return pack_int4(zeros)


class _RecomputedMatmul(torch.autograd.Function):
    """y = layer(x) with a gradient for x only, the float weight dequantized again in backward.

    Autograd would otherwise keep each frozen layer's dequantized float weight from forward to
    backward, which gives back all the memory the integers saved (QLoRA). The layer's weights
    and bias are frozen: no gradient for them.
    """

    @staticmethod
    def forward(ctx, x: Tensor, layer: QuantizedLinear) -> Tensor:
        ctx.layer = layer
        with torch.no_grad():
            return layer.reference(x)

    @staticmethod
    def backward(ctx, grad_y: Tensor) -> tuple[Tensor, None]:
        weight = ctx.layer.dequantize(grad_y.dtype)  # (out, in), rebuilt, dropped after use
        return grad_y @ weight, None


class QuantizedLinear(nn.Module):
    """y = x W^T + b with W held as integers and scales (see the module docstring's layouts).

    Args:
        in_features, out_features, bias: as for `nn.Linear`.
        method: "int8" (symmetric, per output channel or per group), "int8-dynamic" (per
            channel, int8 activations) or "int4" (group-wise, asymmetric).
        group_size: input columns per group (32, 64 or 128, dividing `in_features`): int4's,
            or int8's grouped layout (Q8_0); None for per-channel int8.
        zero_point: int4 only: "int" (packed integer zeros) or "float" (float16 minimums).

    The buffers are allocated empty: `lmscale.compress.quantize` fills them from a float
    weight (or `from_codes` from integer codes), and a checkpoint loader assigns stored tensors.
    """

    def __init__(
        self, in_features: int, out_features: int, method: str, group_size: int | None = None,
        bias: bool = False, zero_point: str = "int",
    ) -> None:  # fmt: skip
        super().__init__()
        check_layout(method, group_size, in_features, zero_point=zero_point)
        self.in_features, self.out_features = in_features, out_features
        self.method, self.group_size = method, group_size
        self.zero_point = zero_point
        if method in ("int8", "int8-dynamic"):
            self.register_buffer(
                "qweight", torch.empty(out_features, in_features, dtype=torch.int8)
            )
            scales_shape = (out_features,) if group_size is None else (
                out_features, in_features // group_size)  # fmt: skip
            self.register_buffer("scales", torch.empty(scales_shape))
        else:
            n_groups = in_features // group_size
            packed = torch.empty(out_features, in_features // 2, dtype=torch.uint8)
            self.register_buffer("qweight", packed)
            self.register_buffer("scales", torch.empty(out_features, n_groups))
            if zero_point == "float":
                self.register_buffer("mins", torch.empty(out_features, n_groups))
            else:
                zeros = torch.empty(out_features, (n_groups + 1) // 2, dtype=torch.uint8)
                self.register_buffer("zeros", zeros)
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self._kernel: dict = {}  # form -> (key, derived tensors): see `_kernel_state`

    def __getstate__(self) -> dict:
        """Pickling / deepcopy leave the derived kernel forms out (rebuilt on first use)."""
        return {**super().__getstate__(), "_kernel": {}}

    # --- codes -----------------------------------------------------------------------------

    def codes(self) -> tuple[Tensor, Tensor, Tensor | None]:
        """The integer codes, unpacked: dequantized = (q - zeros) * scales, per group.

        Returns:
            q: int8 (out, in) for int8 layouts, uint8 (out, in) in 0..15 for int4;
            scales: float32 (out,) for per-channel int8, (out, in/g) for groups;
            zeros: float32 (out, in/g) for int4 (integers in 0..15; for the float layout
                -mins / scales, any real), None for int8 (symmetric).
        """
        if self.method != "int4":
            return self.qweight.clone(), self.scales.float(), None
        if self.zero_point == "float":
            scales = self.scales.float()
            return unpack_int4(self.qweight), scales, -self.mins.float() / scales
        n_groups = self.in_features // self.group_size
        zeros = unpack_int4(self.zeros)[:, :n_groups].float()
        return unpack_int4(self.qweight), self.scales.float(), zeros

    @classmethod
    def from_codes(
        cls, q: Tensor, scales: Tensor, zeros: Tensor | None, method: str,
        group_size: int | None = None, bias: Tensor | None = None, zero_point: str = "int",
    ) -> QuantizedLinear:  # fmt: skip
        """A layer holding these codes (the inverse of `codes`); scales are kept as given.

        Args:
            q: (out, in) integer codes: -127..127 for int8 layouts, 0..15 for int4.
            scales: (out,) for per-channel int8, (out, in/g) for groups; their dtype is the
                layer's.
            zeros: (out, in/g) zero points for int4: integer-valued in 0..15, or any real for
                zero_point="float" (stored as mins = -zeros * scales), None for int8.
            method, group_size, zero_point: the layout.
            bias: (out,) or None.
        """
        out_features, in_features = q.shape
        check_layout(method, group_size, in_features, zero_point=zero_point)
        scales = scales.detach()
        with torch.device("meta"):
            layer = cls(in_features, out_features, method, group_size, bias is not None,
                        zero_point)  # fmt: skip
        if method == "int4":
            n_groups = in_features // group_size
            if zeros is None or tuple(zeros.shape) != (out_features, n_groups):
                raise LmscaleError(f"int4 codes need zeros of shape {(out_features, n_groups)}")
            if int(q.min()) < 0 or int(q.max()) > 15:
                raise LmscaleError("int4 codes must lie in 0..15")
            layer.qweight = pack_int4(q.to(torch.uint8))
            if zero_point == "float":
                if not bool(torch.isfinite(zeros).all()):
                    raise LmscaleError("int4 float zero points must be finite")
                # rounded to float16, the dtype they are saved in: a saved layer equals this one
                mins = -zeros.detach().float() * scales.float()
                layer.mins = mins.clamp(-65504, 65504).half().to(scales.dtype)
            else:
                if int(zeros.min()) < 0 or zeros.max() > 15:
                    raise LmscaleError("int4 codes and zero points must lie in 0..15")
                layer.zeros = pack_zeros(torch.round(zeros).to(torch.uint8))
        else:
            if zeros is not None and bool(zeros.ne(0).any()):
                raise LmscaleError("int8 is symmetric: its zero points must be None (or 0)")
            if int(q.min()) < -128 or int(q.max()) > 127:
                raise LmscaleError("int8 codes must lie in -128..127")
            layer.qweight = q.to(torch.int8)
        expected = (
            (out_features,) if group_size is None else (out_features, in_features // group_size)
        )
        if tuple(scales.shape) != expected:
            raise LmscaleError(
                f"{method} scales must have shape {expected}, got {tuple(scales.shape)}"
            )
        layer.scales = scales.clone()
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return layer

    # --- the matmul --------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        # NOTE: the kernels have no backward; when a gradient must flow through to the input
        # (QLoRA: adapters in earlier layers), the differentiable reference matmul runs instead.
        needs_grad = torch.is_grad_enabled() and x.requires_grad
        if needs_grad and (self.bias is None or not self.bias.requires_grad):
            return _RecomputedMatmul.apply(x, self)
        if not use_kernels or needs_grad or x.device.type != "cpu" or x.dtype not in _FLOATS:
            return self.reference(x)
        rows = x.numel() // self.in_features
        if rows <= kernels.MAX_ROWS and self._native_ready():
            return self._native_matvec(x)
        if self.method == "int8" and torch.compiler.is_compiling() and rows <= MATVEC_MAX_ROWS:
            return self._int8_matvec(x)
        if self.method == "int8" and self.group_size is not None:
            return self.reference(x)  # no eager kernel for groups
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.method == "int8-dynamic":
            weight_t, scales = self._kernel_state(torch.float32)
            x2 = x2.float()
            x_scales = x2.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127  # per token
            x_int8 = torch.round(x2 / x_scales).to(torch.int8)
            y = torch._int_mm(x_int8, weight_t) * (x_scales * scales)
        elif self.method == "int8":
            weight, scales = self._kernel_state(_KERNEL_DTYPE)
            y = torch._weight_int8pack_mm(x2.to(_KERNEL_DTYPE).contiguous(), weight, scales)
        else:
            weight, scales_and_zeros = self._kernel_state(_KERNEL_DTYPE)
            y = torch._weight_int4pack_mm_for_cpu(
                x2.to(_KERNEL_DTYPE).contiguous(), weight, self.group_size, scales_and_zeros
            )[:, : self.out_features]  # fmt: skip
        y = y.to(x.dtype).view(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def _native_ready(self) -> bool:
        """Whether lmscale's own CPU matvec kernels (`lmscale.kernels`) take this layer.

        Eagerly the first call builds them (once per machine); a compiled graph only asks
        whether they are loaded (`prepare_kernel` loads them before compiling).
        """
        if self.method == "int8-dynamic" or self.in_features % 32:
            return False
        return kernels.loaded() if torch.compiler.is_compiling() else kernels.load()

    def _native_matvec(self, x: Tensor) -> Tensor:
        """x W^T for a few rows through `torch.ops.lmscale` (see `lmscale.kernels`)."""
        x2 = x.reshape(-1, self.in_features).float()
        if self.method == "int4":
            qweight, scales, mins = self._kernel_state("native")
            y = torch.ops.lmscale.int4_matvec(x2, qweight, scales, mins, self.group_size)
        else:
            qweight, scales = self._kernel_state("native")
            group = self.group_size or self.in_features
            y = torch.ops.lmscale.int8_matvec(x2, qweight, scales, group)
        y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def _int8_matvec(self, x: Tensor) -> Tensor:
        """x W^T for a few rows, as products summed over the input in float32 (see the module
        docstring: compiled only; eagerly this would materialise every product)."""
        q, x = self.qweight.float(), realized(x)
        if self.group_size is None:
            y = (x.float()[..., None, :] * q).sum(-1) * self.scales.float()
        else:
            n_groups = self.in_features // self.group_size
            grouped = x.float().reshape(*x.shape[:-1], 1, n_groups, self.group_size)
            q = q.view(self.out_features, n_groups, self.group_size)
            y = (grouped * q * self.scales.float()[..., None]).sum((-1, -2))
        y = y.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def reference(self, x: Tensor) -> Tensor:
        """The plain PyTorch matmul these kernels must equal: dequantize, then `F.linear`."""
        if self.method != "int4" and self.group_size is None:
            # (x @ q^T) * s equals x @ (q * s)^T up to rounding: the scale is per output column.
            y = F.linear(x, self.qweight.to(x.dtype)) * self.scales.to(x.dtype)
            return y if self.bias is None else y + self.bias.to(x.dtype)
        if self.method != "int4":
            return self._grouped_int8_reference(x)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize(x.dtype), bias)

    def _grouped_int8_reference(self, x: Tensor) -> Tensor:
        """`reference` of grouped int8, a block of output rows at a time.

        NOTE: dequantizing SmolLM2's whole 49152-row table (113 MB of float32) for each step
        made eager batch-1 decoding ~40x slower; per block, a few rows take the per-group
        dot products times the scales (no float weight is made), more rows a float block
        that is still in cache when the matmul reads it.
        """
        n_groups, group = self.in_features // self.group_size, self.group_size
        x_groups = x.reshape(-1, n_groups, group)  # (rows, ng, g)
        few = x_groups.shape[0] <= _FEW_ROWS
        blocks = []
        for start in range(0, self.out_features, _ROWS_PER_BLOCK):
            q = self.qweight[start : start + _ROWS_PER_BLOCK].to(x.dtype).view(-1, n_groups, group)
            scales = self.scales[start : start + _ROWS_PER_BLOCK].to(x.dtype)
            if few:
                blocks.append((torch.einsum("ogk,rgk->rog", q, x_groups) * scales).sum(-1))
            else:
                weight = (q * scales[..., None]).view(-1, self.in_features)
                blocks.append(F.linear(x_groups.view(-1, self.in_features), weight))
        y = torch.cat(blocks, dim=-1).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def prepare_kernel(self) -> None:
        """Derive the kernels' packed forms now (a compiled graph can only read them, see below)."""
        if self.qweight.device.type != "cpu":
            return
        if self._native_ready():
            self._kernel_state("native")
        if self.method == "int8" and self.group_size is not None:
            return  # no other kernel: the reference, or `_int8_matvec` compiled
        self._kernel_state(torch.float32 if self.method == "int8-dynamic" else _KERNEL_DTYPE)

    def _kernel_state(self, form: torch.dtype | str):
        """A kernel's own form of the buffers, derived once and cached.

        Args:
            form: "native" (`lmscale.kernels`), or the activation dtype of a PyTorch kernel.

        The cache key is the buffers' storage and dtype, so `.to()`, loading new tensors
        (`assign=True`) or a deepcopy all rebuild it rather than using a stale copy.
        NOTE: inside a compiled graph the key cannot be read (`data_ptr`): the state derived
        by `prepare_kernel` (or the last eager call) is used as it is.
        """
        if torch.compiler.is_compiling():
            return self._kernel[form][1]
        offsets = getattr(self, "mins", None)
        key = (self.qweight.data_ptr(), self.scales.data_ptr(), self.scales.dtype,
               None if offsets is None else offsets.data_ptr())  # fmt: skip
        cached = self._kernel.get(form)
        if cached is None or cached[0] != key:
            derive = self._derive_native if form == "native" else self._derive
            self._kernel[form] = cached = (key, derive(form))
        return cached[1]

    def _derive_native(self, form: str):
        """`lmscale.kernels`' form: the stored codes as they are, float32 scales (and mins)."""
        with torch.no_grad():
            qweight = self.qweight.contiguous()
            scales = self.scales.float().reshape(self.out_features, -1).contiguous()
            if self.method != "int4":
                return qweight, scales
            if self.zero_point == "float":
                return qweight, scales, self.mins.float().contiguous()
            n_groups = self.in_features // self.group_size
            zeros = unpack_int4(self.zeros)[:, :n_groups].float()
            return qweight, scales, (-zeros * scales).contiguous()

    def _derive(self, dtype: torch.dtype):
        with torch.no_grad():
            if self.method == "int8":
                # NOTE: the kernel reads the weight with aligned loads for M >= 4 and crashes
                # (SIGSEGV) on a tensor that is not 64-byte aligned, as one read straight out of a
                # safetensors file is; checkpoint loading aligns them, this is the safety net.
                weight = self.qweight.contiguous()
                if weight.data_ptr() % 64:
                    weight = weight.clone()
                return weight, self.scales.to(dtype).contiguous()
            if self.method == "int8-dynamic":
                return self.qweight.t().contiguous(), self.scales.float()  # (in, out) for _int_mm
            q, scales, zeros = self.codes()
            pad = -self.out_features % 16  # the kernel needs N % 16 == 0
            q = F.pad(q.to(torch.int32), (0, 0, 0, pad))
            weight = torch._convert_weight_to_int4pack_for_cpu(q, 2)
            if self.zero_point == "float":  # w = q * s + m = (q - 8) * s + (m + 8 s)
                float_zeros = self.mins.float() + 8 * scales
            else:  # w = (q - z) * s = (q - 8) * s + (8 - z) * s
                float_zeros = (8 - zeros) * scales
            pairs = torch.stack((scales, float_zeros), dim=-1)  # (out, ng, 2)
            pairs = F.pad(pairs, (0, 0, 0, 0, 0, pad)).transpose(0, 1)  # (ng, N, 2)
            return weight, pairs.to(dtype).contiguous()

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The float weight (out, in) these integers stand for, in `dtype` (default: the scales')."""
        dtype = dtype or self.scales.dtype
        if self.method != "int4" and self.group_size is None:
            return self.qweight.to(dtype) * self.scales.to(dtype)[:, None]
        return self.dequantize_rows(None, dtype)

    def dequantize_rows(self, rows: Tensor | None, dtype: torch.dtype) -> Tensor:
        """Rows `rows` (any shape of indices; None = all) of the float weight, (*rows, in)."""
        offsets = None
        if self.method == "int4":
            offsets = self.mins if self.zero_point == "float" else self.zeros
        if rows is None:
            qweight, scales = self.qweight, self.scales
        else:
            qweight, scales = self.qweight[rows.reshape(-1)], self.scales[rows.reshape(-1)]
            offsets = None if offsets is None else offsets[rows.reshape(-1)]
        lead = (self.out_features,) if rows is None else tuple(rows.shape)
        if self.method != "int4" and self.group_size is None:
            return (qweight.to(dtype) * scales.to(dtype)[:, None]).view(*lead, self.in_features)
        n_groups = scales.shape[1]
        if self.method != "int4":  # grouped int8
            q = qweight.view(-1, n_groups, self.group_size).to(dtype)
            return (q * scales.to(dtype)[..., None]).view(*lead, self.in_features)
        q = unpack_int4(qweight).view(-1, n_groups, self.group_size).to(dtype)  # (rows, ng, g)
        if self.zero_point == "float":
            w = q * scales.to(dtype)[..., None] + offsets.to(dtype)[..., None]
        else:
            z = unpack_int4(offsets)[:, :n_groups].to(dtype)[..., None]  # (rows, ng, 1)
            w = (q - z) * scales.to(dtype)[..., None]
        return w.view(*lead, self.in_features)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size is not None else ""
        if self.zero_point == "float":
            group += ", zero_point=float"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"method={self.method}{group}, bias={self.bias is not None}"
        )


_FLOATS = (torch.float32, torch.bfloat16, torch.float16)

_ROWS_PER_BLOCK = 2048
"""Output rows at a time in grouped int8's reference matmul (a few MB of floats)."""
_FEW_ROWS = 8
"""Up to this many input rows, grouped int8's reference makes no float weight (see there)."""


class QuantizedEmbedding(nn.Module):
    """A token embedding whose (vocab, dim) table is a `QuantizedLinear` (`table`).

    A lookup dequantizes only the rows it reads. A model with a tied output head uses
    `table` itself as its `output` module, so the head's logits run through the fast kernel
    on the very same integers, stored once.

    Args:
        num_embeddings, embedding_dim: as for `nn.Embedding`.
        method: "int8" or "int4"; group_size: int4's, or grouped int8's (None: per row);
            zero_point: int4 only.
    """

    def __init__(
        self, num_embeddings: int, embedding_dim: int, method: str, group_size: int | None = None,
        zero_point: str = "int",
    ) -> None:  # fmt: skip
        super().__init__()
        if method not in EMBEDDING_METHODS:
            raise LmscaleError(
                f"unknown embedding quantization '{method}' (choose from float, int8, int4)"
            )
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.table = QuantizedLinear(
            embedding_dim, num_embeddings, method, group_size, zero_point=zero_point
        )

    @property
    def weight(self) -> Tensor:
        """An EMPTY tensor of the table's float dtype and device.

        For code that reads `model.tok_embeddings.weight.dtype / .device` (the engine, the KV
        cache); anything that needs the values fails loudly on the shape: use `dequantize`.
        """
        return self.table.scales.new_empty(0)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.table.dequantize_rows(tokens, self.table.scales.dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        return self.table.dequantize(dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


def check_layout(
    method: str, group_size: int | None, in_features: int | None = None, where: str = "the layer",
    zero_point: str = "int",
) -> None:  # fmt: skip
    """Raise LmscaleError unless (method, group_size, zero_point) names a layout this module holds.

    Args:
        method, group_size, zero_point: the layout (see `QuantizedLinear`).
        in_features: the input width of a layer to hold it, if one is in view.
        where: the layer, named in the message.
    """
    if method not in METHODS:
        raise LmscaleError(
            f"unknown quantization method '{method}' (choose from {', '.join(METHODS)})"
        )
    if zero_point not in ZERO_POINTS:
        raise LmscaleError(f"unknown zero point '{zero_point}' (choose from int, float)")
    if method != "int4":
        if zero_point != "int":
            raise LmscaleError("a float zero point applies to int4 only (int8 is symmetric)")
        if group_size is None:
            return
        if method != "int8":
            raise LmscaleError("a group size applies to int4 and int8 only")
    if group_size not in GROUP_SIZES:
        raise LmscaleError(f"{method} group size must be 32, 64 or 128, got {group_size}")
    if in_features is not None and in_features % group_size:
        raise LmscaleError(
            f"int4 group size {group_size} does not divide the input width {in_features} of {where}"
        )


def swap_in_quantized_(
    model: nn.Module, names: list[str], method: str, group_size: int | None,
    zero_point: str = "int",
) -> nn.Module:  # fmt: skip
    """Replace the `nn.Linear` at each fully-qualified name by an empty `QuantizedLinear`.

    A loader calls this on a model built on the meta device, then assigns the stored tensors.

    Args:
        model: the model to change in place.
        names: e.g. ["layers.0.attention.wq", ...].
        method, group_size, zero_point: the layout (see `QuantizedLinear`).

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
            linear.in_features,
            linear.out_features,
            method,
            group_size,
            linear.bias is not None,
            zero_point,
        )
        model.set_submodule(name, quantized)
    return model


def swap_in_embedding_(
    model: nn.Module, method: str, group_size: int | None, tied: bool, zero_point: str = "int"
) -> QuantizedEmbedding:
    """Replace `model.tok_embeddings` by an empty `QuantizedEmbedding` (and a tied head by its table).

    Args:
        model: a `Transformer`, changed in place.
        method, group_size, zero_point: the table's layout.
        tied: make `model.output` the embedding's table (one copy of the integers).

    Returns:
        The new embedding module.
    """
    old = model.tok_embeddings
    embedding = QuantizedEmbedding(
        old.num_embeddings, old.embedding_dim, method, group_size, zero_point
    )
    model.tok_embeddings = embedding
    if tied:
        model.output = embedding.table
    return embedding
