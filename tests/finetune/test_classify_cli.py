"""`lmscale finetune classify` and `lmscale classify` on a tiny model and a learnable task.

The task: does a six-word line of Hamlet's vocabulary contain the word "crown"? A tiny randomly
initialised model learns it in a few dozen steps in every training mode.
"""

import contextlib
import io
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmscale.checkpoint import save_model_dir
from lmscale.cli.main import main
from lmscale.config import to_dict
from lmscale.data.labelled import load_labelled
from lmscale.errors import LmscaleError
from lmscale.finetune.classify_io import classify_texts, load_classifier
from lmscale.finetune.classify_run import balanced_sample
from lmscale.model import Transformer, preset

ROOT = Path(__file__).resolve().parents[2]
WORDS = "the king queen lord sword night ghost father mother speak hear see tell love death".split()
MODES = {  # mode -> its flags; both poolings are exercised
    "full": ["--pooling", "mean", "--lr", "3e-3"],
    "head": ["--pooling", "mean", "--head-epochs", "100", "--head-lr", "1e-2"],
    "lora": ["--pooling", "mean", "--lr", "3e-3", "--rank", "8", "--targets", "q,k,v,o"],
}


def run(*args) -> tuple[int, str]:
    """`main(args)` in this process: (exit code, stdout)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([str(a) for a in args])
    return code, out.getvalue()


@pytest.fixture(scope="module")
def crown_jsonl(tmp_path_factory):
    rng = random.Random(0)
    rows = []
    for i in range(240):
        words = [rng.choice(WORDS) for _ in range(6)]
        if i % 2:
            words[rng.randrange(6)] = "crown"
        rows.append({"text": " ".join(words), "label": "crown" if i % 2 else "plain"})
    path = tmp_path_factory.mktemp("data") / "crown.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def trained(tiny_model_dir, crown_jsonl, tmp_path_factory):
    """Each mode trained once through the CLI: mode -> (folder, the --json summary)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    done = {}
    for mode, flags in MODES.items():
        out = tmp_path_factory.mktemp("cls") / mode
        code, stdout = run(
            "finetune", "classify", "--model", tiny_model_dir, "--data", crown_jsonl, "--out", out,
            "--train", mode, *flags, "--steps", 60, "--eval-every", 20, "--warmup-steps", 5,
            "--batch-size", 16, "--max-length", 32, "--json",
        )  # fmt: skip
        assert code == 0
        done[mode] = (out, json.loads(stdout))
    torch.set_num_threads(threads)
    return done


@pytest.mark.parametrize("mode", MODES)
def test_each_mode_beats_the_majority_baseline_and_reloads_to_the_same_scores(
    trained, crown_jsonl, mode
):
    out, summary = trained[mode]
    test, baseline = summary["test"], summary["baseline"]
    assert summary["examples"] == {"train": 192, "val": 24, "test": 24}
    assert test["accuracy"] >= baseline["accuracy"] + 0.25, summary
    assert test["macro_f1"] >= baseline["macro_f1"] + 0.25, summary
    assert set(summary["per_label_f1"]) == {"crown", "plain"}

    # The folder scores the test split exactly as the model in memory did.
    examples = load_labelled(str(crown_jsonl), "test")
    scored = classify_texts(out, [e.text for e in examples], [e.label for e in examples])
    assert scored["accuracy"] == test["accuracy"] and scored["macro_f1"] == test["macro_f1"]
    record = json.loads((out / "classifier.json").read_text())
    assert record["train"] == mode and record["labels"] == ["crown", "plain"]
    assert record["metrics"]["test"] == test


def test_what_each_mode_saves_and_trains(trained, tiny_model_dir):
    files = {mode: sorted(p.name for p in out.iterdir()) for mode, (out, _) in trained.items()}
    assert files["head"] == ["classifier.json", "head.safetensors"]
    assert files["full"] == ["classifier.json", "head.safetensors", "model"]
    assert files["lora"] == ["adapter", "classifier.json", "head.safetensors"]

    head_params = 2 * 64 + 2  # Linear(dim 64, 2 labels)
    full, head, lora = (trained[mode][1] for mode in ("full", "head", "lora"))
    assert head["trainable_params"] == head_params
    assert full["trainable_params"] == full["total_params"]
    adapter = load_file(trained["lora"][0] / "adapter" / "adapter_model.safetensors")
    assert adapter and all(".lora_A." in k or ".lora_B." in k for k in adapter)
    assert lora["trainable_params"] == sum(t.numel() for t in adapter.values()) + head_params

    # Only full fine-tuning changed the backbone's own weights.
    base = load_file(Path(tiny_model_dir) / "model.safetensors")
    tuned = load_file(trained["full"][0] / "model" / "model.safetensors")
    assert any(not torch.equal(base[k], tuned[k]) for k in base)
    classifier, _, _ = load_classifier(trained["lora"][0])
    weight = classifier.backbone.layers[0].attention.wq.base.weight
    assert torch.equal(weight, base["layers.0.attention.wq.weight"])


