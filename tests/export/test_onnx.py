"""ONNX export: onnxruntime runs the exported graph with its KV cache and matches lmscale."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lmscale.compress.quantize import QuantConfig, quantize_
from lmscale.compress.save import save_quantized
from lmscale.errors import LmscaleError
from lmscale.model import Transformer, preset
from lmscale.model.quantized import QuantizedLinear
from lmscale.tokenizer import Tokenizer

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from lmscale.export import export_onnx  # noqa: E402
from lmscale.export.nbits import dequantize_nbits, nbits_tensors  # noqa: E402
from lmscale.export.onnx import exact_quantized_math  # noqa: E402
from lmscale.export.onnx_runtime import OnnxModel  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def exact_lmscale_math():
    """Compare with lmscale's exact quantized math (see `exact_quantized_math`), not its
    bfloat16-activation CPU kernels."""
    with exact_quantized_math():
        yield


def tiny_model(name: str, method: str | None = None, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(preset(name)).eval()
    if method is not None:
        quantize_(model, QuantConfig(method=method))
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each (preset, quantization) exported once per module: exports take seconds."""
    cache = {}

    def get(name: str, method: str | None = None):
        if (name, method) not in cache:
            model = tiny_model(name, method)
            out = export_onnx(model, None, tmp_path_factory.mktemp("onnx") / "m")
            cache[name, method] = model, out
        return cache[name, method]

    return get


def lmscale_greedy(model, ids: torch.Tensor, steps: int) -> tuple[list[torch.Tensor], list]:
    """Logits of the prompt's last position and of each decode step, through lmscale's cache."""
    cache = model.new_cache(ids.shape[0], ids.shape[1] + steps)
    logits, tokens = [], []
    with torch.no_grad():
        out = model(ids, cache)
        for _ in range(steps):
            logits.append(out[:, -1])
            tokens.append(out[:, -1].argmax(-1, keepdim=True))
            out = model(tokens[-1], cache)
    return logits, tokens


@pytest.mark.parametrize("name", ["tiny", "tiny-gpt2"])
def test_prefill_and_cached_decode_match_lmscale_at_batch_2(exported, name):
    model, out = exported(name)
    ort = OnnxModel(out)
    ids = torch.randint(
        0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1)
    )
    ref_logits, ref_tokens = lmscale_greedy(model, ids, steps=4)
    with torch.no_grad():
        full = model(ids)
    logits, past = ort.step(ids.numpy(), ort.empty_past(2))
    assert np.abs(logits - full.numpy()).max() <= 1e-4
    for step in range(4):
        assert np.abs(logits[:, -1] - ref_logits[step].numpy()).max() <= 1e-4
        token = logits[:, -1].argmax(-1)[:, None]
        assert np.array_equal(token, ref_tokens[step].numpy())
        assert past[0].shape == (2, model.config.n_kv_heads, 7 + step, model.config.head_dim)
        logits, past = ort.step(token, past)


def test_graph_has_optimum_names_and_dynamic_axes(exported):
    model, out = exported("tiny")
    graph = onnx.load(str(out / "model.onnx")).graph
    n = model.config.n_layers
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask"] + [
        f"past_key_values.{i}.{kv}" for i in range(n) for kv in ("key", "value")
    ]
    assert [o.name for o in graph.output] == ["logits"] + [
        f"present.{i}.{kv}" for i in range(n) for kv in ("key", "value")
    ]

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    inputs = {i.name: dims(i) for i in graph.input}
    assert inputs["input_ids"] == ["batch_size", "sequence_length"]
    assert inputs["past_key_values.0.key"] == ["batch_size", 2, "past_sequence_length", 16]
    assert dims(graph.output[1])[2] == "past_sequence_length + sequence_length"
    config = json.loads((out / "config.json").read_text())
    assert config["onnx"]["n_layers"] == n and config["num_hidden_layers"] == n


