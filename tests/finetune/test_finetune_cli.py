"""`lmscale finetune lora`, `generate --adapter` and `merge` as a user runs them: subprocesses."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from lmscale.checkpoint import load_pretrained
from lmscale.engine import SamplingParams, generate_ids, stream_text
from lmscale.finetune.adapter import load_adapter

ROOT = Path(__file__).resolve().parents[2]


def lmscale(*args):
    env = os.environ | {"PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "lmscale", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def test_finetune_then_generate_with_adapter_then_merge(tiny_model_dir, chat_jsonl, tmp_path):
    adapter, merged = tmp_path / "ad", tmp_path / "merged"
    out = lmscale(
        "finetune", "lora", "--model", tiny_model_dir, "--data", chat_jsonl, "--out", adapter,
        "--rank", 4, "--alpha", 8, "--targets", "q,v,down", "--steps", 3, "--batch-size", 2,
        "--max-length", 64, "--lr", 1e-2, "--device", "cpu", "--json",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["steps"] == 3 and summary["out"] == str(adapter)
    assert (adapter / "adapter_model.safetensors").is_file()

    prompt = ["--prompt", "In Hamlet, who says", "--temperature", 0, "--max-new-tokens", 8]
    common = ["generate", *prompt, "--device", "cpu", "--json"]
    with_adapter = lmscale(*common, "--model", tiny_model_dir, "--adapter", adapter)
    assert with_adapter.returncode == 0, with_adapter.stderr
    out = lmscale("merge", "--model", tiny_model_dir, "--adapter", adapter, "--out", merged)
    assert out.returncode == 0, out.stderr

    # The merged folder is an ordinary model computing what base + adapter computes.
    base, tokenizer = load_pretrained(tiny_model_dir)
    load_adapter(base, adapter)
    folded, _ = load_pretrained(merged)
    ids = torch.tensor([tokenizer.encode("Who's there? Nay, answer me")])
    with torch.no_grad():
        assert (folded(ids) - base(ids)).abs().max() <= 1e-5
        plain, _ = load_pretrained(tiny_model_dir)
        assert (folded(ids) - plain(ids)).abs().max() > 1e-4  # the adapter did change it
    params = SamplingParams(temperature=0, max_new_tokens=8)
    ids = generate_ids(folded, tokenizer.encode("In Hamlet, who says"), params,
                       stop_ids=tokenizer.end_of_turn_ids)  # fmt: skip
    text = "".join(stream_text(ids, tokenizer.decode))
    assert text == json.loads(with_adapter.stdout)["text"]

    refused = lmscale(*common, "--model", merged, "--adapter", adapter)
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and "already merged in" in refused.stderr


def test_user_mistakes_are_one_line_and_exit_2(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    base = ["finetune", "lora", "--model", tiny_model_dir, "--out", tmp_path / "ad"]
    out = lmscale(*base, "--data", bad)
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "bad.jsonl line 1: no assistant message" in out.stderr
    out = lmscale(*base, "--data", "shakespeare-speakers", "--targets", "q,nope")
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "LoRA target 'nope' matches no linear layer" in out.stderr
