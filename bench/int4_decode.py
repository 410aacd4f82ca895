"""int4 decode of the bundled SmolLM2 GGUF kept quantized: lmscale compiled and eager vs llama.cpp.

The file is loaded with `keep_quantized=True`: its Q4_1 layers as int4 (float zero point) and
its Q8_0 token table, which is also the tied output projection, as grouped int8 (exactly the
file's codes, as llama.cpp reads them). llama.cpp runs the same file through llama-cpp-python
(a benchmark-only dependency: `pip install llama-cpp-python` builds it, ~10 minutes here) with
the same thread count; it is skipped with a line when not installed.

Greedy generation of 1 token (the prefill) and of `--new-tokens` tokens after a
`--prompt-tokens` prompt, the sides alternating over `--repeats` rounds (round 0 warms up and
compiles); decode tok/s = (new - 1) / (t_all - t_first), medians; the ratios are to llama.cpp.

    python bench/int4_decode.py --threads 2 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from compress import llama_cpp_runner

from lmscale.checkpoint import load_pretrained
from lmscale.engine import SamplingParams, generate_ids
from lmscale.engine.decode_step import DecodeStep

TEXT = "The history of the printing press begins in the fifteenth century, when "


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_pretrained("smollm2-135m-instruct", keep_quantized=True)
    model.eval()
    prompt = tokenizer.encode(TEXT * 50, add_bos=False)[: args.prompt_tokens]
    step = DecodeStep(model, verbose=True)

    def lmscale(step):
        def run(tokens: list[int], n: int) -> list[int]:
            params = SamplingParams(temperature=0, max_new_tokens=n)
            return list(generate_ids(model, tokens, params, step=step))

        return run

    sides = {"lmscale compiled": lmscale(step), "lmscale eager": lmscale(None)}
    llama = llama_cpp_runner(args.threads)
    if llama is not None:
        sides["llama.cpp"] = llama
    times = {side: {"first": [], "all": []} for side in sides}
    outputs = {}
    for round_ in range(args.repeats + 1):
        for side, run in sides.items():
            for kind, n in (("first", 1), ("all", args.new_tokens)):
                start = time.perf_counter()
                outputs[side] = run(prompt, n)
                if round_:
                    times[side][kind].append(time.perf_counter() - start)
    reference = outputs["lmscale eager"]
    print(f"\ntorch {torch.__version__}, {args.threads} threads, prompt {len(prompt)} tokens, "
          f"{args.new_tokens} new, medians of {args.repeats} rounds")  # fmt: skip
    for side, tokens in outputs.items():
        same = sum(a == b for a, b in zip(tokens, reference, strict=False))
        print(f"{side}: first {same} of {len(reference)} greedy tokens equal lmscale eager's")
    speeds = {}
    for side, t in times.items():
        first, full = statistics.median(t["first"]), statistics.median(t["all"])
        speeds[side] = (len(prompt) / first, (args.new_tokens - 1) / (full - first))
    base = speeds.get("llama.cpp")
    print("\n| side | prefill tok/s | decode tok/s | prefill x llama.cpp | decode x llama.cpp |")
    print("|---|---:|---:|---:|---:|")
    for side, (prefill, decode) in speeds.items():
        ratios = f"{prefill / base[0]:.2f}x | {decode / base[1]:.2f}x" if base else "- | -"
        print(f"| {side} | {prefill:.0f} | {decode:.1f} | {ratios} |")


if __name__ == "__main__":
    main()
