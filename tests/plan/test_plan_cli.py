"""`lmscale plan` end to end, as a user runs it: real processes, real output."""

import json
import subprocess
import sys

import pytest


def plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lmscale", "plan", *args], capture_output=True, text=True
    )


def test_the_issue_commands_answer_without_torch():
    code = (
        "import sys; from lmscale.cli.main import main; "
        "main(['plan', '--model', 'llama-7b', '--gpu', 'h100-80gb', '--gpus', '64', '--seq', "
        "'4096', '--global-batch-tokens', '4M', '--tokens', '2T']); "
        "main(['plan', '--serve', '--model', 'llama-7b', '--gpu', 'l4', '--context', '8192', "
        "'--dtype', 'int4']); print('torch loaded:', 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.rstrip().endswith("torch loaded: False")
    assert "recommended:" in out.stdout and "strategies that fit, fastest first" in out.stdout
    assert "DDP" in out.stdout.split("strategies that do not fit:")[1]  # 7B AdamW on every GPU
    assert "concurrent sequences of 8192 tokens:" in out.stdout


def test_json_plan_for_a_shape_given_by_parameter_count():
    result = plan("--params", "70e9", "--layers", "80", "--hidden", "8192", "--heads", "64",
                  "--kv-heads", "8", "--gpu", "a100-80gb", "--gpus", "512", "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["model"]["params"] == pytest.approx(70e9, rel=0.01)
    assert data["model"]["n_kv_heads"] == 8 and data["cluster"]["n_devices"] == 512
    best = data["recommended"]
    assert best["fits"] and best["memory_bytes"]["peak"] < 79 * 2**30
    fitting = [s["cost"]["seconds"] for s in data["strategies"] if s["fits"]]
    assert fitting == sorted(fitting) and fitting[0] == best["cost"]["seconds"]
    assert all(s["problem"] for s in data["strategies"] if not s["fits"])
    assert data["job"]["tokens"] == pytest.approx(20 * data["model"]["params"])


def test_a_strategy_of_your_own_is_shown_in_detail_even_when_it_does_not_fit():
    result = plan("--model", "llama2-7b", "--gpus", "8", "--strategy", "ddp")
    assert result.returncode == 0, result.stderr
    assert "your strategy: dp8  [DDP]" in result.stdout
    assert "does not fit: needs" in result.stdout and "optimizer states" in result.stdout
    shown = plan("--model", "llama2-7b", "--gpus", "16", "--tp", "8", "--sp", "--pp", "2",
                 "--recompute", "full", "--json")  # fmt: skip
    chosen = json.loads(shown.stdout)["chosen"]
    assert chosen["strategy"] == {"dp": 1, "tp": 8, "pp": 2, "zero": 0, "sp": True,
                                  "recompute": "full", "micro_batch": 1, "pp_schedule": "1f1b",
                                  "virtual_stages": 1}  # fmt: skip


def test_serve_json_lists_every_dtype_and_other_contexts():
    result = plan("--serve", "--model", "smollm2-135m", "--gpu", "rtx-4090", "--json")
    data = json.loads(result.stdout)
    assert set(data["weights_bytes"]) == {"fp32", "bf16", "fp16", "fp8", "int8", "int4"}
    assert data["max_sequences"] > 100 and data["by_context"]


@pytest.mark.parametrize(
    "args, message",
    [
        (("--model", "gpt2", "--tp", "16", "--gpus", "16"), "larger than the 12 attention heads"),
        (
            ("--model", "gpt2", "--tp", "5", "--gpus", "10"),
            "does not divide the 12 attention heads",
        ),
        (("--model", "llama2-7b", "--gpus", "4096", "--strategy", "ddp"), "cannot give 4096"),
        (("--model", "llama2-7b", "--gpus", "12", "--tp", "8"), "not a multiple of tp x pp"),
        (("--params", "7e9", "--hidden", "1000", "--heads", "3"), "must be divisible by --heads"),
        (
            (
                "--model",
                "nope",
            ),
            "unknown --model 'nope'",
        ),
        (("--model", "gpt2", "--gpu", "x100"), "unknown --gpu 'x100'"),
        (("--model", "gpt2", "--tokens", "lots"), "--tokens must be a number"),
        (("--model", "gpt2", "--seq", "4096"), "longer than the 1024 learned positions"),
        (("--model", "gpt2", "--strategy", "zero9"), "--strategy must be one of"),
        (("--serve", "--model", "llama2-70b", "--gpu", "l4"), "use a smaller --dtype"),
        ((), "say which model"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message):
    result = plan(*args)
    assert result.returncode == 2
    assert message in result.stderr and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr


def test_a_reader_that_stops_early_ends_the_plan_quietly():
    """`lmscale plan ... | head`: the reader closes the pipe; no traceback, the shell's 141."""
    command = [sys.executable, "-m", "lmscale", "plan", "--model", "llama2-70b", "--gpus", "512",
               "--all", "--top", "0", "--json"]  # fmt: skip
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
        assert process.stdout.readline().strip() == b"{"
        process.stdout.close()  # the JSON is far larger than the pipe's buffer
        stderr = process.stderr.read().decode()
        assert process.wait() == 141
    assert stderr == ""
