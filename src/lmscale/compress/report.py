"""The compression trade-off report: one row per variant of a model, size against quality.

Every variant is built in memory from the original (`copy.deepcopy`, then `quantize_` or
`prune_`) and scored on the same windows as `lmscale.train.evaluate` (non-overlapping windows of
`context` tokens; every token of a window but its first is scored). Besides perplexity, each row
holds how far the variant's next-token distribution moved from the original's:

    KL       mean over scored positions of  sum_v p(v) (log p(v) - log q(v)),
             p = original, q = variant (nats; 0 for the original itself)
    top-1    share of scored positions whose argmax token differs from the original's

Perplexity alone hides damage: a variant can keep the average likelihood while it reorders which
token comes first. Peak RAM and batch-1 prompt and decode speed come from `lmscale.compress.measure`:
each variant is saved to a temporary folder and loaded by a fresh process, as a user would run it.

A row may also be a model saved elsewhere (`Variant(name, path=DIR)`: a distilled student, a
GPTQ-quantized folder): it is loaded as is and scored against the same original, so its
tokenizer must be the original's.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmscale.checkpoint import load_pretrained, save_model_dir
from lmscale.compress.measure import Speed, measure
from lmscale.compress.prune import PruneConfig, count_params, prune_
from lmscale.compress.quantize import QuantConfig, quantization_of, quantize_
from lmscale.compress.save import save_quantized, state_bytes
from lmscale.config import to_dict
from lmscale.errors import LmscaleError
from lmscale.model import Transformer
from lmscale.model.quantized import QuantizedLinear
from lmscale.tokenizer import Tokenizer
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
    dtype: str = "float32"
    """The float dtype the variant runs in (its unquantized weights and activations)."""
    path: str | None = None
    """A saved model to load as this row instead of building one from the original."""


DEFAULT_VARIANTS: tuple[Variant, ...] = (
    Variant("float32"),
    Variant("bfloat16", dtype="bfloat16"),
    Variant("int8", quant=QuantConfig("int8", embeddings="int8")),
    Variant("int8-dynamic", quant=QuantConfig("int8-dynamic", embeddings="int8")),
    Variant("int4 g32 (RTN)", quant=QuantConfig("int4", 32, embeddings="int8")),
    Variant("int4 g32, int4 emb.", quant=QuantConfig("int4", 32, embeddings="int4")),
    Variant("structured 25%", prune=PruneConfig("structured", 0.25)),
)
"""What `lmscale compress-report` builds; the quantized rows are what `lmscale quantize` writes
by default (int8 embedding and head) and the smallest int4 form. A calibrated (GPTQ) or distilled
model is added as a saved folder (`Variant(name, path=DIR)`, `--add NAME=DIR`)."""


@dataclass
class Row:
    """One variant's measurements."""

    variant: str
    params: int
    """Parameters, quantized weights counted as the float weights they stand for."""
    bytes: int
    """Bytes on disk of the saved model.safetensors when speed is measured (tied tensors once),
    else of the in-memory state dict."""
    perplexity: float
    """exp(mean NLL) over the scored tokens."""
    kl: float
    """Mean KL(original || variant) of the next-token distributions, nats."""
    top1_changed: float
    """Share of scored positions whose most likely token differs from the original's."""
    peak_ram: int | None = None
    """Bytes a fresh process grew by to load and run it (None: speed not measured)."""
    prompt_tok_s: float | None = None
    """Batch-1 prompt (prefill) tokens/s on this machine."""
    decode_tok_s: float | None = None
    """Batch-1 greedy decode tokens/s on this machine."""

    def as_dict(self) -> dict:
        return asdict(self)


