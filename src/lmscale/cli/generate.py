"""`lmscale generate`: continue a prompt, streaming the tokens."""

from __future__ import annotations

import argparse
import json
import sys

from lmscale.cli.model_options import apply_adapter, decode_step, eager_arg, keep_quantized_arg


def generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a bundled name, .gguf, HF folder or run dir")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop at this text (repeatable)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    p.add_argument("--adapter", default=None, help="a LoRA adapter folder to apply to --model")
    keep_quantized_arg(p)
    eager_arg(p)


def generate(args: argparse.Namespace, _: list[str]) -> None:
    from lmscale.checkpoint import load_pretrained
    from lmscale.engine import SamplingParams, generate_ids, stream_text
    from lmscale.train.precision import resolve_device

    params = SamplingParams(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        max_new_tokens=args.max_new_tokens, stop=args.stop, seed=args.seed,
    )  # fmt: skip
    model, tokenizer = load_pretrained(
        args.model, resolve_device(args.device), keep_quantized=args.keep_quantized
    )
    apply_adapter(model, args.adapter)
    step = decode_step(model, args.eager)
    ids = generate_ids(
        model, tokenizer.encode(args.prompt), params, stop_ids=tokenizer.end_of_turn_ids,
        step=step,
    )  # fmt: skip
    pieces = stream_text(ids, tokenizer.decode, params.stop or ())
    if args.json:
        print(json.dumps({"prompt": args.prompt, "text": "".join(pieces)}))
        return
    sys.stdout.write(args.prompt)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
