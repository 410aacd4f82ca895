"""`lmscale serve`: the OpenAI-compatible HTTP API over the continuous-batching engine."""

from __future__ import annotations

import argparse

from lmscale.cli.model_options import eager_arg, keep_quantized_arg
from lmscale.errors import LmscaleError


def serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="smollm2-135m-instruct",
        help="a bundled name, .gguf, HF folder or run dir",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (or set LMSCALE_API_KEY)")
    p.add_argument("--served-model-name", help="the model's name in the API (default: --model)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: float32)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    keep_quantized_arg(p)
    eager_arg(p)
    p.add_argument("--max-num-seqs", type=int, default=64, help="most requests in the batch")
    p.add_argument("--max-waiting", type=int, default=256, help="queue bound; past it, 429")
    p.add_argument("--kv-cache-mb", type=int, default=256, help="memory for the KV-cache pool")
    p.add_argument(
        "--no-prefix-caching", action="store_true",
        help="compute every prompt in full instead of reusing cached KV blocks of its prefix",
    )  # fmt: skip
    p.add_argument(
        "--drain-s", type=float, default=30.0, help="on SIGTERM, finish requests for this long"
    )


def serve(args: argparse.Namespace, _: list[str]) -> None:
    from lmscale.engine.config import EngineConfig
    from lmscale.serve.server import ServeOptions
    from lmscale.serve.server import serve as run_server

    if args.dtype not in (None, "float32", "bfloat16", "float16"):
        raise LmscaleError(f"--dtype must be float32, bfloat16 or float16, got '{args.dtype}'")
    if not 0 < args.port < 65536:
        raise LmscaleError(f"--port must be in 1..65535, got {args.port}")
    from lmscale.train.precision import resolve_device

    resolve_device(args.device)  # a missing GPU is a one-line error, not a traceback
    engine = EngineConfig(
        max_num_seqs=args.max_num_seqs, max_waiting=args.max_waiting,
        kv_cache_bytes=args.kv_cache_mb * 2**20, enable_prefix_caching=not args.no_prefix_caching,
        compiled_decode=not args.eager, compiled_decode_verbose=True,
    )  # fmt: skip
    run_server(
        ServeOptions(
            model=args.model, host=args.host, port=args.port, api_key=args.api_key,
            dtype=args.dtype, device=args.device, served_name=args.served_model_name,
            drain_s=args.drain_s, keep_quantized=args.keep_quantized,
            engine=engine,
        )
    )  # fmt: skip
