"""Serving under load: `lmscale serve` with 1, 8 and 32 concurrent streaming clients, beside
Hugging Face transformers `generate` serving the same requests one at a time, in the same run.

1. Cold start: `python -m lmscale serve --model M --port P` is spawned, and a 1-token completion
   is retried until one is answered; the time from the spawn to that answer is the cold start.
   (With `--url`, an already running server is used and there is no cold start.)
2. One unmeasured chat request warms the server; then, per level of `--clients`, that many clients
   send streaming chat completions back to back (`stream: true`, `include_usage`), greedy
   (temperature 0), `--max-tokens` each, the prompts taken in turn from a fixed list of 8
   questions, until the level's `max(--min-requests, --requests x clients)` requests are done.
   Per request: time to first token (request sent -> first content delta), inter-token latencies
   (between content deltas), output tokens (the final usage chunk). Per level: requests/s and
   output tokens/s over the level's wall time, TTFT and ITL p50/p99.
3. The server is stopped, and transformers (`LlamaForCausalLM` loaded from the folder lmscale
   exports from the same weights, in `--dtype` as the server, `--threads` torch threads) runs the
   1-client level's requests one at a time: the same chat-templated prompt ids, `do_sample=False`,
   the same token limit, stopping at the same end-of-turn tokens; a streamer timestamps each token.
   The server keeps its defaults (torch's threads: one per core).
4. lmscale's engine in this process (`LLMEngine`, the same compiled step, no HTTP) runs the same
   requests one at a time: the rate one client of the server should come within 0.9x of.

"other CPU" is the share of the machine's CPU time that processes other than the benchmark and
its server used during each phase: on a shared machine, a phase with a high share ran slower.

The server decodes through its compiled step by default and compiles it in the background while
it already answers: after the cold start the benchmark waits until `/metrics` says the graphs are
ready (`lmscale_decode_compiled 1`) and reports that time too (`--eager` serves op by op).
After the levels, a chat-turn phase: one conversation of ~1,000 prompt tokens (a long user
message), then its second turn (history + reply + a short question); the TTFT of each, the second
finding the first's blocks in the prefix cache.

The issue's CPU targets are printed beside the numbers: output tokens/s at 32 clients >= 10x the
1-client rate, p99 TTFT < 1.5 s and p99 ITL < 300 ms at 32 clients, one client >= transformers
and >= 0.9x the in-process engine,
and the second chat turn's TTFT <= 0.3x the first's.

    python bench/serve_load.py --clients 1,8,32 --requests 2 --max-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import httpx

MODEL = "smollm2-135m-instruct"
PROMPTS = (
    "Why is the sky blue?",
    "Explain how a bicycle stays upright.",
    "Write a short story about a lighthouse keeper.",
    "What were the main causes of the French Revolution?",
    "Describe the water cycle to a ten-year-old.",
    "Give three tips for learning a new language.",
    "How do vaccines train the immune system?",
    "Write a poem about autumn leaves.",
)
TARGET_SCALING, TARGET_TTFT_S, TARGET_ITL_S, TARGET_TURN, TARGET_OWN = 10.0, 1.5, 0.3, 0.3, 0.9
LONG_MESSAGE = " ".join(PROMPTS) + " Answer each of these questions in turn, carefully. "


def main() -> None:
    args = parse_args()
    load_before = os.getloadavg()
    with running_server(args) as (url, cold_start, server_pid):
        if args.cold_start_only:
            print(f"cold start (spawn of `lmscale serve` -> first answered request): "
                  f"{cold_start:.2f} s")  # fmt: skip
            return
        model = served_model(url)
        compiled_s = None if args.url else wait_until_compiled(url, cold_start)
        asyncio.run(run_level(url, model, 1, 1, args))  # warm-up, not reported
        levels = []
        for clients in args.clients:
            meter = OtherCpu(server_pid)
            levels.append(
                asyncio.run(run_level(url, model, clients, n_requests(clients, args), args))
            )
            levels[-1]["other_cpu"] = meter.share()
        turns = asyncio.run(chat_turns(url, model, args))
    meter = OtherCpu(None)
    baseline = run_transformers(levels[0]["requests"], args)
    baseline["other_cpu"] = meter.share()
    meter = OtherCpu(None)
    engine = run_in_process(levels[0]["requests"], args)
    engine["other_cpu"] = meter.share()
    results = summarize(levels, baseline, cold_start, load_before, args)
    results["in_process"] = level_stats(engine)
    results.update(compiled_s=compiled_s, chat_turns=turns)
    results["targets"]["turn_ratio"] = turns["second_ttft_s"] / turns["first_ttft_s"]
    report(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=MODEL, help="what `lmscale serve --model` loads")
    p.add_argument("--clients", default="1,8,32", help="concurrency levels, comma-separated")
    p.add_argument("--requests", type=int, default=2, help="requests per client per level")
    p.add_argument("--min-requests", type=int, default=8, help="at least this many per level")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="torch threads of transformers")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="weights of both sides (--url: of transformers)",
    )
    p.add_argument("--cold-start-only", action="store_true", help="stop after the cold start")
    p.add_argument("--eager", action="store_true", help="serve with `lmscale serve --eager`")
    p.add_argument("--url", help="benchmark this running server (e.g. http://127.0.0.1:8000)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    return args


def n_requests(clients: int, args: argparse.Namespace) -> int:
    return max(args.min_requests, args.requests * clients)


# --- the server ----------------------------------------------------------------------------------


@contextlib.contextmanager
def running_server(args: argparse.Namespace) -> Iterator[tuple[str, float | None, int | None]]:
    """(base URL, cold start seconds, process id): `args.url` as is (no cold start, no process
    of ours), or a fresh `lmscale serve` process."""
    if args.url:
        yield args.url.rstrip("/"), None, None
        return
    port = free_port()
    command = [sys.executable, "-m", "lmscale", "serve", "--model", args.model, "--port", str(port),
               "--dtype", args.dtype] + (["--eager"] if args.eager else [])  # fmt: skip
    with tempfile.TemporaryFile() as log:
        start = time.perf_counter()
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            cold_start = wait_until_answered(url, args.model, server, log, start)
            yield url, cold_start, server.pid
        finally:
            server.terminate()
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_answered(url: str, model: str, server: subprocess.Popen, log, start: float) -> float:
    """Seconds from `start` to the first answered 1-token completion."""
    body = {"model": os.path.basename(os.path.normpath(model)), "prompt": "Hi", "max_tokens": 1}
    while time.perf_counter() - start < 600:
        if server.poll() is not None:
            log.seek(0)
            sys.exit(f"the server exited ({server.returncode}):\n{log.read().decode()}")
        try:
            response = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        except httpx.TransportError:  # not listening yet
            time.sleep(0.05)
            continue
        if response.status_code == 400:  # --model is not the bundled name: ask for the real one
            body["model"] = served_model(url)
            continue
        response.raise_for_status()
        return time.perf_counter() - start
    sys.exit("the server did not answer within 600 s")


def wait_until_compiled(url: str, since: float) -> float:
    """Seconds from the spawn until `/metrics` reports the compiled decode graphs ready."""
    start = time.perf_counter() - since
    while time.perf_counter() - start < 900:
        text = httpx.get(f"{url}/metrics", timeout=60).text
        if "lmscale_decode_compiled 1.0" in text or "lmscale_decode_compiled" not in text:
            return time.perf_counter() - start
        time.sleep(0.5)
    sys.exit("the compiled decode step was not ready within 900 s")


async def chat_turns(url: str, model: str, args) -> dict:
    """TTFT of a ~1,000-token chat's first turn and of its second (a prefix-cache hit)."""
    messages = [{"role": "user", "content": LONG_MESSAGE * 12}]
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        first = await stream_messages(http, model, messages, args.max_tokens)
        messages += [{"role": "assistant", "content": first["text"]},
                     {"role": "user", "content": "Now say it in one sentence."}]  # fmt: skip
        second = await stream_messages(http, model, messages, args.max_tokens)
    return {
        "first_prompt_tokens": first["prompt_tokens"], "first_ttft_s": first["ttft_s"],
        "second_prompt_tokens": second["prompt_tokens"], "second_ttft_s": second["ttft_s"],
    }  # fmt: skip


