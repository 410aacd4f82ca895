"""Running the two apps: Flower's Simulation Engine in this process, or its Deployment Engine.

The Simulation Engine (the default) runs the ServerApp in a thread here and the ClientApps in
Ray actors, `threads` CPUs each, as many at once as the machine's cores allow; each actor
keeps the sites it has loaded between rounds. `deployment.run_deployment` runs the same apps as
real processes (a SuperLink, one SuperNode per client) on 127.0.0.1.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from lmscale.checkpoint.registry import resolve_bundled
from lmscale.errors import LmscaleError
from lmscale.federated.config import FederateConfig
from lmscale.federated.partition import client_partitions
from lmscale.federated.results import prepare_out, read_rounds


def federate(
    config: FederateConfig, out: str | Path, deployment: bool = False, mods: list | None = None,
    verbose: bool = False,
) -> list[dict]:  # fmt: skip
    """Run a federated fine-tuning; returns the lines of OUT/rounds.jsonl.

    Args:
        config: what to run.
        out: the run folder (see `results`); one that holds a run is refused.
        deployment: real SuperLink and SuperNode processes instead of the simulation.
        mods: Flower client mods wrapped around every ClientApp call (simulation only).
        verbose: keep Flower's own INFO log (lmscale prints a line per round either way).
    """
    out = Path(out)
    check(config)
    logging.getLogger("flwr").setLevel(logging.INFO if verbose else logging.WARNING)
    prepare_out(out, config)
    if deployment:
        from lmscale.federated.deployment import run_deployment

        run_deployment(config, out)
    else:
        run_simulated(config, out, mods)
    rounds = read_rounds(out) if (out / "rounds.jsonl").exists() else []
    if len(rounds) != config.rounds + 1:
        raise LmscaleError(f"the federated run stopped after {max(len(rounds) - 1, 0)} of "
                           f"{config.rounds} rounds (see the log above)")  # fmt: skip
    return rounds


def check(config: FederateConfig) -> None:
    """Fail early, in one line, on data or a model that the apps would fail on later."""
    client_partitions(config.data, config.clients)
    model = Path(config.model)
    if not model.exists() and resolve_bundled(config.model) is None:
        raise LmscaleError(f"model not found: '{config.model}'")


def run_simulated(config: FederateConfig, out: Path, mods: list | None = None) -> None:
    from flwr.simulation import run_simulation

    from lmscale.federated.apps import client_app, server_app

    cpus = os.cpu_count() or 1
    backend = {
        "client_resources": {"num_cpus": config.threads, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": max(cpus, config.threads), "include_dashboard": False,
            "logging_level": logging.ERROR, "log_to_driver": True,
        },
    }  # fmt: skip
    run_simulation(
        server_app=server_app(config, out), client_app=client_app(config, mods),
        num_supernodes=config.clients, backend_config=backend,
    )  # fmt: skip
