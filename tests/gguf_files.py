"""Tiny GGUF files written with `gguf.GGUFWriter`, and llama.cpp blocks built from known values.

The packers below build K-quant blocks (which the `gguf` package cannot quantize) byte by byte
from llama.cpp's block definitions (ggml-common.h / ggml-quants.c); each returns the blocks and
the float32 values they stand for, computed from the definition's formula, not by decoding.
NOTE: the formula is evaluated in float64, where it is exact for these ranges, and rounded
once to float32, as llama.cpp's float32 arithmetic rounds the same exact value once.
"""

from dataclasses import dataclass

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

QK_K = 256
"""Values in one K-quant super-block."""


@dataclass(frozen=True)
class TinyShape:
    """The sizes of a tiny llama model (three tokens)."""

    dim: int = 32
    hidden_dim: int = 64
    n_heads: int = 2
    n_kv_heads: int = 1
    n_layers: int = 1
    tied: bool = True


K_SHAPE = TinyShape(dim=256, hidden_dim=512, n_heads=4, n_kv_heads=2, n_layers=2, tied=False)
"""Widths that K-quant rows (multiples of 256 values) fit; 4 query heads of 64."""


def tiny_shapes(shape: TinyShape) -> dict[str, tuple[int, ...]]:
    """Every tensor's name in the file and its PyTorch-order shape."""
    dim, hidden, head_dim = shape.dim, shape.hidden_dim, shape.dim // shape.n_heads
    shapes = {"token_embd.weight": (3, dim), "output_norm.weight": (dim,)}
    if not shape.tied:
        shapes["output.weight"] = (3, dim)
    layer = {"attn_q": (dim, dim), "attn_k": (shape.n_kv_heads * head_dim, dim),
             "attn_v": (shape.n_kv_heads * head_dim, dim), "attn_output": (dim, dim),
             "ffn_gate": (hidden, dim), "ffn_up": (hidden, dim), "ffn_down": (dim, hidden),
             "attn_norm": (dim,), "ffn_norm": (dim,)}  # fmt: skip
    for index in range(shape.n_layers):
        for name, size in layer.items():
            shapes[f"blk.{index}.{name}.weight"] = size
    return shapes


