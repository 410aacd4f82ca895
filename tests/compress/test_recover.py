"""`lmscale prune --recover-steps`: a real process fine-tunes a pruned tiny model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmscale.checkpoint import load_pretrained
from lmscale.train import load_run_config, train
from lmscale.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]


def lmscale(*args):
    env = os.environ | {"PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "-m", "lmscale.cli.main", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


@pytest.fixture(scope="module")
def trained(shakespeare_dir, tmp_path_factory):
    """A tiny model trained a few steps on the session's prepared plays."""
    run = tmp_path_factory.mktemp("source") / "run"
    args = ["--data.path", str(shakespeare_dir), "--train.max_steps", "10"]
    train(load_run_config("configs/tiny.toml", args), run, progress=False)
    return run


def block_sparsity(model) -> float:
    weights = [m.weight for m in model.layers.modules() if isinstance(m, torch.nn.Linear)]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def test_magnitude_recovery_lowers_the_loss_and_keeps_the_zeros(trained, shakespeare_dir, tmp_path):
    out = tmp_path / "pruned"
    result = lmscale(
        "prune", "--model", trained, "--method", "magnitude", "--sparsity", "0.6", "--out", out,
        "--recover-steps", "8", "--recover-data", shakespeare_dir, "--recover-lr", "3e-3",
        "--train.context", "64", "--train.log_interval", "1", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    recovery = json.loads(result.stdout)["recovery"]
    assert recovery["after_val_ppl"] < recovery["before_val_ppl"]
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert len(losses) == 8 and sum(losses[-3:]) < sum(losses[:3])
    pruned, _ = load_pretrained(out / "pruned")
    recovered, _ = load_pretrained(out)  # the run directory loads as its latest checkpoint
    assert block_sparsity(recovered) == block_sparsity(pruned) == pytest.approx(0.6, abs=1e-4)
    for (name, before), after in zip(
        pruned.state_dict().items(), recovered.state_dict().values(), strict=True
    ):
        if name.startswith("layers.") and before.ndim == 2:
            assert torch.equal(after == 0, before == 0), name
            assert not torch.equal(after, before), name  # the kept weights did train


def test_structured_recovery_distilled_from_the_source(trained, shakespeare_dir, tmp_path):
    out = tmp_path / "small"
    result = lmscale(
        "prune", "--model", trained, "--method", "structured", "--sparsity", "0.5",
        "--importance", "weight", "--out", out, "--recover-steps", "4",
        "--recover-data", shakespeare_dir, "--recover-distill", "--train.context", "64",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "recovery (4 steps): val ppl" in result.stdout
    source, _ = load_pretrained(trained)
    recovered, _ = load_pretrained(out)
    assert recovered.config.hidden_dim == source.config.hidden_dim // 2
    assert load_run_config(out / "config.toml").distill.teacher == str(trained)
    # Overrides without a recovery are refused.
    refused = lmscale(
        "prune", "--model", trained, "--method", "magnitude", "--sparsity", "0.5",
        "--out", tmp_path / "x", "--train.lr", "1",
    )  # fmt: skip
    assert refused.returncode == 2 and "unrecognized arguments" in refused.stderr


def test_data_prepared_with_a_pretrained_tokenizer_keeps_its_special_tokens(smollm2, tmp_path):
    from lmscale.data import TokenDataset, data_tokenizer, prepare

    _, tokenizer = smollm2
    text = tmp_path / "text.txt"
    text.write_text("ROMEO. But soft, what light through yonder window breaks?\n" * 50)
    manifest = prepare(str(text), tmp_path / "data", tokenizer=tokenizer)
    assert manifest.vocab_size == 49152 and manifest.eos_id == tokenizer.eos_id
    loaded = data_tokenizer(tmp_path / "data")
    assert loaded.settings == tokenizer.settings and loaded.to_json() == tokenizer.to_json()
    train_tokens = TokenDataset(tmp_path / "data", "train").tokens
    expected = tokenizer.encode(text.read_text()[: len(train_tokens) * 20])
    assert list(train_tokens[:10]) == expected[:10]
