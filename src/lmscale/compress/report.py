"""The compression trade-off report: one row per variant of a model, size against quality.

Every variant is built in memory from the original (`copy.deepcopy`, then `quantize_` or
`prune_`) and scored on the same windows as `lmscale.train.evaluate` (non-overlapping windows of
`context` tokens; every token of a window but its first is scored). Besides perplexity, each row
holds how far the variant's next-token distribution moved from the original's:

    KL       mean over scored positions of  sum_v p(v) (log p(v) - log q(v)),
             p = original, q = variant (nats; 0 for the original itself)
    top-1    share of scored positions whose argmax token differs from the original's

Perplexity alone hides damage: a variant can keep the average likelihood while it reorders which
token comes first. Decode speed is rough: batch 1, a few greedy tokens after a warm-up, one run.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmscale.compress.prune import PruneConfig, count_params, prune_
from lmscale.compress.quantize import QuantConfig, quantize_
from lmscale.compress.save import state_bytes
from lmscale.errors import LmscaleError
from lmscale.model import Transformer
from lmscale.model.quantized import QuantizedLinear
from lmscale.train.evaluate import windows


@dataclass(frozen=True)
class Variant:
    """One compressed form of the original model."""

    name: str
    """The row's label."""
    quant: QuantConfig | None = None
    """Weight-only quantization to apply, or None."""
    prune: PruneConfig | None = None
    """Pruning to apply (before any quantization), or None."""


DEFAULT_VARIANTS: tuple[Variant, ...] = (
    Variant("float32"),
    Variant("int8", quant=QuantConfig("int8")),
    Variant("int4 g32 (RTN)", quant=QuantConfig("int4", 32)),
    Variant("structured 25%", prune=PruneConfig("structured", 0.25)),
)


@dataclass
class Row:
    """One variant's measurements."""

    variant: str
    params: int
    """Parameters, quantized weights counted as the float weights they stand for."""
    bytes: int
    """Bytes of the state dict as stored (integers, scales and zero points; tied tensors once)."""
    perplexity: float
    """exp(mean NLL) over the scored tokens."""
    kl: float
    """Mean KL(original || variant) of the next-token distributions, nats."""
    top1_changed: float
    """Share of scored positions whose most likely token differs from the original's."""
    decode_tok_s: float
    """Rough batch-1 greedy decode speed on this machine."""

    def as_dict(self) -> dict:
        return asdict(self)


def build_variant(model: Transformer, variant: Variant, calibration: Tensor | None) -> Transformer:
    """A compressed copy of `model`; the original is left unchanged."""
    copy_ = copy.deepcopy(model)
    if variant.prune is not None:
        prune_(copy_, variant.prune, calibration=calibration)
    if variant.quant is not None:
        quantize_(copy_, variant.quant)
    return copy_.eval()


def compress_report(
    source: Transformer,
    text_tokens: np.ndarray,
    context: int,
    variants: Sequence[Variant] = DEFAULT_VARIANTS,
    max_tokens: int | None = None,
    decode_tokens: int = 16,
) -> list[Row]:
    """Build every variant from `source` and measure it against `source` on the same text.

    Args:
        source: the float original, in eval mode (not changed).
        text_tokens: the held-out text's token ids, 1-D.
        context: window length in tokens (as in `evaluate`).
        variants: what to build; a variant named like the original (no config) gives KL 0.
        max_tokens: score only the first windows covering this many tokens; structured
            pruning calibrates on up to 2,048 tokens after them, never on scored ones.
        decode_tokens: greedy tokens timed per variant (after a short warm-up).

    Returns:
        One `Row` per variant, in order.

    Raises:
        LmscaleError: the text has fewer than two tokens, or structured pruning needs
            calibration tokens and the text has none left past the scored part.
    """
    tokens = np.asarray(text_tokens, dtype=np.int64)
    chunks = windows(tokens, context, max_tokens)
    if not chunks:
        raise LmscaleError("the text has fewer than two tokens: nothing to score")
    scored_end = sum(len(chunk) for chunk in chunks)
    calibration = _calibration(tokens[scored_end:], context, variants)
    models = [build_variant(source, variant, calibration) for variant in variants]
    sums = _score(source, models, chunks)
    prompt = chunks[0][: min(16, len(chunks[0]))].tolist()
    return [
        Row(variant.name, logical_params(model), state_bytes(model),
            float(np.exp(total["nll"] / total["count"])), total["kl"] / total["count"],
            total["changed"] / total["count"], decode_speed(model, prompt, decode_tokens))
        for variant, model, total in zip(variants, models, sums, strict=True)
    ]  # fmt: skip


CALIBRATION_TOKENS = 2048
"""Structured pruning's calibration budget, as in `prune_model`."""


