"""GPU training speed of lmscale beside transformers and nanoGPT, measured in one call (issue 19).

For gpt2-124m and llama-135m at batch 16 x 1024 in bf16, each contestant runs a few warm-up
steps (torch.compile happens there) and then `--steps` timed steps, each ended by
torch.cuda.synchronize; the median step gives tokens/s, and MFU is counted from the same model
FLOPs for all (lmscale.train.mfu: 6N plus the attention term, against the GPU's dense bf16 peak).

    lmscale fsdp            the real training loop (setup + train_step) with FSDP2 on one GPU:
                            bf16 parameters, each block compiled, fused AdamW, SDPA attention
    lmscale single          the real loop without a wrapper: model and fused loss compiled as
                            one graph under bf16 autocast
    lmscale single float8   (--float8) the same with train.float8 (torchao Float8 linears)
    transformers eager      GPT2LMHeadModel / LlamaForCausalLM of the same shape and weights,
    transformers compiled   sdpa attention, bf16 autocast, fused AdamW; the loss from labels=
    nanoGPT compiled        (--nanogpt PATH/model.py; GPT-2 only) its GPT and its own fused
                            AdamW from configure_optimizers, under bf16 autocast

Results go to $OUT/train_gpu.json (rewritten after every contestant, so a run cut short keeps
what it measured) and a table on stdout. Contestants that would start after --budget-s seconds
are recorded as skipped, so the whole script fits a 10-minute device call.

    python bench/train_gpu.py                      # CUDA: budgeted to end within 10 minutes
    python bench/train_gpu.py --float8 --nanogpt ~/nanoGPT/model.py
    python bench/train_gpu.py --smoke              # CPU: tiny presets, 2 x 64, 3 steps, eager
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from train_throughput import hf_loss, hf_model, machine, make_step  # bench/, beside this file

from lmscale.data.manifest import Manifest, Shard, Split, file_sha256
from lmscale.errors import LmscaleError
from lmscale.model import ModelConfig, Transformer, preset
from lmscale.parallel import destroy_process_group
from lmscale.parallel.config import ParallelConfig
from lmscale.tokenizer import Tokenizer
from lmscale.train.config import DataConfig, RunConfig, TrainConfig
from lmscale.train.loop import setup, train_step
from lmscale.train.mfu import peak_flops, training_flops_per_token

LR = 3e-4
# Issue 19's targets on an H100: tokens/s floors and ratios over transformers.
TARGETS = {
    "gpt2-124m": {"tokens_per_s": 519_000, "vs_transformers": 1.5},
    "llama-135m": {"vs_transformers_compiled": 1.5},
}
NO_NANOGPT = "not measured (no nanoGPT checkout on the device: pass --nanogpt PATH/model.py)"


def random_data(folder: Path, vocab_size: int, n_tokens: int) -> Path:
    """A prepared data folder of uniformly random token ids, for the real loop to read.

    Throughput does not depend on the ids, and a real tokenizer of 50k entries would take
    minutes to train: the tokenizer.json beside them is a tiny stand-in that is never used to
    encode (the loop only keeps it for checkpoints, which this bench does not write).
    """
    folder.mkdir(parents=True, exist_ok=True)
    Tokenizer.train(["the stand-in tokenizer of a benchmark"], 300).save(folder / "tokenizer.json")
    dtype = np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)
    rng = np.random.default_rng(0)
    splits = {}
    for name, count in (("train", n_tokens), ("val", 4096)):
        file = f"{name}_000.bin"
        (folder / file).write_bytes(rng.integers(0, vocab_size, count, dtype=dtype).tobytes())
        shard = Shard(file, count, file_sha256(folder / file))
        splits[name] = Split([f"random-{name}"], count, [shard])
    manifest = Manifest("random", "tokenizer.json", vocab_size, dtype.name, 0, splits)
    manifest.save(folder)
    return folder


class Clock:
    """Per-step wall times, each step ended by a device synchronize."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.sync = torch.cuda.synchronize if self.cuda else (lambda: None)

    def run(self, step, warmup: int, steps: int) -> dict:
        """Run `step()` (returning the loss as a float) warm-up + timed times."""
        start = time.perf_counter()
        losses = [step() for _ in range(warmup)]
        self.sync()
        warmup_s = time.perf_counter() - start
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            losses.append(step())
            self.sync()
            times.append(time.perf_counter() - t0)
        # NOTE: the loop resets the peak at each of its steps: this is a timed step's peak.
        peak = torch.cuda.max_memory_allocated() if self.cuda else None
        return {"step_s": times, "warmup_s": warmup_s, "losses": losses, "peak_alloc": peak}


