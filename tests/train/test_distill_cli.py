"""`lmscale distill` as a user runs it: a real process, a tiny teacher and student."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmscale.checkpoint import load_pretrained
from lmscale.data import data_tokenizer, prepare
from lmscale.train import load_run_config, train

ROOT = Path(__file__).resolve().parents[2]


def lmscale(*args):
    env = os.environ | {"PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "-m", "lmscale.cli.main", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A few thousand lines of Shakespeare as one text file."""
    from lmscale.data import iter_documents

    path = tmp_path_factory.mktemp("corpus") / "plays.txt"
    path.write_text(next(iter(iter_documents("shakespeare"))).text[:60_000])
    return path


@pytest.fixture(scope="module")
def teacher(corpus, tmp_path_factory):
    """A 3-layer teacher trained briefly on the corpus with its own 384-token tokenizer."""
    root = tmp_path_factory.mktemp("teacher")
    prepare(str(corpus), root / "data", vocab_size=384)
    args = ["--data.path", str(root / "data"), "--model.n_layers", "3", "--train.max_steps", "6"]
    train(load_run_config("configs/tiny.toml", args), root / "run", progress=False)
    return root / "run"


STEPS = ("--train.max_steps", "4", "--train.eval_interval", "4", "--train.checkpoint_interval", "4")


def test_distill_writes_a_student_and_a_baseline_and_prints_both(corpus, teacher, tmp_path):
    out = tmp_path / "d"
    result = lmscale(
        "distill", "--teacher", teacher, "--student-config", "configs/tiny.toml",
        "--data", corpus, "--out", out, "--baseline", "--temperature", "3", "--no-progress",
        *STEPS,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["model", "val", "loss", "val", "ppl", "where"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == {"teacher", "student", "baseline"}
    assert rows["baseline"][3] == str(out / "baseline")
    # The raw corpus was prepared with the teacher's tokenizer, and both students load.
    teacher_model, teacher_tokenizer = load_pretrained(teacher)
    assert data_tokenizer(out / "data").to_json() == teacher_tokenizer.to_json()
    student, _ = load_pretrained(out)
    baseline, _ = load_pretrained(out / "baseline")
    assert student.config == baseline.config
    assert student.config.vocab_size == teacher_model.config.vocab_size
    assert student.config.n_layers != teacher_model.config.n_layers  # a smaller student
    saved = load_run_config(out / "config.toml")
    assert (saved.distill.teacher, saved.distill.temperature) == (str(teacher), 3.0)
    assert load_run_config(out / "baseline" / "config.toml").distill.teacher is None
    # Same seed, same data: the runs differ by the teacher alone.
    assert float(rows["student"][2]) != float(rows["baseline"][2])


def test_distill_json_and_a_vocabulary_mismatch(shakespeare_dir, corpus, teacher, tmp_path):
    # The session's prepared plays use another tokenizer: refused through the loop's check.
    mismatch = lmscale(
        "train", "--config", "configs/tiny.toml", "--data.path", shakespeare_dir,
        "--distill.teacher", teacher, "--out", tmp_path / "x", *STEPS,
    )  # fmt: skip
    assert mismatch.returncode == 2
    (line,) = mismatch.stderr.strip().splitlines()
    assert "vocabulary of 384, the student 512" in line
    result = lmscale(
        "distill", "--teacher", teacher, "--student-config", "configs/tiny.toml", "--data",
        corpus, "--out", tmp_path / "j", "--json", "--alpha", "1", *STEPS,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["baseline"] is None and summary["student"]["val_ppl"] > 1
    assert summary["teacher"]["perplexity"] > 1
