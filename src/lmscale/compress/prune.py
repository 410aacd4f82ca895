"""Pruning: `prune_(model, PruneConfig(...))`, in place, in the torchao manner.

Three methods, all on the linear layers of the Transformer blocks (the embedding and the output
head, tied in SmolLM2, are left whole, as in quantization):

    magnitude   zero the fraction `sparsity` of weights with the smallest |w|, under one threshold
                over every block linear (scope "global") or in each linear alone ("layer")
    2:4         in every group of 4 consecutive input weights of a row, zero the 2 smallest |w|
                (exactly 50%: the pattern sparse tensor cores run at up to 2x)
    structured  remove whole attention head groups and MLP channels (see `structured.py`): the
                result is a smaller dense model, which is what runs faster on any hardware

Magnitude and 2:4 keep the shapes: the weights are zeros in a float tensor, so the saved folder
is a normal float folder and every verb loads it. The zeros alone save neither time nor bytes.
NOTE: on CUDA, `torch.sparse.to_sparse_semi_structured` turns a 2:4 weight into a compressed
tensor whose matmul runs on sparse tensor cores (fp16/bf16, Ampere or newer); this CPU-only
build has no such kernel, so 2:4 weights stay dense here and `prune_` does not convert them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from lmscale.checkpoint import load_pretrained, save_model_dir
from lmscale.compress.quantize import FilterFn, describe, in_blocks, quantization_of
from lmscale.compress.structured import prune_structured_
from lmscale.config import to_dict
from lmscale.data import iter_documents
from lmscale.errors import LmscaleError
from lmscale.tokenizer import Tokenizer

METHODS = ("magnitude", "2:4", "structured")
SCOPES = ("global", "layer")
IMPORTANCES = ("activation", "weight")


@dataclass
class PruneConfig:
    """How to prune a model."""

    method: str = "magnitude"
    """magnitude (unstructured), 2:4 (semi-structured) or structured (heads and MLP channels)."""
    sparsity: float = 0.5
    """Fraction to remove, in (0, 1): of the weights, or (structured) of the heads and channels."""
    scope: str = "global"
    """magnitude only: one threshold over all block linears (global) or one per linear (layer)."""
    importance: str = "activation"
    """structured only: score units by their output on calibration text, or by weight norms."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise LmscaleError(
                f"unknown pruning method '{self.method}' (known: {', '.join(METHODS)})"
            )
        if not 0.0 < self.sparsity < 1.0:
            raise LmscaleError(f"sparsity must be between 0 and 1 (exclusive), got {self.sparsity}")
        if self.method == "2:4" and self.sparsity != 0.5:
            raise LmscaleError(
                f"2:4 pruning removes exactly half: sparsity 0.5, got {self.sparsity}"
            )
        if self.scope not in SCOPES:
            raise LmscaleError(f"unknown pruning scope '{self.scope}' (known: global, layer)")
        if self.importance not in IMPORTANCES:
            raise LmscaleError(
                f"unknown importance '{self.importance}' (known: {', '.join(IMPORTANCES)})"
            )

    def as_dict(self) -> dict:
        extra = {
            "magnitude": {"scope": self.scope}, "structured": {"importance": self.importance}
        }.get(self.method, {})  # fmt: skip
        return {"method": self.method, "sparsity": self.sparsity} | extra


def smallest_mask(scores: Tensor, k: int) -> Tensor:
    """A boolean mask of exactly `k` entries of `scores` with the smallest values (1-D).

    A threshold alone would take every tie at the k-th value; the ties are cut to fit.
    """
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k <= 0:
        return mask
    threshold = scores.kthvalue(k).values
    mask = scores < threshold
    ties = (scores == threshold).nonzero().flatten()
    mask[ties[: k - int(mask.sum())]] = True
    return mask


def magnitude_(linears: dict[str, nn.Linear], sparsity: float, scope: str) -> None:
    """Zero the smallest-|w| fraction `sparsity` of the weights, globally or per layer."""
    if scope == "layer":
        for linear in linears.values():
            w = linear.weight
            mask = smallest_mask(w.detach().abs().flatten().float(), round(sparsity * w.numel()))
            w.masked_fill_(mask.view_as(w), 0.0)
        return
    weights = [linear.weight for linear in linears.values()]
    scores = torch.cat([w.detach().abs().flatten().float() for w in weights])  # (all weights,)
    mask = smallest_mask(scores, round(sparsity * scores.numel()))
    for w, part in zip(weights, mask.split([w.numel() for w in weights]), strict=True):
        w.masked_fill_(part.view_as(w), 0.0)


def semi_structured_(linears: dict[str, nn.Linear]) -> None:
    """2:4: keep the 2 largest |w| of every 4 consecutive input weights of each row."""
    for name, linear in linears.items():
        if linear.in_features % 4:
            raise LmscaleError(f"2:4 pruning needs a multiple of 4 inputs; '{name}' has "
                               f"{linear.in_features}")  # fmt: skip
    for linear in linears.values():
        w = linear.weight
        groups = w.detach().view(w.shape[0], -1, 4)  # (out, in/4, 4)
        drop = groups.abs().topk(2, dim=-1, largest=False).indices  # (out, in/4, 2)
        groups.scatter_(-1, drop, 0.0)  # a view: writes into the weight


