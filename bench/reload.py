"""What a hot reload and the quality probe cost the streams a server is running.

    python bench/reload.py [--streams 8] [--tokens 96] [--json]

Serves SmolLM2-135M (fp32, eager decode, so no compilation muddies the numbers) through the
real app on 127.0.0.1, with a LoRA adapter (rank 8, random weights) and a probe text, and runs
`--streams` concurrent greedy streams three times:
  - steady: nothing else happens;
  - reload: one `POST /admin/reload` to a second adapter while they run;
  - probe: the probe (1,024 tokens, scored in 256-token windows) falls due as they start.
Prints per phase the streams' tokens/s, inter-token p50/p99, lost requests, and for the reload
its load time; and the time to first token of a request sent while the probe is being scored.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "serve"))
from serving import running  # noqa: E402

from lmscale.checkpoint import load_pretrained  # noqa: E402
from lmscale.engine.config import EngineConfig  # noqa: E402
from lmscale.finetune.adapter import save_adapter  # noqa: E402
from lmscale.finetune.lora import LoRAConfig, adapter_state_dict, apply_lora_  # noqa: E402
from lmscale.serve.server import ServeOptions, build_app  # noqa: E402

MODEL = "smollm2-135m-instruct"
KEY = "bench"
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def random_adapter(out: Path, seed: int) -> Path:
    model, _ = load_pretrained(MODEL, dtype=torch.float32)
    config = LoRAConfig(rank=8, alpha=16.0)
    apply_lora_(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in adapter_state_dict(model).items():
            scale = 0.01 if "lora_B" in name else 0.05
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * scale)
    return save_adapter(model, out, config)


async def one_stream(client: httpx.AsyncClient, url: str, tokens: int) -> dict:
    body = {"model": "m", "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": tokens, "temperature": 0, "stream": True}  # fmt: skip
    sent, stamps, done = time.perf_counter(), [], False
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise SystemExit(
                f"the server answered {response.status_code}: {await response.aread()}"
            )
        async for line in response.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                choices = json.loads(line[6:])["choices"]
                if choices and choices[0]["delta"].get("content"):
                    stamps.append(time.perf_counter())
    return {"sent": sent, "stamps": stamps, "done": done and response.status_code == 200}


async def phase(url: str, streams: int, tokens: int, during=None) -> dict:
    async with httpx.AsyncClient(timeout=600) as client:
        started = time.perf_counter()
        tasks = [asyncio.create_task(one_stream(client, url, tokens)) for _ in range(streams)]
        extra = await during(client) if during else {}
        results = await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - started
    gaps = [b - a for r in results for a, b in zip(r["stamps"], r["stamps"][1:], strict=False)]
    n_tokens = sum(len(r["stamps"]) for r in results)
    return {
        "tokens_per_s": round(n_tokens / elapsed, 1),
        "itl_p50_ms": round(1000 * statistics.median(gaps), 1),
        "itl_p99_ms": round(1000 * statistics.quantiles(gaps, n=100)[98], 1),
        "lost": sum(not r["done"] for r in results),
    } | extra


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--tokens", type=int, default=96)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        first, second = random_adapter(tmp / "a1", 1), random_adapter(tmp / "a2", 2)
        probe = tmp / "probe.txt"
        probe.write_text(" ".join([PROMPT] * 64))
        options = ServeOptions(
            model=MODEL, adapter=str(first), probe=str(probe), probe_every_s=3600,
            admin_key=KEY, served_name="m", dtype="float32",
            engine=EngineConfig(max_num_seqs=32),
        )  # fmt: skip
        app, _ = build_app(options)
        with running(app) as url:
            admin = {"Authorization": f"Bearer {KEY}"}
            # The start-up probe and a first request, so every phase finds the engine warm.
            time.sleep(5)
            asyncio.run(phase(url, 1, 8))
            results = {"steady": asyncio.run(phase(url, args.streams, args.tokens))}

            async def reload(client):
                await asyncio.sleep(1.0)
                answer = await client.post(
                    url + "/admin/reload", json={"adapter": str(second)}, headers=admin
                )
                return {"reload_status": answer.status_code, "load_s": answer.json()["load_s"]}

            results["reload"] = asyncio.run(phase(url, args.streams, args.tokens, reload))
            switch = app.state.switch

            async def probe_due(client):
                # The probe falls due now: it runs in the first idle moment between requests.
                switch.current.monitor._next_probe = time.monotonic()
                return {}

            time.sleep(2)
            results["probe"] = asyncio.run(phase(url, args.streams, args.tokens, probe_due))

            async def first_token_while_probing(client):
                switch.current.monitor._next_probe = time.monotonic()
                await asyncio.sleep(0.05)  # the probe has begun its windows
                r = await one_stream(client, url, 4)
                return r["stamps"][0] - r["sent"]

            async def idle_first_token(client):
                r = await one_stream(client, url, 4)
                return r["stamps"][0] - r["sent"]

            async def ttft(fn, n=5):
                async with httpx.AsyncClient(timeout=600) as client:
                    values = []
                    for _ in range(n):
                        values.append(await fn(client))
                        await asyncio.sleep(1.5)  # the probe (if any) finishes
                    return round(1000 * statistics.median(values), 1)

            results["ttft_ms_idle"] = asyncio.run(ttft(idle_first_token))
            results["ttft_ms_while_probing"] = asyncio.run(ttft(first_token_while_probing))
    meta = {"model": MODEL, "streams": args.streams, "tokens": args.tokens,
            "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}  # fmt: skip
    if args.json:
        print(json.dumps(meta | results, indent=2))
        return
    print(f"{MODEL}, {args.streams} greedy streams x {args.tokens} tokens, "
          f"{meta['threads']} threads")  # fmt: skip
    print(f"{'phase':<8} {'tok/s':>7} {'ITL p50 ms':>11} {'ITL p99 ms':>11} {'lost':>5}")
    for name in ("steady", "reload", "probe"):
        r = results[name]
        print(f"{name:<8} {r['tokens_per_s']:>7} {r['itl_p50_ms']:>11} {r['itl_p99_ms']:>11} "
              f"{r['lost']:>5}")  # fmt: skip
    print(
        f"reload: load {results['reload']['load_s']} s; ratio of p99 ITL reload/steady "
        f"{results['reload']['itl_p99_ms'] / results['steady']['itl_p99_ms']:.2f}"
    )
    print(
        f"TTFT idle {results['ttft_ms_idle']} ms, while the probe runs "
        f"{results['ttft_ms_while_probing']} ms"
    )


if __name__ == "__main__":
    main()
