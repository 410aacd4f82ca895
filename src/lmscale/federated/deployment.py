"""The same two apps on Flower's Deployment Engine: real SuperLink and SuperNode processes.

`run_deployment` does on 127.0.0.1 what a federation does across machines:

    flower-superlink --insecure                                  (the server's machine)
    flower-supernode --insecure --superlink HOST:9092 \\
        --node-config "partition-id=I num-partitions=N"          (one per site, at the site)
    flwr run APP_FOLDER CONNECTION --stream                      (whoever starts the run)

APP_FOLDER is a Flower app that names lmscale's apps (`lmscale.federated.apps:client` and
`:server`) and carries the run's config in its `[tool.flwr.app.config]`; it is written to
OUT/flower-app. Every site needs lmscale (with its `federated` extra) and its own `--data`
partition; `partition-id` says which one. On other machines, start the SuperNodes with the
SuperLink's address (port 9092, the Fleet API) and TLS certificates instead of `--insecure`.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from lmscale.errors import LmscaleError
from lmscale.federated.apps import CONFIG_KEY, OUT_KEY
from lmscale.federated.config import FederateConfig
from lmscale.federated.results import PLOT

APP_MODULE = "lmscale_federated_app"
CONNECTION = "lmscale-local"


def write_app(folder: Path, config: FederateConfig, out: Path) -> Path:
    """A Flower app folder whose components are lmscale's apps and whose config is `config`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{APP_MODULE}.py").write_text(
        '"""lmscale\'s federated apps, named for Flower\'s Deployment Engine."""\n\n'
        "from lmscale.federated import apps\n\n"
        "client = apps.client\n"
        "server = apps.server\n"
    )
    run_config = {CONFIG_KEY: config.to_json(), OUT_KEY: str(out.resolve())}
    (folder / "pyproject.toml").write_text(f"""\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "lmscale-federated-app"
version = "1.0.0"
description = "lmscale federated fine-tuning (written by lmscale federate --deployment)"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "lmscale"

[tool.flwr.app.components]
serverapp = "{APP_MODULE}:server"
clientapp = "{APP_MODULE}:client"

[tool.flwr.app.config]
{chr(10).join(f"{key} = {json.dumps(value)}" for key, value in run_config.items())}
""")
    return folder


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def run_deployment(config: FederateConfig, out: Path, timeout_s: float = 3600) -> None:
    """Start a SuperLink and one SuperNode per client, run the app, stop them all."""
    app = write_app(out / "flower-app", config, out)
    home = out / "flower-home"
    serverappio, fleet, control, *clientappio = free_ports(3 + config.clients)
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "127.0.0.1:{control}"\ninsecure = true\n'
    )
    env = _environment(home)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    processes: list[subprocess.Popen] = []
    try:
        processes.append(_start("superlink", [
            _script("flower-superlink"), "--insecure",
            "--serverappio-api-address", f"127.0.0.1:{serverappio}",
            "--fleet-api-address", f"127.0.0.1:{fleet}",
            "--control-api-address", f"127.0.0.1:{control}",
            "--database", str(home / "state.db"),
        ], env, logs))  # fmt: skip
        _wait_for_port(control, processes[0], "the SuperLink")
        for i, port in enumerate(clientappio):
            processes.append(_start(f"supernode-{i}", [
                _script("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{fleet}",
                "--clientappio-api-address", f"127.0.0.1:{port}",
                "--node-config", f"partition-id={i} num-partitions={config.clients}",
            ], env, logs))  # fmt: skip
        run = subprocess.run(
            [_script("flwr"), "run", str(app), CONNECTION, "--stream"], env=env,
            timeout=timeout_s, stdout=sys.stderr, stderr=subprocess.STDOUT,
        )  # fmt: skip
        if run.returncode != 0:
            raise LmscaleError(f"flwr run failed with exit code {run.returncode} (logs: {logs})")
        _wait_for_end(out, processes[0], timeout_s)
    finally:
        for process in reversed(processes):
            _stop(process)


def _environment(home: Path) -> dict[str, str]:
    env = dict(os.environ, FLWR_HOME=str(home.resolve()))
    # Flower starts its helper processes (flower-superexec, flwr-serverapp, flwr-clientapp)
    # by name: they are beside this Python's executable.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def _script(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        raise LmscaleError(f"{name} not found: install Flower (pip install 'lmscale[federated]')")
    return found


def _start(name: str, command: list[str], env: dict, logs: Path) -> subprocess.Popen:
    log = (logs / f"{name}.log").open("w")
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip


def _wait_for_port(port: int, process: subprocess.Popen, what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise LmscaleError(f"{what} exited with code {process.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise LmscaleError(f"{what} did not open port {port} in {timeout_s:.0f} s")


def _wait_for_end(out: Path, superlink: subprocess.Popen, timeout_s: float) -> None:
    """`flwr run --stream` may return before the ServerApp has saved the model and the plot."""
    deadline = time.monotonic() + timeout_s
    while not (out / PLOT).exists() and superlink.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        try:
            os.killpg(process.pid, 15)
            process.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(process.pid, 9)
