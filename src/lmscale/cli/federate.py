"""`lmscale federate`: adapt one model across clients whose data never leaves them (Flower)."""

from __future__ import annotations

import argparse
import json

from lmscale.errors import LmscaleError


def federate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="smollm2-135m-instruct",
        help="the starting model (default: the bundled SmolLM2-135M-Instruct)",
    )
    p.add_argument(
        "--data",
        default="shakespeare-genres",
        help="shakespeare-genres (one client per genre of the bundled plays) or a "
        "folder with one sub-folder, .jsonl or text file per client",
    )
    p.add_argument(
        "--clients",
        type=int,
        default=None,
        help="clients: the first N of --data (default: all of them)",
    )
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument(
        "--fraction",
        type=float,
        default=1.0,
        help="fraction of the clients asked to train each round (default 1)",
    )
    p.add_argument("--local-steps", type=int, default=20, help="optimizer steps per round")
    p.add_argument("--batch-size", type=int, default=4, help="windows per local step")
    p.add_argument("--context", type=int, default=256, help="tokens per window")
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="local learning rate (default 2e-4 for lora, 1e-3 for full)",
    )
    p.add_argument("--strategy", default="fedavg", help="fedavg (default) or fedprox")
    p.add_argument("--mu", type=float, default=0.01, help="FedProx's proximal weight")
    p.add_argument(
        "--adapter",
        default="lora",
        help="lora (default: clients send LoRA adapters) or full (every weight)",
    )
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha")
    p.add_argument("--targets", default="q,k,v,o", help="LoRA target layers")
    dp = p.add_argument_group("differential privacy (client-level unless --dp-sgd)")
    dp.add_argument("--dp-clip", type=float, default=None, help="bound on an update's L2 norm")
    dp.add_argument("--dp-noise", type=float, default=None, help="noise multiplier")
    dp.add_argument(
        "--dp-epsilon",
        type=float,
        default=None,
        help="the epsilon to reach after --rounds (sets the noise)",
    )
    dp.add_argument(
        "--dp-delta",
        type=float,
        default=None,
        help="delta of the guarantee (default: below 1/the protected units)",
    )
    dp.add_argument(
        "--dp-sgd",
        action="store_true",
        help="sample-level DP-SGD in each client (Opacus) with --dp-noise/--dp-clip",
    )
    p.add_argument(
        "--eval-tokens",
        type=int,
        default=4096,
        help="held-out tokens scored per client and evaluation",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads per simulated client")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--deployment",
        action="store_true",
        help="Flower's Deployment Engine: a SuperLink and one SuperNode process "
        "per client on 127.0.0.1, instead of the Simulation Engine",
    )
    p.add_argument("--out", required=True, help="the run folder (rounds.jsonl, plot, model)")
    p.add_argument("--verbose", action="store_true", help="show Flower's own log as well")
    p.add_argument("--json", action="store_true", help="print the final round as JSON")


def federate(args: argparse.Namespace, _: list[str]) -> None:
    try:
        import flwr  # noqa: F401
    except ImportError:
        raise LmscaleError(
            "lmscale federate needs Flower and Opacus: pip install 'lmscale[federated]'"
        ) from None
    from lmscale.federated.config import FederateConfig
    from lmscale.federated.local import LocalConfig
    from lmscale.federated.partition import client_partitions
    from lmscale.federated.runtime import federate as run
    from lmscale.finetune.lora import LoRAConfig

    clients = args.clients if args.clients is not None else len(client_partitions(args.data))
    lr = args.lr if args.lr is not None else (2e-4 if args.adapter == "lora" else 1e-3)
    local = LocalConfig(
        steps=args.local_steps, batch_size=args.batch_size, context=args.context, lr=lr,
        eval_tokens=args.eval_tokens,
    )  # fmt: skip
    config = FederateConfig(
        model=args.model, data=args.data, clients=clients, rounds=args.rounds,
        fraction=args.fraction, strategy=args.strategy, mu=args.mu, adapter=args.adapter,
        lora=LoRAConfig(rank=args.rank, alpha=args.alpha, targets=args.targets), local=local,
        dp_clip=args.dp_clip, dp_noise=args.dp_noise, dp_epsilon=args.dp_epsilon,
        dp_delta=args.dp_delta, dp_sgd=args.dp_sgd, seed=args.seed, threads=args.threads,
    )  # fmt: skip
    rounds = run(config, args.out, deployment=args.deployment, verbose=args.verbose)
    last = rounds[-1]
    if args.json:
        print(json.dumps(last))
    else:
        g, first = last["global"], rounds[0]["global"]
        line = (f"{args.out}: global held-out perplexity {first['perplexity']:.2f} -> "
                f"{g['perplexity']:.2f} after {config.rounds} rounds")  # fmt: skip
        if last.get("epsilon") is not None:
            line += f" at epsilon {last['epsilon']:.2f} (delta {last['delta']:.1e})"
        print(line)
