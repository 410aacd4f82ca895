"""`lmscale plan`: memory, time, cost and energy of training or serving a model, before any of it
is spent; `--calibrate RUN` sets a prediction beside what a finished run measured.

Pure Python (no torch), so it answers at once on any laptop.
"""

from __future__ import annotations

import argparse
import json

from lmscale.errors import LmscaleError


def plan_args(p: argparse.ArgumentParser) -> None:
    what = p.add_argument_group("the model (a name, or a parameter count and any of the shape)")
    what.add_argument(
        "--model",
        help="a named shape (llama2-7b, gpt3-175b, smollm2-135m, ...) or an lmscale preset",
    )
    what.add_argument(
        "--params", help="parameter count (70e9, 7B, 350M): the rest of the shape is derived"
    )
    what.add_argument("--layers", type=int, help="with --params: number of blocks")
    what.add_argument("--hidden", type=int, help="with --params: model width (dim)")
    what.add_argument("--heads", type=int, help="with --params: attention heads")
    what.add_argument(
        "--kv-heads", type=int, help="with --params: key/value heads (grouped-query attention)"
    )
    what.add_argument("--ffn", type=int, help="with --params: MLP width")
    what.add_argument(
        "--vocab", type=int, default=32000, help="with --params: vocabulary (default 32000)"
    )
    what.add_argument(
        "--family", choices=("llama", "gpt2"), default="llama", help="with --params: block style"
    )
    job = p.add_argument_group("the training job")
    job.add_argument(
        "--seq", type=int, help="tokens per sequence (default: the model's context, at most 4096)"
    )
    job.add_argument(
        "--global-batch-tokens",
        help="tokens per optimizer step (default 0.5M below 1B parameters, 2M below 20B, else 4M)",
    )
    job.add_argument(
        "--tokens", help="tokens to train on (default: 20 per parameter, Chinchilla-optimal)"
    )
    job.add_argument(
        "--micro-batch", type=int, default=1, help="sequences per forward pass per rank (default 1)"
    )
    job.add_argument(
        "--precision", default="mixed", help="mixed (default), amp, fp32 or bf16: see README"
    )
    job.add_argument("--optimizer", default="adamw", help="adamw (default) or sgd (with momentum)")
    job.add_argument(
        "--attention", default="flash", help="flash (default: no score matrix kept) or eager"
    )
    job.add_argument(
        "--dropout", type=float, default=0.0, help="dropout (adds its masks to the activations)"
    )
    where = p.add_argument_group("the cluster")
    where.add_argument(
        "--gpu", default="h100-80gb", help="catalog entry (default h100-80gb; cpu:N for N cores)"
    )
    where.add_argument("--gpus", type=int, default=1, help="devices in all (default 1)")
    where.add_argument(
        "--gpus-per-node", type=int, help="devices per node (default: the catalog's)"
    )
    where.add_argument(
        "--mfu", type=float, help="fraction of peak FLOP/s sustained (default: the catalog's)"
    )
    where.add_argument("--price", type=float, help="USD per device-hour (default: the catalog's)")
    where.add_argument(
        "--power", type=float, help="watts per device (default: the catalog's board power)"
    )
    where.add_argument(
        "--pue", type=float, help="data-centre power usage effectiveness (default 1.1)"
    )
    where.add_argument("--grid", type=float, help="kg CO2e per kWh (default 0.429)")
    how = p.add_argument_group("a strategy of your own (else every strategy is ranked)")
    how.add_argument("--strategy", help="ddp, zero1, zero2, zero3 or fsdp")
    how.add_argument("--zero", type=int, help="ZeRO stage 0-3")
    how.add_argument("--tp", type=int, help="tensor-parallel degree")
    how.add_argument("--pp", type=int, help="pipeline-parallel stages")
    how.add_argument("--pp-schedule", help="with --pp: gpipe, 1f1b (default) or interleaved-1f1b")
    how.add_argument(
        "--virtual-stages", type=int,
        help="with --pp-schedule interleaved-1f1b: model chunks per pipeline rank (2 or more)",
    )  # fmt: skip
    how.add_argument("--sp", action="store_true", help="sequence parallel (with --tp)")
    how.add_argument("--recompute", help="none, selective or full activation recomputation")
    out = p.add_argument_group("output and other modes")
    out.add_argument("--top", type=int, default=10, help="rows of the ranking (0: all)")
    out.add_argument(
        "--all", action="store_true", help="rank every configuration, not the best of each kind"
    )
    out.add_argument("--json", action="store_true", help="print the plan as JSON")
    out.add_argument("--serve", action="store_true", help="plan serving instead of training")
    out.add_argument(
        "--context", type=int, help="--serve: tokens per sequence (default: the model's context)"
    )
    out.add_argument(
        "--dtype", default="bf16", help="--serve: weights in fp32, bf16, fp16, fp8, int8 or int4"
    )
    out.add_argument(
        "--kv-dtype", default="bf16", help="--serve: KV cache in fp32, bf16, fp16, fp8 or int8"
    )
    out.add_argument(
        "--calibrate",
        metavar="RUN_DIR",
        help="predicted against measured for a finished lmscale train run",
    )
    # fmt: skip


def plan(args: argparse.Namespace, _: list[str]) -> None:
    if args.calibrate:
        return _calibrate(args)
    model, name = _model(args)
    from lmscale.plan.hardware import accelerator

    device = accelerator(args.gpu)
    if args.serve:
        return _serve(args, model, name, device)
    return _train(args, model, device)


