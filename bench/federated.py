"""Federated fine-tuning on Flower: what it buys against training alone, what it costs against
pooling the data, and the price of privacy.

On the bundled SmolLM2-135M-Instruct with LoRA, over the `shakespeare-genres` clients (one per
genre of the plays, each holding out one play), every model is scored on the same global
held-out set (the first --eval-tokens held-out tokens of every client):

1. federated: FedAvg and FedProx (`lmscale federate`, the Simulation Engine), R rounds of S local
   steps of B windows at each of the K clients;
2. centralised: the same starting adapter trained R*S steps on the pooled data with batches of
   K*B windows (the same steps, and the same windows seen in all, as the federation);
3. local-only: each client alone, R*S steps of B windows on its own data;
4. the price of privacy: FedAvg with client-level DP at epsilon 8 and 2 (delta 1e-5, the noise
   from the accountant), and with sample-level DP-SGD in each client (Opacus) at the same noise;
5. bytes per round: LoRA's shared tensors against the full weights (counted from the model).

The targets: the federated model beats every local-only model on the global held-out set, and
its perplexity is within 10% of the centralised one's without DP.

    python bench/federated.py [--rounds 5 --local-steps 5 --batch-size 4 --context 128]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from lmscale.federated.config import FederateConfig
from lmscale.federated.local import LocalConfig, evaluate_tokens, token_windows, train_round
from lmscale.federated.partition import client_partitions
from lmscale.federated.runtime import federate
from lmscale.federated.site import encode, global_heldout, starting_model
from lmscale.finetune.lora import LoRAConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--clients", type=int, default=6)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--local-steps", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-tokens", type=int, default=1024)
    p.add_argument("--mu", type=float, default=0.01)
    p.add_argument("--epsilons", default="8,2", help="client-level DP targets, comma-separated")
    p.add_argument("--dp-clip", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip", default="", help="phases to skip: fedprox,local,dp,dpsgd")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument(
        "--plot",
        type=Path,
        default=None,
        help="perplexity by round of each federated run beside the baselines (PNG)",
    )
    args = p.parse_args()
    skip = set(filter(None, args.skip.split(",")))

    local = LocalConfig(steps=args.local_steps, batch_size=args.batch_size, context=args.context,
                        lr=args.lr, eval_tokens=args.eval_tokens)  # fmt: skip
    base = FederateConfig(model=args.model, clients=args.clients, rounds=args.rounds,
                          local=local, lora=LoRAConfig(), threads=args.threads)  # fmt: skip
    torch.set_num_threads(2)
    model, tokenizer = starting_model(base)
    heldout = global_heldout(base, tokenizer)
    score = lambda m: evaluate_tokens(m, heldout, replace(local, eval_tokens=len(heldout)))  # noqa: E731
    results: dict[str, dict] = {"start": {"perplexity": score(model).perplexity}}
    print(f"# starting model: global held-out perplexity {results['start']['perplexity']:.2f}")
    work = Path(tempfile.mkdtemp(prefix="lmscale-fed-bench-"))

    def federated(name: str, config: FederateConfig) -> None:
        start = time.perf_counter()
        rounds = federate(config, work / name)
        last = rounds[-1]
        results[name] = {
            "perplexity": last["global"]["perplexity"], "epsilon": last["epsilon"],
            "delta": last["delta"], "seconds": time.perf_counter() - start,
            "bytes_per_round": statistics.median(r["bytes_sent"] + r["bytes_received"]
                                                 for r in rounds[1:]),
            "by_round": [r["global"]["perplexity"] for r in rounds],
        }  # fmt: skip
        print(f"# {name}: {_fmt(results[name])}", flush=True)

    federated("fedavg", base)
    if "fedprox" not in skip:
        federated("fedprox", replace(base, strategy="fedprox", mu=args.mu))

    steps = args.rounds * args.local_steps
    parts = client_partitions(base.data, base.clients)
    windows = [token_windows(encode(tokenizer, p.train_text), args.context) for p in parts]
    start = time.perf_counter()
    central = starting_model(base)[0]
    pooled = replace(local, steps=steps, batch_size=args.batch_size * args.clients)
    train_round(central, torch.cat(windows), pooled, seed=0)
    results["centralised"] = {"perplexity": score(central).perplexity,
                              "seconds": time.perf_counter() - start}  # fmt: skip
    print(f"# centralised: {_fmt(results['centralised'])}", flush=True)
    if "local" not in skip:
        for part, own in zip(parts, windows, strict=True):
            alone = starting_model(base)[0]
            train_round(alone, own, replace(local, steps=steps), seed=0)
            results[f"local:{part.name}"] = {"perplexity": score(alone).perplexity}
            print(f"# local-only {part.name}: {_fmt(results[f'local:{part.name}'])}", flush=True)

    if "dp" not in skip:
        for eps in [float(e) for e in args.epsilons.split(",") if e]:
            federated(f"fedavg-dp-eps{eps:g}", replace(
                base, dp_clip=args.dp_clip, dp_epsilon=eps, dp_delta=1e-5))  # fmt: skip
    if "dpsgd" not in skip:
        federated("fedavg-dpsgd", replace(base, dp_sgd=True, dp_noise=1.0, dp_clip=1.0,
                                          local=replace(local)))  # fmt: skip

    lora_bytes = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    full_bytes = sum(p.numel() * 4 for n, p in model.named_parameters() if "lora_" not in n)
    # Each round sends the tensors to every client twice (train, evaluate) and gets them back once.
    per_round = lambda b: 3 * args.clients * b  # noqa: E731
    results["bytes"] = {"lora_tensors": lora_bytes, "full_tensors": full_bytes,
                        "lora_per_round": per_round(lora_bytes),
                        "full_per_round": per_round(full_bytes)}  # fmt: skip
    report(results, args)
    if args.plot:
        plot(results, args.plot)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


def replot(json_path: Path, png: Path) -> None:
    """The plot again from a run's --json (python -c 'import federated; federated.replot(...)')."""
    plot(json.loads(json_path.read_text()), png)