def build_variant(model: Transformer, variant: Variant, calibration: Tensor | None) -> Transformer:
    """A compressed copy of `model` (or the saved model `variant.path`); `model` is unchanged."""
    if variant.path is not None:
        loaded, _ = load_pretrained(variant.path, dtype=variant.dtype)
        return loaded.eval()
    copy_ = copy.deepcopy(model).to(getattr(torch, variant.dtype))
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
    tokenizer: Tokenizer | None = None,
    speed: dict | None = None,
) -> list[Row]:
    """Build every variant from `source` and measure it against `source` on the same text.

    Args:
        source: the float original, in eval mode (not changed).
        text_tokens: the held-out text's token ids, 1-D.
        context: window length in tokens (as in `evaluate`).
        variants: what to build; a variant named like the original (no config) gives KL 0.
        max_tokens: score only the first windows covering this many tokens; structured
            pruning calibrates on up to 2,048 tokens after them, never on scored ones.
        tokenizer: the original's tokenizer; with it, every variant is saved and measured for
            peak RAM and speed in a fresh process (`lmscale.compress.measure`); without, those
            columns stay None.
        speed: keyword arguments for `measure` (prompt_tokens, decode_tokens, repeats, threads).

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
    for variant, model in zip(variants, models, strict=True):
        if model.config.vocab_size != source.config.vocab_size:
            raise LmscaleError(
                f"variant '{variant.name}' has a vocabulary of {model.config.vocab_size}, the "
                f"original {source.config.vocab_size}: KL needs the same tokenizer"
            )
    sums = _score(source, models, chunks)
    rows = [
        Row(variant.name, logical_params(model), state_bytes(model),
            float(np.exp(total["nll"] / total["count"])), total["kl"] / total["count"],
            total["changed"] / total["count"])
        for variant, model, total in zip(variants, models, sums, strict=True)
    ]  # fmt: skip
    if tokenizer is not None:
        for variant, model, row in zip(variants, models, rows, strict=True):
            measured, row.bytes = _measure_saved(variant, model, tokenizer, speed or {})
            row.peak_ram, row.prompt_tok_s = measured.peak_ram, measured.prompt_tok_s
            row.decode_tok_s = measured.decode_tok_s
    return rows


def _measure_saved(
    variant: Variant, model: Transformer, tokenizer: Tokenizer, speed: dict
) -> tuple[Speed, int]:
    """Save `model` to a temporary folder (unless it came from one) and measure it there.

    Returns:
        The speed and the bytes of the folder's model.safetensors (the size on disk, which is
        what a user ships; in memory some scales are held wider than they are stored).
    """
    if variant.path is not None:
        return measure(variant.path, variant.dtype, **speed), _weights_bytes(Path(variant.path))
    with tempfile.TemporaryDirectory(prefix="lmscale-report-") as tmp:
        out = Path(tmp) / "model"
        if quantization_of(model) is not None:
            save_quantized(model, tokenizer, out)
        else:
            config = {"model": to_dict(model.config), "tokenizer": tokenizer.settings}
            save_model_dir(out, model.state_dict(), config, tokenizer.to_json())
        return measure(out, variant.dtype, **speed), _weights_bytes(out)


def _weights_bytes(folder: Path) -> int:
    """Bytes of a model folder's weights file (a run directory: its latest checkpoint's)."""
    files = sorted(folder.rglob("model.safetensors"))
    return files[-1].stat().st_size if files else 0


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


def markdown_table(rows: list[Row]) -> str:
    """The rows as a Markdown table, sizes and ratios against the first row."""
    first = rows[0]
    lines = [
        "| variant | params | MB | vs first | peak RAM MB | prompt tok/s | decode tok/s "
        "| perplexity | KL (nats) | top-1 changed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row.variant} | {row.params / 1e6:.2f}M | {row.bytes / 1e6:.1f} "
            f"| {row.bytes / first.bytes:.2f}x | {_maybe(row.peak_ram, 1e-6)} "
            f"| {_maybe(row.prompt_tok_s)} | {_maybe(row.decode_tok_s, digits=1)} "
            f"| {row.perplexity:.2f} | {row.kl:.4f} | {row.top1_changed:.1%} |"
        )
    return "\n".join(lines)


def _maybe(value: float | None, scale: float = 1.0, digits: int = 0) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def plot_report(rows: list[Row], path: str | Path) -> Path:
    """Perplexity against MB on disk and (when measured) against decode tok/s, as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LmscaleError("--png needs matplotlib: pip install matplotlib") from None
    panels = [("bytes", "MB on disk", 1e-6)]
    if all(row.decode_tok_s is not None for row in rows):
        panels.append(("decode_tok_s", "decode tokens/s (batch 1)", 1.0))
    figure, axes_list = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for axes, (key, label, scale) in zip(axes_list[0], panels, strict=True):
        for row in rows:
            x = getattr(row, key) * scale
            axes.scatter(x, row.perplexity)
            axes.annotate(row.variant, (x, row.perplexity), fontsize=8)
        axes.set_xlabel(label)
        axes.set_ylabel("perplexity (held-out text)")
        axes.set_yscale("log")
        axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return Path(path)
