"""Fine-tuning cost on CPU: full vs LoRA vs QLoRA (lmscale) vs Hugging Face transformers + PEFT.

All configurations train SmolLM2-135M-Instruct (the bundled GGUF, float32) on the same batches:
`shakespeare-speakers` chat data rendered and packed by `lmscale.finetune.sft_data` into rows of
`--seq-len` tokens, `--batch-size` rows a step, the same rows in the same order for everyone.
The configurations:

    full          lmscale, every parameter trains (AdamW, lr 2e-5)
    lora          lmscale LoRA r=8, alpha=16 on q,k,v,o (AdamW, lr 2e-4)
    qlora-int8    the same adapter over the int8 base (`quantize_`, per-channel)
    qlora-int4    the same adapter over the int4 base (group 32)
    peft-lora     `LlamaForCausalLM` loaded from the Hugging Face folder lmscale exports from
                  the same weights, `peft.get_peft_model` with the same rank, alpha, targets,
                  dropout 0 and AdamW lr 2e-4; loss = mean cross-entropy over the same targets

Each runs in its own Python process (peak RSS of one configuration, not of all of them), with
`--threads` torch threads, `--warmup` untimed steps and `--steps` timed ones. Reported: trainable
parameters, peak RSS growth (peak RSS while training minus RSS before loading the model, so the
weights, gradients, optimizer state and activations are in it; the Python and torch import is
not; the peak counter is reset after loading, so loading's transients are not), the RSS the
loaded model adds before training, tokens/s (batch x seq len / step time, median of the timed steps) and the loss of the
first and the last step (the first is the same for every configuration but QLoRA's: a fresh
adapter changes nothing, and both sides compute the same loss). With `--rounds` > 1 the
configurations alternate over rounds and medians are reported.

    python bench/finetune.py --threads 2 --batch-size 4 --seq-len 256 --steps 10
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MODEL = "smollm2-135m-instruct"
CONFIGS = ("full", "lora", "qlora-int8", "qlora-int4", "peft-lora")
RANK, ALPHA = 8, 16.0
LR = {"full": 2e-5}
DEFAULT_LR = 2e-4
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def main() -> None:
    args = parse_args()
    if args.child:
        print(json.dumps(run_child(args)))
        return
    with tempfile.TemporaryDirectory() as folder:
        prepare(Path(folder), args)
        results: dict[str, list[dict]] = {name: [] for name in args.configs.split(",")}
        for round_ in range(args.rounds):
            for name in results:
                print(f"round {round_ + 1}: {name} ...", file=sys.stderr, flush=True)
                results[name].append(spawn(name, Path(folder), args))
    report(results, args)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    return p.parse_args()


def prepare(folder: Path, args: argparse.Namespace) -> None:
    """The float32 weights as a native and a Hugging Face folder, and the batches, on disk."""
    from lmscale.checkpoint import export_hf, load_pretrained, save_model_dir
    from lmscale.config import to_dict
    from lmscale.finetune.sft_data import RowLoader, build_rows
    from lmscale.finetune.shakespeare_chat import speaker_conversations

    model, tokenizer = load_pretrained(MODEL, dtype="float32")
    config = {"model": to_dict(model.config), "tokenizer": tokenizer.settings}
    save_model_dir(folder / "native", model.state_dict(), config, tokenizer.to_json())
    export_hf(model, None, folder / "hf")
    rows = build_rows(tokenizer, speaker_conversations(limit=1000), args.seq_len, packing=True)
    loader = RowLoader(rows, args.batch_size, tokenizer.pad_id or 0, seed=0)
    batches = [loader.next_batch() for _ in range(args.warmup + args.steps)]
    torch.save(batches, folder / "batches.pt")


def spawn(name: str, folder: Path, args: argparse.Namespace) -> dict:
    command = [
        sys.executable, __file__, "--child", name, "--folder", str(folder),
        "--threads", str(args.threads), "--warmup", str(args.warmup), "--steps", str(args.steps),
    ]  # fmt: skip
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS; False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _peak() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_child(args: argparse.Namespace) -> dict:
    """Load, build the optimizer, train warm-up + timed steps; measure (see the docstring)."""
    torch.set_num_threads(args.threads)
    folder = Path(args.folder)
    batches = torch.load(folder / "batches.pt")
    torch.manual_seed(0)
    before = _rss()
    model, step_loss = (build_peft if args.child == "peft-lora" else build_lmscale)(args, folder)
    _trim()  # hand freed load-time memory (e.g. the float weights quantize_ replaced) back
    load_rss = _rss() - before
    reset = _reset_peak()  # loading's transients are not training's memory
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR.get(args.child, DEFAULT_LR), weight_decay=0.0)
    model.train()
    losses, times = [], []
    for inputs, targets in batches:
        start = time.perf_counter()
        loss = step_loss(inputs, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        times.append(time.perf_counter() - start)
    tokens = statistics.median(t.numel() for t, _ in batches)
    return {
        "trainable": sum(p.numel() for p in params),
        "peak_rss": _peak() - before,
        "load_rss": load_rss,
        "peak_reset": reset,
        "tok_s": tokens / statistics.median(times[args.warmup :]),
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "steps": len(losses),
    }


def build_lmscale(args: argparse.Namespace, folder: Path):
    from lmscale.checkpoint import load_pretrained
    from lmscale.compress.quantize import QuantConfig, quantize_
    from lmscale.finetune.lora import LoRAConfig, apply_lora_
    from lmscale.train.loss import count_targets, lm_loss_sum

    model, _ = load_pretrained(folder / "native", dtype="float32")
    if args.child.startswith("qlora-"):
        quantize_(model, QuantConfig(args.child.removeprefix("qlora-")))
    if args.child == "full":
        model.requires_grad_(True)
    else:
        apply_lora_(model, LoRAConfig(RANK, ALPHA, 0.0, ("q", "k", "v", "o")))

    def step_loss(inputs, targets):
        return lm_loss_sum(model, inputs, targets) / count_targets(targets)

    return model, step_loss


def build_peft(args: argparse.Namespace, folder: Path):
    import peft
    import torch.nn.functional as F
    from transformers import LlamaForCausalLM

    from lmscale.train.loss import IGNORE_INDEX

    hf = LlamaForCausalLM.from_pretrained(folder / "hf", dtype=torch.float32)
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=HF_TARGETS)
    model = peft.get_peft_model(hf, config)

    def step_loss(inputs, targets):
        logits = model(input_ids=inputs).logits  # (B, T, vocab); targets are already shifted
        return F.cross_entropy(
            logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX
        )

    return model, step_loss


def report(results: dict[str, list[dict]], args: argparse.Namespace) -> None:
    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    import transformers

    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = "not installed"
    print(
        f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
        f"{torch.__version__}, transformers {transformers.__version__}, peft {peft_version}; "
        f"{args.threads} threads, batch {args.batch_size} x {args.seq_len} tokens, "
        f"{args.warmup} warm-up + {args.steps} timed steps, {args.rounds} round(s); load "
        f"{os.getloadavg()[0]:.1f}\n"
    )
    ref = "peft-lora" if "peft-lora" in results else None
    print(
        "| config | trainable params | RSS after load | peak RSS growth | tokens/s "
        "| loss first -> last |" + (" RSS vs PEFT | tokens/s vs PEFT |" if ref else "")
    )
    print("|---|---:|---:|---:|---:|---|" + ("---:|---:|" if ref else ""))
    for name in results:
        row = (
            f"| {name} | {int(median(name, 'trainable')):,} | "
            f"{median(name, 'load_rss') / 2**20:,.0f} MiB | "
            f"{median(name, 'peak_rss') / 2**20:,.0f} MiB | {median(name, 'tok_s'):,.0f} | "
            f"{median(name, 'first_loss'):.3f} -> {median(name, 'last_loss'):.3f} |"
        )
        if ref:
            row += (
                f" {median(name, 'peak_rss') / median(ref, 'peak_rss'):.2f}x |"
                f" {median(name, 'tok_s') / median(ref, 'tok_s'):.2f}x |"
            )
        print(row)
    if not all(r["peak_reset"] for rs in results.values() for r in rs):
        print("\n(peak RSS could not be reset after loading: loading transients are included)")


if __name__ == "__main__":
    main()
