"""The fast CPU kernels of `QuantizedLinear` against its reference, `codes` / `from_codes`, and
the quantized embedding (lookup, tied head, save -> load)."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from lmscale.checkpoint import load_pretrained, save_model_dir
from lmscale.compress import QuantConfig, quantization_of, quantize_
from lmscale.compress.save import save_quantized
from lmscale.config import to_dict
from lmscale.errors import LmscaleError
from lmscale.model import Transformer, decode_layout_, preset
from lmscale.model.quantized import QuantizedEmbedding, QuantizedLinear
from lmscale.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[2]
LAYOUTS = [("int8", None), ("int8-dynamic", None), ("int4", 32), ("int4", 64), ("int4", 128)]
FLOAT_ZERO = [("int4", 32, "float"), ("int4", 64, "float"), ("int4", 128, "float")]
"""int4 with a float group minimum (Q4_1) instead of an integer zero point."""


def quantized_layer(
    method, group_size, out_features=40, in_features=256, bias=True, seed=0, zero_point="int"
):
    """A random layer quantized with `quantize_` (40 outputs: the int4 kernel pads to 48)."""
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight[3] = 0.0  # a zero row: scale at its floor, codes all at the zero point
        linear.weight[5] = linear.weight[5].abs() + 0.01  # one sign: the float minimum is not 0
    model = nn.Sequential(linear)
    config = QuantConfig(method, group_size, zero_point=zero_point)
    quantize_(model, config, filter_fn=lambda module, fqn: True)
    return model[0]


# Largest kernel error allowed, as a fraction of the largest reference output: the weight-only
# kernels round activations and scales to bfloat16 (~0.4%), or (lmscale's own, a few rows, on
# an AVX-512 VNNI CPU) activations to 8 bits per 32 columns; int8-dynamic rounds activations to
# 8 bits per token. A wrong layout (nibble order, zero-point convention, padding) is ~100% off.
TOLERANCE = {"int8": 0.02, "int8-dynamic": 0.03, "int4": 0.02}


@pytest.fixture
def no_native_kernels(monkeypatch):
    """As on a machine where lmscale's own kernels could not be built."""
    from lmscale import kernels

    monkeypatch.setattr(kernels, "_state", {"ok": False, "reason": "a test"})


