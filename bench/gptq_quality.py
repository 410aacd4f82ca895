"""GPTQ against round-to-nearest int4 on the bundled SmolLM2-135M: perplexity and quantize time.

    PYTHONPATH=src python bench/gptq_quality.py [--samples 128] [--length 512]
        [--variants float,rtn32,gptq32,gptq32-act,...] [--out results.jsonl]

Perplexity is scored as in tests/compress/test_smollm2.py: the first 2,048 tokens of Hamlet,
windows of 256. GPTQ calibrates on seeded windows of the other plays (`calibration_windows`).
Each result is printed (and appended to --out) as soon as it is measured.

Variants: "float"; "rtnG" and "gptqG" for group size G (int4, integer zero point, the saved
layout); "gptqG-act" with act-order; and two experiments that are not a saved format, "rtnG-min"
and "gptqG-min": a float zero point (w = q * s + min, the grid of llama.cpp's Q4_1, which the
bundled weights were dequantized from), applied as float weights, to see how much of RTN's loss
is the grid's misalignment with Q4_1. Group size 128 does not divide SmolLM2's width 576.
On a shared machine pass --threads 1: two threads that wait on each other waste most of it.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import numpy as np
import torch
from torch import Tensor, nn

from lmscale.checkpoint import load_pretrained
from lmscale.compress import QuantConfig, quantize_
from lmscale.compress import gptq as gptq_module
from lmscale.compress.gptq import GptqConfig, calibration_windows, gptq_quantize_
from lmscale.compress.quantize import in_blocks
from lmscale.data.corpus import iter_documents
from lmscale.train.evaluate import evaluate

DEFAULT = "float,rtn32,gptq32,gptq32-act,rtn32-min,rtn64,gptq64,gptq64-act"


def min_grid(w: Tensor) -> tuple[Tensor, Tensor]:
    """Q4_1's grid of a (out, g) group: s = (max - min) / 15, w = (q - z) s with z = -min / s."""
    lo, hi = w.amin(dim=1), w.amax(dim=1)
    scales = ((hi - lo) / 15).clamp(min=1e-12)
    return scales, -lo / scales


def float_module(codes, scales, zeros, linear, group_size) -> nn.Linear:
    """Stands in for `gptq._int4_module` in the -min experiments: the dequantized float weight."""
    g = group_size
    q = codes.float().view(codes.shape[0], -1, g)
    w = ((q - zeros[..., None]) * scales[..., None]).view_as(linear.weight)
    with torch.no_grad():
        linear.weight.copy_(w)
    return linear


@torch.no_grad()
def rtn_min_(model: nn.Module, group_size: int) -> None:
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and in_blocks(module, name):
            w = module.weight.view(module.out_features, -1, group_size)
            lo = w.amin(-1, keepdim=True)
            s = ((w.amax(-1, keepdim=True) - lo) / 15).clamp(min=1e-12)
            w.copy_(torch.round((w - lo) / s).clamp(0, 15) * s + lo)


def build(model, tokenizer, variant, calibration, act_default=False):
    kind, _, option = variant.partition("-")
    q = copy.deepcopy(model)
    if kind == "float":
        return q
    group = int(kind.removeprefix("rtn").removeprefix("gptq"))
    if kind.startswith("rtn"):
        if option == "min":
            rtn_min_(q, group)
        else:
            quantize_(q, QuantConfig("int4", group))
        return q
    config = GptqConfig(act_order=option == "act")
    if option == "min":
        saved = gptq_module._int4_module
        gptq_module._int4_module = float_module
        try:
            gptq_quantize_(q, QuantConfig("int4", group), calibration, config, grid=min_grid)
        finally:
            gptq_module._int4_module = saved
    else:
        gptq_quantize_(q, QuantConfig("int4", group), calibration, config)
    return q


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--variants", default=DEFAULT)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_pretrained("smollm2-135m-instruct")
    model.eval()
    text = next(d.text for d in iter_documents("shakespeare") if d.name == "tragedies/hamlet")
    held_out = np.asarray(tokenizer.encode(text[:40_000])[:2049])
    calibration = calibration_windows(tokenizer, "shakespeare", args.samples, args.length)
    base = None
    for variant in args.variants.split(","):
        start = time.perf_counter()
        q = build(model, tokenizer, variant, calibration)
        seconds = time.perf_counter() - start
        ppl = evaluate(q, held_out, 256).perplexity
        base = base or ppl
        row = {
            "variant": variant, "perplexity": round(ppl, 4), "vs_float": round(ppl / base, 4),
            "quantize_s": round(seconds, 1), "samples": args.samples, "length": args.length,
            "threads": args.threads,
        }  # fmt: skip
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as handle:
                handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