def lmscale_step(name: str, cfg: ModelConfig, args, data: Path, strategy: str, float8: bool):
    """A step of the real training loop on `strategy` ('fsdp' on one GPU, or 'none')."""
    train = TrainConfig(
        max_steps=args.warmup + args.steps + 1, batch_size=args.batch, context=args.seq,
        dtype=args.dtype, compile=args.compile, float8=float8, lr=LR, warmup_steps=2,
        eval_interval=0, checkpoint_interval=0, log_interval=10**6,
    )  # fmt: skip
    config = RunConfig(model=cfg, data=DataConfig(str(data)), train=train,
                       parallel=ParallelConfig(strategy=strategy))  # fmt: skip
    run_dir = data.parent / f"run-{name}-{strategy}{'-float8' if float8 else ''}"
    run = setup(config, run_dir, resume=False)  # writes only config.toml and run_info.json
    return lambda: train_step(run)


def reference_step(model, loss_fn, opt, tokens, targets, args, device, compile_: bool):
    """A step of a reference model: bf16 autocast, its optimizer, clip 1.0 (train_throughput's)."""
    step = make_step(model.to(device).train(), loss_fn, opt, args.dtype, device, compile_)
    return lambda: step(tokens, targets).item()


def transformers_step(cfg: ModelConfig, compile_: bool, tokens, targets, args, device):
    from lmscale.train.optim import build_optimizer

    model = hf_model(cfg, Transformer(cfg)).to(device)  # same shape, same initial weights
    opt = build_optimizer(model, "adamw", LR, weight_decay=0.1)  # fused AdamW, as lmscale's
    return reference_step(model, hf_loss, opt, tokens, targets, args, device, compile_)


def nanogpt_step(cfg: ModelConfig, path: str, tokens, targets, args, device):
    """nanoGPT's own GPT and optimizer, loaded from a checkout's model.py (never copied here)."""
    spec = importlib.util.spec_from_file_location("nanogpt_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    conf = module.GPTConfig(block_size=args.seq, vocab_size=cfg.vocab_size, n_layer=cfg.n_layers,
                            n_head=cfg.n_heads, n_embd=cfg.dim, dropout=0.0, bias=True)  # fmt: skip
    model = module.GPT(conf).to(device)
    opt = model.configure_optimizers(0.1, LR, (0.9, 0.95), device.type)  # its fused AdamW
    loss_fn = lambda m, x, y: m(x, y)[1]  # noqa: E731 - forward returns (logits, loss)
    return reference_step(model, loss_fn, opt, tokens, targets, args, device, args.compile)


def contestants(name: str, cfg: ModelConfig, args, data: Path, tokens, targets, device) -> list:
    """(priority, label, build or the reason it is not measured) for each contestant of `name`.

    Priority 0 runs first for every model, then 1, ...: what issue 19's targets need comes
    before what is only nice to have, so a tight --budget-s drops the latter.
    """
    ref = (tokens, targets, args, device)
    out = [
        (0, "lmscale single", lambda: lmscale_step(name, cfg, args, data, "none", False)),
        (1, "lmscale fsdp", lambda: lmscale_step(name, cfg, args, data, "fsdp", False)),
    ]
    if args.compile:
        out.append((0, "transformers compiled", lambda: transformers_step(cfg, True, *ref)))
    out.append((1, "transformers eager" if args.compile else "transformers",
                lambda: transformers_step(cfg, False, *ref)))  # fmt: skip
    if cfg.family != "gpt2":
        out.append((1, "nanoGPT", "not applicable (nanoGPT is GPT-2 only)"))
    elif args.nanogpt:
        label = "nanoGPT compiled" if args.compile else "nanoGPT"
        out.append((1, label, lambda: nanogpt_step(cfg, args.nanogpt, *ref)))
    else:
        out.append((1, "nanoGPT", NO_NANOGPT))
    if args.float8:
        build = lambda: lmscale_step(name, cfg, args, data, "none", True)  # noqa: E731
        out.append((2, "lmscale single float8", build))
    return out


