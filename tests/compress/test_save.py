"""Quantized model folders: saved, loaded by `load_pretrained` from their integers, and the CLI."""

import json

import pytest
import torch
from safetensors import safe_open

from lmscale.checkpoint import load_pretrained, save_model_dir
from lmscale.cli.main import main
from lmscale.compress import QuantConfig, quantization_of, quantize_, quantize_model
from lmscale.config import to_dict
from lmscale.engine import GenerationRequest, LLMEngine, RequestParams, SamplingParams, generate_ids
from lmscale.errors import LmscaleError
from lmscale.model import Transformer, preset
from lmscale.model.quantized import QuantizedLinear
from lmscale.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    """A tiny llama-family model with random weights, saved as a native float folder."""
    tokenizer = Tokenizer.train(["to be or not to be, that is the question"] * 20, 300)
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=tokenizer.vocab_size))
    config = {"model": to_dict(model.config), "tokenizer": tokenizer.settings}
    out = tmp_path_factory.mktemp("float") / "tiny"
    return save_model_dir(out, model.state_dict(), config, tokenizer.to_json())


def layer_bytes(folder, names):
    """Bytes in model.safetensors of the tensors belonging to the modules `names`."""
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        keys = [k for k in handle.keys() if k.rsplit(".", 1)[0] in names]
        return sum(handle.get_tensor(k).nbytes for k in keys)


@pytest.mark.parametrize("config, ratio", [(QuantConfig("int8"), 0.27),
                                           (QuantConfig("int4", 32), 0.17),
                                           (QuantConfig("int4", 64), 0.15)])  # fmt: skip
def test_save_then_load_gives_the_same_outputs_from_a_smaller_file(
    float_dir, tmp_path, config, ratio
):
    model, _ = load_pretrained(float_dir)
    names = quantize_(model, config)
    out = tmp_path / "q"
    result = quantize_model(float_dir, config, out)
    assert result.modules == len(names) == 14
    loaded, tokenizer = load_pretrained(out)
    assert quantization_of(loaded) == quantization_of(model)
    first = loaded.layers[0].attention.wq
    assert isinstance(first, QuantizedLinear)  # rebuilt from the stored integers
    assert first.qweight.dtype == (torch.int8 if config.method == "int8" else torch.uint8)
    assert loaded.output.weight is loaded.tok_embeddings.weight
    tokens = torch.tensor([tokenizer.encode("to be or not to be")])
    assert torch.equal(loaded(tokens), model(tokens))
    saved = json.loads((out / "config.json").read_text())["quantization"]
    assert saved == {"method": config.method, "group_size": config.group_size, "modules": names,
                     "embeddings": None, "zero_point": "int"}  # fmt: skip
    assert layer_bytes(out, names) < ratio * layer_bytes(float_dir, names)
    assert result.bytes == (out / "model.safetensors").stat().st_size
    assert result.bytes < (float_dir / "model.safetensors").stat().st_size


def test_a_quantized_folder_loads_in_bfloat16(float_dir, tmp_path):
    quantize_model(float_dir, QuantConfig("int4", 32), tmp_path / "q")
    model, tokenizer = load_pretrained(tmp_path / "q", dtype="bfloat16")
    assert model.layers[0].attention.wq.scales.dtype == torch.bfloat16
    assert model.layers[0].attention.wq.qweight.dtype == torch.uint8
    logits = model(torch.tensor([tokenizer.encode("to be")]))
    assert logits.dtype == torch.bfloat16 and logits.isfinite().all()


def test_a_damaged_quantization_section_is_a_clear_error(float_dir, tmp_path):
    out = quantize_model(float_dir, QuantConfig("int8"), tmp_path / "q").out
    config = json.loads((out / "config.json").read_text())
    config["quantization"]["method"] = "int5"
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(LmscaleError, match="unknown quantization method 'int5'"):
        load_pretrained(out)
    config["quantization"]["modules"] = "all"
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(LmscaleError, match="bad 'quantization' section"):
        load_pretrained(out)


def test_cli_quantize_writes_a_folder_that_eval_loads(float_dir, tmp_path, capsys):
    out = tmp_path / "q4"
    argv = ["quantize", "--model", str(float_dir), "--method", "int4", "--group-size", "64"]
    assert main([*argv, "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["method"] == "int4" and result["group_size"] == 64 and result["modules"] == 14
    assert result["bytes"] < result["float_bytes"]
    text = tmp_path / "text.txt"
    text.write_text("to be or not to be, that is the question " * 4)
    assert main(["eval", "--model", str(out), "--text", str(text), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] > 0


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--method", "int3"],
            "unknown quantization method 'int3' (choose from int8, int8-dynamic, int4)",
        ),
        (["--method", "int4", "--group-size", "48"], "group size must be 32, 64 or 128, got 48"),
        (["--method", "int4", "--group-size", "128"], "group size 128 does not divide"),
        (["--method", "int8", "--group-size", "32"], "group size applies to int4 only"),
    ],
)
def test_cli_bad_input_is_one_line(float_dir, tmp_path, capsys, args, message):
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(float_dir), *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()


def test_cli_refuses_an_already_quantized_model_and_an_existing_out(float_dir, tmp_path, capsys):
    quantize_model(float_dir, QuantConfig("int8"), tmp_path / "q8")
    argv = ["quantize", "--model", str(tmp_path / "q8"), "--method", "int4"]
    assert main([*argv, "--out", str(tmp_path / "q4")]) == 2
    err = capsys.readouterr().err
    assert "already quantized (int8, 14 layers)" in err and err.count("\n") == 1
    argv = ["quantize", "--model", str(float_dir), "--method", "int8"]
    assert main([*argv, "--out", str(tmp_path / "q8")]) == 2
    assert "already exists" in capsys.readouterr().err
    for fmt in ("hf", "native"):  # export writes float models: it must not write a broken one
        argv = ["export", fmt, "--model", str(tmp_path / "q8"), "--out", str(tmp_path / fmt)]
        assert main(argv) == 2
        assert "is quantized" in capsys.readouterr().err and not (tmp_path / fmt).exists()


def test_the_serving_engine_runs_a_quantized_folder(float_dir, tmp_path):
    quantize_model(float_dir, QuantConfig("int4", 32), tmp_path / "q")
    model, tokenizer = load_pretrained(tmp_path / "q")
    prompt = tokenizer.encode("to be or not")
    params = RequestParams(temperature=0, max_new_tokens=8, ignore_eos=True)
    out = LLMEngine(model, tokenizer).generate([GenerationRequest(prompt, params, "a")])["a"]
    greedy = SamplingParams(temperature=0, max_new_tokens=8)
    assert out.token_ids == list(generate_ids(model, prompt, greedy))
