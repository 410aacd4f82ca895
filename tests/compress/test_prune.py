"""Pruning: exact sparsity, the 2:4 pattern, structured pruning into a smaller model, folders, CLI."""

import copy
import json

import pytest
import torch
from torch import nn

from lmscale.checkpoint import load_pretrained, save_model_dir
from lmscale.cli.main import main
from lmscale.compress import PruneConfig, QuantConfig, prune_, prune_model, quantize_model
from lmscale.compress.structured import prune_structured_
from lmscale.config import to_dict
from lmscale.engine import GenerationRequest, LLMEngine, RequestParams, SamplingParams, generate_ids
from lmscale.errors import LmscaleError
from lmscale.model import Transformer, preset
from lmscale.tokenizer import Tokenizer

TEXT = "to be or not to be, that is the question"


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


def tiny(name="tiny"):
    torch.manual_seed(0)
    return Transformer(preset(name)).eval()


def block_linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and "layers." in n}


def zeros(linear):
    return int((linear.weight == 0).sum())


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.77])
def test_global_magnitude_reaches_the_exact_sparsity_under_one_threshold(sparsity):
    model = tiny()
    embedding = model.tok_embeddings.weight.clone()
    record = prune_(model, PruneConfig("magnitude", sparsity, "global"))
    linears = block_linears(model)
    total = sum(m.weight.numel() for m in linears.values())
    assert sum(zeros(m) for m in linears.values()) == round(sparsity * total)
    assert record["modules"] == list(linears) and record["achieved"] == pytest.approx(
        sparsity, 1e-4
    )
    kept = torch.cat([m.weight[m.weight != 0].abs() for m in linears.values()])
    assert torch.equal(model.tok_embeddings.weight, embedding)  # embedding and head untouched
    original = tiny()  # one threshold: every removed weight is smaller than every kept one
    removed = torch.cat([
        original.get_submodule(n).weight[m.weight == 0].abs() for n, m in linears.items()
    ])  # fmt: skip
    assert removed.max() <= kept.min()
    layer_sparsity = {zeros(m) / m.weight.numel() for m in linears.values()}
    assert len(layer_sparsity) > 1  # global: the layers differ


def test_per_layer_magnitude_reaches_the_exact_sparsity_in_every_layer():
    model = tiny()
    prune_(model, PruneConfig("magnitude", 0.3, "layer"))
    for linear in block_linears(model).values():
        assert zeros(linear) == round(0.3 * linear.weight.numel())


def test_two_four_keeps_the_two_largest_of_every_group_of_four():
    model, original = tiny(), tiny()
    record = prune_(model, PruneConfig("2:4", 0.5))
    assert record["achieved"] == 0.5
    for name, linear in block_linears(model).items():
        groups = linear.weight.view(linear.out_features, -1, 4)  # (out, in/4, 4)
        assert ((groups != 0).sum(-1) == 2).all()
        before = original.get_submodule(name).weight.view_as(groups).abs()
        kept = (groups != 0).float()
        assert torch.equal(kept, torch.zeros_like(kept).scatter_(-1, before.topk(2).indices, 1.0))


@pytest.mark.parametrize("calibration", [None, torch.randint(0, 512, (3, 24))])
def test_structured_at_sparsity_zero_keeps_the_outputs(calibration):
    model, tokens = tiny(), torch.randint(0, 512, (2, 16))
    expected = model(tokens)
    record = prune_structured_(model, 0.0, calibration)
    assert record["before"] == record["after"] and record["achieved"] == 0
    assert torch.equal(model(tokens), expected)


