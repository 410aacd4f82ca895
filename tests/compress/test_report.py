"""The compression report: KL and top-1 against the original, sizes, the CLI."""

import json

import numpy as np
import pytest
import torch

from lmscale.checkpoint import save_model_dir
from lmscale.cli.main import main
from lmscale.compress import DEFAULT_VARIANTS, QuantConfig, Variant, compress_report
from lmscale.config import to_dict
from lmscale.errors import LmscaleError
from lmscale.model import PRESETS, ModelConfig, Transformer
from lmscale.tokenizer import Tokenizer

TEXT = "to be or not to be, that is the question: whether 'tis nobler in the mind to suffer. "


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train([TEXT] * 20, 300)


@pytest.fixture(scope="module")
def model(tokenizer):
    """Random weights with a wide init, so the next-token distributions are far from uniform."""
    torch.manual_seed(0)
    config = ModelConfig(**PRESETS["tiny"] | {"vocab_size": tokenizer.vocab_size, "init_std": 0.5})
    return Transformer(config).eval()


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, 300, size=400)


@pytest.fixture(scope="module")
def rows(model, tokens):
    return compress_report(model, tokens, context=64, max_tokens=256, decode_tokens=4)


def test_the_original_row_matches_itself(rows):
    original = rows[0]
    assert original.variant == "float32"
    assert original.kl == pytest.approx(0.0, abs=1e-6) and original.top1_changed == 0.0


def test_int8_moves_the_distribution_a_little_and_int4_more(rows):
    by_name = {row.variant: row for row in rows}
    int8, int4 = by_name["int8"], by_name["int4 g32 (RTN)"]
    assert 0 < int8.kl < 0.05 and int8.kl < int4.kl / 10  # wide-init logits are sharp
    assert int8.perplexity == pytest.approx(rows[0].perplexity, rel=0.02)


def test_sizes_order_as_expected(rows):
    by_name = {row.variant: row for row in rows}
    original = by_name["float32"]
    assert by_name["int4 g32 (RTN)"].bytes < by_name["int8"].bytes < original.bytes
    assert by_name["structured 25%"].bytes < original.bytes
    assert by_name["int8"].params == by_name["int4 g32 (RTN)"].params == original.params
    assert by_name["structured 25%"].params < original.params
    assert all(row.decode_tok_s > 0 and np.isfinite(row.perplexity) for row in rows)


def test_the_original_model_is_left_unchanged(model, tokens):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compress_report(model, tokens, 64, [Variant("int8", quant=QuantConfig("int8"))], 128, 2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_structured_pruning_never_calibrates_on_scored_tokens(model, tokens):
    with pytest.raises(LmscaleError, match="calibrates on the text past the scored tokens"):
        compress_report(model, tokens, 64, DEFAULT_VARIANTS, max_tokens=len(tokens))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, model, tokenizer):
    config = {"model": to_dict(model.config), "tokenizer": tokenizer.settings}
    out = tmp_path_factory.mktemp("report") / "tiny"
    return save_model_dir(out, model.state_dict(), config, tokenizer.to_json())


def test_cli_json_parses(model_dir, tmp_path, capsys):
    text = tmp_path / "held_out.txt"
    text.write_text(TEXT * 40)
    code = main(["compress-report", "--model", str(model_dir), "--text", str(text),
                 "--context", "32", "--max-tokens", "128", "--json"])  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert code in (0, None) and report["context"] == 32
    assert [row["variant"] for row in report["rows"]] == [v.name for v in DEFAULT_VARIANTS]
    assert report["rows"][0]["kl"] == pytest.approx(0.0, abs=1e-6)


def test_cli_bad_model_is_a_one_line_error(tmp_path, capsys):
    text = tmp_path / "held_out.txt"
    text.write_text(TEXT)
    code = main(["compress-report", "--model", str(tmp_path / "nope"), "--text", str(text)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "model not found" in err
