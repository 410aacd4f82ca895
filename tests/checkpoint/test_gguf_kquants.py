"""The GGUF files people have: K-quant blocks read as the values their definition gives, and a
Q4_K_M-like file (Q4_K, Q6_K, Q5_K, Q4_0, Q8_0 mixed) loaded whole, as float and as int4."""

import numpy as np
import pytest
import torch
from gguf_files import K_SHAPE, PACKERS, pack, tiny_gguf, tiny_shapes

from lmscale.checkpoint.gguf import dequantize, read_gguf

gguf = pytest.importorskip("gguf")


@pytest.mark.parametrize("type_name", sorted(PACKERS))
def test_k_blocks_dequantize_to_their_definition(type_name):
    blocks, values = PACKERS[type_name](6, np.random.default_rng(0))
    got = dequantize(blocks.reshape(2, -1), type_name, (2, 3 * 256), "test")
    assert torch.equal(got, torch.from_numpy(values.reshape(2, -1)))


def test_q4_k_block_by_hand():
    # One Q4_K block: d = 0.5, dmin = 0.25; group g (32 values) has 6-bit scale 60 + g % 4 and
    # min 40 + g, so groups 4-7 need the top bits kept in bytes 0-7; value i has code i % 16.
    header = np.array([0.5, 0.25], np.float16).view(np.uint8)
    sc, m = 60 + np.arange(8) % 4, 40 + np.arange(8)
    scales = np.zeros(12, np.uint8)
    scales[:4] = sc[:4] | (sc[4:] >> 4) << 6
    scales[4:8] = m[:4] | (m[4:] >> 4) << 6
    scales[8:] = (sc[4:] & 15) | (m[4:] & 15) << 4
    codes = np.arange(256) % 16
    chunks = codes.reshape(4, 2, 32)  # 64 values per 32 bytes: first 32 low, next 32 high
    quants = (chunks[:, 0] | chunks[:, 1] << 4).astype(np.uint8).reshape(-1)
    block = np.concatenate([header, scales, quants])[None, :]
    got = dequantize(block, "Q4_K", (1, 256), "test")[0]
    group = np.arange(256) // 32
    expected = 0.5 * sc[group] * codes - 0.25 * m[group]
    assert torch.equal(got, torch.from_numpy(expected).float())
    assert got[40].item() == 0.5 * 61 * 8 - 0.25 * 41  # group 1, code 8


MIXED = {
    # Q4_K_M keeps most linears Q4_K and gives attn_v, ffn_down and the head Q6_K; layer 1
    # brings the other types such files hold (Q5_K_M's Q5_K, Q4_0, Q8_0).
    "token_embd.weight": "Q4_K",
    "output.weight": "Q6_K",
    **{
        f"blk.0.{name}.weight": "Q4_K"
        for name in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up")
    },  # fmt: skip
    "blk.0.attn_v.weight": "Q6_K",
    "blk.0.ffn_down.weight": "Q6_K",
    "blk.1.attn_q.weight": "Q4_K",
    "blk.1.attn_k.weight": "Q4_1",
    "blk.1.attn_v.weight": "Q8_0",
    "blk.1.attn_output.weight": "Q4_0",
    "blk.1.ffn_gate.weight": "Q4_K",
    "blk.1.ffn_up.weight": "Q5_K",
    "blk.1.ffn_down.weight": "Q5_K",
}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """(path, {tensor name: float32 values}) of a two-layer file of `MIXED` types."""
    rng, raw, values = np.random.default_rng(1), {}, {}
    shapes = tiny_shapes(K_SHAPE)
    for name, type_name in MIXED.items():
        blocks, values[name] = pack(type_name, shapes[name], rng)
        raw[name] = (type_name, blocks)
    path = tmp_path_factory.mktemp("gguf") / "mixed.gguf"
    return tiny_gguf(path, shape=K_SHAPE, raw=raw, seed=2), values


def test_mixed_file_loads_its_values(mixed):
    path, values = mixed
    state = read_gguf(path).state_dict
    for name in ("token_embd.weight", "output.weight", "blk.1.ffn_down.weight"):
        lmscale_name = {
            "token_embd.weight": "tok_embeddings.weight",
            "blk.1.ffn_down.weight": "layers.1.feed_forward.w2.weight",
        }.get(name, name)
        assert torch.equal(state[lmscale_name], torch.from_numpy(values[name]))