@pytest.mark.parametrize("name", ["tiny", "tiny-gpt2"])
@pytest.mark.parametrize("calibration", [False, True])
def test_structured_equals_the_original_with_the_removed_units_zeroed(name, calibration):
    model, masked, tokens = tiny(name), tiny(name), torch.randint(0, 512, (2, 16))
    n_rep, head_dim = model.config.n_heads // model.config.n_kv_heads, model.config.head_dim
    importance = "activation" if calibration else "weight"
    config = PruneConfig("structured", 0.5, importance=importance)
    record = prune_(model, config, calibration=torch.randint(0, 512, (4, 32)))
    for small, full in zip(model.layers, masked.layers, strict=True):
        # Which units stayed: match the kept columns of the output projections to the original's.
        for out_small, out_full, width in ((small.attention.wo, full.attention.wo, n_rep * head_dim),
                                           (small.feed_forward.w2, full.feed_forward.w2, 1)):  # fmt: skip
            units = out_full.weight.detach().view(out_full.out_features, -1, width)
            kept = out_small.weight.view(out_small.out_features, -1, width)
            hit = (units[:, :, None] == kept[:, None]).all(dim=(0, 3)).any(dim=1)  # (units,)
            assert int(hit.sum()) == kept.shape[1]
            units[:, ~hit] = 0.0  # zeroing a unit's output columns removes its contribution
    assert torch.allclose(model(tokens), masked(tokens), atol=1e-5)
    expected = {"tiny": (2, 1, 64), "tiny-gpt2": (2, 2, 128)}[name]
    after = record["after"]
    assert (after["n_heads"], after["n_kv_heads"], after["hidden_dim"]) == expected
    assert model.config.head_dim == 16 and record["achieved"] == pytest.approx(0.5)
    assert record["importance"] == ("activation" if calibration else "weight")


def test_a_structured_folder_is_a_smaller_normal_model(float_dir, tokenizer, tmp_path):
    model, _ = load_pretrained(float_dir)
    config = PruneConfig("structured", 0.5, importance="weight")
    prune_(model, config)
    result = prune_model(float_dir, config, tmp_path / "p")
    loaded, loaded_tokenizer = load_pretrained(tmp_path / "p")
    config = loaded.config
    assert (config.n_heads, config.n_kv_heads, config.head_dim, config.hidden_dim) == (2, 1, 16, 64)
    assert config.dim == 64 and config.n_layers == 2
    assert loaded.output.weight is loaded.tok_embeddings.weight
    tokens = torch.tensor([tokenizer.encode(TEXT)])
    assert torch.equal(loaded(tokens), model(tokens))
    saved = json.loads((tmp_path / "p" / "config.json").read_text())["pruning"]
    assert saved == result.pruning and saved["after"]["hidden_dim"] == 64
    assert result.params < result.source_params
    prompt = loaded_tokenizer.encode("to be or not")
    greedy = SamplingParams(temperature=0, max_new_tokens=8)
    ids = list(generate_ids(loaded, prompt, greedy))
    params = RequestParams(temperature=0, max_new_tokens=8, ignore_eos=True)
    out = LLMEngine(loaded, loaded_tokenizer).generate([GenerationRequest(prompt, params, "a")])
    assert len(ids) > 0 and out["a"].token_ids[: len(ids)] == ids
    quantize_model(tmp_path / "p", QuantConfig("int4", 32), tmp_path / "pq")  # a normal model


@pytest.mark.parametrize("method", ["magnitude", "2:4"])
def test_a_zeroed_folder_round_trips(float_dir, tokenizer, tmp_path, method):
    result = prune_model(float_dir, PruneConfig(method, 0.5), tmp_path / "p")
    loaded, _ = load_pretrained(tmp_path / "p")
    linears = block_linears(loaded)
    assert sum(zeros(m) for m in linears.values()) == round(0.5 * sum(
        m.weight.numel() for m in linears.values()))  # fmt: skip
    model, _ = load_pretrained(float_dir)
    prune_(model, PruneConfig(method, 0.5))
    tokens = torch.tensor([tokenizer.encode(TEXT)])
    assert torch.equal(loaded(tokens), model(tokens))
    assert result.params == result.source_params  # same shapes: zeros in a float folder
    saved = json.loads((tmp_path / "p" / "config.json").read_text())["pruning"]
    assert saved["method"] == method and saved["modules"] == list(linears)