def _fmt(r: dict) -> str:
    text = f"perplexity {r['perplexity']:.2f}"
    if r.get("epsilon") is not None:
        text += f" at epsilon {r['epsilon']:.2f}"
    if "seconds" in r:
        text += f", {r['seconds']:.0f} s"
    return text


def report(results: dict, args) -> None:
    fed, central = results["fedavg"]["perplexity"], results["centralised"]["perplexity"]
    print()
    print("| model | global held-out perplexity | x centralised |")
    print("|---|---:|---:|")
    for name, r in results.items():
        if "perplexity" in r:
            print(f"| {name} | {r['perplexity']:.2f} | {r['perplexity'] / central:.3f} |")
    locals_ = {k: v["perplexity"] for k, v in results.items() if k.startswith("local:")}
    if locals_:
        best = min(locals_.values())
        ok = fed < best
        print(f"\nfederated {fed:.2f} vs the best local-only {best:.2f}: "
              f"{'beats every one (target met)' if ok else 'target NOT met'}")  # fmt: skip
    ratio = fed / central
    print(f"federated / centralised perplexity: {ratio:.3f} "
          f"({'within 10%: target met' if ratio <= 1.10 else 'target NOT met'})")  # fmt: skip
    b = results["bytes"]
    print(f"tensor bytes per round ({args.clients} clients, train and evaluate): LoRA "
          f"{b['lora_per_round'] / 1e6:.1f} MB, full weights {b['full_per_round'] / 1e6:.1f} MB "
          f"({b['full_per_round'] / b['lora_per_round']:.0f}x); measured LoRA "
          f"{results['fedavg']['bytes_per_round'] / 1e6:.1f} MB")  # fmt: skip
    sys.stdout.flush()


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    start = results["start"]["perplexity"]
    for name, r in results.items():
        if "by_round" not in r:
            continue
        if max(r["by_round"]) > 2 * start:  # diverged (client-level DP with few clients)
            ax.plot([], [], label=f"{name}: off the chart ({r['perplexity']:.3g})")
        else:
            ax.plot(range(len(r["by_round"])), r["by_round"], marker="o", label=name)
    ax.axhline(results["centralised"]["perplexity"], color="black", linestyle="--",
               label="centralised (pooled data)")  # fmt: skip
    locals_ = [v["perplexity"] for k, v in results.items() if k.startswith("local:")]
    if locals_:
        ax.axhline(min(locals_), color="grey", linestyle=":", label="best local-only")
    ax.set_xlabel("round")
    ax.set_ylabel("global held-out perplexity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
