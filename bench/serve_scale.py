"""Scale-out serving on Ray Serve: what replicas cost and how routing and autoscaling behave.

Each phase spawns the real command, `lmscale serve --replicas/--autoscale ...` (which starts and
stops its own local Ray), waits until every replica has answered and its compiled decode graphs
are ready, then drives it with streaming chat clients (bench/serve_load.py's clients):

1. throughput and latency: 1 replica x 2 threads against 2 replicas x 1 thread, at 8 and 32
   clients (output tok/s, TTFT and ITL p50/p99);
2. a load spike on `--autoscale 1:2`: the seconds from the first request of a sustained burst
   to the first tokens the second replica generates (it is started, loads the model, answers);
3. routing: a multi-turn chat workload (conversations of several turns, each turn's prompt the
   whole conversation so far) on 2 replicas with `--routing prefix` and with `power-of-two`
   (Ray Serve's default): the engines' prefix-cache hit rate, in tokens, of each.

On a 2-core machine this measures overhead and behaviour, not speed-up: two replicas share the
same two cores that one replica's two threads would use.

    python bench/serve_scale.py [--model smollm2-135m-instruct] [--max-tokens 64] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import date

import httpx
from serve_load import (
    LONG_MESSAGE,
    PROMPTS,
    free_port,
    level_stats,
    machine,
    run_level,
    served_model,
    stream_messages,
)

MODEL = "smollm2-135m-instruct"


def main() -> None:
    args = parse_args()
    results = {"machine": machine(), "date": str(date.today()), "max_tokens": args.max_tokens}
    results["throughput"] = []
    for replicas, threads in ((1, 2), (2, 1)) if "throughput" in args.phases else ():
        flags = ["--replicas", str(replicas), "--threads-per-replica", str(threads)]
        with running(args, flags, warm=replicas) as (url, model):
            for clients in args.clients:
                level = asyncio.run(run_level(url, model, clients, 2 * clients, args))
                level["other_cpu"] = None
                stats = level_stats(level)
                results["throughput"].append({"replicas": replicas, "threads": threads, **stats})
    spike = ["--autoscale", "1:2", "--target-ongoing-requests", "4", "--upscale-delay-s", "1",
             "--threads-per-replica", "1"]  # fmt: skip
    if "spike" in args.phases:
        with running(args, spike, warm=1) as (url, model):
            results["spike_s"] = asyncio.run(measure_spike(url, model, args))
    results["routing"] = {}
    for routing in ("prefix", "power-of-two") if "routing" in args.phases else ():
        flags = ["--replicas", "2", "--threads-per-replica", "1", "--routing", routing]
        with running(args, flags, warm=2) as (url, model):
            results["routing"][routing] = asyncio.run(chat_workload(url, model, args))
    report(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=MODEL, help="what `lmscale serve --model` loads")
    p.add_argument("--clients", default="8,32", help="concurrency levels, comma-separated")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--conversations", type=int, default=8, help="chats in the routing workload")
    p.add_argument("--turns", type=int, default=4, help="turns of each chat")
    p.add_argument(
        "--think-s",
        type=float,
        default=2.0,
        help="a user's pause before the next turn: uniform in [0, 2 x this] s",
    )
    p.add_argument(
        "--phases", default="throughput,spike,routing", help="which phases to run, comma-separated"
    )
    p.add_argument("--eager", action="store_true", help="serve with `--eager`")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    args.phases = set(args.phases.split(","))
    return args


@contextlib.contextmanager
def running(args, flags: list[str], warm: int) -> Iterator[tuple[str, str]]:
    """A fresh `lmscale serve` on Ray Serve with `flags`; yields (URL, served model name) once
    `warm` replicas have answered and report their compiled graphs ready."""
    port = free_port()
    command = [sys.executable, "-m", "lmscale", "serve", "--model", args.model,
               "--port", str(port), *flags] + (["--eager"] if args.eager else [])  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            model = wait_until_serving(url, server, log)
            warm_up(url, model, warm, compiled=not args.eager)
            print(f"# {' '.join(flags)}: ready", flush=True)
            yield url, model
        finally:
            server.terminate()
            try:
                server.wait(timeout=120)
            except subprocess.TimeoutExpired:
                server.kill()


def wait_until_serving(url: str, server: subprocess.Popen, log) -> str:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if server.poll() is not None:
            log.seek(0)
            sys.exit(f"the server exited ({server.returncode}):\n{log.read().decode()[-4000:]}")
        with contextlib.suppress(httpx.TransportError, KeyError, ValueError):  # not up yet
            return served_model(url)
        time.sleep(0.5)
    sys.exit("the server did not start within 600 s")


def metrics(url: str) -> dict[str, float]:
    values = {}
    for line in httpx.get(f"{url}/metrics", timeout=60).text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            values[key] = float(value)
    return values


def replica_tokens(url: str) -> dict[str, float]:
    prefix = 'lmscale_replica_generation_tokens_total{replica="'
    return {k[len(prefix) : -2]: v for k, v in metrics(url).items() if k.startswith(prefix)}


def warm_up(url: str, model: str, replicas: int, compiled: bool) -> None:
    """Requests until `replicas` replicas have generated, then wait for their compiled graphs
    (each compiles after its first request, in the background)."""
    deadline = time.monotonic() + 900

    async def burst():
        async with httpx.AsyncClient(base_url=url, timeout=600) as http:
            messages = [[{"role": "user", "content": p}] for p in PROMPTS]
            await asyncio.gather(*(stream_messages(http, model, m, 8) for m in messages))

    while sum(v > 0 for v in replica_tokens(url).values()) < replicas:
        if time.monotonic() > deadline:
            sys.exit(f"fewer than {replicas} replicas answered within 900 s")
        asyncio.run(burst())
    while compiled and metrics(url).get("lmscale_decode_compiled") != 1:
        if time.monotonic() > deadline:
            sys.exit("the compiled decode graphs were not ready within 900 s")
        time.sleep(1)


async def measure_spike(url: str, model: str, args) -> float:
    """Seconds from the start of a 16-client burst to the second replica's first tokens."""
    first = set(replica_tokens(url))
    stop = asyncio.Event()
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:

        async def client(i: int):
            messages = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
            while not stop.is_set():
                await stream_messages(http, model, messages, args.max_tokens)

        start = time.perf_counter()
        tasks = [asyncio.create_task(client(i)) for i in range(16)]
        try:
            while True:
                new = {r: v for r, v in replica_tokens(url).items() if r not in first and v > 0}
                if new:
                    return time.perf_counter() - start
                if time.perf_counter() - start > 600:
                    sys.exit("no second replica answered within 600 s")
                await asyncio.sleep(0.25)
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)