def test_cli_prune_structured_with_calibration_text(float_dir, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(f"{TEXT}\n" * 40)
    argv = ["prune", "--model", str(float_dir), "--method", "structured", "--sparsity", "0.5"]
    assert main([*argv, "--calibration", str(text), "--out", str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out
    assert "n_heads 4 -> 2; n_kv_heads 2 -> 1; hidden_dim 128 -> 64" in out
    assert json.loads((tmp_path / "p" / "config.json").read_text())["pruning"]["importance"] == (
        "activation"
    )
    assert main(["eval", "--model", str(tmp_path / "p"), "--text", str(text), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] > 0


def test_cli_prune_structured_calibrates_on_shakespeare_by_default(float_dir, tmp_path, capsys):
    argv = ["prune", "--model", str(float_dir), "--method", "structured", "--sparsity", "0.25"]
    assert main([*argv, "--out", str(tmp_path / "p"), "--json"]) == 0
    pruning = json.loads(capsys.readouterr().out)["pruning"]
    assert pruning["importance"] == "activation"
    assert pruning["calibration"] == {"corpus": "shakespeare", "tokens": 2048}
    # a quarter of 2 kv groups rounds to none removed; a quarter of 128 channels to 32
    assert pruning["after"] == {"n_heads": 4, "n_kv_heads": 2, "hidden_dim": 96}


def test_structured_by_activation_needs_calibration_tokens():
    with pytest.raises(LmscaleError, match="needs calibration tokens"):
        prune_(tiny(), PruneConfig("structured", 0.5))


def test_cli_prune_json(float_dir, tmp_path, capsys):
    argv = ["prune", "--model", str(float_dir), "--method", "magnitude", "--sparsity", "0.25"]
    assert main([*argv, "--scope", "layer", "--out", str(tmp_path / "p"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["pruning"]["scope"] == "layer"
    assert result["pruning"]["achieved"] == pytest.approx(0.25, abs=1e-3)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "random", "--sparsity", "0.5"], "unknown pruning method 'random'"),
        (["--method", "magnitude", "--sparsity", "0"], "sparsity must be between 0 and 1"),
        (["--method", "magnitude", "--sparsity", "1"], "sparsity must be between 0 and 1"),
        (["--method", "structured", "--sparsity", "-0.2"], "sparsity must be between 0 and 1"),
        (["--method", "2:4", "--sparsity", "0.6"], "2:4 pruning removes exactly half"),
        (["--method", "magnitude", "--sparsity", "0.5", "--scope", "row"], "unknown pruning scope"),
        (["--method", "magnitude", "--sparsity", "half"], "invalid float value: 'half'"),
        (
            ["--method", "structured", "--sparsity", "0.5", "--importance", "gradient"],
            "unknown importance 'gradient'",
        ),
        (
            ["--method", "structured", "--sparsity", "0.5", "--calibration", "missing.txt"],
            "unknown corpus 'missing.txt'",
        ),
    ],
)
def test_cli_bad_input_is_one_line(float_dir, tmp_path, capsys, args, message):
    out = tmp_path / "p"
    assert main(["prune", "--model", str(float_dir), *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()


def test_cli_refuses_a_quantized_model(float_dir, tmp_path, capsys):
    quantize_model(float_dir, QuantConfig("int8"), tmp_path / "q8")
    argv = ["prune", "--model", str(tmp_path / "q8"), "--method", "2:4", "--sparsity", "0.5"]
    assert main([*argv, "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert "is quantized (int8, 14 layers)" in err and err.count("\n") == 1
    assert not (tmp_path / "p").exists()


def test_prune_refuses_layers_that_do_not_fit():
    model = Transformer(preset("tiny", dim=66, n_heads=3, n_kv_heads=1)).eval()  # 66 % 4 != 0
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(LmscaleError, match="multiple of 4 inputs"):
        prune_(model, PruneConfig("2:4", 0.5))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # unchanged
