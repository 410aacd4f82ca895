"""The GGUF files people have: K-quant blocks read as the values their definition gives, and a
Q4_K_M-like file (Q4_K, Q6_K, Q5_K, Q4_0, Q8_0 mixed) loaded whole, as float and as int4."""

import numpy as np
import pytest
import torch
from gguf_files import K_SHAPE, PACKERS, pack, tiny_gguf, tiny_shapes
from torch import nn

import lmscale.model.quantized as quantized
from lmscale.checkpoint import load_pretrained
from lmscale.checkpoint.gguf import dequantize, load_gguf, read_gguf, unpermute_rope
from lmscale.checkpoint.gguf_int4 import int4_buffers
from lmscale.checkpoint.load import build_model
from lmscale.compress import quantization_of
from lmscale.errors import LmscaleError
from lmscale.model import ModelConfig
from lmscale.model.quantized import QuantizedEmbedding, QuantizedLinear

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


CONFIG = ModelConfig(
    family="llama", vocab_size=3, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=512,
    max_seq_len=16, norm_eps=float(np.float32(1e-5)), tie_embeddings=False,
)  # fmt: skip
"""`K_SHAPE` as lmscale's config (the file's metadata: context 16, RoPE theta 10000 by default,
and eps 1e-5 as GGUF stores it, in float32)."""

NAMES = {"token_embd": "tok_embeddings", "output": "output", "output_norm": "norm",
         "attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv",
         "attn_output": "attention.wo", "ffn_gate": "feed_forward.w1",
         "ffn_down": "feed_forward.w2", "ffn_up": "feed_forward.w3",
         "attn_norm": "attention_norm", "ffn_norm": "ffn_norm"}  # fmt: skip
TOKENS = torch.tensor([[0, 1, 2, 2, 1, 0, 0, 2]])


def reference_state(path, values: dict) -> dict:
    """lmscale's state dict of the file built here: the quantized tensors' known values, the
    float32 ones as written, q/k rows back in half-split order (llama.cpp's permutation undone)."""
    state = {}
    for tensor in gguf.GGUFReader(str(path)).tensors:
        weight = values.get(tensor.name)
        weight = torch.from_numpy(np.array(tensor.data if weight is None else weight))
        parts = tensor.name.split(".")  # "blk.0.attn_q.weight" or "output_norm.weight"
        if parts[-2] in ("attn_q", "attn_k"):
            weight = unpermute_rope(weight, CONFIG.n_heads if parts[-2] == "attn_q" else 2)
        prefix = f"layers.{parts[1]}." if parts[0] == "blk" else ""
        state[f"{prefix}{NAMES[parts[-2]]}.weight"] = weight
    return state


def expected_int4_layers() -> dict[str, str]:
    """The linears `keep_quantized` makes int4: Q4_K and Q4_1 with a float minimum, Q4_0 not."""
    layers = {}
    for name, type_name in MIXED.items():
        parts = name.split(".")
        if parts[0] == "blk" and type_name in ("Q4_0", "Q4_1", "Q4_K"):
            layers[f"layers.{parts[1]}.{NAMES[parts[2]]}"] = (
                "int" if type_name == "Q4_0" else "float"
            )
    return layers


def test_mixed_file_loads_as_a_model_built_from_its_values(mixed):
    path, values = mixed
    model, gguf_model = load_gguf(path)
    assert gguf_model.config == CONFIG and gguf_model.int4_layers == {}
    expected = reference_state(path, values)
    assert gguf_model.state_dict.keys() == expected.keys()
    for name, weight in expected.items():
        assert torch.equal(gguf_model.state_dict[name], weight), name
    reference = build_model(CONFIG, expected)
    with torch.no_grad():
        assert torch.equal(model(TOKENS), reference(TOKENS))


