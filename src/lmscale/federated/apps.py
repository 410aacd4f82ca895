"""Flower's two apps for a federated lmscale run: the ClientApp each site runs, the ServerApp.

A site receives the global shared tensors (and the round's config), trains on its own
partition, and replies with its trained shared tensors and a few numbers: its example count
(FedAvg's weight), its training loss, its index, and under DP-SGD its epsilon. Text and token
ids never leave it. Asked to evaluate, it replies with its held-out loss of the global model.

The server starts every site from the same tensors, runs Flower's strategy for `rounds`, scores
the global model on the global held-out set before the first round and after each one, writes
each round's line to OUT/rounds.jsonl as it completes, and saves the global model at the end.

`client_app(config)` / `server_app(config, out)` build the apps for the Simulation Engine (the
config travels with them); the module-level `client` and `server` apps are what a Flower app
folder names for the Deployment Engine: they read the same config from the run config's
`lmscale-config` (JSON) and `out` keys.
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from lmscale.federated.config import FederateConfig
from lmscale.federated.local import evaluate_tokens, load_shared_, shared_state
from lmscale.federated.partition import client_partitions
from lmscale.federated.privacy import default_delta, epsilon, noise_for_epsilon
from lmscale.federated.results import append_round, plot_rounds, save_global
from lmscale.federated.site import global_heldout, load_site, round_config, starting_model
from lmscale.federated.strategy import ARRAYS, METRICS, RoundBook, build_strategy

CONFIG_KEY, OUT_KEY = "lmscale-config", "out"


def client_app(config: FederateConfig | None = None, mods: list | None = None) -> ClientApp:
    """The ClientApp; `config` None reads it from the run config (the Deployment Engine)."""
    app = ClientApp(mods=mods or [])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        run = config or _run_config(context)
        index = int(context.node_config["partition-id"])
        site = load_site(run, index)
        sent = msg.content[ARRAYS].to_torch_state_dict()
        settings = msg.content["config"]
        server_round = int(settings["server-round"])
        mu = float(settings.get("proximal-mu", 0.0))
        seed = int(np.random.SeedSequence([run.seed, server_round, index]).generate_state(1)[0])
        result = site.train(sent, round_config(run, mu), seed)
        metrics = {"num-examples": result.examples, "train-loss": result.loss, "client": index}
        if run.dp_sgd:
            eps, delta = _dp_sgd_epsilon(run, context, site.windows.shape[0], result.steps)
            metrics["epsilon"], metrics["delta"] = eps, delta
        content = RecordDict({ARRAYS: ArrayRecord(site.update()), METRICS: MetricRecord(metrics)})
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        run = config or _run_config(context)
        index = int(context.node_config["partition-id"])
        site = load_site(run, index)
        result = site.evaluate(msg.content[ARRAYS].to_torch_state_dict(), run.local)
        metrics = {"heldout-loss": result.loss, "num-examples": result.tokens, "client": index}
        return Message(content=RecordDict({METRICS: MetricRecord(metrics)}), reply_to=msg)

    return app


def _dp_sgd_epsilon(
    run: FederateConfig, context: Context, windows: int, steps: int
) -> tuple[float, float]:
    """This site's (epsilon, delta) after all its DP-SGD steps so far (the node's state)."""
    record = context.state.get("lmscale-dp") or MetricRecord({"steps": 0})
    record["steps"] = int(record["steps"]) + steps
    context.state["lmscale-dp"] = record
    rate = min(1.0, run.local.batch_size / windows)
    delta = run.dp_delta or default_delta(windows)
    return epsilon(run.dp_noise, int(record["steps"]), rate, delta), delta


def server_app(config: FederateConfig | None = None, out: str | Path | None = None) -> ServerApp:
    """The ServerApp; `config` None reads config and out from the run config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run = config or _run_config(context)
        folder = Path(out if out is not None else context.run_config[OUT_KEY])
        run_server(grid, run, folder)

    return app


def run_server(grid: Grid, config: FederateConfig, out: Path) -> None:
    """The federated rounds (see the module docstring); out is already prepared."""
    random.seed(config.seed)  # Flower samples the clients of a round with `random`
    model, tokenizer = starting_model(config)
    parts = client_partitions(config.data, config.clients)
    heldout = global_heldout(config, tokenizer)
    noise, delta = privacy_parameters(config)
    book = RoundBook([p.name for p in parts])
    strategy = build_strategy(config, book, noise if config.client_level_dp else None)
    budget = replace(config.local, eval_tokens=len(heldout))  # score the whole global set
    started = time.perf_counter()

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        load_shared_(model, arrays.to_torch_state_dict())
        result = evaluate_tokens(model, heldout, budget)
        entry = book.entry(server_round)
        line = {k: v for k, v in entry.items() if k != "started"}
        line["global"] = result.as_dict()
        line["seconds"] = time.perf_counter() - entry["started"]
        line["elapsed_s"] = time.perf_counter() - started
        line["epsilon"], line["delta"] = _round_epsilon(config, noise, delta, server_round, line)
        append_round(out, line)
        _say(_summary(line))
        return MetricRecord({"global-loss": result.loss})

    result = strategy.start(
        grid=grid, initial_arrays=ArrayRecord(shared_state(model)), num_rounds=config.rounds,
        train_config=ConfigRecord({"seed": config.seed}), evaluate_fn=evaluate_global,
    )  # fmt: skip
    load_shared_(model, result.arrays.to_torch_state_dict())
    saved = save_global(out, model, tokenizer, config)
    plot_rounds(out)
    _say(f"global {'adapter' if config.adapter == 'lora' else 'model'}: {saved}")


def privacy_parameters(config: FederateConfig) -> tuple[float | None, float | None]:
    """(noise multiplier, delta) of the run's guarantee; (None, None) without DP."""
    if config.client_level_dp:
        delta = config.dp_delta or default_delta(config.clients)
        rate = config.clients_per_round / config.clients
        noise = config.dp_noise
        if noise is None:
            noise = noise_for_epsilon(config.dp_epsilon, config.rounds, rate, delta)
        return noise, delta
    if config.dp_sgd:
        return config.dp_noise, config.dp_delta  # each site's delta follows its window count
    return None, None


def _round_epsilon(config, noise, delta, server_round: int, line: dict):
    if config.client_level_dp:
        rate = config.clients_per_round / config.clients
        return epsilon(noise, server_round, rate, delta), delta
    if config.dp_sgd:
        sites = [c for c in line["clients"].values() if "epsilon" in c]
        if not sites:
            return 0.0, delta
        return max(c["epsilon"] for c in sites), max(c["delta"] for c in sites)
    return None, None


def _summary(line: dict) -> str:
    g = line["global"]
    text = (
        f"round {line['round']}: global held-out loss {g['loss']:.4f} (ppl {g['perplexity']:.2f})"
    )
    if line["round"] > 0:
        text += f", {line.get('trained', 0)}/{line.get('asked', 0)} clients trained"
        text += f", {line['bytes_received'] / 1e6:.2f} MB received, {line['seconds']:.1f} s"
    if line["epsilon"] is not None:
        text += f", epsilon {line['epsilon']:.2f}"
    return text


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _run_config(context: Context) -> FederateConfig:
    return FederateConfig.from_json(str(context.run_config[CONFIG_KEY]))


client = client_app()
server = server_app()