def test_left_padding_is_masked_out(exported):
    """A left-padded row decodes as the same prompt alone (RoPE scores depend on distances)."""
    model, out = exported("tiny")
    ort = OnnxModel(out)
    prompt = np.array([[5, 17, 99, 3]])
    alone, _ = ort.step(prompt, ort.empty_past(1))
    padded = np.array([[0, 0, 5, 17, 99, 3]])
    mask = np.array([[0, 0, 1, 1, 1, 1]])
    logits, _ = ort.step(padded, ort.empty_past(1), mask)
    assert np.abs(logits[:, -1] - alone[:, -1]).max() <= 1e-4


@pytest.mark.parametrize("method", ["int4", "int8"])
def test_nbits_layout_dequantizes_to_the_layer_weight(method):
    model = tiny_model("tiny", method)
    layer = model.layers[0].feed_forward.w2  # in_features 128
    t = nbits_tensors(layer)
    weight = dequantize_nbits(t["packed"], t["scales"], t["zero_points"], t["K"], t["N"],
                              t["bits"], t["block_size"])  # fmt: skip
    assert torch.equal(weight, layer.dequantize(torch.float32))


def test_nbits_layout_of_grouped_int8_keeps_its_scale_per_block():
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (48, 128), generator=gen)
    scales = torch.rand(48, 4, generator=gen).half().float()
    layer = QuantizedLinear.from_codes(q, scales, None, "int8", 32)  # a GGUF's Q8_0 layout
    t = nbits_tensors(layer)
    assert (t["bits"], t["block_size"]) == (8, 32) and torch.equal(t["scales"], scales.view(-1))
    weight = dequantize_nbits(t["packed"], t["scales"], t["zero_points"], t["K"], t["N"],
                              t["bits"], t["block_size"])  # fmt: skip
    assert torch.equal(weight, layer.dequantize(torch.float32))


