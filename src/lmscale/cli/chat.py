"""`lmscale chat`: a conversation with a chat model on stdin/stdout, using its chat template."""

from __future__ import annotations

import argparse
import sys

from lmscale.cli.model_options import apply_adapter, decode_step, eager_arg, keep_quantized_arg


def chat_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a bundled name, .gguf, HF folder or run dir")
    p.add_argument("--system", default=None, help="system message that starts the conversation")
    p.add_argument("--max-new-tokens", type=int, default=512, help="longest reply in tokens")
    p.add_argument("--temperature", type=float, default=0.7, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--adapter", default=None, help="a LoRA adapter folder to apply to --model")
    keep_quantized_arg(p)
    eager_arg(p)
    p.epilog = "One message per line on stdin; /reset clears the history, /exit (or EOF) ends."


def chat(args: argparse.Namespace, _: list[str]) -> None:
    from lmscale.checkpoint import load_pretrained
    from lmscale.engine import ChatSession, SamplingParams
    from lmscale.train.precision import resolve_device

    params = SamplingParams(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        max_new_tokens=args.max_new_tokens, seed=args.seed,
    )  # fmt: skip
    model, tokenizer = load_pretrained(
        args.model, resolve_device(args.device), keep_quantized=args.keep_quantized
    )
    apply_adapter(model, args.adapter)
    step = decode_step(model, args.eager)
    session = ChatSession(model, tokenizer, params, system=args.system, step=step)
    interactive = sys.stdin.isatty()
    for line in _user_lines(interactive):
        if line == "/reset":
            session.reset()
            continue
        for piece in session.reply(line):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()


def _user_lines(interactive: bool):
    """Non-empty user lines until EOF or /exit, with a `> ` prompt on a terminal."""
    while True:
        try:
            line = input("> ") if interactive else sys.stdin.readline()
        except EOFError:
            return
        if not interactive and not line:
            return
        line = line.strip()
        if line == "/exit":
            return
        if line:
            yield line
