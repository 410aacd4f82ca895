"""`lmscale chat` and `lmscale export` as a user runs them: real subprocesses."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
MODEL = "smollm2-135m-instruct"


def lmscale(*args, stdin=None):
    # one thread: the machine is shared, and a busy second core slows every op down
    env = os.environ | {"PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "lmscale", *args]
    return subprocess.run(
        cmd, input=stdin, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300
    )


def test_chat_answers_each_piped_line():
    # NOTE: --eager: compiling SmolLM2's step took ~2 minutes of the suite with a cold cache; the
    # compiled chat is tested on a tiny model (tests/engine/test_decode_step.py).
    out = lmscale("chat", "--model", MODEL, "--temperature", "0", "--max-new-tokens", "16",
                  "--eager", stdin="What is the capital of France?\nAnd of Italy?\n")  # fmt: skip
    assert out.returncode == 0, out.stderr
    replies = out.stdout.strip().split("\n")
    assert len(replies) == 2, out.stdout
    assert "Paris" in replies[0] and "Rome" in replies[1]


def test_export_hf_round_trip_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    out = lmscale("export", "hf", "--model", MODEL, "--out", str(tmp_path), "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["out"] == str(tmp_path)
    from lmscale.checkpoint import load_pretrained

    model, tokenizer = load_pretrained(MODEL)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer.encode("The quick brown fox jumps over the lazy dog")])
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max() <= 1e-4


@pytest.mark.parametrize(
    "args, message",
    [(("chat", "--model", "nonexistent"), "model not found"),
     (("export", "tflite", "--model", MODEL, "--out", "x"), "unknown export format"),
     (("export", "hf", "--model", MODEL, "--out", "x", "--dtype", "int8"), "--dtype")],
)  # fmt: skip
def test_user_mistakes_are_one_line_and_exit_2(args, message):
    out = lmscale(*args)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and message in out.stderr
