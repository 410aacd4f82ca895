"""`lmscale report` on real short runs: the page parses, the PNGs are drawn, the JSON is the log."""

import base64
import json
import math
import shutil
import statistics
from html.parser import HTMLParser

import pytest
from PIL import Image, ImageStat

from lmscale.cli.main import main
from lmscale.plan.perf import GRID_KG_PER_KWH
from lmscale.report import read_run, report
from lmscale.report.plots import smooth

FIELDS = ("loss", "lr", "tokens_per_s", "step_time_s", "elapsed_s", "peak_mem_bytes",
          "peak_alloc_bytes", "comm_bytes")  # fmt: skip


class Page(HTMLParser):
    """The images and links of a page, and whether every tag it opened was closed."""

    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self):
        super().__init__()
        self.images, self.links, self.open = [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs)
        elif tag == "a":
            self.links.append(attrs["href"])
        if tag not in self.VOID:
            self.open.append(tag)

    def handle_endtag(self, tag):
        assert self.open and self.open.pop() == tag, f"</{tag}> closes nothing open"


def metric_lines(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def assert_not_blank(image: Image.Image, what: str):
    rgb = image.convert("RGB")
    assert len(rgb.getcolors(maxcolors=1 << 16) or range(2)) > 1, f"{what} is one colour"
    assert max(ImageStat.Stat(rgb).var) > 0, f"{what} has no variance"


def test_report_of_real_runs_renders(report_runs, tmp_path):
    result = report(report_runs, tmp_path / "out")
    names = {p.name for p in result.pngs}
    assert names == {"loss_steps.png", "loss_tokens.png", "throughput.png", "mfu.png",
                     "memory.png", "step_time.png", "comm.png", "lr.png", "energy.png"}  # fmt: skip
    page = Page()
    page.feed(result.page.read_text())
    page.close()
    assert page.open == [], f"unclosed tags: {page.open}"
    assert sorted(page.links) == sorted(names)  # every PNG beside the page is linked
    assert sorted(img["data-file"] for img in page.images) == sorted(names)
    for img in page.images:  # and embedded: the page alone is the report
        prefix = "data:image/png;base64,"
        assert img["src"].startswith(prefix)
        embedded = base64.b64decode(img["src"][len(prefix) :])
        assert embedded == (tmp_path / "out" / img["data-file"]).read_bytes()
    for png in result.pngs:
        with Image.open(png) as image:
            image.verify()
        with Image.open(png) as image:
            assert image.width > 400 and image.height > 300
            assert_not_blank(image, png.name)
    text = result.page.read_text()
    assert all(f"<b>{p.name}</b>" in text for p in report_runs)  # each run named by its folder
    assert f"{GRID_KG_PER_KWH:g} kg per kWh" in text


def test_json_matches_metrics_jsonl(report_runs, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["report", *map(str, report_runs), "--out", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((out / "report.json").read_text())
    assert [r["name"] for r in printed["runs"]] == ["base", "small-batch", "ddp"]
    for run_dir, run in zip(report_runs, printed["runs"], strict=True):
        lines = metric_lines(run_dir)
        steps = [r for r in lines if "loss" in r]
        assert [r["step"] for r in run["steps"]] == [r["step"] for r in steps]
        for logged, shown in zip(steps, run["steps"], strict=True):
            for field in FIELDS:
                assert shown.get(field) == logged.get(field), (run["name"], field)
            tokens_per_step = logged["tokens_per_s"] * logged["step_time_s"]
            assert shown["tokens"] == pytest.approx(logged["step"] * tokens_per_step, rel=1e-6)
            assert 0 < shown["mfu"] < 1
        evals = [r for r in lines if "val_loss" in r]
        assert [(r["step"], r["val_loss"], r["val_ppl"]) for r in run["evals"]] == [
            (r["step"], r["val_loss"], r["val_ppl"]) for r in evals
        ]
        summary = run["summary"]
        assert summary["steps"] == 24 and summary["final_loss"] == steps[-1]["loss"]
        timed = [r["tokens_per_s"] for r in steps if r["step"] > 1]
        assert summary["median_tokens_per_s"] == statistics.median(timed)
        assert summary["peak_mem_bytes"] == max(r["peak_mem_bytes"] for r in steps)
        assert summary["best_val_loss"] == min(r["val_loss"] for r in evals)
        assert summary["best_val_ppl"] == pytest.approx(math.exp(summary["best_val_loss"]))
        energy = run["energy"]  # measured seconds x devices x catalog power
        assert energy["seconds"] == steps[-1]["elapsed_s"]
        watts = energy["devices"] * energy["device_power_w"]
        assert energy["kwh"] == pytest.approx(energy["seconds"] * watts / 3.6e6)
        assert energy["kg_co2e"] == pytest.approx(energy["kwh"] * GRID_KG_PER_KWH)
        assert run["prediction"]["peak_bytes"] > 0 and run["prediction"]["step_s"] > 0
    ddp = printed["runs"][2]
    assert ddp["world_size"] == 2 and ddp["device"]["name"] == "cpu:1"
    assert ddp["summary"]["comm_bytes_per_step"] > 0
    assert printed["runs"][0]["summary"]["comm_bytes_per_step"] is None


def test_grid_intensity_and_device_options(report_runs, tmp_path, capsys):
    args = ["report", str(report_runs[0]), "--out", str(tmp_path), "--json"]
    assert main([*args, "--grid-intensity", "0.1", "--device", "h100"]) == 0
    run = json.loads(capsys.readouterr().out)["runs"][0]
    assert run["device"]["name"] == "h100-80gb" and run["energy"]["device_power_w"] == 700
    assert run["energy"]["kg_co2e"] == pytest.approx(run["energy"]["kwh"] * 0.1)


def test_a_run_without_evaluations_memory_or_elapsed_time_omits_them(report_runs, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(report_runs[0], old)
    kept = [{k: v for k, v in r.items() if not k.startswith("peak_") and k != "elapsed_s"}
            for r in metric_lines(old) if "val_loss" not in r]  # fmt: skip
    (old / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    result = report([old], tmp_path / "out")
    names = {p.name for p in result.pngs}
    assert not names & {"memory.png", "comm.png"} and "loss_steps.png" in names
    run = result.numbers["runs"][0]
    assert run["evals"] == [] and "best_val_loss" not in run["summary"]
    assert run["prediction"] is None and run["energy"]["seconds_from"].startswith("median")
    timed = [r["step_time_s"] for r in kept]
    assert run["energy"]["seconds"] == pytest.approx(statistics.median(timed) * 24)
    assert any("no planner prediction" in note for note in run["notes"])


def test_a_resumed_run_adds_up_its_sessions(tmp_path):
    # elapsed_s restarts when a run resumes; the step logged twice keeps its later line.
    lines = [(2, 0.2), (4, 0.4), (6, 0.6), (4, 0.15), (6, 0.35), (8, 0.55)]
    records = [{"step": s, "loss": 6 - s / 10, "tokens_per_s": 1000.0, "step_time_s": 0.1,
                "elapsed_s": e} for s, e in lines]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    run = read_run(tmp_path)
    assert run.sessions == [0.6, 0.55]
    assert [r["step"] for r in run.steps] == [2, 4, 6, 8] and run.steps[1]["elapsed_s"] == 0.15
    assert run.tokens_per_step == 100  # no config.toml: tokens/s x step time


def test_smoothing_is_a_debiased_moving_average():
    assert smooth([1.0, 1.0, 1.0], 0.9) == pytest.approx([1.0, 1.0, 1.0])
    assert smooth([1.0, 3.0], 0.0) == [1.0, 3.0]
    assert smooth([0.0, 2.0], 0.5) == pytest.approx([0.0, 2 * 0.5 / 0.75])


@pytest.mark.parametrize("case", ["missing", "no-metrics", "bad-line", "bad-device"])
def test_bad_input_is_a_one_line_error(case, report_runs, tmp_path, capsys):
    run = tmp_path / "run"
    args = [str(run)]
    if case == "no-metrics":
        run.mkdir()
    elif case in ("bad-line", "bad-device"):
        shutil.copytree(report_runs[0], run)
        if case == "bad-line":
            with (run / "metrics.jsonl").open("a") as f:
                f.write('{"step": 25, "loss": \n')
        else:
            args += ["--device", "tpu-v9"]
    assert main(["report", *args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lmscale: error: report: "), err
    assert {"missing": "not found", "no-metrics": "no metrics.jsonl", "bad-line": "is not JSON",
            "bad-device": "unknown --device"}[case] in err  # fmt: skip
