"""The server's side of a round: Flower's FedAvg / FedProx, recorded, optionally made private.

`recording(FedAvg)` / `recording(FedProx)` are Flower's own strategies (sampling, messages,
example-weighted averaging, FedProx's `proximal-mu` in the train config) with three additions:

- every round's facts go to a `RoundBook`: each client's training loss and held-out loss (the
  replies carry the client's index), the replies that failed, the payload bytes sent and
  received, and the round's seconds;
- replies are aggregated in client order, whatever order they arrived in, so a run repeats
  to the bit;
- a failed reply (a crashed or unreachable client) is left out of that round's aggregate, as
  Flower does, and the client is asked again next round;
- with client-level DP the aggregate is `privacy.private_mean` of the clipped updates
  (unweighted, over the fixed number of clients asked) plus seeded Gaussian noise, in place of
  the weighted mean; the noise generator is seeded from (seed, round), so a run is reproducible.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedProx

from lmscale.federated.config import FederateConfig
from lmscale.federated.privacy import private_mean

ARRAYS, METRICS = "arrays", "metrics"


@dataclass
class RoundBook:
    """What the strategy saw in each round, by round number (0: the starting model)."""

    names: list[str]
    """Client names by partition index."""
    rounds: dict[int, dict] = field(default_factory=dict)

    def entry(self, server_round: int) -> dict:
        return self.rounds.setdefault(server_round, {
            "round": server_round, "clients": {}, "failures": 0, "bytes_sent": 0,
            "bytes_received": 0, "started": time.perf_counter(),
        })  # fmt: skip

    def client(self, server_round: int, index: int) -> dict:
        return self.entry(server_round)["clients"].setdefault(self.names[index], {})


def recording(base: type[FedAvg]) -> type[FedAvg]:
    """`base` (FedAvg or FedProx) with a `RoundBook` and optional client-level DP."""

    class Recording(base):
        def __init__(self, config: FederateConfig, book: RoundBook, noise: float | None, **kw):
            super().__init__(**kw)
            self.config, self.book, self.noise = config, book, noise

        def configure_train(
            self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
        ) -> Iterable[Message]:
            self.current = arrays  # what DP measures each update against
            messages = list(super().configure_train(server_round, arrays, config, grid))
            self.book.entry(server_round)["bytes_sent"] += _payload(messages)
            self.book.entry(server_round)["asked"] = len(messages)
            return messages

        def configure_evaluate(
            self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
        ) -> Iterable[Message]:
            messages = list(super().configure_evaluate(server_round, arrays, config, grid))
            self.book.entry(server_round)["bytes_sent"] += _payload(messages)
            return messages

        def aggregate_train(self, server_round: int, replies: Iterable[Message]):
            replies = sorted(replies, key=_by_client)
            entry = self.book.entry(server_round)
            entry["bytes_received"] += _payload(replies)
            valid = [r for r in replies if not r.has_error()]
            entry["failures"] += len(replies) - len(valid)
            entry["trained"] = len(valid)
            for reply in valid:
                metrics = reply.content[METRICS]
                client = self.book.client(server_round, int(metrics["client"]))
                client["train_loss"] = float(metrics["train-loss"])
                client["examples"] = int(metrics["num-examples"])
                if "epsilon" in metrics:
                    client["epsilon"] = float(metrics["epsilon"])
                    client["delta"] = float(metrics["delta"])
            if self.noise is None or not valid:
                return super().aggregate_train(server_round, replies)
            return self._private_aggregate(server_round, valid)

        def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
            replies = sorted(replies, key=_by_client)
            entry = self.book.entry(server_round)
            entry["bytes_received"] += _payload(replies)
            for reply in replies:
                if reply.has_error():
                    entry["failures"] += 1
                    continue
                metrics = reply.content[METRICS]
                client = self.book.client(server_round, int(metrics["client"]))
                client["heldout_loss"] = float(metrics["heldout-loss"])
                client["heldout_perplexity"] = float(np.exp(min(metrics["heldout-loss"], 700)))
            return super().aggregate_evaluate(server_round, replies)

        def _private_aggregate(self, server_round: int, valid: list[Message]):
            keys = list(self.current.keys())
            current = self.current.to_numpy_ndarrays()
            updates = []
            for reply in valid:
                sent = reply.content[ARRAYS].to_numpy_ndarrays()
                updates.append([s - c for s, c in zip(sent, current, strict=True)])
            rng = np.random.default_rng([self.config.seed, server_round])
            mean, norms = private_mean(
                updates, self.config.dp_clip, self.noise, self.config.clients_per_round, rng
            )
            self.book.entry(server_round)["update_norms"] = norms
            new = (Array(np.ascontiguousarray(c + m)) for c, m in zip(current, mean, strict=True))
            arrays = ArrayRecord(dict(zip(keys, new, strict=True)))
            metrics = self.train_metrics_aggr_fn([r.content for r in valid], self.weighted_by_key)
            return arrays, metrics

    Recording.__name__ = Recording.__qualname__ = f"Recording{base.__name__}"
    return Recording


def build_strategy(config: FederateConfig, book: RoundBook, noise: float | None) -> FedAvg:
    """Flower's strategy for `config` (all clients must connect before round 1)."""
    kw = dict(
        fraction_train=config.fraction, fraction_evaluate=1.0,
        min_train_nodes=config.clients_per_round, min_evaluate_nodes=config.clients,
        min_available_nodes=config.clients,
    )  # fmt: skip
    if config.strategy == "fedprox":
        return recording(FedProx)(config, book, noise, proximal_mu=config.mu, **kw)
    return recording(FedAvg)(config, book, noise, **kw)


def _by_client(reply: Message) -> tuple[int, int]:
    """Replies in client order (they arrive in any): float sums then repeat exactly."""
    if reply.has_error():
        return (1, 0)
    return (0, int(reply.content[METRICS]["client"]))


def _payload(messages: Iterable[Message]) -> int:
    """Bytes of the tensors in `messages` (the configs and metrics are a few dozen more)."""
    total = 0
    for message in messages:
        if message.has_content():
            total += sum(r.count_bytes() for r in message.content.array_records.values())
    return total