def test_the_classify_verb_in_a_subprocess_matches_the_library(trained, crown_jsonl, tmp_path):
    out = trained["lora"][0]
    examples = load_labelled(str(crown_jsonl), "test")
    data = tmp_path / "test.jsonl"
    data.write_text(
        "".join(json.dumps({"text": e.text, "label": e.label}) + "\n" for e in examples)
    )
    env = os.environ | {"PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "lmscale", "classify", "--model", str(out), "--file", str(data)]
    done = subprocess.run([*cmd, "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    cli = json.loads(done.stdout)
    here = classify_texts(out, [e.text for e in examples], [e.label for e in examples])
    assert [row["label"] for row in cli["predictions"]] == [r["label"] for r in here["predictions"]]
    for a, b in zip(cli["predictions"], here["predictions"], strict=True):
        assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-5)
    assert cli["accuracy"] == trained["lora"][1]["test"]["accuracy"]

    code, stdout = run("classify", "--model", out, "--text", "the crown of the king")
    assert code == 0 and stdout.split("\t")[0] in ("crown", "plain")


def test_balanced_subsamples_are_seeded_and_keep_the_order(crown_jsonl):
    train = load_labelled(str(crown_jsonl), "train")
    kept = [e for e in train if e.label == "plain"][:30] + [e for e in train if e.label == "crown"][
        :6
    ]
    examples = [e for e in train if e in kept]  # 30 plain, 6 crown, in file order
    sample = balanced_sample(examples, 20, seed=3)
    assert len(sample) == 20 and sum(e.label == "crown" for e in sample) == 6  # all it has
    sample = balanced_sample(examples, 10, seed=3)
    assert sum(e.label == "crown" for e in sample) == 5
    assert sample == balanced_sample(examples, 10, seed=3) != balanced_sample(examples, 10, 4)
    assert [examples.index(e) for e in sample] == sorted(examples.index(e) for e in sample)
    assert balanced_sample(examples, None) == examples


def test_a_head_classifier_refuses_another_base(trained, tiny_tokenizer, tmp_path):
    torch.manual_seed(1)  # the same shapes, other weights
    other = Transformer(preset("tiny", max_seq_len=256))
    config = {"model": to_dict(other.config), "tokenizer": tiny_tokenizer.settings}
    other_dir = save_model_dir(tmp_path / "other", other.state_dict(), config,
                               tiny_tokenizer.to_json())  # fmt: skip
    moved = tmp_path / "moved"
    moved.mkdir()
    source = trained["head"][0]
    record = json.loads((source / "classifier.json").read_text()) | {"base_model": str(other_dir)}
    (moved / "classifier.json").write_text(json.dumps(record))
    (moved / "head.safetensors").write_bytes((source / "head.safetensors").read_bytes())
    with pytest.raises(LmscaleError, match="trained on another base model"):
        load_classifier(moved)


def _one_line_error(capsys, *args) -> str:
    code, _ = run(*args)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    return err


def test_user_mistakes_are_one_line_errors(tiny_model_dir, crown_jsonl, trained, capsys, tmp_path):
    train = ["finetune", "classify", "--model", tiny_model_dir, "--out", tmp_path / "c"]
    assert "unknown data 'nope'" in _one_line_error(capsys, *train, "--data", "nope")

    unlabelled = tmp_path / "unlabelled.jsonl"
    unlabelled.write_text('{"text": "a line"}\n')
    err = _one_line_error(capsys, *train, "--data", unlabelled)
    assert "unlabelled.jsonl line 1: expected an object with a string 'text'" in err

    # A label that only the test split holds.
    lines = crown_jsonl.read_text().splitlines()
    first_test = int(load_labelled(str(crown_jsonl), "test")[0].source.split(":")[1])
    lines[first_test - 1] = json.dumps({"text": "the ghost", "label": "ghost"})
    odd = tmp_path / "odd.jsonl"
    odd.write_text("\n".join(lines) + "\n")
    err = _one_line_error(capsys, *train, "--data", odd)
    assert "test label 'ghost' was not seen in training" in err

    existing = trained["head"][0]
    err = _one_line_error(capsys, *train[:-1], existing, "--data", crown_jsonl)
    assert "already exists" in err
    assert "unknown training mode" in _one_line_error(
        capsys, *train, "--data", crown_jsonl, "--train", "half"
    )
    assert "give --text or --file" in _one_line_error(capsys, "classify", "--model", existing)
    err = _one_line_error(capsys, "classify", "--model", tiny_model_dir, "--text", "x")
    assert "is not a classifier folder" in err
    unseen = tmp_path / "unseen.jsonl"
    unseen.write_text('{"text": "the king", "label": "queen"}\n')
    err = _one_line_error(capsys, "classify", "--model", existing, "--file", unseen)
    assert "label 'queen' was not seen in training" in err