def test_keep_quantized_mixed_file_holds_the_same_weights_as_int4(mixed, monkeypatch):
    path, _ = mixed
    float_model, _ = load_gguf(path)
    model, gguf_model = load_gguf(path, keep_quantized=True)
    assert gguf_model.int4_layers == expected_int4_layers()
    assert gguf_model.int8_layers == [
        f"layers.{name.split('.')[1]}.{NAMES[name.split('.')[2]]}"
        for name, type_name in MIXED.items() if type_name == "Q8_0"
    ]  # fmt: skip
    floats = dict(float_model.named_modules())
    for name, module in model.named_modules():
        if name in gguf_model.int4_layers:
            zero_point = gguf_model.int4_layers[name]
            assert isinstance(module, QuantizedLinear)
            assert (module.method, module.group_size, module.zero_point) == ("int4", 32, zero_point)
            # the same values, q/k rows unpermuted with them (exact: float32 scales, see gguf_int4)
            assert torch.equal(module.dequantize(), floats[name].weight), name
        elif name in gguf_model.int8_layers:  # Q8_0: grouped int8, its file's codes
            assert isinstance(module, QuantizedLinear)
            assert (module.method, module.group_size) == ("int8", 32)
            assert torch.equal(module.dequantize(), floats[name].weight), name
        elif isinstance(floats[name], nn.Linear):  # Q5_K, Q6_K stay float
            assert type(module) is nn.Linear and torch.equal(module.weight, floats[name].weight)
    assert type(model.tok_embeddings) is nn.Embedding  # Q4_K, but the embedding stays float
    with pytest.raises(LmscaleError, match="mix quantized layouts"):  # no one saved record
        quantization_of(model)
    with torch.no_grad():
        expected = float_model(TOKENS)
        error = (model(TOKENS) - expected).abs().max() / expected.abs().max()
        assert 0 < error < 0.01  # the bfloat16 kernels ran: the int4 layers' kernel tolerance
        monkeypatch.setattr(quantized, "use_kernels", False)
        # the reference path: the same weights (the Q8_0 layer's sums per group of 32 round
        # differently in float32)
        torch.testing.assert_close(model(TOKENS), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("type_name, zero_point", [("Q4_0", "int"), ("Q4_1", "float")])
def test_keep_quantized_q4_0_and_q4_1_files(tmp_path, type_name, zero_point):
    path = tiny_gguf(tmp_path / "tiny.gguf", tensor_type=type_name, seed=0)
    float_model, _ = load_gguf(path)
    model, tokenizer = load_pretrained(path, keep_quantized=True)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert len(layers) == 7 and {m.zero_point for m in layers.values()} == {zero_point}
    floats = dict(float_model.named_modules())
    for name, layer in layers.items():
        assert torch.equal(layer.dequantize(), floats[name].weight), name
        # Q4_0's d, Q4_1's d and m are float16: lmscale's saved format holds them exactly
        assert torch.equal(layer.scales, layer.scales.half().float())
    tokens = torch.tensor([tokenizer.encode("abba")])
    with torch.no_grad():
        expected = float_model(tokens)
        assert (model(tokens) - expected).abs().max() < 0.01 * expected.abs().max()


def test_keep_quantized_q8_0_file_keeps_its_linears_and_tied_table_as_grouped_int8(tmp_path):
    path = tiny_gguf(tmp_path / "q8.gguf", tensor_type="Q8_0", seed=0)
    float_model, _ = load_gguf(path)
    model, gguf_model = load_gguf(path, keep_quantized=True)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert set(gguf_model.int8_layers) == {*layers, "tok_embeddings"} - {"tok_embeddings.table"}
    assert len(layers) == 8 and {(m.method, m.group_size) for m in layers.values()} == {
        ("int8", 32)
    }
    assert isinstance(model.tok_embeddings, QuantizedEmbedding)
    assert model.output is model.tok_embeddings.table  # tied: one table
    floats = dict(float_model.named_modules())
    for name, layer in layers.items():
        float_name = "tok_embeddings" if name == "tok_embeddings.table" else name
        assert torch.equal(layer.dequantize(), floats[float_name].weight), name
    tokens = torch.tensor([[0, 2, 1, 2]])
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), float_model(tokens), rtol=0.01, atol=0.01)


def test_int4_buffers_refuse_a_tensor_of_the_wrong_size():
    with pytest.raises(LmscaleError, match="blk.0.attn_q.weight' does not hold .* Q4_K"):
        int4_buffers(np.zeros((2, 143), np.uint8), "Q4_K", (2, 256), "tensor 'blk.0.attn_q.weight'")


def test_keep_quantized_refuses_an_unsupported_type(tmp_path):
    raw = {"blk.0.attn_q.weight": ("IQ4_NL", np.zeros((32, 18), np.uint8))}  # 32 per 18 B
    path = tiny_gguf(tmp_path / "iq4.gguf", tensor_type="Q4_0", raw=raw)
    with pytest.raises(
        LmscaleError, match="iq4.gguf: tensor 'blk.0.attn_q.weight' has type IQ4_NL"
    ):
        read_gguf(
            path,
            keep_quantized=True,
        )
