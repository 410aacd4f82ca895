"""GPTQ: int4 weights chosen with calibration data, so each layer's *output* error stays small.

Round-to-nearest rounds every weight on its own. GPTQ (Frantar et al. 2022, "GPTQ: Accurate
Post-Training Quantization for Generative Pre-trained Transformers") rounds the columns of a
layer's weight W (out, in) one at a time and, after each, moves the not-yet-rounded columns to
cancel the error just made, as measured on calibration inputs X (tokens, in). The objective per
layer is ||X W^T - X Wq^T||^2, whose Hessian in each row of W is H = 2 X^T X:

    H += percdamp * mean(diag H) * I                  dampening (H is often near singular)
    U  = chol(H^-1), upper                            rows of U: the inverse Hessian, updated
                                                      after each column, without recomputing
    for column j:  q_j = grid(w_j);  e = (w_j - q_j) / U[j, j]
                   w_{j+1..} -= e U[j, j+1..]         spread the error to the later columns

"Lazy batches" apply the update inside a block of 128 columns at once and to the columns after
it with one matmul. Int4 groups: the scale and zero point of a group are fixed from the
(already updated) weights when its first column is reached, on the same grid as RTN's
(`quantize_int4`, or `quantize_int4_float` for `zero_point="float"`: `grid_for`), so the
result is a plain `QuantizedLinear`.

Act-order (`act_order`): columns are visited by decreasing diag(H) (the inputs with the most
energy first). The group grids are then fixed up front from the original weights ("static
groups"), so group g still covers input columns g*G..(g+1)*G and the saved layout is unchanged.

Blocks are processed in order: the calibration activations enter block i after passing through
the *quantized* blocks before it, so each block's Hessians see the errors made upstream.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from lmscale.compress.quantize import (
    QuantConfig,
    describe,
    quantization_of,
    quantize_int4,
    quantize_int4_float,
)
from lmscale.data import iter_documents
from lmscale.errors import LmscaleError
from lmscale.model import Transformer
from lmscale.model.quantized import QuantizedLinear, check_layout
from lmscale.tokenizer import Tokenizer

METHODS = ("gptq",)
HELD_OUT = ("tragedies/hamlet",)
"""Plays never sampled from the bundled Shakespeare: the report and tests evaluate on Hamlet."""

Grid = Callable[[Tensor], tuple[Tensor, Tensor]]
"""(out, g) weights -> (scales (out,), zeros (out,)) with w ~ (q - zero) * scale, q in 0..15."""


@dataclass
class GptqConfig:
    """How GPTQ calibrates: the data and the algorithm's knobs."""

    samples: int = 128
    """Calibration sequences."""
    length: int = 512
    """Tokens per sequence."""
    corpus: str = "shakespeare"
    """`lmscale.data.iter_documents` spec; from the bundled Shakespeare, Hamlet is left out."""
    act_order: bool = False
    """Quantize columns by decreasing Hessian diagonal (group grids then fixed up front)."""
    percdamp: float = 0.01
    """Dampening added to diag(H), as a fraction of its mean."""
    block_size: int = 128
    """Columns per lazy batch."""
    seed: int = 0
    """Picks the calibration windows."""

    def __post_init__(self) -> None:
        if self.samples < 1 or self.length < 2:
            raise LmscaleError(
                f"calibration needs at least 1 sample of 2 tokens, got {self.samples} of "
                f"{self.length}"
            )
        if not 0.0 <= self.percdamp < 1.0:
            raise LmscaleError(f"percdamp must be in [0, 1), got {self.percdamp}")

    def as_dict(self) -> dict:
        return {
            "method": "gptq", "corpus": str(self.corpus), "samples": self.samples,
            "length": self.length, "act_order": self.act_order, "percdamp": self.percdamp,
            "seed": self.seed,
        }  # fmt: skip


def int4_grid(w: Tensor) -> tuple[Tensor, Tensor]:
    """The RTN int4 grid of a (out, g) group: `quantize_int4`'s scale and integer zero point."""
    _, scales, zeros = quantize_int4(w, w.shape[1])
    return scales[:, 0], zeros[:, 0].float()


def int4_float_grid(w: Tensor) -> tuple[Tensor, Tensor]:
    """The float-minimum (Q4_1) grid of a (out, g) group, as `quantize_int4_float` picks it.

    The zero point is -min / scale, a real number: w ~ (q - zero) * scale = q * scale + min.
    """
    _, scales, mins = quantize_int4_float(w, w.shape[1])
    return scales[:, 0], -mins[:, 0] / scales[:, 0]


