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
    p.add_argument("--adapter", help="a LoRA adapter folder to apply to --model")
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
    ops = p.add_argument_group("operating: quality gauges and hot reload")
    ops.add_argument(
        "--probe", metavar="FILE",
        help="a text whose perplexity is measured at start and every --probe-every seconds, "
        "in idle moments (the lmscale_probe_perplexity gauge)",
    )  # fmt: skip
    ops.add_argument("--probe-every", type=float, default=600.0, help="seconds between probes")
    ops.add_argument(
        "--no-prompt-scoring", action="store_true",
        help="do not score incoming prompts' loss under the model (lmscale_prompt_loss)",
    )  # fmt: skip
    ops.add_argument(
        "--admin-key",
        help="enable POST /admin/reload with 'Authorization: Bearer KEY' (or set "
        "LMSCALE_ADMIN_KEY; default: the API key); SIGHUP reloads too",
    )  # fmt: skip
    ray = p.add_argument_group("scale-out on Ray Serve (any of these serves through Ray)")
    ray.add_argument("--replicas", type=int, help="this many engine replicas, load balanced")
    ray.add_argument("--autoscale", metavar="MIN:MAX", help="replicas scaled on ongoing requests")
    ray.add_argument(
        "--target-ongoing-requests", type=float, default=8.0,
        help="with --autoscale: streams per replica to scale towards",
    )  # fmt: skip
    ray.add_argument("--upscale-delay-s", type=float, default=5.0, help="with --autoscale")
    ray.add_argument("--downscale-delay-s", type=float, default=30.0, help="with --autoscale")
    ray.add_argument(
        "--threads-per-replica", type=int,
        help="torch threads (and Ray CPUs) of each replica (default: cores / most replicas)",
    )  # fmt: skip
    ray.add_argument(
        "--routing", default="prefix", choices=("prefix", "power-of-two"),
        help="prefix: to the replica caching the prompt's beginning (else the least loaded); "
        "power-of-two: Ray Serve's default",
    )  # fmt: skip
    ray.add_argument(
        "--ray-address", help="join this Ray cluster (e.g. ray://HEAD:10001) instead of a local one"
    )


def serve(args: argparse.Namespace, _: list[str]) -> None:
    from lmscale.engine.config import EngineConfig
    from lmscale.serve.server import ServeOptions
    from lmscale.serve.server import serve as run_server

    if args.dtype not in (None, "float32", "bfloat16", "float16"):
        raise LmscaleError(f"--dtype must be float32, bfloat16 or float16, got '{args.dtype}'")
    if not 0 < args.port < 65536:
        raise LmscaleError(f"--port must be in 1..65535, got {args.port}")
    if args.probe_every <= 0:
        raise LmscaleError(f"--probe-every must be positive, got {args.probe_every}")
    if args.probe is not None:
        from lmscale.serve.server import read_probe

        read_probe(args.probe)  # a missing or empty file is a one-line error before loading
    if args.adapter is not None:
        from lmscale.finetune.adapter import read_adapter_config

        read_adapter_config(args.adapter)
    from lmscale.train.precision import resolve_device

    resolve_device(args.device)  # a missing GPU is a one-line error, not a traceback
    engine = EngineConfig(
        max_num_seqs=args.max_num_seqs, max_waiting=args.max_waiting,
        kv_cache_bytes=args.kv_cache_mb * 2**20, enable_prefix_caching=not args.no_prefix_caching,
        compiled_decode=not args.eager, compiled_decode_verbose=True,
    )  # fmt: skip
    options = ServeOptions(
            model=args.model, host=args.host, port=args.port, api_key=args.api_key,
            dtype=args.dtype, device=args.device, served_name=args.served_model_name,
            drain_s=args.drain_s, keep_quantized=args.keep_quantized,
            engine=engine, adapter=args.adapter, probe=args.probe, probe_every_s=args.probe_every,
            score_prompts=not args.no_prompt_scoring, admin_key=args.admin_key,
    )  # fmt: skip
    scale = scale_options(args)
    if scale is None:
        run_server(options)
        return
    try:
        import ray.serve  # noqa: F401
    except ImportError:
        raise LmscaleError(
            "serving replicas needs Ray Serve: pip install 'lmscale[ray]' (or 'ray[serve]')"
        ) from None
    from lmscale.serve.scale_out import serve_replicas

    serve_replicas(options, scale)


def scale_options(args: argparse.Namespace):
    """The Ray Serve options the arguments ask for, or None to serve in this process."""
    from lmscale.serve.scale_out import ScaleOptions, parse_autoscale

    if args.replicas is None and args.autoscale is None and args.ray_address is None:
        return None
    if args.replicas is not None and args.autoscale is not None:
        raise LmscaleError("give --replicas N or --autoscale MIN:MAX, not both")
    if args.replicas is not None and args.replicas < 1:
        raise LmscaleError(f"--replicas must be at least 1, got {args.replicas}")
    if args.threads_per_replica is not None and args.threads_per_replica < 1:
        raise LmscaleError(
            f"--threads-per-replica must be at least 1, got {args.threads_per_replica}"
        )
    if args.target_ongoing_requests <= 0:
        raise LmscaleError("--target-ongoing-requests must be positive")
    if min(args.upscale_delay_s, args.downscale_delay_s) < 0:
        raise LmscaleError("--upscale-delay-s and --downscale-delay-s must not be negative")
    return ScaleOptions(
        replicas=args.replicas or 1,
        autoscale=parse_autoscale(args.autoscale) if args.autoscale else None,
        target_ongoing_requests=args.target_ongoing_requests,
        upscale_delay_s=args.upscale_delay_s, downscale_delay_s=args.downscale_delay_s,
        threads=args.threads_per_replica, routing=args.routing, ray_address=args.ray_address,
    )  # fmt: skip