def served_model(url: str) -> str:
    return httpx.get(f"{url}/v1/models", timeout=60).json()["data"][0]["id"]


# --- the clients ---------------------------------------------------------------------------------


async def run_level(url: str, model: str, clients: int, total: int, args) -> dict:
    """`clients` concurrent clients sharing `total` requests, each sent when its client is free."""
    jobs = iter(range(total))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:

        async def client() -> list[dict]:
            return [await stream_chat(http, model, i, args.max_tokens) for i in jobs]

        start = time.perf_counter()
        done = await asyncio.gather(*(client() for _ in range(clients)))
        wall = time.perf_counter() - start
    requests = sorted((r for rs in done for r in rs), key=lambda r: r["index"])
    return {"clients": clients, "wall_s": wall, "requests": requests}


async def stream_chat(http: httpx.AsyncClient, model: str, index: int, max_tokens: int) -> dict:
    """Send request `index` (prompt `index % 8`) and time its server-sent events."""
    messages = [{"role": "user", "content": PROMPTS[index % len(PROMPTS)]}]
    return {"index": index, **await stream_messages(http, model, messages, max_tokens)}


async def stream_messages(http: httpx.AsyncClient, model: str, messages, max_tokens: int) -> dict:
    """One streaming greedy chat completion of `messages`, its server-sent events timed."""
    index = len(messages)
    body = {
        "model": model, "messages": messages,
        "stream": True, "stream_options": {"include_usage": True}, "temperature": 0,
        "max_tokens": max_tokens,
    }  # fmt: skip
    stamps, pieces, usage = [], [], None
    sent = time.perf_counter()
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            raise RuntimeError(f"request {index}: {response.status_code} {response.text}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            for choice in chunk["choices"]:
                if piece := choice["delta"].get("content"):
                    stamps.append(time.perf_counter())
                    pieces.append(piece)
    return {
        "ttft_s": stamps[0] - sent, "itl_s": gaps(stamps),
        "output_tokens": usage["completion_tokens"], "prompt_tokens": usage["prompt_tokens"],
        "text": "".join(pieces),
    }  # fmt: skip


def gaps(stamps: list[float]) -> list[float]:
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


# --- the baseline --------------------------------------------------------------------------------


def run_transformers(requests: list[dict], args: argparse.Namespace) -> dict:
    """transformers `generate` on the same requests, one at a time (imports torch only now, so
    that the server's cold start competes with nothing)."""
    import torch
    from transformers import LlamaForCausalLM

    from lmscale.checkpoint import export_hf, load_pretrained

    torch.set_num_threads(args.threads)
    model, tokenizer = load_pretrained(args.model)
    with tempfile.TemporaryDirectory() as folder:
        export_hf(model, None, folder)
        hf = LlamaForCausalLM.from_pretrained(folder, dtype=getattr(torch, args.dtype)).eval()
    del model
    stop_ids = tokenizer.end_of_turn_ids

    def prompt_ids(index: int) -> list[int]:  # as the server renders a chat request
        messages = [{"role": "user", "content": PROMPTS[index % len(PROMPTS)]}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return tokenizer.encode(text, add_bos=False)

    def run(index: int) -> dict:
        ids = torch.tensor([prompt_ids(index)])
        clock = _Clock()
        sent = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=False,
                max_new_tokens=args.max_tokens, eos_token_id=stop_ids, pad_token_id=stop_ids[0],
                streamer=clock,
            )  # fmt: skip
        new = out[0, ids.shape[1] :].tolist()
        content = [t for t in new if t not in stop_ids]
        return {
            "index": index, "ttft_s": clock.stamps[1] - sent,
            "itl_s": gaps(clock.stamps[1 : 1 + len(content)]), "output_tokens": len(new),
            "prompt_tokens": ids.shape[1], "text": tokenizer.decode(content),
        }  # fmt: skip

    run(0)  # warm-up, not reported
    start = time.perf_counter()
    done = [run(r["index"]) for r in requests]
    wall = time.perf_counter() - start
    versions = {"torch": torch.__version__, "transformers": _version("transformers")}
    return {"clients": 1, "wall_s": wall, "requests": done, "versions": versions}


def run_in_process(requests: list[dict], args: argparse.Namespace) -> dict:
    """lmscale's own engine in this process (no HTTP, no event loop), on the same requests one at
    a time, decoding through the same compiled step as the server (unless `--eager`): the
    in-process batch-1 rate that one client of the server is measured against."""
    import torch

    from lmscale.checkpoint import load_pretrained
    from lmscale.engine import EngineConfig, LLMEngine
    from lmscale.engine.request import GenerationRequest, RequestParams

    torch.set_num_threads(args.threads)
    model, tokenizer = load_pretrained(args.model)
    model = model.to(getattr(torch, args.dtype))
    engine = LLMEngine(model, tokenizer, EngineConfig(compiled_decode=not args.eager))
    engine.warm_up()

    def run(index: int) -> dict:
        messages = [{"role": "user", "content": PROMPTS[index % len(PROMPTS)]}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        ids = tokenizer.encode(text, add_bos=False)
        params = RequestParams(temperature=0, max_new_tokens=args.max_tokens)
        sent, stamps, pieces, out = time.perf_counter(), [], [], None
        engine.add_request(GenerationRequest(ids, params, f"in-process-{index}-{sent}"))
        while engine.has_unfinished():
            for out in engine.step():
                if out.text:
                    stamps.append(time.perf_counter())
                    pieces.append(out.text)
        return {
            "index": index, "ttft_s": stamps[0] - sent, "itl_s": gaps(stamps),
            "output_tokens": out.completion_tokens, "prompt_tokens": len(ids),
            "text": "".join(pieces),
        }  # fmt: skip

    run(0)  # warm-up, not reported
    start = time.perf_counter()
    done = [run(r["index"]) for r in requests]
    return {"clients": 1, "wall_s": time.perf_counter() - start, "requests": done}


class _Clock:
    """A transformers streamer that only notes when each `put` comes: first the prompt, then
    each new token."""

    def __init__(self):
        self.stamps: list[float] = []

    def put(self, value) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


# --- contention ---------------------------------------------------------------------------------


class OtherCpu:
    """How busy other processes kept this machine's CPUs while a phase ran (Linux `/proc`).

    The benchmark may share its machine; this counts the CPU time of everything but this process
    and the server since construction, as a share of all CPUs over the wall time. With `--url`
    the server is not ours, so its work counts as other. None where `/proc` is missing.
    """

    def __init__(self, server_pid: int | None):
        self.server_pid = server_pid
        self.start, self.started = self._read(), time.perf_counter()

    def share(self) -> float | None:
        end, wall = self._read(), time.perf_counter() - self.started
        if end is None or self.start is None:
            return None
        busy, ours = (b - a for a, b in zip(self.start, end, strict=True))
        return max(0.0, busy - ours) / (wall * os.cpu_count())

    def _read(self) -> tuple[float, float] | None:
        """(busy CPU seconds of the machine, CPU seconds of this process and the server)."""
        tick = os.sysconf("SC_CLK_TCK")
        try:
            with open("/proc/stat") as f:
                user, nice, system, _, _, irq, softirq = map(int, f.readline().split()[1:8])
            ours = sum(os.times()[:2])
            if self.server_pid is not None:
                with open(f"/proc/{self.server_pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()  # after the command's name
                ours += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        except (OSError, ValueError):
            return None
        return (user + nice + system + irq + softirq) / tick, ours


# --- results -------------------------------------------------------------------------------------


def level_stats(level: dict) -> dict:
    requests, wall = level["requests"], level["wall_s"]
    ttft = [r["ttft_s"] for r in requests]
    itl = [gap for r in requests for gap in r["itl_s"]]
    tokens = sum(r["output_tokens"] for r in requests)
    return {
        "clients": level["clients"], "requests": len(requests), "wall_s": wall,
        "requests_per_s": len(requests) / wall, "output_tokens": tokens,
        "output_tokens_per_s": tokens / wall,
        "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
        "itl_p50_s": percentile(itl, 50), "itl_p99_s": percentile(itl, 99),
        "other_cpu": level["other_cpu"],
    }  # fmt: skip


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between the two nearest ranks (numpy's default)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(levels, baseline, cold_start, load_before, args) -> dict:
    stats = [level_stats(level) for level in levels]
    hf = level_stats(baseline)
    for s in stats:
        s["vs_transformers"] = s["output_tokens_per_s"] / hf["output_tokens_per_s"]
    by_clients = {s["clients"]: s for s in stats}
    return {
        "machine": machine(), "versions": baseline["versions"], "date": time.strftime("%Y-%m-%d"),
        "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "max_tokens": args.max_tokens, "dtype": args.dtype, "cold_start_s": cold_start,
        "lmscale": stats, "transformers": hf,
        "same_text_as_transformers": same_texts(levels[0]["requests"], baseline["requests"]),
        "same_text_as_1_client": [same_texts(levels[0]["requests"], lv["requests"]) for lv in levels],
        "targets": targets(by_clients),
    }  # fmt: skip


def same_texts(reference: list[dict], other: list[dict]) -> list[int]:
    """[how many of `other`'s greedy texts equal the reference's for the same prompt, of how many]."""
    texts = {r["index"] % len(PROMPTS): r["text"] for r in reference}
    matched = [r for r in other if r["index"] % len(PROMPTS) in texts]
    return [sum(texts[r["index"] % len(PROMPTS)] == r["text"] for r in matched), len(matched)]


def targets(by_clients: dict[int, dict]) -> dict:
    scaling = ttft = itl = None
    if 1 in by_clients and 32 in by_clients:
        scaling = by_clients[32]["output_tokens_per_s"] / by_clients[1]["output_tokens_per_s"]
    if 32 in by_clients:
        ttft, itl = by_clients[32]["ttft_p99_s"], by_clients[32]["itl_p99_s"]
    return {
        "scaling_32_over_1": scaling,
        "scaling_met": None if scaling is None else scaling >= TARGET_SCALING,
        "ttft_p99_32_clients_s": ttft, "ttft_met": None if ttft is None else ttft < TARGET_TTFT_S,
        "itl_p99_32_clients_s": itl, "itl_met": None if itl is None else itl < TARGET_ITL_S,
    }  # fmt: skip


def machine() -> str:
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
        name = next(
            line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name")
        )
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"{name}, {os.cpu_count()} cores"


def report(results: dict) -> None:
    load = results["load_average"]
    print(f"\n{results['machine']}, torch {results['versions']['torch']}, transformers "
          f"{results['versions']['transformers']}, {results['date']}; {results['dtype']}, max_tokens "
          f"{results['max_tokens']}; load average (1 min) {load['before'][0]:.1f} before, "
          f"{load['after'][0]:.1f} after")  # fmt: skip
    if results["cold_start_s"] is not None:
        print(f"cold start (spawn of `lmscale serve` -> first answered request): "
              f"{results['cold_start_s']:.1f} s")  # fmt: skip
    print("| server | clients | requests | output tokens | wall s | requests/s | output tok/s "
          "| vs transformers | TTFT p50 / p99 s | ITL p50 / p99 ms | other CPU |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    hf = results["transformers"]
    for s in results["lmscale"]:
        print(_row("lmscale", s, f"{s['vs_transformers']:.2f}x"))
    print(_row("transformers, one at a time", hf, "1.00x"))
    own = results["in_process"]
    own_ratio = own["output_tokens_per_s"] / hf["output_tokens_per_s"]
    print(_row("lmscale engine in-process, one at a time", own, f"{own_ratio:.2f}x"))
    same = results["same_text_as_transformers"]
    print(f"greedy texts equal to transformers' (1 client): {same[0]}/{same[1]}; equal to the "
          "1-client texts, per level: "
          + ", ".join(f"{a}/{b}" for a, b in results["same_text_as_1_client"]))  # fmt: skip
    t = results["targets"]
    if t["scaling_32_over_1"] is not None:
        print(f"target: output tok/s at 32 clients >= {TARGET_SCALING:.0f}x 1 client: "
              f"{t['scaling_32_over_1']:.2f}x -> {_verdict(t['scaling_met'])}")  # fmt: skip
    if t["ttft_p99_32_clients_s"] is not None:
        print(
            f"target: p99 TTFT at 32 clients < {TARGET_TTFT_S} s: "
            f"{t['ttft_p99_32_clients_s']:.2f} s -> {_verdict(t['ttft_met'])}"
        )
        print(f"target: p99 ITL at 32 clients < {TARGET_ITL_S * 1e3:.0f} ms: "
              f"{t['itl_p99_32_clients_s'] * 1e3:.0f} ms -> {_verdict(t['itl_met'])}")  # fmt: skip
    one = results["lmscale"][0]
    if one["clients"] == 1:
        print(
            f"target: one client >= transformers: {one['vs_transformers']:.2f}x -> "
            f"{_verdict(one['vs_transformers'] >= 1)}"
        )
        over_own = one["output_tokens_per_s"] / own["output_tokens_per_s"]
        print(f"target: one client >= {TARGET_OWN}x the in-process engine: {over_own:.2f}x -> "
              f"{_verdict(over_own >= TARGET_OWN)}")  # fmt: skip
    turns = results["chat_turns"]
    print(
        f"chat turns: first {turns['first_prompt_tokens']} prompt tokens, TTFT "
        f"{turns['first_ttft_s']:.2f} s; second {turns['second_prompt_tokens']} tokens, TTFT "
        f"{turns['second_ttft_s']:.2f} s; ratio {t['turn_ratio']:.2f} (target <= {TARGET_TURN})"
        f" -> {_verdict(t['turn_ratio'] <= TARGET_TURN)}"
    )
    if results["compiled_s"] is not None:
        print(f"compiled decode graphs ready {results['compiled_s']:.1f} s after the spawn")


def _row(name: str, s: dict, ratio: str) -> str:
    other = "n/a" if s["other_cpu"] is None else f"{s['other_cpu']:.0%}"
    return (
        f"| {name} | {s['clients']} | {s['requests']} | {s['output_tokens']} | {s['wall_s']:.1f} "
        f"| {s['requests_per_s']:.2f} | {s['output_tokens_per_s']:.1f} | {ratio} "
        f"| {s['ttft_p50_s']:.2f} / {s['ttft_p99_s']:.2f} "
        f"| {s['itl_p50_s'] * 1e3:.0f} / {s['itl_p99_s'] * 1e3:.0f} | {other} |"
    )


def _verdict(met: bool) -> str:
    return "met" if met else "NOT met"


if __name__ == "__main__":
    main()
