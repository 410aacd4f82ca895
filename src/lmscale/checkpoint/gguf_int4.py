"""llama.cpp's 4- and 8-bit blocks as the buffers of lmscale's `QuantizedLinear`, bit for bit.

Four GGUF types are layouts of `lmscale.model.quantized` (group 32) in other bytes:

    type  block                                         value            lmscale layout (group 32)
    Q4_0  32 values: fp16 d, 16 B codes                 d * (q - 8)      zero point 8, scale d
    Q4_1  32 values: fp16 d, fp16 m, 16 B codes         d * q + m        float: scale d, min m
    Q4_K  256 values = 8 groups of 32: fp16 d,          d*sc_i * q       float: scale d*sc_i,
          fp16 dmin, 12 B of 6-bit sc_i and m_i,          - dmin*m_i            min -dmin*m_i
          128 B codes
    Q8_0  32 values: fp16 d, 32 int8 codes              d * q            grouped int8: scale d

Where the codes sit (llama.cpp's ggml-common.h):

    Q4_0, Q4_1  byte j of a block: code j (low nibble), code j + 16 (high nibble)
    Q4_K        bytes 32c..32c+31: codes of group 2c (low nibbles), group 2c + 1 (high)
    Q4_K scales 12 bytes b, for group i < 4: sc = b[i] & 63, m = b[i + 4] & 63;
                for i >= 4: sc = b[i + 4] & 15 | (b[i - 4] >> 6) << 4,
                            m  = b[i + 4] >> 4 | (b[i] >> 6) << 4

NOTE: scales and mins are float32, computed as llama.cpp (and `gguf.quants.dequantize`)
does: d * sc_i is exact in float32 (an 11-bit by a 6-bit mantissa) but not always in float16,
so `QuantizedLinear.dequantize` gives back the float load's weights exactly. Saving such a
model in lmscale's own format (float16 scales) rounds Q4_K's d * sc_i; Q4_0's and Q4_1's d and
m are float16 already and stay exact.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from lmscale.errors import LmscaleError
from lmscale.model.quantized import pack_int4, pack_zeros

GROUP_SIZE = 32
"""Input columns per scale, for all three types (Q4_K's sub-blocks are 32 wide too)."""

ZERO_POINTS = {"Q4_0": "int", "Q4_1": "float", "Q4_K": "float"}
"""The GGUF types that load as int4 layers, and the `QuantizedLinear` zero point each needs."""

INT8_TYPES = ("Q8_0",)
"""The GGUF types that load as grouped int8 layers."""

_BLOCK = {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q4_K": (256, 144), "Q8_0": (32, 34)}
"""(values, bytes) of one block."""


def int4_buffers(
    data: np.ndarray, type_name: str, shape: tuple[int, int], label: str
) -> dict[str, Tensor]:
    """One GGUF tensor's blocks as the buffers of an int4 `QuantizedLinear` with group 32.

    Args:
        data: the reader's uint8 array of blocks (one row of blocks per output row).
        type_name: "Q4_0", "Q4_1" or "Q4_K" (see `ZERO_POINTS`).
        shape: (out_features, in_features) in PyTorch order.
        label: what to call the tensor in an error ("model.gguf: tensor 'blk.0.attn_q.weight'").

    Returns:
        {"qweight": uint8 (out, in/2), "scales": float32 (out, in/32), and "mins": float32
        (out, in/32) for Q4_1 and Q4_K or "zeros": packed uint8 (out, in/64) for Q4_0}.
    """
    blocks = _blocks(data, type_name, shape, label)
    codes, scales, mins = _DECODERS[type_name](blocks)
    buffers = {"qweight": pack_int4(torch.from_numpy(codes)), "scales": torch.from_numpy(scales)}
    if mins is None:  # Q4_0: the integer 8 stands for 0.0 in every group
        buffers["zeros"] = pack_zeros(torch.full(scales.shape, 8, dtype=torch.uint8))
    else:
        buffers["mins"] = torch.from_numpy(mins)
    return buffers


def int8_buffers(data: np.ndarray, shape: tuple[int, int], label: str) -> dict[str, Tensor]:
    """A Q8_0 tensor's blocks as the buffers of a grouped int8 `QuantizedLinear` (group 32).

    Args:
        data, shape, label: as for `int4_buffers`.

    Returns:
        {"qweight": int8 (out, in), "scales": float32 (out, in/32)} (the fp16 d, exactly).
    """
    blocks = _blocks(data, "Q8_0", shape, label)
    codes = np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(shape[0], -1)
    return {"qweight": torch.from_numpy(codes), "scales": torch.from_numpy(_float16(blocks, 0))}


def _blocks(data: np.ndarray, type_name: str, shape: tuple[int, int], label: str) -> np.ndarray:
    """`data` as (out, blocks per row, bytes per block) uint8, or LmscaleError on a wrong size."""
    values, size = _BLOCK[type_name]
    rows, cols = shape
    if cols % values or data.dtype != np.uint8 or data.size != rows * cols // values * size:
        raise LmscaleError(
            f"{label} does not hold {tuple(shape)} {type_name} values "
            f"({data.size} bytes of {data.dtype}, blocks of {values} values in {size} bytes)"
        )
    return np.ascontiguousarray(data).reshape(rows, cols // values, size)


def _float16(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The fp16 at byte `offset` of every block, as float32 (rows, blocks)."""
    return (
        np.ascontiguousarray(blocks[..., offset : offset + 2])
        .view(np.float16)[..., 0]
        .astype(np.float32)
    )


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """(..., n) bytes -> (..., 2, n) codes: every low nibble first, then every high one."""
    return np.stack((packed & 0x0F, packed >> 4), axis=-2)


def _q4_0(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, None]:
    rows = blocks.shape[0]
    codes = _nibbles(blocks[..., 2:]).reshape(rows, -1)  # (out, in)
    return codes, _float16(blocks, 0), None


def _q4_1(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows = blocks.shape[0]
    codes = _nibbles(blocks[..., 4:]).reshape(rows, -1)  # (out, in)
    return codes, _float16(blocks, 0), _float16(blocks, 2)


def _q4_k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows, n_blocks, _ = blocks.shape
    quants = blocks[..., 16:].reshape(rows, n_blocks, 4, 32)  # 4 chunks of 64 values each
    codes = _nibbles(quants).reshape(rows, -1)  # (out, nb, 4, 2, 32) -> (out, in)
    sc, m = _q4_k_scales(blocks[..., 4:16])  # (out, nb, 8) each
    d, dmin = _float16(blocks, 0)[..., None], _float16(blocks, 2)[..., None]
    scales = (d * sc.astype(np.float32)).reshape(rows, -1)  # (out, in/32)
    mins = -(dmin * m.astype(np.float32)).reshape(rows, -1)
    return codes, scales, mins


def _q4_k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K's 12 bytes per block -> the 6-bit scales and mins of its 8 groups, (..., 8) each."""
    low, mid, high = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    # groups 0-3: the low 6 bits of bytes 0-3 (scales) and 4-7 (mins); groups 4-7: a nibble
    # of bytes 8-11 with the 2 top bits of bytes 0-3 (scales) or 4-7 (mins) above it
    sc = np.concatenate((low & 63, (high & 0x0F) | ((low >> 6) << 4)), axis=-1)
    m = np.concatenate((mid & 63, (high >> 4) | ((mid >> 6) << 4)), axis=-1)
    return sc, m


_DECODERS = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q4_K": _q4_k}
