"""Forward speed of structurally pruned SmolLM2 against the original, and transformers' forward.

Structured pruning removes whole KV groups and MLP channels, so the pruned model is a smaller
dense model; this measures how much faster its forward pass runs on the CPU (median of
`--repeats` passes after a warm-up), with transformers' LlamaForCausalLM on the original
weights in the same run as the outside reference.

    python bench/prune_speed.py --threads 1 --repeats 5
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import tempfile
import time

import torch

from lmscale.checkpoint import export_hf, load_pretrained
from lmscale.compress import PruneConfig, prune_
from lmscale.data.corpus import iter_documents

MODEL = "smollm2-135m-instruct"


def median_seconds(model, tokens: torch.Tensor, repeats: int) -> float:
    with torch.inference_mode():
        model(tokens)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(tokens)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.25, 0.5])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_pretrained(MODEL)
    text = next(d.text for d in iter_documents("shakespeare") if d.name == "tragedies/macbeth")
    ids = tokenizer.encode(text[:60_000])
    calibration = torch.tensor(ids[:2048]).view(-1, 256)
    tokens = torch.tensor(ids[2048 : 2048 + args.batch * args.seq]).view(args.batch, args.seq)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} thread(s), forward of {tuple(tokens.shape)} tokens, median of {args.repeats}")  # fmt: skip
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as folder:
        export_hf(model, tokenizer, folder)
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    rows = [
        (
            "transformers (original)",
            sum(p.numel() for p in hf.parameters()),
            median_seconds(hf, tokens, args.repeats),
        )
    ]
    rows.append(
        (
            "lmscale (original)",
            sum(p.numel() for p in model.parameters()),
            median_seconds(model, tokens, args.repeats),
        )
    )
    for sparsity in args.sparsities:
        pruned = copy.deepcopy(model)
        prune_(pruned, PruneConfig("structured", sparsity), calibration=calibration)
        rows.append(
            (
                f"lmscale structured {sparsity:.0%}",
                sum(p.numel() for p in pruned.parameters()),
                median_seconds(pruned, tokens, args.repeats),
            )
        )
    base = rows[1][2]
    print("| model | parameters | forward s | vs lmscale original | vs transformers |")
    print("|---|---:|---:|---:|---:|")
    for name, params, seconds in rows:
        print(
            f"| {name} | {params / 1e6:.1f}M | {seconds:.3f} | {base / seconds:.2f}x | {rows[0][2] / seconds:.2f}x |"
        )


if __name__ == "__main__":
    main()