def _calibration(rest: np.ndarray, context: int, variants: Sequence[Variant]) -> Tensor | None:
    needs = any(
        v.prune is not None and v.prune.method == "structured" and v.prune.importance != "weight"
        for v in variants
    )
    if not needs:
        return None
    if len(rest) < 2:
        raise LmscaleError(
            "structured pruning calibrates on the text past the scored tokens, and none is left: "
            "give a longer --text or a smaller --max-tokens"
        )
    rest = rest[:CALIBRATION_TOKENS]
    if len(rest) < context:
        return torch.from_numpy(rest)[None]
    return torch.from_numpy(rest[: len(rest) // context * context]).view(-1, context)


@torch.no_grad()
def _score(source: nn.Module, models: list[nn.Module], chunks: list[np.ndarray]) -> list[dict]:
    """Per model: summed NLL, KL from `source`, top-1 changes, and the scored-token count."""
    sums = [dict(nll=0.0, kl=0.0, changed=0, count=0) for _ in models]
    for chunk in chunks:  # one window at a time: the original's logits never pile up
        window = torch.from_numpy(chunk.astype(np.int64))[None]  # (1, T)
        inputs, targets = window[:, :-1], window[0, 1:]
        reference = F.log_softmax(source(inputs)[0].float(), dim=-1)  # (T-1, vocab)
        for model, total in zip(models, sums, strict=True):
            logprobs = F.log_softmax(model(inputs)[0].float(), dim=-1)  # (T-1, vocab)
            total["nll"] += F.nll_loss(logprobs, targets, reduction="sum").item()
            total["kl"] += F.kl_div(
                logprobs, reference, log_target=True, reduction="sum"
            ).item()  # sum_v p (log p - log q), p = reference
            total["changed"] += int((logprobs.argmax(-1) != reference.argmax(-1)).sum())
            total["count"] += len(targets)
    return sums


def logical_params(model: nn.Module) -> int:
    """Parameters, each quantized layer counted as its (out, in) float weight."""
    quantized = sum(
        m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantizedLinear)
    )
    return count_params(model) + quantized


def decode_speed(model: Transformer, prompt: list[int], n_tokens: int) -> float:
    """Rough batch-1 greedy decode tokens/s: one warm-up, then one timed run of `n_tokens`.

    NOTE: the loop of `lmscale.engine.generate_ids`, written out here because `compress` sits
    below `engine` in DESIGN.md's dependency order; the prefill is timed with the decode.
    """
    n_tokens = max(1, min(n_tokens, model.config.max_seq_len - len(prompt)))
    greedy_decode(model, prompt, min(2, n_tokens))  # warm-up
    start = time.perf_counter()
    greedy_decode(model, prompt, n_tokens)
    return n_tokens / max(time.perf_counter() - start, 1e-9)


@torch.inference_mode()
def greedy_decode(model: Transformer, prompt: list[int], n_tokens: int) -> list[int]:
    """`n_tokens` greedy ids after `prompt`, through the KV cache."""
    cache = model.new_cache(1, len(prompt) + n_tokens)
    tokens = torch.tensor([prompt], device=model.tok_embeddings.weight.device)  # (1, T)
    out = []
    for _ in range(n_tokens):
        hidden = model.hidden_states(tokens, cache)[:, -1]  # (1, dim)
        tokens = model.output(hidden).argmax(-1, keepdim=True)  # (1, 1)
        out.append(int(tokens))
    return out


def markdown_table(rows: list[Row]) -> str:
    """The rows as a Markdown table, sizes and ratios against the first row."""
    first = rows[0]
    lines = [
        "| variant | params | MB | vs first | perplexity | KL (nats) | top-1 changed "
        "| decode tok/s (rough) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.variant} | {row.params / 1e6:.2f}M | {row.bytes / 1e6:.1f} "
            f"| {row.bytes / first.bytes:.2f}x | {row.perplexity:.2f} | {row.kl:.4f} "
            f"| {row.top1_changed:.1%} | {row.decode_tok_s:.0f} |"
        )
    return "\n".join(lines)


def plot_report(rows: list[Row], path: str | Path) -> Path:
    """Two panels, perplexity against MB and against decode tok/s, saved as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LmscaleError("--png needs matplotlib, which is not installed") from None
    figure, (by_size, by_speed) = plt.subplots(1, 2, figsize=(10, 4))
    for axes, key, label in ((by_size, "bytes", "MB"), (by_speed, "decode_tok_s", "tok/s")):
        for row in rows:
            x = getattr(row, key) / (1e6 if key == "bytes" else 1)
            axes.scatter(x, row.perplexity)
            axes.annotate(row.variant, (x, row.perplexity), fontsize=8)
        axes.set_xlabel(label + (" (rough, batch 1)" if key == "decode_tok_s" else ""))
        axes.set_ylabel("perplexity")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return Path(path)