def _model(args: argparse.Namespace):
    from lmscale.plan.models import model_from_params, named_model
    from lmscale.plan.units import parse_count

    if args.model and args.params:
        raise LmscaleError("give --model or --params, not both")
    if args.model:
        model, name = named_model(args.model), args.model
    elif args.params:
        params = parse_count(args.params, "--params")
        model = model_from_params(
            params, family=args.family, n_layers=args.layers, dim=args.hidden,
            n_heads=args.heads, n_kv_heads=args.kv_heads, hidden_dim=args.ffn,
            vocab_size=args.vocab, max_seq_len=max(args.seq or 4096, args.context or 0),
        )  # fmt: skip
        name = f"a {params:.3g}-parameter model"
    else:
        raise LmscaleError("say which model: --model NAME or --params N (see --help)")
    if not 0 <= args.dropout < 1:
        raise LmscaleError(f"--dropout must be in [0, 1), got {args.dropout}")
    return model.replace(dropout=args.dropout) if args.dropout else model, name


def _train(args: argparse.Namespace, model, device) -> None:
    from lmscale.plan.perf import Cluster
    from lmscale.plan.recommend import evaluate, recommend
    from lmscale.plan.report import training_json, training_text
    from lmscale.plan.units import parse_count
    from lmscale.plan.workload import Workload

    seq = args.seq or min(model.max_seq_len, 4096)
    batch = args.global_batch_tokens or _default_batch(model.num_params())
    workload = Workload(
        model, seq, parse_count(batch, "--global-batch-tokens"),
        parse_count(args.tokens, "--tokens") if args.tokens else None,
        args.precision, args.optimizer, args.attention,
    )  # fmt: skip
    cluster = Cluster.of(
        device, args.gpus, devices_per_node=args.gpus_per_node, mfu=args.mfu,
        price_per_hour=args.price, power_w=args.power, pue=args.pue, grid_kg_per_kwh=args.grid,
    )  # fmt: skip
    if args.micro_batch < 1:
        raise LmscaleError(f"--micro-batch must be positive, got {args.micro_batch}")
    chosen = None
    strategy = _chosen_strategy(args, workload)
    if strategy is not None:
        chosen = evaluate(workload, strategy, cluster)
    rec = recommend(workload, cluster, args.micro_batch)
    if args.json:
        print(json.dumps(training_json(workload, cluster, rec, chosen, args.all), indent=2))
    else:
        print(training_text(workload, cluster, rec, chosen, args.top, args.all))


def _default_batch(params: float) -> float:
    return 0.5e6 if params < 1e9 else 2e6 if params < 20e9 else 4e6


def _chosen_strategy(args: argparse.Namespace, workload):
    """The strategy the user spelled out, checked; None when they left the choice to the planner."""
    from lmscale.plan.strategy import NAMED_STRATEGIES, Strategy, check_strategy

    given = (args.strategy, args.zero, args.tp, args.pp, args.recompute, args.pp_schedule,
             args.virtual_stages)  # fmt: skip
    if all(v is None for v in given) and not args.sp:
        return None
    zero = args.zero
    if args.strategy is not None:
        if args.strategy not in NAMED_STRATEGIES:
            raise LmscaleError(
                f"--strategy must be one of {', '.join(NAMED_STRATEGIES)}, got '{args.strategy}'"
            )
        named = NAMED_STRATEGIES[args.strategy]["zero"]
        if zero is not None and zero != named:
            raise LmscaleError(
                f"--strategy {args.strategy} is ZeRO stage {named}, but --zero {zero} was given"
            )
        zero = named
    tp, pp = args.tp or 1, args.pp or 1
    if tp < 1 or pp < 1:
        raise LmscaleError("--tp and --pp must be positive")
    if args.gpus % (tp * pp):
        raise LmscaleError(
            f"--gpus {args.gpus} is not a multiple of tp x pp = {tp * pp}: the rest of the devices "
            "run data parallel, so choose --gpus as a multiple of it"
        )
    strategy = Strategy(
        dp=args.gpus // (tp * pp), tp=tp, pp=pp, zero=zero or 0, sp=args.sp,
        recompute=args.recompute or "none", micro_batch=args.micro_batch,
        pp_schedule=args.pp_schedule or "1f1b", virtual_stages=1 if args.virtual_stages is None else args.virtual_stages,
    )  # fmt: skip
    check_strategy(strategy, workload)
    return strategy


def _serve(args: argparse.Namespace, model, name: str, device) -> None:
    from lmscale.plan.inference import serve_plan
    from lmscale.plan.report import serve_json, serve_text

    context = args.context or model.max_seq_len
    plan = serve_plan(model, device, context, args.dtype, args.kv_dtype, args.gpus, args.mfu)
    others = []
    for c in (1024, 2048, 4096, 8192, 16384, 32768, 131072):
        if c <= max(context, model.max_seq_len) and c != context:
            try:
                others.append(
                    serve_plan(model, device, c, args.dtype, args.kv_dtype, args.gpus, args.mfu)
                )
            except LmscaleError:
                break  # not one sequence of this length fits
    if args.json:
        print(json.dumps(serve_json(plan, others), indent=2))
        return
    print(serve_text(plan, name, device.name, others))
    if context > model.max_seq_len:
        print(f"  note: {context} tokens is beyond the {model.max_seq_len} the model was built for")


def _calibrate(args: argparse.Namespace) -> None:
    from lmscale.plan.calibrate import calibrate
    from lmscale.plan.report import calibration_json, calibration_text

    result = calibrate(args.calibrate, args.gpu if args.gpu != "h100-80gb" else None)
    print(json.dumps(calibration_json(result), indent=2) if args.json else calibration_text(result))
