"""Peak RAM and batch-1 prompt and decode speed of a saved model, each in a fresh process.

A model's RAM and speed are measured in a child process that loads nothing else, because in the
report's own process the original and every other variant are resident at once (so its peak
RSS says nothing about one variant), and allocator state left by one variant slows the next.

The child (`lmscale.compress.measure.main([DIR, "--dtype", D, ...])`) prints one JSON line:

    load_s        seconds to load the folder into a ready model
    peak_ram      bytes: the process's peak RSS minus its RSS before loading (so the Python and
                  torch import, ~0.3 GB here, is left out; loading transients are included)
    prompt_tok_s  prompt tokens / s: one uncached pass over `prompt` random tokens, median
    decode_tok_s  greedy tokens / s after that prompt through the KV cache, median; timed from
                  the first generated token on, so the prefill is not in it

The decode loop is `lmscale.engine.generate_ids`' in miniature (`compress` sits below `engine`
in DESIGN.md's dependency order), with float32 weights re-laid out as the `generate` verb does.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lmscale.errors import LmscaleError


@dataclass
class Speed:
    """What one child process measured (see the module docstring)."""

    load_s: float
    peak_ram: int
    prompt_tok_s: float
    decode_tok_s: float

    def as_dict(self) -> dict:
        return asdict(self)


def measure(
    model_dir: str | Path,
    dtype: str = "float32",
    prompt_tokens: int = 128,
    decode_tokens: int = 32,
    repeats: int = 3,
    threads: int | None = None,
) -> Speed:
    """Measure a saved model folder in a fresh Python process (see the module docstring).

    Args:
        model_dir: a folder `load_pretrained` reads (native, quantized, pruned, a run).
        dtype: the float dtype to load it in.
        prompt_tokens: prompt length for the prefill timing (capped by the model's context).
        decode_tokens: greedy tokens timed after it.
        repeats: timed runs of each (after one warm-up); medians are reported.
        threads: torch threads in the child; None keeps torch's default.

    Returns:
        The child's `Speed`.

    Raises:
        LmscaleError: the child failed (its last line of stderr is in the message).
    """
    command = [
        sys.executable, "-c", "import sys; from lmscale.compress.measure import main; "
        "sys.exit(main(sys.argv[1:]))", str(model_dir), "--dtype", dtype,
        "--prompt-tokens", str(prompt_tokens), "--decode-tokens", str(decode_tokens),
        "--repeats", str(repeats),
    ]  # fmt: skip
    if threads is not None:
        command += ["--threads", str(threads)]
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)}  # the same lmscale as ours
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise LmscaleError(f"measuring {model_dir} failed: {last}")
    return Speed(**json.loads(done.stdout.strip().splitlines()[-1]))


def _rss() -> int:
    """This process's resident set size now, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    """The largest resident set size this process has had, in bytes (VmHWM).

    NOTE: not `getrusage`'s ru_maxrss: Linux keeps that across fork and exec, so a child of a
    large process (the report holds every variant) would report its parent's peak.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise LmscaleError("cannot read VmHWM from /proc/self/status")


@torch.inference_mode()
def greedy_decode(model, prompt: torch.Tensor, n_tokens: int) -> tuple[list[int], float]:
    """`n_tokens` greedy ids after `prompt` (1, T) through the KV cache, and the seconds spent
    on all but the first (the decode steps proper, after the prompt's pass)."""
    cache = model.new_cache(1, prompt.shape[1] + n_tokens)
    tokens, out, start = prompt, [], 0.0
    for _ in range(n_tokens):
        hidden = model.hidden_states(tokens, cache)[:, -1]  # (1, dim)
        tokens = model.output(hidden).argmax(-1, keepdim=True)  # (1, 1)
        out.append(int(tokens))
        if len(out) == 1:
            start = time.perf_counter()
    return out, time.perf_counter() - start


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@torch.inference_mode()
def _measure_here(args: argparse.Namespace) -> Speed:
    from lmscale.checkpoint import load_pretrained
    from lmscale.model import decode_layout_

    if args.threads:
        torch.set_num_threads(args.threads)
    before = _rss()
    start = time.perf_counter()
    model, _ = load_pretrained(args.model_dir, dtype=args.dtype)
    decode_layout_(model.eval())  # as `lmscale generate` runs it
    load_s = time.perf_counter() - start
    n_prompt = max(1, min(args.prompt_tokens, model.config.max_seq_len - args.decode_tokens - 1))
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (1, n_prompt), generator=generator)

    def prefill():
        model.output(model.hidden_states(prompt)[:, -1])

    prefill()  # warm-up
    greedy_decode(model, prompt, 2)
    prompt_s = statistics.median(_timed(prefill) for _ in range(args.repeats))
    n = args.decode_tokens
    decode_s = statistics.median(
        greedy_decode(model, prompt, n + 1)[1] for _ in range(args.repeats)
    )
    return Speed(
        load_s=load_s,
        peak_ram=max(0, _peak_rss() - before),
        prompt_tok_s=n_prompt / prompt_s,
        decode_tok_s=n / decode_s,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int)
    speed = _measure_here(parser.parse_args(argv))
    print(json.dumps(speed.as_dict()))
    return 0