@torch.no_grad()
def prune_(
    model: nn.Module,
    config: PruneConfig,
    filter_fn: FilterFn = in_blocks,
    calibration: Tensor | None = None,
) -> dict:
    """Prune `model` in place.

    Args:
        model: a float `lmscale.model.Transformer` (not quantized).
        config: method, sparsity and scope.
        filter_fn: `(module, fully-qualified name) -> bool`, the linears magnitude and 2:4
            prune; structured pruning always acts on every block's attention and MLP.
        calibration: structured with importance "activation": (B, T) token ids whose
            activations weigh each head group and channel.

    Returns:
        The record config.json keeps under "pruning": the config, the pruned modules (or, for
        structured, the shapes before and after) and the sparsity reached.

    Raises:
        LmscaleError: the model is quantized, or a layer's shape does not fit the method.
    """
    quantization = quantization_of(model)
    if quantization is not None:
        raise LmscaleError(
            f"the model is quantized ({describe(quantization)}); prune its float original"
        )
    if config.method == "structured":
        if config.importance == "weight":
            calibration = None
        elif calibration is None:
            raise LmscaleError(
                "structured pruning by activation needs calibration tokens (or importance='weight')"
            )
        return config.as_dict() | prune_structured_(model, config.sparsity, calibration)
    linears = {
        name: module for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and filter_fn(module, name)
    }  # fmt: skip
    if not linears:
        raise LmscaleError("the model has no linear layers to prune")
    HANDLERS[config.method](linears, config)
    return config.as_dict() | {"modules": list(linears), "achieved": sparsity_of(linears.values())}


HANDLERS: dict[str, Callable[[dict[str, nn.Linear], PruneConfig], None]] = {
    "magnitude": lambda linears, config: magnitude_(linears, config.sparsity, config.scope),
    "2:4": lambda linears, config: semi_structured_(linears),
}
"""The in-shape methods: the chosen linears by name, zeroed in place."""


def sparsity_of(linears) -> float:
    """The fraction of zeros over the weights of `linears` (an iterable of `nn.Linear`)."""
    zeros = total = 0
    for linear in linears:
        zeros += int((linear.weight == 0).sum())
        total += linear.weight.numel()
    return zeros / max(total, 1)


@dataclass
class PruneResult:
    """What `prune_model` wrote."""

    out: Path
    pruning: dict
    """The record saved under "pruning" in config.json (see `prune_`)."""
    params: int
    """Parameters of the pruned model (a tied embedding counted once)."""
    source_params: int
    """Parameters of the model before pruning."""

    def as_dict(self) -> dict:
        return {"out": str(self.out), "pruning": self.pruning, "params": self.params,
                "source_params": self.source_params}  # fmt: skip


def prune_model(
    source: str | Path,
    config: PruneConfig,
    out: str | Path,
    calibration: str | Path = "shakespeare",
    calibration_tokens: int = 2048,
) -> PruneResult:
    """Load `source`, prune it in place (`prune_`), save it as a native float folder at `out`.

    Args:
        source: anything `load_pretrained` accepts (a bundled name, .gguf, HF folder, run dir).
        config: method, sparsity and scope.
        out: the folder to create; an existing one is refused before any work.
        calibration: structured by activation: a corpus (`lmscale.data.iter_documents` spec:
            "shakespeare", a text file, folder or .jsonl) whose first `calibration_tokens`
            tokens weigh the importance of each unit.
        calibration_tokens: how many tokens of it to run (in windows of up to 256).

    Returns:
        The folder written and the parameter counts before and after.
    """
    if Path(out).exists():
        raise LmscaleError(f"{out} already exists: choose a new --out")
    model, tokenizer = load_pretrained(source)
    source_params = count_params(model)
    tokens = None
    if config.method == "structured" and config.importance == "activation":
        context = min(256, model.config.max_seq_len)
        tokens = corpus_windows(tokenizer, calibration, calibration_tokens, context)
    pruning = prune_(model, config, calibration=tokens)
    if tokens is not None:
        pruning["calibration"] = {"corpus": str(calibration), "tokens": tokens.numel()}
    config_json = {
        "model": to_dict(model.config), "tokenizer": tokenizer.settings, "pruning": pruning,
    }  # fmt: skip
    path = save_model_dir(out, model.state_dict(), config_json, tokenizer.to_json())
    return PruneResult(path, pruning, count_params(model), source_params)


def corpus_windows(tokenizer: Tokenizer, corpus: str | Path, n_tokens: int, context: int) -> Tensor:
    """The first `n_tokens` tokens of a corpus as (B, context) windows (one shorter one at least)."""
    ids: list[int] = []
    for document in iter_documents(corpus):
        ids += tokenizer.encode(document.text[: 16 * n_tokens])  # ~4 characters a token
        if len(ids) >= n_tokens:
            break
    ids = ids[:n_tokens]
    if not ids:
        raise LmscaleError(f"calibration corpus {corpus} holds no text")
    if len(ids) < context:
        return torch.tensor([ids])
    return torch.tensor(ids[: len(ids) // context * context]).view(-1, context)


def count_params(model: nn.Module) -> int:
    """Parameters, a tied (shared) tensor counted once."""
    return sum(p.numel() for p in model.parameters())
