"""Decode tokens/s at batch 1: onnxruntime (exported folder) vs lmscale, float32, int8 and int4.

Both decode greedily from the same prompt with a KV cache, on the same number of threads; the new
tokens must agree. Medians of interleaved repeats. Usage:

    PYTHONPATH=src python bench/onnx_decode.py [--model smollm2-135m-instruct] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lmscale.checkpoint import load_pretrained
from lmscale.compress.quantize import QuantConfig, quantize_
from lmscale.compress.save import save_quantized
from lmscale.export import export_onnx
from lmscale.export.onnx_runtime import OnnxModel

PROMPT = "The three most important things to know about the ocean are"


def lmscale_decode(model, prompt: list[int], n: int) -> tuple[list[int], float]:
    """Greedy new tokens and decode tokens/s (the prefill excluded, as for onnxruntime)."""
    cache = model.new_cache(1, len(prompt) + n)
    with torch.no_grad():
        logits = model(torch.tensor([prompt]), cache)
        start, new = time.perf_counter(), []
        for _ in range(n):
            new.append(int(logits[0, -1].argmax()))
            logits = model(torch.tensor([[new[-1]]]), cache)
    return new, n / (time.perf_counter() - start)


def onnx_decode(ort: OnnxModel, prompt: list[int], n: int) -> tuple[list[int], float]:
    import numpy as np

    logits, past = ort.step(np.asarray([prompt]), ort.empty_past(1))
    start, new = time.perf_counter(), []
    for _ in range(n):
        new.append(int(logits[0, -1].argmax()))
        logits, past = ort.step(np.asarray([[new[-1]]]), past)
    return new, n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", default="float32,int8,int4")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants.split(","):
            model, tokenizer = load_pretrained(args.model, dtype="float32")
            if variant != "float32":
                quantize_(model, QuantConfig(method=variant))
                save_quantized(model, tokenizer, Path(tmp) / f"{variant}-src")
                model, tokenizer = load_pretrained(Path(tmp) / f"{variant}-src")
            t0 = time.perf_counter()
            out = export_onnx(model, tokenizer, Path(tmp) / variant)
            export_s = time.perf_counter() - t0
            size = sum(p.stat().st_size for p in out.glob("model.onnx*")) / 2**20
            ort = OnnxModel(out, threads=args.threads)
            prompt = tokenizer.encode(PROMPT)
            speeds = {"lmscale": [], "onnxruntime": []}
            for _ in range(args.repeats):  # interleaved
                ref, tps = lmscale_decode(model, prompt, args.new_tokens)
                speeds["lmscale"].append(tps)
                got, tps = onnx_decode(ort, prompt, args.new_tokens)
                speeds["onnxruntime"].append(tps)
            same = sum(a == b for a, b in zip(ref, got, strict=True))
            med = {k: statistics.median(v) for k, v in speeds.items()}
            rows.append((variant, med["lmscale"], med["onnxruntime"], same, size, export_s))
            print(f"{variant}: done", flush=True)
    print(f"\n{args.model}, batch 1, {args.threads} threads, {args.new_tokens} new tokens, "
          f"median of {args.repeats} interleaved repeats")  # fmt: skip
    print("| variant | lmscale tok/s | onnxruntime tok/s | speed-up | same tokens | model.onnx MiB "
          "| export s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for variant, lm, ox, same, size, export_s in rows:
        print(f"| {variant} | {lm:.1f} | {ox:.1f} | {ox / lm:.2f}x | {same}/{args.new_tokens} "
              f"| {size:.0f} | {export_s:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
