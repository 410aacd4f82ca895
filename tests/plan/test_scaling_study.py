"""`lmscale scaling` end to end: a real sweep of three tiny sizes on a tiny prepared corpus."""

import json

import matplotlib.image
import pytest

from lmscale.cli.main import main
from lmscale.data import prepare
from lmscale.data.corpus import shakespeare_dir
from lmscale.plan.sweep import shape_for

SIZES = (2e4, 4e4, 8e4)
EVALS = 4


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """Eight documents of real text (the openings of eight plays), a 320-token vocabulary."""
    root = tmp_path_factory.mktemp("scaling")
    corpus = root / "corpus"
    corpus.mkdir()
    for i, play in enumerate(sorted(shakespeare_dir().rglob("*.md"))[:8]):
        (corpus / f"play{i}.txt").write_text(play.read_text()[:40000])
    prepare(str(corpus), root / "data", vocab_size=320, val_fraction=0.25)
    return root / "data"


def study_args(data, out, *extra):
    # NOTE: --minutes 0.01 is shorter than the probes alone, so every size trains the minimum
    # (2 x --evals steps for the smallest, proportionally more for the others) whatever the
    # machine's speed: the plan, and so the whole study, is deterministic.
    return [
        "scaling", "--data", str(data), "--sizes", "20K,40K,80K", "--minutes", "0.01",
        "--out", str(out), "--context", "32", "--evals", str(EVALS), "--eval-tokens", "2048",
        "--no-progress", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def study(tiny_data, tmp_path_factory):
    """The study, run once for the module: (its arguments, OUT)."""
    out = tmp_path_factory.mktemp("study") / "scaling"
    args = study_args(tiny_data, out)
    assert main(args) == 0
    return args, out


def test_the_study_writes_its_runs_fits_and_plot(study):
    _, out = study
    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    expected = [shape_for(n, 320, 32).num_params(embeddings=False) for n in SIZES]
    assert [r["params"] for r in runs] == expected
    assert all(r["params_total"] > r["params"] for r in runs)
    steps = [r["steps"] for r in runs]
    assert steps[0] == 2 * EVALS
    assert [round(steps[0] * n / expected[0]) for n in expected] == steps  # steps ∝ N
    ratios = [r["tokens_per_param"] for r in runs]
    assert max(ratios) / min(ratios) < 1.05  # the same tokens per parameter for every size
    for run in runs:
        curve = run["curve"]
        assert len(curve) == EVALS and curve[-1]["step"] == run["steps"]
        assert [p["flops"] for p in curve] == sorted(p["flops"] for p in curve)
        assert curve[-1]["flops"] == pytest.approx(run["flops"])
        assert curve[-1]["val_loss"] < curve[0]["val_loss"]
    finals = [r["final_loss"] for r in runs]
    assert finals == sorted(finals, reverse=True)  # bigger is better at equal tokens/param
    fits = results["fits"]
    assert fits["loss_vs_params"]["dof"] == 0  # three sizes fit three parameters exactly
    assert fits["loss_vs_params"]["alpha"] > 0
    assert fits["budget_flops"] == pytest.approx(100 * sum(r["flops"] for r in runs))
    assert "error" in fits["optimal"] or fits["optimal"]["params"] > 0
    image = matplotlib.image.imread(out / "scaling.png")
    assert image.shape[0] > 300 and image.shape[1] > 600


def test_a_rerun_reuses_every_finished_size(study, capsys):
    args, out = study
    before = json.loads((out / "results.json").read_text())
    metrics = [(out / "runs" / r["label"] / "metrics.jsonl").read_text() for r in before["runs"]]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "L(N) = E + A N^-alpha" in text and text.count("(reused)") == 3
    assert "compute-optimal size for" in text
    after = json.loads((out / "results.json").read_text())
    assert [r["final_loss"] for r in after["runs"]] == [r["final_loss"] for r in before["runs"]]
    again = [(out / "runs" / r["label"] / "metrics.jsonl").read_text() for r in after["runs"]]
    assert again == metrics  # nothing was trained again


def test_an_interrupted_size_resumes_from_its_checkpoint(study, capsys):
    args, out = study
    before = json.loads((out / "results.json").read_text())
    largest = out / "runs" / before["runs"][-1]["label"]
    (largest / "result.json").unlink()  # as if stopped after its last checkpoint
    assert main([*args, "--json"]) == 0
    after = json.loads(capsys.readouterr().out)
    assert [r["reused"] for r in after["runs"]] == [True, True, False]
    assert after["runs"][-1]["curve"] == before["runs"][-1]["curve"]


def test_a_rerun_with_other_settings_is_refused(study, capsys):
    args = list(study[0])
    args[args.index("--context") + 1] = "16"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmscale: error: --out") and "context = 32" in err
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "no/such/data"], "no prepared data there"),
        (["--sizes", "1M,abc,4M"], "--sizes must be a number"),
        (["--sizes", "1M,2M"], "at least 3 different sizes"),
        (["--sizes", "1K,2K,3K"], "fewer than 3 different model shapes"),
        (["--minutes", "0"], "--minutes must be positive"),
        (["--minutes", "-3"], "--minutes must be positive"),
        (["--budget-flops", "lots"], "--budget-flops must be a number"),
    ],
)
def test_user_mistakes_are_one_line(tiny_data, tmp_path, capsys, args, message):
    base = {"--data": str(tiny_data), "--sizes": "20K,40K,80K", "--minutes": "1"}
    base |= dict(zip(args[::2], args[1::2], strict=True))
    argv = ["scaling", "--out", str(tmp_path / "s"), *[x for kv in base.items() for x in kv]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "s").exists()  # nothing trained, nothing written