@pytest.mark.parametrize(
    "method, group_size, zero_point", [(*layout, "int") for layout in LAYOUTS] + FLOAT_ZERO
)
@pytest.mark.parametrize("shape", [(1, 1, 256), (3, 7, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernel_equals_the_dequantized_reference(method, group_size, zero_point, shape, dtype):
    layer = quantized_layer(method, group_size, zero_point=zero_point).to(dtype)
    x = torch.randn(shape).to(dtype)
    y = layer(x)
    expected = nn.functional.linear(
        x.double(), layer.dequantize(torch.float64), layer.bias.double()
    )
    assert y.shape == (*shape[:-1], 40) and y.dtype == dtype
    error = (y.double() - expected).abs().max() / expected.abs().max()
    assert error < TOLERANCE[method] * (2 if dtype == torch.bfloat16 else 1)
    assert layer._kernel  # a kernel ran (CPU), not the reference


def test_the_kernel_follows_the_layer_to_another_dtype_and_new_buffers():
    layer = quantized_layer("int4", 32)
    x = torch.randn(2, 256)
    before = layer(x)
    layer.to(torch.bfloat16)
    assert layer(x.bfloat16()).dtype == torch.bfloat16
    other = quantized_layer("int4", 32, seed=1)
    layer.to(torch.float32)
    layer.load_state_dict(other.state_dict(), assign=True)
    torch.testing.assert_close(layer(x), other(x), rtol=0, atol=0)
    assert not torch.equal(layer(x), before)


@pytest.mark.parametrize(
    "method, group_size, zero_point", [(*layout, "int") for layout in LAYOUTS] + FLOAT_ZERO
)
def test_codes_dequantize_and_rebuild_the_layer(method, group_size, zero_point):
    layer = quantized_layer(method, group_size, zero_point=zero_point)
    q, scales, zeros = layer.codes()
    assert q.shape == (40, 256) and scales.dtype == torch.float32
    if method == "int4":
        assert q.dtype == torch.uint8 and int(q.max()) <= 15
        assert zeros.shape == scales.shape == (40, 256 // group_size)
        per_column = (q.float().view(40, -1, group_size) - zeros[..., None]) * scales[..., None]
        # a float zero point is -min / scale: (q - zero) * scale equals q * scale + min only
        # up to float32 rounding
        exact = 0 if zero_point == "int" else 1e-6
        torch.testing.assert_close(
            per_column.view(40, 256), layer.dequantize(), rtol=exact, atol=exact
        )  # fmt: skip
        assert (zero_point == "float") == bool((zeros != zeros.round()).any())
    else:
        assert q.dtype == torch.int8 and zeros is None and scales.shape == (40,)
        torch.testing.assert_close(q.float() * scales[:, None], layer.dequantize(), rtol=0, atol=0)
    rebuilt = QuantizedLinear.from_codes(
        q, scales, zeros, method, group_size, layer.bias, zero_point
    )  # fmt: skip
    for name, tensor in layer.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[name], tensor), name
    x = torch.randn(3, 256)
    assert torch.equal(rebuilt(x), layer(x))


def test_from_codes_refuses_codes_out_of_range():
    q = torch.full((16, 64), 16, dtype=torch.uint8)
    with pytest.raises(LmscaleError, match="must lie in 0..15"):
        QuantizedLinear.from_codes(q, torch.ones(16, 2), torch.zeros(16, 2), "int4", 32)
    with pytest.raises(LmscaleError, match="int8 is symmetric"):
        QuantizedLinear.from_codes(
            torch.zeros(16, 64, dtype=torch.int8), torch.ones(16), torch.ones(16, 2), "int8"
        )  # fmt: skip


def grouped_int8_layer(out_features=40, in_features=256, group_size=32, seed=0):
    """Grouped int8 (the layout a GGUF's Q8_0 loads into): random codes, float16 scales."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (out_features, in_features), generator=gen)
    scales = (torch.rand(out_features, in_features // group_size, generator=gen) / 100).half()
    bias = torch.randn(out_features, generator=gen)
    return QuantizedLinear.from_codes(q, scales.float(), None, "int8", group_size, bias)


def test_grouped_int8_holds_one_scale_per_group_and_equals_the_reference(float_activations):
    layer = grouped_int8_layer()
    q, scales, zeros = layer.codes()
    assert q.dtype == torch.int8 and zeros is None and scales.shape == (40, 8)
    expected = (q.float().view(40, 8, 32) * scales[..., None]).view(40, 256)
    assert torch.equal(layer.dequantize(), expected)
    rows = torch.tensor([[3, 0], [39, 3]])
    assert torch.equal(layer.dequantize_rows(rows, torch.float32), expected[rows])
    for shape in ((3, 5, 256), (2, 256)):  # the reference, in blocks; lmscale's kernel
        x = torch.randn(shape)
        torch.testing.assert_close(
            layer(x), nn.functional.linear(x, expected, layer.bias), rtol=1e-5, atol=1e-5
        )  # fmt: skip
    rebuilt = QuantizedLinear.from_codes(q, scales, None, "int8", 32, layer.bias)
    for name, tensor in layer.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[name], tensor), name
    with pytest.raises(LmscaleError, match="int8 group size must be 32, 64 or 128, got 48"):
        QuantizedLinear(240, 40, "int8", 48)
    with pytest.raises(LmscaleError, match="a group size applies to int4 and int8 only"):
        QuantizedLinear(256, 40, "int8-dynamic", 32)
    with pytest.raises(LmscaleError, match=r"int8 scales must have shape \(40, 8\)"):
        QuantizedLinear.from_codes(q, scales[:, 0], None, "int8", 32)


@pytest.mark.parametrize("rows", [1, 3])
def test_compiled_int8_of_a_few_rows_sums_in_float32(rows, no_native_kernels):
    """Without lmscale's own kernels, in a compiled graph of a few rows (the decode step), both
    int8 layouts run as a float32 product-sum fed by a realised input: float32 rounding from
    the reference, where the eager kernel's bfloat16 activations are ~0.1% off."""
    per_channel, grouped = quantized_layer("int8", None), grouped_int8_layer()
    norm = torch.rand(256) + 0.5

    def normed(x):  # the RMSNorm that feeds a projection (and must not be recomputed per row)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm

    compiled = torch.compile(lambda x: (per_channel(normed(x)), grouped(normed(x))), fullgraph=True)
    x = torch.randn(rows, 256)
    with torch.no_grad():
        h = normed(x).double()
        for layer, y in zip((per_channel, grouped), compiled(x), strict=True):
            expected = nn.functional.linear(h, layer.dequantize(torch.float64), layer.bias.double())
            assert (y.double() - expected).abs().max() / expected.abs().max() < 1e-6
        eager = per_channel(normed(x)).double()
        assert (eager - nn.functional.linear(h, per_channel.dequantize(torch.float64),
                per_channel.bias.double())).abs().max() > 1e-5  # fmt: skip


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny tied-embedding llama model with random weights, saved as a native float folder."""
    tokenizer = Tokenizer.train(["to be or not to be, that is the question"] * 20, 300)
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=tokenizer.vocab_size))
    config = {"model": to_dict(model.config), "tokenizer": tokenizer.settings}
    out = tmp_path_factory.mktemp("float") / "tiny"
    return save_model_dir(out, model.state_dict(), config, tokenizer.to_json())


@pytest.mark.parametrize("method, embeddings, zero_point", [
    ("int8", "int8", "int"), ("int4", "int4", "int"), ("int4", "int8", "int"),
    ("int4", "int4", "float"), ("int8", "int4", "float"),
])  # fmt: skip
def test_quantized_embeddings_share_one_table_with_the_head_and_load_back(
    tiny_dir, tmp_path, method, embeddings, zero_point
):
    model, tokenizer = load_pretrained(tiny_dir)
    table = model.tok_embeddings.weight.detach().clone()
    quantize_(model, QuantConfig(method, embeddings=embeddings, zero_point=zero_point))
    embedding = model.tok_embeddings
    assert isinstance(embedding, QuantizedEmbedding) and model.output is embedding.table
    assert embedding.weight.dtype == torch.float32 and embedding.weight.numel() == 0
    record = quantization_of(model)
    table_zero = zero_point if embeddings == "int4" else "int"
    assert record["embeddings"] == {"method": embeddings, "group_size": 32 if embeddings ==
                                    "int4" else None, "tied": True,
                                    "zero_point": table_zero}  # fmt: skip
    assert record["zero_point"] == (zero_point if method == "int4" else "int")
    tokens = torch.tensor([tokenizer.encode("to be or not to be")])
    rows = embedding(tokens)  # the lookup dequantizes just these rows
    torch.testing.assert_close(rows[0], embedding.dequantize()[tokens[0]], rtol=0, atol=0)
    half_step = 1 / 127 if embeddings == "int8" else 1 / 15  # of the largest |value|, at most
    assert (rows[0] - table[tokens[0]]).abs().max() <= half_step * table.abs().max()
    out = save_quantized(model, tokenizer, tmp_path / "q")
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
        assert handle.get_tensor("tok_embeddings.table.scales").dtype == torch.float16
        if table_zero == "float":
            assert handle.get_tensor("tok_embeddings.table.mins").dtype == torch.float16
    assert "tok_embeddings.weight" not in keys and "output.qweight" not in keys  # stored once
    loaded, _ = load_pretrained(out)
    assert loaded.output is loaded.tok_embeddings.table
    assert quantization_of(loaded) == record
    assert torch.equal(loaded(tokens), model(tokens))
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name  # bit-equal


def test_int4_float_zero_point_bytes_are_half_a_byte_plus_two_float16_per_group(tiny_dir, tmp_path):
    model, tokenizer = load_pretrained(tiny_dir)
    quantize_(model, QuantConfig("int4", 32, zero_point="float"))
    out = save_quantized(model, tokenizer, tmp_path / "q")
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
        layer = {k: handle.get_tensor(f"layers.0.attention.wq.{k}") for k in ("qweight", "scales",
                                                                           "mins")}  # fmt: skip
    assert "layers.0.attention.wq.zeros" not in keys and layer["mins"].dtype == torch.float16
    out_f, in_f = model.layers[0].attention.wq.out_features, 64
    assert sum(t.nbytes for t in layer.values()) == out_f * in_f * (0.5 + 2 / 32 + 2 / 32)
    config = json.loads((out / "config.json").read_text())["quantization"]
    assert config["zero_point"] == "float" and config["method"] == "int4"


def test_int4_bytes_are_half_a_byte_plus_float16_scale_and_packed_zero_per_group(
    tiny_dir, tmp_path
):
    model, tokenizer = load_pretrained(tiny_dir)
    quantize_(model, QuantConfig("int4", 32, embeddings="int4"))
    out = save_quantized(model, tokenizer, tmp_path / "q")
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        layer = {k: handle.get_tensor(f"layers.0.attention.wq.{k}") for k in ("qweight", "scales",
                                                                           "zeros")}  # fmt: skip
        total = sum(handle.get_tensor(k).nbytes for k in handle.keys())
    out_f, in_f = model.layers[0].attention.wq.out_features, 64
    assert sum(t.nbytes for t in layer.values()) == out_f * in_f * (0.5 + 2 / 32 + 0.5 / 32)
    float_total = sum(t.nbytes for t in load_pretrained(tiny_dir)[0].state_dict().values()) - (
        model.config.vocab_size * model.config.dim * 4  # the tied head is stored once
    )  # fmt: skip
    assert total < 0.2 * float_total  # norms stay float32


def test_cli_quantizes_embeddings_and_eval_and_generate_run_the_folder(tiny_dir, tmp_path):
    env = os.environ | {"PYTHONPATH": str(ROOT / "src")}

    def lmscale(*args):
        cmd = [sys.executable, "-m", "lmscale.cli.main", *map(str, args)]
        return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)

    out = tmp_path / "q"
    bad = lmscale("quantize", "--model", tiny_dir, "--method", "int4", "--embeddings", "int2",
                  "--out", out)  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert "unknown --embeddings 'int2' (choose from float, int8, int4)" in bad.stderr
    assert not out.exists()
    bad = lmscale("quantize", "--model", tiny_dir, "--method", "int4", "--zero-point", "half",
                  "--out", out)  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert "unknown --zero-point 'half' (choose from int, float)" in bad.stderr
    bad = lmscale("quantize", "--model", tiny_dir, "--method", "int8", "--zero-point", "float",
                  "--out", out)  # fmt: skip
    assert bad.returncode == 2 and "applies to int4 only" in bad.stderr and not out.exists()
    done = lmscale("quantize", "--model", tiny_dir, "--method", "int4", "--out", out)
    assert done.returncode == 0, done.stderr
    assert "int8 embeddings" in done.stdout  # the default
    text = tmp_path / "text.txt"
    text.write_text("to be or not to be, that is the question " * 4)
    evaluated = lmscale("eval", "--model", out, "--text", text, "--json")
    assert evaluated.returncode == 0 and '"tokens"' in evaluated.stdout, evaluated.stderr
    generated = lmscale("generate", "--model", out, "--prompt", "to be", "--temperature", "0",
                        "--max-new-tokens", "5", "--json")  # fmt: skip
    assert generated.returncode == 0 and '"text"' in generated.stdout, generated.stderr


def test_deepcopy_of_a_layer_that_ran_rebuilds_its_kernel():
    layer = quantized_layer("int8-dynamic", None)
    x = torch.randn(2, 256)
    y = layer(x)
    twin = copy.deepcopy(layer)
    assert not twin._kernel and torch.equal(twin(x), y)


def test_the_decode_layout_leaves_quantized_layers_alone(tiny_dir):
    model, tokenizer = load_pretrained(tiny_dir)
    quantize_(model, QuantConfig("int4", 32, embeddings="int8"))
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    tokens = torch.tensor([tokenizer.encode("to be or not")])
    logits = model(tokens)
    decode_layout_(model)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]) and tensor.is_contiguous(), name
    assert torch.equal(model(tokens), logits)


def test_a_folder_saved_before_zero_points_were_recorded_loads_as_int(tiny_dir, tmp_path):
    model, tokenizer = load_pretrained(tiny_dir)
    quantize_(model, QuantConfig("int4", 32, embeddings="int4"))
    out = save_quantized(model, tokenizer, tmp_path / "q")
    config = json.loads((out / "config.json").read_text())
    del config["quantization"]["zero_point"], config["quantization"]["embeddings"]["zero_point"]
    (out / "config.json").write_text(json.dumps(config))
    loaded, _ = load_pretrained(out)
    assert quantization_of(loaded) == quantization_of(model)
    tokens = torch.tensor([tokenizer.encode("to be or not")])
    assert torch.equal(loaded(tokens), model(tokens))
