"""int4 decode of the bundled SmolLM2 Q4_1 file kept quantized: compiled step vs eager, same run.

The file is loaded with `keep_quantized=True` (int4 layers in the float-zero layout, the
embedding table and tied output projection in float32); greedy generation of 1 token (the
prefill) and of `--new-tokens` tokens after a `--prompt-tokens` prompt, alternating the two
sides over `--repeats` rounds; decode tok/s = (new - 1) / (t_all - t_first), medians.

    python bench/int4_decode.py --threads 2 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

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
    prompt = tokenizer.encode(TEXT * 50, add_bos=False)[: args.prompt_tokens]
    sides = {"compiled": DecodeStep(model.eval(), verbose=True), "eager": None}
    times = {side: {"first": [], "all": []} for side in sides}
    outputs = {}
    for round_ in range(args.repeats + 1):  # round 0 warms up (and compiles)
        for side, step in sides.items():
            for kind, n in (("first", 1), ("all", args.new_tokens)):
                params = SamplingParams(temperature=0, max_new_tokens=n)
                start = time.perf_counter()
                outputs[side] = list(generate_ids(model, prompt, params, step=step))
                if round_:
                    times[side][kind].append(time.perf_counter() - start)
    same = outputs["compiled"] == outputs["eager"]
    print(f"torch {torch.__version__}, {args.threads} threads; greedy tokens equal: {same}")
    print("| side | prefill tok/s | decode tok/s |")
    print("|---|---:|---:|")
    for side, t in times.items():
        first, full = statistics.median(t["first"]), statistics.median(t["all"])
        decode = (args.new_tokens - 1) / (full - first)
        print(f"| {side} | {len(prompt) / first:.0f} | {decode:.1f} |")


if __name__ == "__main__":
    main()