def measure(build, args, device, flops: float, peak: float | None) -> dict:
    """Build a contestant, time it, and summarise; frees everything it made."""
    torch._dynamo.reset()  # each contestant compiles afresh, within dynamo's recompile limits
    try:
        timing = Clock(device).run(build(), args.warmup, args.steps)
    except LmscaleError as error:
        return {"not_measured": str(error)}
    except Exception as error:  # noqa: BLE001 - record it and go on with the others
        return {"error": f"{type(error).__name__}: {error}".splitlines()[0][:500]}
    finally:
        destroy_process_group()  # the fsdp contestant's; a no-op for the others
        torch._dynamo.reset()  # compiled graphs hold on to the contestant's model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    tok_s = [args.batch * args.seq / s for s in timing["step_s"]]
    median = statistics.median(tok_s)
    return {
        "tokens_per_s": median, "tokens_per_s_all": tok_s, "warmup_s": timing["warmup_s"],
        "mfu": median * flops / peak if peak else None,
        "peak_alloc_gib": timing["peak_alloc"] / 2**30 if timing["peak_alloc"] else None,
        "loss_first": timing["losses"][0], "loss_last": timing["losses"][-1],
    }  # fmt: skip


def ratios(results: dict) -> dict:
    """Each lmscale contestant's tokens/s over each reference's."""
    speed = {k: v["tokens_per_s"] for k, v in results.items() if "tokens_per_s" in v}
    ours = {k: v for k, v in speed.items() if k.startswith("lmscale")}
    theirs = {k: v for k, v in speed.items() if not k.startswith("lmscale")}
    return {f"{a} / {b}": sa / sb for a, sa in ours.items() for b, sb in theirs.items()}


def verdict(name: str, results: dict) -> dict | None:
    """Issue 19's targets for `name`, checked against the fastest lmscale contestant."""
    target = TARGETS.get(name)
    best = max((v["tokens_per_s"] for k, v in results.items()
                if k.startswith("lmscale") and "tokens_per_s" in v), default=None)  # fmt: skip
    if target is None or best is None:
        return None
    out = {"best_lmscale_tokens_per_s": best, "target": target}
    if "tokens_per_s" in target:
        out["tokens_per_s_met"] = best >= target["tokens_per_s"]
    for key, ref in (("vs_transformers", "transformers eager"),
                     ("vs_transformers_compiled", "transformers compiled")):  # fmt: skip
        if key in target and "tokens_per_s" in results.get(ref, {}):
            out[f"{key}_met"] = best / results[ref]["tokens_per_s"] >= target[key]
    return out


def flash_attention_ok(cfg: ModelConfig, seq: int, device: torch.device) -> bool | str:
    """Whether SDPA can take the FlashAttention kernel for this shape (as the model calls it)."""
    if device.type != "cuda":
        return "not applicable on the CPU"
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, cfg.n_heads, seq, cfg.head_dim, device=device, dtype=torch.bfloat16)
    kv = torch.randn(1, cfg.n_kv_heads, seq, cfg.head_dim, device=device, dtype=torch.bfloat16)
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            torch.nn.functional.scaled_dot_product_attention(
                q, kv, kv, is_causal=True, enable_gqa=cfg.n_kv_heads != cfg.n_heads
            )
    except RuntimeError:
        return False
    return True


def model_jobs(name: str, args, device, tmp: Path) -> tuple[dict, list]:
    """The summary entry of preset `name` (results still empty) and its contestants."""
    cfg = preset(name, max_seq_len=max(args.seq, preset(name).max_seq_len))
    flops = training_flops_per_token(cfg, args.seq)
    peak = peak_flops(torch.cuda.get_device_name(), "bfloat16") if device.type == "cuda" else None
    entry = {"params": cfg.num_params(), "flops_per_token": flops, "peak_flops": peak,
             "flash_attention": flash_attention_ok(cfg, args.seq, device), "results": {}}  # fmt: skip
    gen = torch.Generator().manual_seed(1234)
    window = torch.randint(cfg.vocab_size, (args.batch, args.seq + 1), generator=gen).to(device)
    tokens, targets = window[:, :-1], window[:, 1:]  # (B, T) each: every position scored
    data = random_data(tmp / name, cfg.vocab_size, 64 * args.batch * args.seq)
    return entry, contestants(name, cfg, args, data, tokens, targets, device)


