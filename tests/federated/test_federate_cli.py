"""`lmscale federate` as a user runs it, and Flower's Deployment Engine with real processes."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("flwr")

from lmscale.federated.config import FederateConfig  # noqa: E402
from lmscale.federated.local import LocalConfig  # noqa: E402
from lmscale.federated.runtime import federate  # noqa: E402

SMALL = ["--local-steps", "2", "--batch-size", "4", "--context", "64", "--eval-tokens", "512"]


def lmscale(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "lmscale", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)  # fmt: skip


def test_federate_trains_an_adapter_that_generate_loads(fed_model_dir, client_folder, tmp_path):
    out = tmp_path / "fed"
    result = lmscale("federate", "--model", str(fed_model_dir), "--data", str(client_folder),
                     "--clients", "3", "--rounds", "2", "--lr", "3e-3", *SMALL,
                     "--out", str(out), "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    last = json.loads(result.stdout.strip().splitlines()[-1])
    assert last["round"] == 2 and last["trained"] == 3
    assert "round 2: global held-out loss" in result.stderr
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    again = lmscale("federate", "--model", str(fed_model_dir), "--data", str(client_folder),
                    "--out", str(out))  # fmt: skip
    assert again.returncode != 0 and "already holds a federated run" in again.stderr
    generated = lmscale("generate", "--model", str(fed_model_dir), "--adapter",
                        str(out / "adapter"), "--prompt", "KING.", "--max-new-tokens", "4",
                        "--eager")  # fmt: skip
    assert generated.returncode == 0, generated.stderr[-2000:]
    assert generated.stdout.strip()


def test_the_deployment_engine_runs_a_superlink_and_a_supernode_per_client(
    fed_model_dir, client_folder, tmp_path
):
    config = FederateConfig(
        model=str(fed_model_dir), data=str(client_folder), clients=2, rounds=1, adapter="full",
        local=LocalConfig(steps=2, batch_size=4, context=64, lr=3e-3, eval_tokens=512),
    )  # fmt: skip
    out = tmp_path / "dep"
    rounds = federate(config, out, deployment=True)
    assert [r["round"] for r in rounds] == [0, 1]
    assert rounds[1]["trained"] == 2 and rounds[1]["global"]["loss"] < rounds[0]["global"]["loss"]
    logs = {p.name: p.read_text() for p in (out / "logs").iterdir()}
    assert set(logs) == {"superlink.log", "supernode-0.log", "supernode-1.log"}
    assert all(text.strip() for text in logs.values())
    app = (out / "flower-app" / "pyproject.toml").read_text()
    assert 'clientapp = "lmscale_federated_app:client"' in app
    assert (out / "model" / "model.safetensors").exists()
    # Every process the run started has stopped.
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(out / "flower-home") not in ps and "flower-supernode" not in ps
