"""The `lmscale` command as a user runs it: real processes, real files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmscale.cli.main import main

ROOT = Path(__file__).resolve().parents[2]


def lmscale(*args, check=True):
    env = os.environ | {"PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "-m", "lmscale.cli.main", *map(str, args)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    if check:
        assert out.returncode == 0, out.stderr
    return out


def test_help_lists_every_verb():
    out = lmscale("--help").stdout
    for verb in ("prepare", "train", "eval", "generate"):
        assert verb in out
    train_help = lmscale("train", "--help").stdout
    assert "--train.max_steps" in train_help and "--parallel.strategy" in train_help


@pytest.mark.parametrize(
    "args, message",
    [
        (["prepare", "--corpus", "no/such/file.txt", "--out", "x"], "no/such/file.txt"),
        (["train", "--config", "configs/nope.toml"], "configs/nope.toml"),
        (
            ["train", "--config", "configs/tiny.toml", "--model.preset", "huge"],
            "unknown model preset",
        ),
        (["train", "--config", "configs/tiny.toml", "--train.lr", "fast"], "train.lr"),
        (["eval", "--model", "no/such/run", "--text", "README.md"], "no/such/run"),
        (["generate", "--model", "no/such/run", "--prompt", "hi", "--top-p", "2"], "top-p"),
        (["train"], "--config"),
        (["train", "--config", "configs/tiny.toml", "--parallel.strategy", "zero3"], "zero3"),
        (["train", "--config", "configs/tiny.toml", "--nproc", "0"], "--nproc must be positive"),
        (
            [
                "train",
                "--config",
                "configs/tiny.toml",
                "--nproc",
                "2",
                "--parallel.strategy",
                "tp",
                "--model.n_kv_heads",
                "1",
            ],
            "does not divide model.n_kv_heads = 1",
        ),  # fmt: skip
        (
            [
                "train",
                "--config",
                "configs/tiny.toml",
                "--nproc",
                "3",
                "--parallel.strategy",
                "fsdp+tp",
                "--parallel.tp",
                "2",
            ],
            "parallel.tp = 2 does not divide the 3 processes",
        ),  # fmt: skip
        (["frobnicate"], "invalid choice"),
    ],
)
def test_user_mistakes_print_one_line_and_exit_2(args, message, capsys, monkeypatch):
    # In process, through the entry point's main(argv): each case checks the message, and a
    # fresh interpreter per case would only import torch again (the process is tested below).
    monkeypatch.chdir(ROOT)
    assert main([*map(str, args)]) == 2
    stderr = capsys.readouterr().err
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], stderr


def test_a_user_mistake_in_a_real_process_is_one_line_and_exit_2():
    out = lmscale("train", "--config", "configs/tiny.toml", "--train.lr", "fast", check=False)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.lr" in lines[0], out.stderr


def test_keep_quantized_runs_a_gguf_on_its_int4_weights(tmp_path):
    from gguf_files import tiny_gguf

    model = tiny_gguf(tmp_path / "tiny.gguf", tensor_type="Q4_1", seed=0)
    text = tmp_path / "text.txt"
    text.write_text("ab a b ba abab " * 8)
    args = ("eval", "--model", model, "--text", text, "--context", 16, "--json")
    float_loss = json.loads(lmscale(*args).stdout)["loss"]
    int4_loss = json.loads(lmscale(*args, "--keep-quantized").stdout)["loss"]
    # the same weights, through the int4 kernels' bfloat16 activations: close, not equal
    assert int4_loss != float_loss and abs(int4_loss - float_loss) < 0.01 * float_loss
    out = lmscale("generate", "--model", model, "--prompt", "ab", "--temperature", 0,
                  "--max-new-tokens", 4, "--keep-quantized", "--json")  # fmt: skip
    assert json.loads(out.stdout)["prompt"] == "ab"


def test_prepare_train_eval_generate(tmp_path):
    data, run = tmp_path / "data", tmp_path / "run"
    prepared = json.loads(
        lmscale(
            "prepare", "--corpus", "shakespeare", "--out", data, "--vocab-size", 400, "--json"
        ).stdout
    )
    assert prepared["train_tokens"] > prepared["val_tokens"] > 0
    trained = lmscale(
        "train", "--config", "configs/tiny.toml", "--out", run, "--data.path", data,
        "--train.max_steps", 12, "--sample-tokens", 10, "--json",
    )  # fmt: skip
    summary = json.loads(trained.stdout)
    assert summary["steps"] == 12 and summary["val_ppl"] > 1 and summary["unigram_val_ppl"] > 1
    assert summary["sample"]
    # The plain output ends with the eval's two documented lines.
    lines = lmscale("eval", "--model", run, "--data", data, "--context", 64).stdout.splitlines()
    assert lines[-2].startswith("loss: ") and lines[-1].startswith("perplexity: ")
    as_json = json.loads(
        lmscale("eval", "--model", run, "--data", data, "--context", 64, "--json").stdout
    )
    assert abs(as_json["loss"] - float(lines[-2].split()[1])) < 1e-5
    play = tmp_path / "play.txt"
    play.write_text("To be, or not to be, that is the question.\n" * 20)
    assert "perplexity: " in lmscale("eval", "--model", run, "--text", play).stdout
    greedy = [
        lmscale(
            "generate",
            "--model",
            run,
            "--prompt",
            "ROMEO",
            "--temperature",
            0,
            "--max-new-tokens",
            8,
        ).stdout
        for _ in range(2)
    ]
    assert greedy[0] == greedy[1] and greedy[0].startswith("ROMEO")
    resumed = lmscale("train", "--out", run, "--resume", "--train.max_steps", 14, "--json")
    assert json.loads(resumed.stdout)["steps"] == 14