def tiny_gguf(
    path, architecture="llama", tokenizer_model="gpt2", tensor_type=None, skip=(),
    shape=TinyShape(), raw=None, seed=None,
):  # fmt: skip
    """A three-token llama GGUF written with `gguf.GGUFWriter`.

    Args:
        tensor_type: the type of every 2-D tensor, quantized with `gguf.quants.quantize` (blocks
            of zeros for a type it cannot quantize); None writes float32.
        skip: tensor names to leave out.
        shape: the model's sizes.
        raw: {tensor name: (type name, uint8 blocks)} written as given, e.g. from `pack`.
        seed: fill with random values drawn from this seed instead of ones.
    """
    raw = raw or {}
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(shape.n_layers)
    writer.add_context_length(16)
    writer.add_embedding_length(shape.dim)
    writer.add_feed_forward_length(shape.hidden_dim)
    writer.add_head_count(shape.n_heads)
    writer.add_head_count_kv(shape.n_kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_token_list(["a", "b", "ab"])
    writer.add_token_merges(["a b"])
    rng = np.random.default_rng(seed)
    for name, size in tiny_shapes(shape).items():
        if name in skip:
            continue
        if name in raw:
            type_name, blocks = raw[name]
            writer.add_tensor(name, blocks, raw_dtype=gguf.GGMLQuantizationType[type_name])
            continue
        data = np.ones(size, np.float32)
        if seed is not None:  # norms near 1, weights near 0
            base, spread = (1.0, 0.1) if len(size) == 1 else (0.0, 0.05)
            data = (base + spread * rng.standard_normal(size)).astype(np.float32)
        if tensor_type is not None and len(size) == 2:
            qtype = gguf.GGMLQuantizationType[tensor_type]
            try:
                blocks = gguf.quants.quantize(data, qtype)
            except (gguf.quants.QuantError, NotImplementedError):  # no quantizer: blocks of zeros
                blocks = np.zeros(gguf.quants.quant_shape_to_byte_shape(size, qtype), np.uint8)
            writer.add_tensor(name, blocks, raw_dtype=qtype)
        else:
            writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# --- blocks from known values ----------------------------------------------------------------


def pack(type_name: str, shape: tuple[int, int], rng) -> tuple[np.ndarray, np.ndarray]:
    """Random blocks of `type_name` for a (rows, cols) weight, and the values they stand for.

    Q4_0/Q4_1/Q8_0 come from `gguf.quants.quantize` of random floats (their values from
    `gguf.quants.dequantize`, checked by hand elsewhere); K types from the packers below.

    Returns:
        (uint8 blocks (rows, bytes), float32 values (rows, cols)).
    """
    if type_name in PACKERS:
        rows, cols = shape
        blocks, values = PACKERS[type_name](rows * cols // QK_K, rng)
        return blocks.reshape(rows, -1), values.reshape(rows, cols)
    qtype = gguf.GGMLQuantizationType[type_name]
    blocks = gguf.quants.quantize(0.05 * rng.standard_normal(shape).astype(np.float32), qtype)
    return blocks, gguf.quants.dequantize(blocks, qtype)


def _fp16(rng, n: int, low=1e-4, high=1e-3) -> np.ndarray:
    """n positive float16 super-block scales."""
    return rng.uniform(low, high, n).astype(np.float16)


def _bytes16(values: np.ndarray) -> np.ndarray:
    """(n,) float16 -> (n, 2) little-endian bytes."""
    return values.astype("<f2").view(np.uint8).reshape(-1, 2)


def _k_scales_12(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K's 12 scale bytes from 8 six-bit scales and mins per block, (n, 8) each.

    Bytes 0-3: scale j (j < 4) in the low 6 bits, the top 2 bits of scale j + 4 above them;
    bytes 4-7: the same for the mins; bytes 8-11: the low nibbles of scale and min j + 4.
    """
    out = np.zeros((sc.shape[0], 12), np.uint8)
    for j in range(4):
        out[:, j] = sc[:, j] | (sc[:, j + 4] >> 4) << 6
        out[:, j + 4] = m[:, j] | (m[:, j + 4] >> 4) << 6
        out[:, j + 8] = (sc[:, j + 4] & 0x0F) | (m[:, j + 4] & 0x0F) << 4
    return out


def _low_nibbles_by_64(q: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K's 128 code bytes: byte 32c + l holds value 64c + l (low) and 64c + 32 + l."""
    out = np.zeros((q.shape[0], 128), np.uint8)
    for c in range(4):
        for lane in range(32):
            out[:, 32 * c + lane] = (q[:, 64 * c + lane] & 0x0F) | (
                q[:, 64 * c + 32 + lane] & 0x0F
            ) << 4
    return out


def _k_values(d, dmin, sc, m, q) -> np.ndarray:
    """w = d * sc_g * q - dmin * m_g for each group g of 32 values, float32 (n, 256)."""
    scale = d.astype(np.float64)[:, None] * np.repeat(sc, 32, axis=1)
    offset = dmin.astype(np.float64)[:, None] * np.repeat(m, 32, axis=1)
    return (scale * q - offset).astype(np.float32)


def pack_q4_k(n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """n Q4_K blocks (144 B: fp16 d, fp16 dmin, 12 B scales and mins, 128 B 4-bit codes)."""
    d, dmin = _fp16(rng, n), _fp16(rng, n)
    sc, m = rng.integers(0, 64, (n, 8), dtype=np.uint8), rng.integers(0, 64, (n, 8), np.uint8)
    q = rng.integers(0, 16, (n, QK_K), dtype=np.uint8)
    blocks = np.concatenate(
        [_bytes16(d), _bytes16(dmin), _k_scales_12(sc, m), _low_nibbles_by_64(q)], axis=1
    )
    return blocks, _k_values(d, dmin, sc, m, q)


def pack_q5_k(n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """n Q5_K blocks (176 B): Q4_K's, with 32 bytes qh of fifth bits before the codes.

    Bit g of qh[l] is the fifth bit of value 32g + l.
    """
    d, dmin = _fp16(rng, n), _fp16(rng, n)
    sc, m = rng.integers(0, 64, (n, 8), dtype=np.uint8), rng.integers(0, 64, (n, 8), np.uint8)
    q = rng.integers(0, 32, (n, QK_K), dtype=np.uint8)
    qh = np.zeros((n, 32), np.uint8)
    for group in range(8):
        for lane in range(32):
            qh[:, lane] |= (q[:, 32 * group + lane] >> 4) << group
    blocks = np.concatenate(
        [_bytes16(d), _bytes16(dmin), _k_scales_12(sc, m), qh, _low_nibbles_by_64(q)], axis=1
    )
    return blocks, _k_values(d, dmin, sc, m, q)


def pack_q6_k(n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """n Q6_K blocks (210 B: 128 B ql, 64 B qh, 16 int8 scales, fp16 d); w = d * sc * (q - 32).

    Per half h of 128 values, lane l < 32 and quarter k < 4 (value 128h + 32k + l): the low
    nibble sits in ql[64h + l + 32 (k odd)] (low nibble for k < 2, high for k >= 2) and the two
    high bits in qh[32h + l] at bit 2k; value e has scale e // 16.
    """
    d = _fp16(rng, n)
    sc = rng.integers(-128, 128, (n, 16)).astype(np.int8)
    q = rng.integers(0, 64, (n, QK_K), dtype=np.uint8)
    ql, qh = np.zeros((n, 128), np.uint8), np.zeros((n, 64), np.uint8)
    for half in range(2):
        for quarter in range(4):
            for lane in range(32):
                code = q[:, 128 * half + 32 * quarter + lane]
                byte = 64 * half + lane + 32 * (quarter % 2)
                ql[:, byte] |= (code & 0x0F) << (4 * (quarter // 2))
                qh[:, 32 * half + lane] |= (code >> 4) << (2 * quarter)
    blocks = np.concatenate([ql, qh, sc.view(np.uint8), _bytes16(d)], axis=1)
    scale = d.astype(np.float64)[:, None] * np.repeat(sc, 16, axis=1)
    return blocks, (scale * (q.astype(np.float64) - 32)).astype(np.float32)


def _two_bit_codes(low: np.ndarray) -> np.ndarray:
    """Q2_K/Q3_K's 64 bytes of 2-bit codes: value 128h + 32k + l at bits 2k of byte 32h + l."""
    out = np.zeros((low.shape[0], 64), np.uint8)
    for half in range(2):
        for quarter in range(4):
            for lane in range(32):
                out[:, 32 * half + lane] |= low[:, 128 * half + 32 * quarter + lane] << 2 * quarter
    return out


def pack_q2_k(n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """n Q2_K blocks (84 B: 16 B scales, 64 B 2-bit codes, fp16 d, fp16 dmin).

    Byte g of the scales holds group g's (16 values) 4-bit scale (low) and 4-bit min (high):
    w = d * sc_g * q - dmin * m_g.
    """
    d, dmin = _fp16(rng, n), _fp16(rng, n)
    sc, m = rng.integers(0, 16, (n, 16), dtype=np.uint8), rng.integers(0, 16, (n, 16), np.uint8)
    q = rng.integers(0, 4, (n, QK_K), dtype=np.uint8)
    blocks = np.concatenate([sc | m << 4, _two_bit_codes(q), _bytes16(d), _bytes16(dmin)], axis=1)
    scale = d.astype(np.float64)[:, None] * np.repeat(sc, 16, axis=1)
    offset = dmin.astype(np.float64)[:, None] * np.repeat(m, 16, axis=1)
    return blocks, (scale * q - offset).astype(np.float32)


def pack_q3_k(n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """n Q3_K blocks (110 B: 32 B hmask, 64 B 2-bit codes, 12 B 6-bit scales, fp16 d).

    A value's code q in -4..3 is stored as q + 4: its low 2 bits as Q2_K's, its third bit at
    bit 4h + k of hmask[l] (value 128h + 32k + l). Scale g (of 16 values) is stored as s + 32 in
    6 bits: its low nibble in byte g (g < 8, low) or g - 8 (high), its top 2 bits at bit
    2 (g // 4) of byte 8 + g % 4. w = d * s_g * q.
    """
    d = _fp16(rng, n)
    s = rng.integers(-32, 32, (n, 16))
    q = rng.integers(-4, 4, (n, QK_K))
    stored, scales = (q + 4).astype(np.uint8), (s + 32).astype(np.uint8)
    hmask = np.zeros((n, 32), np.uint8)
    for half in range(2):
        for quarter in range(4):
            for lane in range(32):
                bit = stored[:, 128 * half + 32 * quarter + lane] >> 2
                hmask[:, lane] |= bit << (4 * half + quarter)
    packed = np.zeros((n, 12), np.uint8)
    for group in range(16):
        packed[:, group % 8] |= (scales[:, group] & 0x0F) << (4 * (group // 8))
        packed[:, 8 + group % 4] |= (scales[:, group] >> 4) << (2 * (group // 4))
    blocks = np.concatenate([hmask, _two_bit_codes(stored & 3), packed, _bytes16(d)], axis=1)
    scale = d.astype(np.float64)[:, None] * np.repeat(s, 16, axis=1)
    return blocks, (scale * q).astype(np.float32)


PACKERS = {"Q2_K": pack_q2_k, "Q3_K": pack_q3_k, "Q4_K": pack_q4_k, "Q5_K": pack_q5_k,
           "Q6_K": pack_q6_k}  # fmt: skip
"""K type -> `(n_blocks, rng) -> (blocks (n, bytes), values (n, 256))`."""
