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
    return compress_report(model, tokens, context=64, max_tokens=256)  # no speed: no tokenizer


def test_the_original_row_matches_itself(rows):
    original = rows[0]
    assert original.variant == "float32"
    assert original.kl == pytest.approx(0.0, abs=1e-6) and original.top1_changed == 0.0


def test_int8_moves_the_distribution_a_little_and_int4_more(rows):
    by_name = {row.variant: row for row in rows}
    int8, int4 = by_name["int8"], by_name["int4 g32 (RTN)"]
    assert 0 < int8.kl < 0.15 and int8.kl < int4.kl / 10  # wide-init logits are sharp
    # A random model's perplexity (~vocabulary-sized) moves a few percent with the seed's draw.
    assert int8.perplexity == pytest.approx(rows[0].perplexity, rel=0.05)


def test_sizes_order_as_expected(rows):
    by_name = {row.variant: row for row in rows}
    original = by_name["float32"]
    assert by_name["int4 g32 (RTN)"].bytes < by_name["int8"].bytes < original.bytes
    assert by_name["structured 25%"].bytes < original.bytes
    assert by_name["int8"].params == by_name["int4 g32 (RTN)"].params == original.params
    assert by_name["structured 25%"].params < original.params
    assert by_name["bfloat16"].bytes == original.bytes // 2
    assert all(np.isfinite(row.perplexity) and row.decode_tok_s is None for row in rows)


def test_the_original_model_is_left_unchanged(model, tokens):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compress_report(model, tokens, 64, [Variant("int8", quant=QuantConfig("int8"))], 128)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_structured_pruning_never_calibrates_on_scored_tokens(model, tokens):
    with pytest.raises(LmscaleError, match="calibrates on the text past the scored tokens"):
        compress_report(model, tokens, 64, DEFAULT_VARIANTS, max_tokens=len(tokens))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, model, tokenizer):
    config = {"model": to_dict(model.config), "tokenizer": tokenizer.settings}
    out = tmp_path_factory.mktemp("report") / "tiny"
    return save_model_dir(out, model.state_dict(), config, tokenizer.to_json())


def test_cli_measures_every_row_in_a_fresh_process_and_scores_saved_models(
    model_dir, tmp_path, capsys
):
    """A saved int8 folder (--add) scores exactly as the in-memory int8 row: same RTN integers."""
    text = tmp_path / "held_out.txt"
    text.write_text(TEXT * 40)
    int8_dir = tmp_path / "int8"
    assert main(["quantize", "--model", str(model_dir), "--method", "int8",
                 "--out", str(int8_dir)]) in (0, None)  # fmt: skip
    capsys.readouterr()
    png = tmp_path / "report.png"
    code = main(["compress-report", "--model", str(model_dir), "--text", str(text),
                 "--context", "32", "--max-tokens", "128", "--decode-tokens", "4",
                 "--variants", "float32,int8", "--add", f"saved int8={int8_dir}",
                 "--png", str(png), "--json"])  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert code in (0, None) and report["context"] == 32
    names = [row["variant"] for row in report["rows"]]
    assert names == ["float32", "int8", "saved int8"]
    rows = {row["variant"]: row for row in report["rows"]}
    assert rows["float32"]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert rows["saved int8"]["kl"] == pytest.approx(rows["int8"]["kl"], rel=1e-4, abs=1e-7)
    assert rows["saved int8"]["bytes"] == rows["int8"]["bytes"]
    for row in report["rows"]:
        assert row["peak_ram"] > 0 and row["prompt_tok_s"] > 0 and row["decode_tok_s"] > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_refuses_an_added_model_with_another_vocabulary(model_dir, tmp_path, capsys):
    torch.manual_seed(1)
    other = Transformer(ModelConfig(**PRESETS["tiny"] | {"vocab_size": 280}))
    tok = Tokenizer.train([TEXT] * 20, 280)
    other_dir = save_model_dir(
        tmp_path / "other", other.state_dict(),
        {"model": to_dict(other.config), "tokenizer": tok.settings}, tok.to_json(),
    )  # fmt: skip
    text = tmp_path / "held_out.txt"
    text.write_text(TEXT * 40)
    code = main(["compress-report", "--model", str(model_dir), "--text", str(text),
                 "--context", "32", "--max-tokens", "128", "--no-speed",
                 "--add", f"other={other_dir}"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "same tokenizer" in err


@pytest.mark.parametrize(
    "args, message",
    [(["--add", "nodir"], "NAME=DIR"), (["--variants", "float32,int3"], "unknown variant 'int3'")],
)
def test_cli_bad_rows_are_one_line_errors(model_dir, tmp_path, capsys, args, message):
    text = tmp_path / "held_out.txt"
    text.write_text(TEXT)
    code = main(["compress-report", "--model", str(model_dir), "--text", str(text), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err


def test_cli_bad_model_is_a_one_line_error(tmp_path, capsys):
    text = tmp_path / "held_out.txt"
    text.write_text(TEXT)
    code = main(["compress-report", "--model", str(tmp_path / "nope"), "--text", str(text)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "model not found" in err


def test_a_measured_peak_is_the_child_s_own_not_its_parent_s(model_dir):
    """Linux keeps ru_maxrss across fork and exec; the child reads its own high-water mark."""
    from lmscale.compress.measure import measure

    ballast = torch.ones(600 * 2**20 // 4)  # 600 MiB resident in this (the parent) process
    speed = measure(model_dir, prompt_tokens=8, decode_tokens=2, repeats=1)
    assert ballast.sum() > 0 and 0 < speed.peak_ram < 300 * 2**20
