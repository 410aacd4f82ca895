"""`quantize_` and `QuantizedLinear` on tiny random models: packing, error bounds, the matmul."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmscale.compress import QuantConfig, quantization_of, quantize_
from lmscale.compress.quantize import quantize_int4, quantize_int4_float, quantize_int8
from lmscale.errors import LmscaleError
from lmscale.model import Transformer, preset
from lmscale.model.quantized import QuantizedLinear, pack_int4, unpack_int4

BLOCK_LINEARS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                 "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")  # fmt: skip


def weight(out_features=48, in_features=256, seed=0):
    """Random weights with a zero row and a row of one sign, the corner cases of the ranges."""
    torch.manual_seed(seed)
    w = torch.randn(out_features, in_features) * 0.05
    w[1] = 0.0
    w[2] = w[2].abs() + 0.01  # every int4 group positive: the range must still hold 0.0
    return w


def test_pack_unpack_round_trip_is_exact():
    values = torch.randint(0, 16, (7, 64), dtype=torch.uint8)
    packed = pack_int4(values)
    assert packed.shape == (7, 32) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), values)
    assert torch.equal(packed[0, 0], values[0, 0] | values[0, 1] << 4)  # low nibble first


def test_int8_error_is_at_most_half_a_step():
    w = weight()
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    error = (q.float() * scales[:, None] - w).abs()
    assert (error <= scales[:, None] / 2 * (1 + 1e-5) + 1e-9).all()
    assert torch.equal(q[1], torch.zeros_like(q[1]))


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_error_is_at_most_half_a_step(group_size):
    w = weight()
    packed, scales, zeros = quantize_int4(w, group_size)
    n_groups = w.shape[1] // group_size
    assert packed.shape == (48, 128) and scales.shape == zeros.shape == (48, n_groups)
    q = unpack_int4(packed).view(48, n_groups, group_size).float()
    dequantized = ((q - zeros[..., None].float()) * scales[..., None]).view_as(w)
    step = scales.repeat_interleave(group_size, dim=1)
    assert ((dequantized - w).abs() <= step / 2 * (1 + 1e-5) + 1e-9).all()
    assert torch.equal(dequantized[1], torch.zeros_like(w[1]))


def q4_1_weight(out_features=48, in_features=256, group_size=32, seed=0):
    """A weight on a llama.cpp Q4_1 grid: w = q * d + m, float16 d and m, q in 0..15 with 0 and
    15 in every group (so the group's range is exactly d * 15 from m), as GGUF dequantizes."""
    generator = torch.Generator().manual_seed(seed)
    n_groups = in_features // group_size
    q = torch.randint(0, 16, (out_features, n_groups, group_size), generator=generator)
    q[..., 3], q[..., 17 % group_size] = 0, 15
    d = (torch.rand(out_features, n_groups, generator=generator) * 0.01 + 1e-4).half().float()
    m = (torch.randn(out_features, n_groups, generator=generator) * 0.05).half().float()
    return (q * d[..., None] + m[..., None]).view(out_features, in_features), q, d, m


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_float_zero_error_is_at_most_half_a_step(group_size):
    w = weight()
    w[3, :group_size] = 7.3  # a constant group far from 0: its float16 minimum is below it
    packed, scales, mins = quantize_int4_float(w, group_size)
    n_groups = w.shape[1] // group_size
    assert packed.shape == (48, 128) and scales.shape == mins.shape == (48, n_groups)
    assert torch.equal(mins, mins.half().float()) and torch.equal(scales, scales.half().float())
    q = unpack_int4(packed).view(48, n_groups, group_size).float()
    dequantized = (q * scales[..., None] + mins[..., None]).view_as(w)
    step = scales.repeat_interleave(group_size, dim=1)
    assert ((dequantized - w).abs() <= step / 2 * (1 + 1e-5) + 1e-9).all()
    # a group of one sign gets all 16 levels: its step is below the integer grid's (holding 0.0)
    _, int_scales, _ = quantize_int4(w, group_size)
    assert (scales[2] < int_scales[2]).all() and (scales <= int_scales * (1 + 1e-3)).all()


@pytest.mark.parametrize("group_size", [32, 64])
def test_int4_float_zero_reproduces_a_q4_1_weight_exactly(group_size):
    w, q, d, m = q4_1_weight(group_size=group_size)
    packed, scales, mins = quantize_int4_float(w, group_size)
    assert torch.equal(scales, d) and torch.equal(mins, m)
    assert torch.equal(unpack_int4(packed), q.view_as(w).to(torch.uint8))
    model = nn.Sequential(nn.Linear(256, 48, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(w)
    quantize_(model, QuantConfig("int4", group_size, zero_point="float"), lambda m, n: True)
    assert torch.equal(model[0].dequantize(torch.float32), w)
    # the integer zero point cannot: its grid must hold 0.0 and its zero point is rounded
    int_model = nn.Sequential(nn.Linear(256, 48, bias=False))
    with torch.no_grad():
        int_model[0].weight.copy_(w)
    quantize_(int_model, QuantConfig("int4", group_size), lambda m, n: True)
    assert (int_model[0].dequantize(torch.float32) - w).abs().max() > 1e-4


@pytest.mark.parametrize("config", [QuantConfig("int8"), QuantConfig("int4", 32),
                                    QuantConfig("int4", 128),
                                    QuantConfig("int4", 32, zero_point="float")])  # fmt: skip
@pytest.mark.parametrize("bias", [False, True])
def test_quantized_linear_equals_linear_with_the_dequantized_weight(config, bias):
    linear = nn.Linear(256, 48, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(weight())
    model = nn.Sequential(linear)
    quantize_(model, config, filter_fn=lambda module, fqn: True)
    quantized = model[0]
    assert isinstance(quantized, QuantizedLinear)
    x = torch.randn(3, 5, 256)
    expected = F.linear(x, quantized.dequantize(torch.float32), linear.bias)
    torch.testing.assert_close(quantized.reference(x), expected, rtol=1e-5, atol=1e-5)
    assert (quantized.dequantize() - linear.weight).abs().max() < 0.02  # a step or so
    assert torch.equal(quantized.scales, quantized.scales.half().float())  # float16 on disk


@pytest.mark.parametrize("family", ["tiny", "tiny-gpt2"])
def test_quantize_replaces_the_block_linears_only(family):
    torch.manual_seed(0)
    model = Transformer(preset(family)).eval()
    embedding = model.tok_embeddings.weight.clone()
    tokens = torch.randint(0, 512, (2, 16))
    before = model(tokens)
    names = quantize_(model, QuantConfig("int4", 32))
    linears = [n for n in BLOCK_LINEARS if family == "tiny" or not n.endswith("w3")]
    assert names == [f"layers.{i}.{n}" for i in range(2) for n in linears]
    assert type(model.output) is nn.Linear and model.output.weight is model.tok_embeddings.weight
    assert torch.equal(model.tok_embeddings.weight, embedding)
    assert quantization_of(model) == {
        "method": "int4", "group_size": 32, "zero_point": "int", "modules": names,
        "embeddings": None,
    }  # fmt: skip
    after = model(tokens)
    assert (after - before).norm() < 0.1 * before.norm()  # random weights: a loose sanity bound


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: QuantConfig("int3"), "unknown quantization method 'int3'"),
        (lambda: QuantConfig("int4", 48), "group size must be 32, 64 or 128, got 48"),
        (lambda: QuantConfig("int8", 32), "group size applies to int4 only"),
        (lambda: QuantConfig("int4", zero_point="half"), "unknown --zero-point 'half'"),
        (lambda: QuantConfig("int8", zero_point="float"), "float applies to int4 only"),
    ],
)
def test_bad_configs_are_refused(make, message):
    with pytest.raises(LmscaleError, match=message):
        make()


def test_a_group_size_that_does_not_divide_the_width_changes_nothing():
    model = Transformer(preset("tiny"))  # dim 64
    with pytest.raises(
        LmscaleError,
        match="group size 128 does not divide the input width 64 of 'layers.0.attention.wq'",
    ):
        quantize_(model, QuantConfig("int4", 128))
    assert quantization_of(model) is None


def test_a_quantized_model_is_not_quantized_again():
    model = Transformer(preset("tiny"))
    quantize_(model, QuantConfig("int8"))
    with pytest.raises(LmscaleError, match=r"already quantized \(int8, 14 layers\)"):
        quantize_(model, QuantConfig("int4"))