def run_all(args, device, started: float, models: dict, save) -> None:
    """Every contestant of every model, by priority, into `models`; saves after each."""
    with tempfile.TemporaryDirectory() as tmp:
        jobs = []
        for name in args.models.split(","):
            models[name], contestants_ = model_jobs(name, args, device, Path(tmp))
            jobs += [(priority, i, name, label, build)
                     for i, (priority, label, build) in enumerate(contestants_)]  # fmt: skip
        for _, _, name, label, build in sorted(jobs, key=lambda job: job[:2]):
            entry = models[name]
            if isinstance(build, str):
                result = {"not_measured": build}
            elif time.perf_counter() - started > args.budget_s:
                result = {"not_measured": f"skipped: past --budget-s {args.budget_s:.0f}"}
            else:
                print(f"{name}: {label} ...", file=sys.stderr, flush=True)
                result = measure(build, args, device, entry["flops_per_token"], entry["peak_flops"])
            entry["results"][label] = result
            entry["ratios"], entry["verdict"] = (
                ratios(entry["results"]),
                verdict(name, entry["results"]),
            )
            save()


def print_table(summary: dict) -> None:
    print(f"machine: {summary['machine']}")
    print(f"batch {summary['batch']} x {summary['seq']}  {summary['dtype']}  "
          f"{summary['steps']} timed steps (median)")  # fmt: skip
    for name, model in summary["models"].items():
        print(f"\n{name}  (flash attention through SDPA: {model['flash_attention']})")
        print(f"  {'':24}{'tokens/s':>12}{'MFU':>8}{'peak GiB':>10}{'warm-up s':>11}")
        for label, r in model["results"].items():
            if "tokens_per_s" not in r:
                print(f"  {label:24}{r.get('not_measured') or 'error: ' + r['error']}")
                continue
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
            mem = f"{r['peak_alloc_gib']:.1f}" if r["peak_alloc_gib"] is not None else "-"
            print(f"  {label:24}{r['tokens_per_s']:12,.0f}{mfu:>8}{mem:>10}{r['warmup_s']:11.1f}")
        for pair, ratio in model["ratios"].items():
            print(f"  {pair}: {ratio:.2f}x")
        if model["verdict"]:
            print(f"  issue 19 targets: {model['verdict']}")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="gpt2-124m,llama-135m", help="presets, comma-separated")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per contestant")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (compiles)")
    ap.add_argument("--float8", action="store_true", help="also lmscale with train.float8")
    ap.add_argument("--nanogpt", metavar="PATH", help="a nanoGPT checkout's model.py")
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="start no contestant after this many seconds")  # fmt: skip
    ap.add_argument("--out", default=os.environ.get("OUT", "out"), help="folder for the JSON")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU check: tiny presets, batch 2 x 64, 3 steps, no compile")  # fmt: skip
    args = ap.parse_args(argv)
    args.dtype = "bfloat16"
    if args.smoke:
        args.models, args.batch, args.seq = "tiny-gpt2,tiny", 2, 64
        args.steps, args.warmup, args.compile = 2, 1, False
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.smoke:
        raise SystemExit("no CUDA device here: run on a GPU, or pass --smoke for the CPU check")
    started = time.perf_counter()
    path = Path(args.out) / "train_gpu.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    import transformers

    summary = {"machine": machine(device), "torch": torch.__version__,
               "transformers": transformers.__version__, "smoke": args.smoke, "batch": args.batch,
               "seq": args.seq, "dtype": args.dtype, "compile": args.compile, "steps": args.steps,
               "warmup": args.warmup, "models": {}}  # fmt: skip

    def save() -> None:
        path.write_text(
            json.dumps(summary | {"elapsed_s": time.perf_counter() - started}, indent=1)
        )

    run_all(args, device, started, summary["models"], save)
    save()
    with contextlib.suppress(BrokenPipeError):
        print_table(summary)
        print(f"\nwrote {path} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