def test_nbits_layout_of_a_float_zero_point_is_float_zero_points():
    torch.manual_seed(0)
    model = Transformer(preset("tiny")).eval()
    quantize_(model, QuantConfig("int4", 64, zero_point="float"))
    layer = model.layers[0].feed_forward.w2
    t = nbits_tensors(layer)
    assert t["zero_points"].dtype == torch.float32 and t["block_size"] == 64
    assert t["zero_points"].shape == (layer.out_features * layer.in_features // 64,)
    weight = dequantize_nbits(t["packed"], t["scales"], t["zero_points"], t["K"], t["N"],
                              t["bits"], t["block_size"])  # fmt: skip
    # (q - (-min / s)) * s against q * s + min: float32 rounding only
    torch.testing.assert_close(weight, layer.dequantize(torch.float32), rtol=1e-5, atol=1e-6)


def check_integers_kept(model, out, bits: int):
    graph = onnx.load(str(out / "model.onnx")).graph
    nodes = [n for n in graph.node if n.op_type == "MatMulNBits"]
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    per_block = 7 if model.config.family == "llama" else 6
    assert len(nodes) == len(layers) == per_block * model.config.n_layers
    assert all(n.domain == "com.microsoft" for n in nodes)
    assert {a.i for n in nodes for a in n.attribute if a.name == "bits"} == {bits}
    inits = {i.name: i for i in graph.initializer}
    packed = [inits[n.input[1]] for n in nodes]
    assert {p.data_type for p in packed} == {onnx.TensorProto.UINT8}
    # no float copy of any quantized weight (either orientation)
    shapes = {
        s
        for m in layers
        for s in ((m.out_features, m.in_features), (m.in_features, m.out_features))
    }
    floats = [tuple(i.dims) for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT]
    assert floats and not shapes & set(floats)


def test_quantized_int4_layers_stay_integers_and_match(exported):
    model, out = exported("tiny", "int4")
    check_integers_kept(model, out, bits=4)
    ort = OnnxModel(out)
    ids = torch.randint(
        0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(2)
    )
    ref_logits, ref_tokens = lmscale_greedy(model, ids, steps=3)
    logits, past = ort.step(ids.numpy(), ort.empty_past(1))
    for step in range(3):
        assert np.abs(logits[:, -1] - ref_logits[step].numpy()).max() <= 1e-3
        token = logits[:, -1].argmax(-1)[:, None]
        assert np.array_equal(token, ref_tokens[step].numpy())
        logits, past = ort.step(token, past)


def test_export_leaves_the_model_unchanged(exported):
    model, _ = exported("tiny", "int4")
    assert isinstance(model.layers[0].attention.wq, QuantizedLinear)


def lmscale(*args):
    env = os.environ | {"PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "lmscale", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


@pytest.fixture(scope="module")
def quantized_dir(tmp_path_factory):
    model = tiny_model("tiny-gpt2", "int8")
    tokenizer = Tokenizer.train(["To be, or not to be, that is the question."] * 20, 300)
    return model, save_quantized(model, tokenizer, tmp_path_factory.mktemp("q") / "q4")


def test_cli_exports_an_int8_dir_that_decodes_in_onnxruntime(quantized_dir, tmp_path):
    model, source = quantized_dir
    out = lmscale("export", "onnx", "--model", str(source), "--out", str(tmp_path / "o"), "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["prefill_max_abs_diff"] <= 1e-3 and report["decode_max_abs_diff"] <= 1e-3
    assert {"model.onnx", "config.json", "tokenizer.json"} <= {
        p.name for p in (tmp_path / "o").iterdir()
    }
    check_integers_kept(model, tmp_path / "o", bits=8)
    tokenizer = Tokenizer.load_pretrained(tmp_path / "o")
    prompt = tokenizer.encode("To be, or not")
    new = OnnxModel(tmp_path / "o", threads=1).generate(prompt, max_new_tokens=5)
    _, ref = lmscale_greedy(model, torch.tensor([prompt]), steps=5)
    assert new == [int(t) for t in torch.cat(ref, dim=1)[0]]


@pytest.mark.parametrize(
    "args, message",
    [(("--model", "nonexistent"), "model not found"),
     (("--model", "tiny", "--out", "pyproject.toml"), "is not an empty folder")],
)  # fmt: skip
def test_cli_mistakes_are_one_line_and_exit_2(args, message, tmp_path):
    args = ("--out", str(tmp_path / "o"), *args) if "--out" not in args else args
    out = lmscale("export", "onnx", *args)
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1 and message in out.stderr


def test_bad_opset_is_refused_before_any_model_loads(tmp_path):
    from lmscale.export.onnx import check_out_dir

    with pytest.raises(LmscaleError, match="--opset must be 18 or newer"):
        check_out_dir(tmp_path / "o", opset=13)


def test_missing_onnxruntime_names_the_extra(monkeypatch, tmp_path):
    from lmscale.export.onnx import require_onnx

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    with pytest.raises(LmscaleError, match=r"pip install 'lmscale\[onnx\]'"):
        require_onnx()
    with pytest.raises(LmscaleError, match="onnxruntime is missing"):
        export_onnx(tiny_model("tiny"), None, tmp_path / "o")


@pytest.mark.parametrize("zero_point", ["int", "float"])
def test_quantized_embeddings_export_with_the_tied_head_kept_as_integers(tmp_path, zero_point):
    """int4 blocks + an int4 embedding table tied to the head (what `quantize --embeddings int4`
    writes): the lookup exports as a float table, the head as MatMulNBits; logits match. With
    `--zero-point float` the zero points are float32 (-min / scale), one per block."""
    torch.manual_seed(0)
    model = Transformer(preset("tiny")).eval()
    quantize_(model, QuantConfig("int4", 32, embeddings="int4", zero_point=zero_point))
    out = export_onnx(model, None, tmp_path / "m")
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 7 * model.config.n_layers + 1  # every block linear and the head
    inits = {i.name: i for i in graph.initializer}
    zero_types = {inits[n.input[3]].data_type for n in nbits}
    T = onnx.TensorProto
    assert zero_types == {T.FLOAT if zero_point == "float" else T.UINT8}
    ids = torch.randint(
        0, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(3)
    )
    ref_logits, ref_tokens = lmscale_greedy(model, ids, steps=2)
    ort = OnnxModel(out)
    logits, past = ort.step(ids.numpy(), ort.empty_past(1))
    assert np.abs(logits[:, -1] - ref_logits[0].numpy()).max() <= 1e-3
    assert np.array_equal(logits[:, -1].argmax(-1)[:, None], ref_tokens[0].numpy())
