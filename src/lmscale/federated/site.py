"""One site's model and data, as a ClientApp process holds them between rounds.

A site loads the starting model once (and adds the fresh adapter, seeded the same everywhere so
every site and the server hold the same initial tensors), tokenizes its own partition once, and
then only ever swaps in the global shared tensors it is sent. Nothing here knows about Flower.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from lmscale.checkpoint import load_pretrained
from lmscale.federated.config import FederateConfig
from lmscale.federated.local import (
    LocalConfig,
    LocalResult,
    evaluate_tokens,
    load_shared_,
    shared_state,
    token_windows,
    train_round,
)
from lmscale.federated.partition import ClientData, client_partitions
from lmscale.finetune.lora import apply_lora_
from lmscale.model import Transformer
from lmscale.tokenizer import Tokenizer
from lmscale.train.evaluate import EvalResult


def starting_model(config: FederateConfig) -> tuple[Transformer, Tokenizer]:
    """The model every party starts from: the base, plus the fresh adapter (same seed)."""
    model, tokenizer = load_pretrained(config.model, "cpu", dtype=torch.float32)
    torch.manual_seed(config.seed)
    if config.adapter == "lora":
        apply_lora_(model, config.lora)  # freezes the base: only A and B require grad
    else:
        model.requires_grad_(True)
    return model.eval(), tokenizer


def encode(tokenizer: Tokenizer, text: str) -> np.ndarray:
    return np.asarray(tokenizer.encode(text, add_bos=False), dtype=np.int64)


@dataclass
class Site:
    """A client's model, training windows and held-out tokens."""

    name: str
    model: Transformer
    windows: Tensor
    heldout: np.ndarray

    def train(self, state: dict[str, Tensor], local: LocalConfig, seed: int) -> LocalResult:
        load_shared_(self.model, state)
        return train_round(self.model, self.windows, local, seed)

    def evaluate(self, state: dict[str, Tensor], local: LocalConfig) -> EvalResult:
        load_shared_(self.model, state)
        return evaluate_tokens(self.model, self.heldout, local)

    def update(self) -> dict[str, Tensor]:
        return shared_state(self.model)


def load_site(config: FederateConfig, partition: int) -> Site:
    """Site `partition` of the run, loaded once per process (a ClientApp is called per round)."""
    return _load_site(config.to_json(), partition)


@lru_cache(maxsize=2)
def _load_site(config_json: str, partition: int) -> Site:
    config = FederateConfig.from_json(config_json)
    torch.set_num_threads(config.threads)
    data: ClientData = client_partitions(config.data, config.clients)[partition]
    model, tokenizer = starting_model(config)
    windows = token_windows(encode(tokenizer, data.train_text), config.local.context)
    return Site(data.name, model, windows, encode(tokenizer, data.heldout_text))


def global_heldout(config: FederateConfig, tokenizer: Tokenizer) -> np.ndarray:
    """The server's evaluation set: the first `eval_tokens` held-out tokens of every client."""
    parts = client_partitions(config.data, config.clients)
    limit = config.local.eval_tokens + 1
    return np.concatenate([encode(tokenizer, p.heldout_text)[:limit] for p in parts])


def round_config(config: FederateConfig, mu: float) -> LocalConfig:
    return replace(config.local, mu=mu)