def grid_for(config: QuantConfig) -> Grid:
    """The RTN grid GPTQ rounds on for this config's zero point."""
    return int4_float_grid if config.layer_zero_point == "float" else int4_grid


@torch.no_grad()
def gptq_weight(
    weight: Tensor, hessian: Tensor, group_size: int, act_order: bool = False,
    percdamp: float = 0.01, block_size: int = 128, grid: Grid = int4_grid,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """GPTQ of one (out, in) weight against the Hessian 2 X^T X of its inputs (see the module).

    Returns:
        (codes uint8 (out, in) in 0..15, scales float32 (out, in/g), zeros float32 (out, in/g)),
        the weight standing for (codes - zeros) * scales group-wise.
    """
    W = weight.detach().float().clone()
    H = hessian.double().clone()
    out_features, n = W.shape
    n_groups = n // group_size
    dead = H.diagonal() == 0  # inputs that were always zero: any value does, keep the grid small
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    scales = torch.zeros(out_features, n_groups)
    zeros = torch.zeros(out_features, n_groups)
    if act_order:  # static groups: every grid from the original weights, before any update
        for g in range(n_groups):
            scales[:, g], zeros[:, g] = grid(W[:, g * group_size : (g + 1) * group_size])
        order = torch.argsort(H.diagonal(), descending=True, stable=True)
    else:
        order = torch.arange(n)
    W, H = W[:, order], H[order][:, order]
    H.diagonal().add_(percdamp * H.diagonal().mean())
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    U = U.float()
    codes = torch.zeros(out_features, n, dtype=torch.uint8)
    block_size = max(block_size // group_size, 1) * group_size  # a group never spans two blocks
    for start in range(0, n, block_size):
        end = min(start + block_size, n)
        block = W[:, start:end].clone()
        errors = torch.zeros_like(block)
        for i in range(end - start):
            column = start + i
            g = int(order[column]) // group_size
            if not act_order and column % group_size == 0:
                scales[:, g], zeros[:, g] = grid(block[:, i : i + group_size])
            w, s, z = block[:, i], scales[:, g], zeros[:, g]
            # round(w/s) + z exactly as RTN for an integer z; a fractional z (experiments) too
            q = (torch.round(w / s + (z - z.round())) + z.round()).clamp(0, 15)
            codes[:, column] = q.to(torch.uint8)
            error = (w - (q - z) * s) / U[column, column]
            block[:, i:] -= error[:, None] * U[column, column:end][None, :]
            errors[:, i] = error
        W[:, end:] -= errors @ U[start:end, end:]
    inverse = torch.argsort(order)
    return codes[:, inverse], scales, zeros


def _int4_module(
    codes: Tensor, scales: Tensor, zeros: Tensor, linear: nn.Linear, group_size: int,
    zero_point: str = "int",
) -> QuantizedLinear:  # fmt: skip
    """The `QuantizedLinear` holding GPTQ's integers, scales (and mins) in float16 as RTN's."""
    bias = None if linear.bias is None else linear.bias.detach().clone()
    module = QuantizedLinear.from_codes(
        codes, scales.half(), zeros, "int4", group_size, bias, zero_point
    )
    return module.to(linear.weight.device)


class _Stop(Exception):
    """Raised by the hook that catches the first block's input, to skip the rest of the model."""


def _block_inputs(model: Transformer, calibration: Tensor, batch_size: int) -> list[tuple]:
    """Per batch of calibration rows: the positional arguments the first block receives."""
    captured: list[tuple] = []

    def catch(_module, args):
        captured.append(tuple(args))
        raise _Stop

    handle = model.layers[0].register_forward_pre_hook(catch)
    try:
        for batch in calibration.split(batch_size):
            try:
                model(batch.to(model.tok_embeddings.weight.device))
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


@torch.no_grad()
def gptq_quantize_(
    model: Transformer, config: QuantConfig, calibration: Tensor, gptq: GptqConfig | None = None,
    batch_size: int = 8, grid: Grid | None = None,
) -> list[str]:  # fmt: skip
    """Replace every block linear of `model` by an int4 `QuantizedLinear` chosen by GPTQ.

    Args:
        model: a float `Transformer` (not quantized), in eval mode.
        config: int4 and its group size.
        calibration: (B, T) token ids.
        gptq: the algorithm's knobs (its sampling fields are not used here).
        batch_size: calibration rows per forward pass.
        grid: the group grid (default `grid_for(config)`; experiments may pass another).

    Returns:
        The fully-qualified names of the replaced modules, in model order.
    """
    gptq = gptq or GptqConfig()
    grid = grid or grid_for(config)
    if config.method != "int4":
        raise LmscaleError(f"GPTQ calibration is implemented for int4 only, not {config.method}")
    already = quantization_of(model)
    if already is not None:
        raise LmscaleError(
            f"the model is already quantized ({describe(already)}); quantize its float original"
        )
    linears_of = [
        {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
        for layer in model.layers
    ]  # fmt: skip
    for i, linears in enumerate(linears_of):
        for name, linear in linears.items():
            where = f"'layers.{i}.{name}'"
            check_layout("int4", config.group_size, linear.in_features, where=where)
    inputs = _block_inputs(model, calibration, batch_size)
    names = []
    for i, (layer, linears) in enumerate(zip(model.layers, linears_of, strict=True)):
        hessians = _hessians(layer, linears, inputs)
        for name, linear in linears.items():
            codes, scales, zeros = gptq_weight(
                linear.weight, hessians[name], config.group_size, gptq.act_order,
                gptq.percdamp, gptq.block_size, grid,
            )  # fmt: skip
            module = _int4_module(
                codes, scales, zeros, linear, config.group_size, config.layer_zero_point
            )
            layer.set_submodule(name, module)
            names.append(f"layers.{i}.{name}")
        inputs = [(layer(*args), *args[1:]) for args in inputs]  # through the quantized block
    return names


def _hessians(layer: nn.Module, linears: dict[str, nn.Linear], inputs: list[tuple]) -> dict:
    """2 X^T X / tokens of each linear's input over all batches; one sum per distinct input.

    wq, wk and wv (and w1, w3) read the very same tensor, so it is summed once for all three.
    """
    sums: dict[str, Tensor] = {}
    shares: dict[str, str] = {}
    seen: dict[str, Tensor] = {}
    tokens = 0

    def keep(name):
        def hook(_module, args):
            seen[name] = args[0]

        return hook

    handles = [linear.register_forward_pre_hook(keep(name)) for name, linear in linears.items()]
    try:
        for args in inputs:
            seen.clear()
            layer(*args)
            for name, x in seen.items():
                owner = next((o for o in sums if o not in shares and seen.get(o) is x), None)
                if owner is not None and owner != name:
                    shares[name] = owner
                    continue
                x = x.reshape(-1, x.shape[-1]).float()
                sums[name] = sums.get(name, 0) + 2 * x.T @ x
            tokens += args[0].shape[0] * args[0].shape[1]
    finally:
        for handle in handles:
            handle.remove()
    return {name: sums[shares.get(name, name)] / tokens for name in linears}


def calibration_windows(
    tokenizer: Tokenizer, corpus: str | Path, samples: int, length: int, seed: int = 0
) -> Tensor:
    """`samples` windows of `length` tokens at seeded random places in a corpus.

    The documents' tokens are joined into one stream (the bundled Shakespeare without
    `HELD_OUT`), and the windows start at offsets drawn uniformly from it.

    Returns:
        (samples, length) token ids.
    """
    skip = HELD_OUT if str(corpus) == "shakespeare" else ()
    stream: list[int] = []
    for document in iter_documents(corpus):
        if document.name not in skip:
            stream += tokenizer.encode(document.text)
    if len(stream) < length:
        raise LmscaleError(
            f"calibration text {corpus} has {len(stream)} tokens, fewer than one window of "
            f"{length} (--calibration-length)"
        )
    ids = torch.tensor(stream)
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - length + 1, (samples,), generator=generator)
    return torch.stack([ids[s : s + length] for s in starts.tolist()])


def check_calibrate(config: QuantConfig, calibrate: str | None) -> None:
    """Raise LmscaleError unless `calibrate` (a --calibrate value or None) fits the method."""
    if calibrate is None:
        return
    if calibrate not in METHODS:
        raise LmscaleError(f"unknown calibration '{calibrate}' (choose from {', '.join(METHODS)})")
    if config.method != "int4":
        raise LmscaleError(f"GPTQ calibration is implemented for int4 only, not {config.method}")


def calibrate_(
    model: Transformer, tokenizer: Tokenizer, config: QuantConfig, gptq: GptqConfig
) -> list[str]:
    """Sample the calibration windows of `gptq` and quantize `model` in place with GPTQ.

    Returns:
        The fully-qualified names of the replaced modules.
    """
    if gptq.length > model.config.max_seq_len:
        raise LmscaleError(
            f"--calibration-length {gptq.length} exceeds the model's max_seq_len "
            f"{model.config.max_seq_len}"
        )
    windows = calibration_windows(tokenizer, gptq.corpus, gptq.samples, gptq.length, gptq.seed)
    return gptq_quantize_(model.eval(), config, windows, gptq)
