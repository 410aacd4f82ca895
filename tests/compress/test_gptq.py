"""GPTQ (`lmscale.compress.gptq`): lower output error than round-to-nearest, saved as plain int4."""

import json

import pytest
import torch
from torch import nn

from lmscale.checkpoint import load_pretrained, save_model_dir
from lmscale.cli.main import main
from lmscale.compress import QuantConfig, quantize_, quantize_model
from lmscale.compress.gptq import (
    GptqConfig,
    _int4_module,
    calibration_windows,
    gptq_quantize_,
    gptq_weight,
    int4_float_grid,
)
from lmscale.compress.quantize import quantize_int4
from lmscale.config import to_dict
from lmscale.errors import LmscaleError
from lmscale.model import Transformer, preset
from lmscale.model.quantized import QuantizedLinear
from lmscale.tokenizer import Tokenizer

TEXT = "to be or not to be, that is the question: whether 'tis nobler in the mind to suffer "


def correlated_layer(seed=0, tokens=2048, in_features=256, out_features=64):
    """A weight and inputs whose features are correlated and of unequal scale, as in an LM."""
    generator = torch.Generator().manual_seed(seed)
    mix = torch.randn(in_features, in_features, generator=generator) / in_features**0.5
    scale = torch.linspace(0.1, 3.0, in_features)
    x = (torch.randn(tokens, in_features, generator=generator) @ mix) * scale
    w = torch.randn(out_features, in_features, generator=generator) * 0.05
    return w, x


def rtn_weight(w, group_size, zero_point="int"):
    linear = nn.Sequential(nn.Linear(w.shape[1], w.shape[0], bias=False))
    with torch.no_grad():
        linear[0].weight.copy_(w)
    config = QuantConfig("int4", group_size, zero_point=zero_point)
    quantize_(linear, config, filter_fn=lambda m, n: True)
    return linear[0].dequantize(torch.float32)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_on_the_float_zero_grid_beats_float_zero_rtn(act_order):
    w, x = correlated_layer()
    hessian = 2 * x.T @ x / len(x)
    codes, scales, zeros = gptq_weight(w, hessian, 32, act_order, grid=int4_float_grid)
    assert bool((zeros != zeros.round()).any())  # real zero points: -min / scale
    module = _int4_module(codes, scales, zeros, nn.Linear(256, 64, bias=False), 32, "float")
    assert module.zero_point == "float" and module.mins.dtype == torch.float16
    dequantized = module.dequantize(torch.float32)
    expected = (codes.float().view(64, -1, 32) - zeros[..., None]) * scales[..., None]
    torch.testing.assert_close(dequantized, expected.view(64, 256), rtol=1e-3, atol=1e-5)
    gptq_error = (x @ (w - dequantized).T).norm()
    rtn_error = (x @ (w - rtn_weight(w, 32, "float")).T).norm()
    assert gptq_error < 0.9 * rtn_error


@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_output_error_is_lower_than_rtn_and_deterministic(group_size, act_order):
    w, x = correlated_layer()
    hessian = 2 * x.T @ x / len(x)
    codes, scales, zeros = gptq_weight(w, hessian, group_size, act_order)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15
    assert scales.shape == zeros.shape == (64, 256 // group_size)
    linear = nn.Linear(256, 64, bias=False)
    module = _int4_module(codes, scales, zeros, linear, group_size)
    assert isinstance(module, QuantizedLinear)
    dequantized = module.dequantize(torch.float32)
    expected = (codes.float().view(64, -1, group_size) - zeros[..., None]) * scales[..., None]
    torch.testing.assert_close(dequantized, expected.view(64, 256))
    gptq_error = (x @ (w - dequantized).T).norm()
    rtn_error = (x @ (w - rtn_weight(w, group_size)).T).norm()
    assert gptq_error < 0.9 * rtn_error
    again = gptq_weight(w, hessian, group_size, act_order)
    assert all(torch.equal(a, b) for a, b in zip((codes, scales, zeros), again, strict=True))


def test_gptq_with_rtn_grid_and_no_correlation_stays_on_rtn_groups():
    """Act-order's static groups are RTN's: with H = I nothing moves, so GPTQ equals RTN."""
    w, _ = correlated_layer()
    codes, scales, zeros = gptq_weight(w, torch.eye(256), 32, act_order=True, percdamp=0.0)
    packed, rtn_scales, rtn_zeros = quantize_int4(w, 32)
    torch.testing.assert_close(scales, rtn_scales)
    assert torch.equal(zeros.to(torch.uint8), rtn_zeros)
    rtn = rtn_weight(w, 32)
    dequantized = (codes.float().view(64, -1, 32) - zeros[..., None]) * scales[..., None]
    torch.testing.assert_close(dequantized.view(64, 256), rtn)


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train([TEXT] * 20, 300)


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory, tokenizer):
    """A tiny llama-family model with random weights, saved as a native float folder."""
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=tokenizer.vocab_size))
    config = {"model": to_dict(model.config), "tokenizer": tokenizer.settings}
    out = tmp_path_factory.mktemp("float") / "tiny"
    return save_model_dir(out, model.state_dict(), config, tokenizer.to_json())


