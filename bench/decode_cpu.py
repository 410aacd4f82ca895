"""Batch-1 CPU inference of SmolLM2-135M: lmscale vs Hugging Face transformers, in the same run.

Both sides run the same weights: the bundled GGUF loaded by lmscale, and `LlamaForCausalLM` loaded
from the Hugging Face folder lmscale exports from it (the first greedy tokens are compared as a
check). Per dtype (fp32, bf16 = weights in bf16 on both sides) and side, two timed calls:
greedy generation of 1 token (= the prefill of the prompt) and of `--new-tokens` tokens with no
early stop; decode tokens/s = (new_tokens - 1) / (t_all - t_first). transformers runs its default
`generate()` (dynamic cache, `do_sample=False`, `min_new_tokens=max_new_tokens`); lmscale runs as
its `generate` and `chat` verbs do (float32 weights in the decode layout, see `decode_layout_`).
The sides and dtypes alternate over `--repeats` rounds; medians are reported, with the
memory-bandwidth ceiling of decoding (bytes of weights read per token / measured read bandwidth).

Sides: lmscale compiled (its default: the `DecodeStep` graph), lmscale eager (`--eager`),
transformers' default `generate()`, and transformers at its strongest on this CPU: a static
cache (`cache_implementation="static"`) with its forward compiled by `torch.compile`
(`--no-hf-compile` leaves it out: inductor needs minutes for it here). Ratios are printed
against both transformers sides.

    python bench/decode_cpu.py --threads 2 --repeats 3
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
from transformers import LlamaForCausalLM

from lmscale.checkpoint import export_hf, load_pretrained
from lmscale.engine import SamplingParams, generate_ids
from lmscale.engine.decode_step import DecodeStep
from lmscale.model import Transformer, decode_layout_

MODEL = "smollm2-135m-instruct"
TEXT = "The history of the printing press begins in the fifteenth century, when "


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_pretrained(MODEL)
    prompt = (tokenizer.encode(TEXT * 200, add_bos=False) * 2)[: args.prompt_tokens]
    runners = build_runners(model, args)
    check_agreement(runners, prompt)
    results = measure(runners, prompt, args)
    report(results, model, args)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--no-hf-compile", action="store_true", help="skip transformers' compiled side")
    return p.parse_args()


Runner = Callable[[list[int], int], list[int]]


def build_runners(model: Transformer, args: argparse.Namespace) -> dict[tuple[str, str], Runner]:
    """(side, dtype) -> a function (prompt ids, n new tokens) -> the greedy new ids."""
    runners = {}
    with tempfile.TemporaryDirectory() as folder:
        export_hf(model, None, folder)
        for name in args.dtypes.split(","):
            dtype = getattr(torch, name)
            hf = LlamaForCausalLM.from_pretrained(folder, torch_dtype=dtype).eval()
            compiled = copy.deepcopy(model).to(dtype)
            runners["lmscale", name] = lmscale_runner(compiled, DecodeStep(compiled))
            runners["lmscale eager", name] = lmscale_runner(
                decode_layout_(copy.deepcopy(model).to(dtype))
            )
            runners["transformers", name] = hf_runner(hf)
            if not args.no_hf_compile:
                strong = LlamaForCausalLM.from_pretrained(folder, torch_dtype=dtype).eval()
                strong.generation_config.cache_implementation = "static"
                strong.forward = torch.compile(strong.forward)
                runners["transformers static+compile", name] = hf_runner(strong)
    return runners


def lmscale_runner(model: Transformer, step: DecodeStep | None = None) -> Runner:
    def run(prompt: list[int], n: int) -> list[int]:
        params = SamplingParams(temperature=0, max_new_tokens=n)
        return list(generate_ids(model, prompt, params, step=step))

    return run


def hf_runner(model: LlamaForCausalLM) -> Runner:
    @torch.inference_mode()
    def run(prompt: list[int], n: int) -> list[int]:
        ids = torch.tensor([prompt])
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
            min_new_tokens=n, pad_token_id=0,
        )  # fmt: skip
        return out[0, len(prompt) :].tolist()

    return run


def check_agreement(runners: dict, prompt: list[int], n: int = 16) -> None:
    """Print how many of the first n greedy tokens each side shares with transformers'."""
    for dtype in sorted({d for _, d in runners}):
        theirs = runners["transformers", dtype](prompt, n)
        for side in sorted({s for s, d in runners if d == dtype and s != "transformers"}):
            ours = runners[side, dtype](prompt, n)
            same = next(
                (i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), n
            )
            print(f"{dtype} {side}: first {same}/{n} greedy tokens agree with transformers")