async def chat_workload(url: str, model: str, args) -> dict:
    """`conversations` concurrent chats of `turns` turns each; the prefix-cache hits and
    queries (tokens) of the engines while it ran, and the TTFT of the later turns."""
    before = metrics(url)
    ttfts = []
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:

        async def chat(i: int):
            # Users pause between turns (seeded): without the pauses every client's next turn
            # leaves just as its last one ends, when that replica is the less loaded one, and
            # power-of-two choices keeps conversations in place by accident.
            pause = random.Random(i)
            opening = f"Conversation {i}. " + LONG_MESSAGE
            messages = [{"role": "user", "content": opening}]
            for turn in range(args.turns):
                if turn:
                    await asyncio.sleep(pause.uniform(0, 2 * args.think_s))
                answer = await stream_messages(http, model, messages, args.max_tokens)
                if turn:
                    ttfts.append(answer["ttft_s"])
                messages += [{"role": "assistant", "content": answer["text"]},
                             {"role": "user", "content": f"Go on, part {turn + 2}."}]  # fmt: skip

        await asyncio.gather(*(chat(i) for i in range(args.conversations)))
    await asyncio.sleep(1.5)  # the replicas' next reports
    after = metrics(url)
    hits, queries = (
        after[f"lmscale_prefix_cache_{n}_total"] - before.get(f"lmscale_prefix_cache_{n}_total", 0)
        for n in ("hits", "queries")
    )
    ttfts.sort()
    return {"hits": hits, "queries": queries, "hit_rate": hits / queries if queries else 0.0,
            "later_turn_ttft_p50_s": ttfts[len(ttfts) // 2]}  # fmt: skip


def report(results: dict) -> None:
    print(f"\n{results['machine']}, {results['date']}; max_tokens {results['max_tokens']}; "
          "every phase a fresh `lmscale serve` on its own local Ray")  # fmt: skip
    print("| replicas x threads | clients | requests | output tok/s | TTFT p50 / p99 s | "
          "ITL p50 / p99 ms |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|")
    for s in results["throughput"]:
        print(
            f"| {s['replicas']} x {s['threads']} | {s['clients']} | {s['requests']} | "
            f"{s['output_tokens_per_s']:.1f} | {s['ttft_p50_s']:.2f} / {s['ttft_p99_s']:.2f} | "
            f"{s['itl_p50_s'] * 1e3:.0f} / {s['itl_p99_s'] * 1e3:.0f} |"
        )
    by = {(s["replicas"], s["clients"]): s["output_tokens_per_s"] for s in results["throughput"]}
    for clients in sorted({c for _, c in by if (1, c) in by and (2, c) in by}):
        print(f"2 x 1 over 1 x 2 at {clients} clients: {by[2, clients] / by[1, clients]:.2f}x")
    if "spike_s" in results:
        print(f"load spike -> the second replica's first tokens: {results['spike_s']:.1f} s")
    for routing, r in results["routing"].items():
        print(
            f"routing {routing}: prefix-cache hit rate {r['hit_rate']:.1%} "
            f"({r['hits']:.0f} of {r['queries']:.0f} prompt tokens); later turns' TTFT p50 "
            f"{r['later_turn_ttft_p50_s']:.2f} s"
        )


if __name__ == "__main__":
    main()