@pytest.fixture(scope="module")
def calibration_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "calibration.txt"
    path.write_text(TEXT * 40)
    return path


def test_a_gptq_model_is_closer_to_float_than_rtn_on_its_calibration(
    float_dir, tokenizer, calibration_file
):
    model, _ = load_pretrained(float_dir)
    windows = calibration_windows(tokenizer, calibration_file, 8, 64)
    assert windows.shape == (8, 64)
    assert torch.equal(windows, calibration_windows(tokenizer, calibration_file, 8, 64))
    reference = model(windows)
    gptq, rtn = load_pretrained(float_dir)[0], load_pretrained(float_dir)[0]
    names = gptq_quantize_(gptq, QuantConfig("int4", 32), windows, batch_size=3)
    assert names == quantize_(rtn, QuantConfig("int4", 32)) and len(names) == 14
    assert (gptq(windows) - reference).norm() < (rtn(windows) - reference).norm()


@pytest.mark.parametrize("zero_point", ["int", "float"])
def test_cli_gptq_writes_a_folder_that_loads_bit_equal(
    float_dir, tokenizer, calibration_file, tmp_path, capsys, zero_point
):
    out = tmp_path / "q4"
    argv = ["quantize", "--model", str(float_dir), "--method", "int4", "--calibrate", "gptq",
            "--calibration", str(calibration_file), "--calibration-samples", "6",
            "--calibration-length", "48", "--act-order", "--embeddings", "float",
            "--zero-point", zero_point, "--out", str(out), "--json"]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["modules"] == 14 and result["calibration"]["method"] == "gptq"
    saved = json.loads((out / "config.json").read_text())["quantization"]
    assert saved["method"] == "int4" and saved["group_size"] == 32
    assert saved["zero_point"] == zero_point
    assert saved["calibration"] == GptqConfig(6, 48, str(calibration_file), True).as_dict()
    loaded, _ = load_pretrained(out)
    assert isinstance(loaded.layers[1].feed_forward.w2, QuantizedLinear)
    model, _ = load_pretrained(float_dir)
    windows = calibration_windows(tokenizer, calibration_file, 6, 48)
    config = QuantConfig("int4", 32, zero_point=zero_point)
    gptq_quantize_(model, config, windows, GptqConfig(act_order=True))
    assert model.layers[0].attention.wq.zero_point == zero_point
    tokens = torch.tensor([tokenizer.encode("to be or not to be")])
    assert torch.equal(loaded(tokens), model(tokens))  # the integers survive the folder exactly
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "int4", "--calibrate", "awq"], "unknown calibration 'awq' (choose from gptq)"),
        (["--method", "int8", "--calibrate", "gptq"], "GPTQ calibration is implemented for int4"),
        (["--method", "int4", "--calibration", "x.txt"], "apply with --calibrate gptq only"),
        (["--method", "int4", "--calibrate", "gptq", "--calibration-length", "4096"],
         "exceeds the model's max_seq_len 128"),
        (["--method", "int4", "--calibrate", "gptq", "--calibration-samples", "0"],
         "at least 1 sample"),
        (["--method", "int4", "--calibrate", "gptq", "--calibration-length", "100"],
         "fewer than one window of 100"),
    ],
)  # fmt: skip
def test_cli_bad_calibration_is_one_line(float_dir, tmp_path, capsys, args, message):
    short = tmp_path / "short.txt"
    short.write_text("to be or not to be")
    out = tmp_path / "q"
    argv = ["quantize", "--model", str(float_dir), *args, "--out", str(out)]
    if "--calibrate" in args and "--calibration" not in args:
        argv += ["--calibration", str(short)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()


def test_quantize_model_refuses_gptq_for_int8_before_loading(tmp_path):
    with pytest.raises(LmscaleError, match="int4 only"):
        quantize_model(tmp_path / "missing", QuantConfig("int8"), tmp_path / "q", GptqConfig())


def test_gptq_handles_a_gpt2_block_with_biases():
    torch.manual_seed(0)
    model = Transformer(preset("tiny-gpt2")).eval()
    tokens = torch.randint(0, 512, (4, 32))
    reference = model(tokens)
    rtn = Transformer(preset("tiny-gpt2")).eval()
    rtn.load_state_dict(model.state_dict())
    quantize_(rtn, QuantConfig("int4", 64))
    names = gptq_quantize_(model, QuantConfig("int4", 64), tokens)
    assert len(names) == 12 and model.layers[0].attention.wq.bias is not None
    assert (model(tokens) - reference).norm() < (rtn(tokens) - reference).norm()