def measure(runners: dict, prompt: list[int], args: argparse.Namespace) -> dict:
    """Median prefill and decode tokens/s per runner, the runs interleaved after a warm-up.

    `bench/compress.py` measures its runners with this function too.
    """
    times = {key: {"first": [], "all": []} for key in runners}
    for run in runners.values():
        run(prompt, 2)  # warm-up: kernel packing, allocator
    for _ in range(args.repeats):
        for key, run in runners.items():
            for kind, n in (("first", 1), ("all", args.new_tokens)):
                start = time.perf_counter()
                out = run(prompt, n)
                times[key][kind].append(time.perf_counter() - start)
                assert len(out) == n, (key, len(out))
    results = {}
    for key, t in times.items():
        first, full = statistics.median(t["first"]), statistics.median(t["all"])
        results[key] = {
            "prefill": len(prompt) / first,
            "decode": (args.new_tokens - 1) / (full - first),
        }
    return results


def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes/s of summing a `gib` GiB float32 tensor (a read-bound pass), median of repeats."""
    data = torch.ones(int(gib * 2**30) // 4)
    data.sum()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        times.append(time.perf_counter() - start)
    return data.numel() * 4 / statistics.median(times)


def bytes_per_token(model: Transformer, element_size: int) -> int:
    """Weight bytes one decode step reads: every matrix once, but one row of the embedding table.

    With tied embeddings the output projection reads the whole table, so it counts once in full
    (as the output) plus one row (as the embedding).
    """
    params = {id(p): p for p in model.parameters()}  # tied weights count once
    total = sum(p.numel() for p in params.values())
    table = model.tok_embeddings.weight
    row = table.shape[1]
    elements = total + row if model.config.tie_embeddings else total - table.numel() + row
    return elements * element_size


def report(results: dict, model: Transformer, args: argparse.Namespace) -> None:
    bandwidth = read_bandwidth()
    print(f"\n{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} threads, prompt {args.prompt_tokens}, new {args.new_tokens}, "
          f"medians of {args.repeats}")  # fmt: skip
    print(f"read bandwidth (sum over 1 GiB fp32): {bandwidth / 1e9:.1f} GB/s")
    print(
        "| dtype | side | prefill tok/s | decode tok/s | decode x transformers | decode x "
        "transformers static+compile | prefill x transformers | decode ceiling tok/s |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")  # fmt: skip
    for dtype in args.dtypes.split(","):
        base = results["transformers", dtype]
        strong = results.get(("transformers static+compile", dtype))
        weight_bytes = bytes_per_token(
            model, torch.empty((), dtype=getattr(torch, dtype)).element_size()
        )
        ceiling = bandwidth / weight_bytes
        for (side, d), r in results.items():
            if d != dtype:
                continue
            vs_strong = f"{r['decode'] / strong['decode']:.2f}x" if strong else "-"
            print(
                f"| {dtype} | {side} | {r['prefill']:.0f} | {r['decode']:.1f} "
                f"| {r['decode'] / base['decode']:.2f}x | {vs_strong} "
                f"| {r['prefill'] / base['prefill']:.2f}x | {ceiling:.0f} "
                f"({weight_bytes / 1e6:.0f} MB/token) |"
            )


if __name__ == "__main__":
    main()
