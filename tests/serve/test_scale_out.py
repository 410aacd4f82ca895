"""`lmscale serve --replicas/--autoscale` on a real local Ray cluster (started once for the module):
load balancing, prefix routing, autoscaling up and down, a replica killed with SIGKILL, and the
official `openai` client's conformance tests of test_openai_api.py run again through Ray Serve.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import signal
import threading
import time

import httpx
import psutil
import pytest
import torch
from conftest import MODEL
from serving import free_port

from lmscale.checkpoint import save_model_dir
from lmscale.config import to_dict
from lmscale.engine.config import EngineConfig
from lmscale.model import PRESETS, ModelConfig, Transformer
from lmscale.serve.scale_out import ScaleOptions, build_application
from lmscale.serve.server import ServeOptions
from lmscale.tokenizer import Tokenizer

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

pytestmark = pytest.mark.slow
NAME = "tiny"


@pytest.fixture(scope="module")
def ray_serve():
    """A local Ray instance with Serve's proxy on a free port; yields the proxy's URL."""
    ray.init(num_cpus=4, include_dashboard=False, logging_level="error", log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_dir(shakespeare_dir, tmp_path_factory):
    """A random tiny model with a long context (streams long enough to load the replicas)."""
    tokenizer = Tokenizer.load(shakespeare_dir / "tokenizer.json")
    torch.manual_seed(0)
    fields = PRESETS["tiny"] | {"vocab_size": tokenizer.vocab_size, "max_seq_len": 1024}
    model = Transformer(ModelConfig(**fields))
    settings = {"model": to_dict(model.config), "tokenizer": tokenizer.settings}
    out = tmp_path_factory.mktemp("models") / "tiny"
    return save_model_dir(out, model.state_dict(), settings, tokenizer.to_json())


@contextlib.contextmanager
def deployed(base: str, name: str, model: str, scale: ScaleOptions, served: str = NAME):
    """An lmscale application on the module's Ray Serve under /NAME; yields its URL."""
    options = ServeOptions(
        model=model, served_name=served, drain_s=10.0,
        engine=EngineConfig(compiled_decode=False, max_num_seqs=16),
    )  # fmt: skip
    serve.run(build_application(options, scale), name=name, route_prefix=f"/{name}")
    try:
        yield f"{base}/{name}"
    finally:
        serve.delete(name)


def metrics(url: str) -> dict[str, float]:
    values = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            values[key] = float(value)
    return values


def replica_tokens(url: str) -> dict[str, float]:
    """Generated tokens by replica id, from the per-replica metric."""
    prefix = 'lmscale_replica_generation_tokens_total{replica="'
    return {k[len(prefix) : -2]: v for k, v in metrics(url).items() if k.startswith(prefix)}


def wait_for(condition, timeout: float, what: str, every: float = 0.25):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)
    return value


def running_replicas(app: str) -> int:
    status = serve.status().applications[app].deployments["engine"]
    return status.replica_states.get("RUNNING", 0)


def complete(url: str, prompt: str, max_tokens: int = 16, **extra) -> httpx.Response:
    body = {"model": NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0} | extra
    return httpx.post(f"{url}/v1/completions", json=body, timeout=60)


def stream_completion(url: str, prompt: str, max_tokens: int) -> dict:
    """One streamed completion, classified: complete (a finish reason and [DONE]), refused
    before the first byte (its status and body), or failed mid-stream (an error event)."""
    body = {"model": NAME, "prompt": prompt, "max_tokens": max_tokens, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
        if response.status_code != 200:
            response.read()
            return {"status": response.status_code, "body": response.json(),
                    "retry_after": response.headers.get("retry-after")}  # fmt: skip
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    done = events[-1] == "[DONE]" if events else False
    chunks = [json.loads(e) for e in events if e != "[DONE]"]
    errors = [c["error"] for c in chunks if "error" in c]
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c.get("choices")]
    return {"status": 200, "done": done, "errors": errors, "finish": [f for f in finish if f]}


@pytest.fixture(scope="module")
def two_replicas(ray_serve, tiny_dir):
    """Two fixed replicas routed by power of two choices, deployed once for the two tests that
    use them (the fault test, which kills one, runs second); yields the application's URL.

    NOTE: they hold 2 of the module's 4 Ray CPUs until the module ends, which leaves room for
    each later application of 2 replicas (one at a time).
    """
    scale = ScaleOptions(replicas=2, threads=1, routing="power-of-two")
    with deployed(ray_serve, "fixed", str(tiny_dir), scale) as url:
        yield url


def test_two_fixed_replicas_both_receive_traffic(two_replicas):
    url = two_replicas
    wait_for(lambda: metrics(url).get("lmscale_replicas") == 2, 30, "two replicas reporting")
    prompts = [f"Question {i}: what is {i} + {i}?" for i in range(24)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda p: complete(url, p, 24), prompts))
    assert all(a.status_code == 200 for a in answers)
    assert all(a.json()["usage"]["completion_tokens"] == 24 for a in answers)
    tokens = wait_for(
        lambda: (t := replica_tokens(url)) and sum(t.values()) >= 24 * 24 and t, 10,
        "the replicas' reports of the tokens",
    )  # fmt: skip
    assert len(tokens) == 2 and min(tokens.values()) > 0, tokens
    totals = metrics(url)
    assert totals["lmscale_kv_blocks_total"] == 2 * min(
        v for k, v in totals.items() if k.startswith("lmscale_replica_kv_blocks_total")
    )  # summed over the replicas


def test_prefix_routing_keeps_a_conversation_on_one_replica(ray_serve, tiny_dir):
    scale = ScaleOptions(replicas=2, threads=1, routing="prefix")
    with deployed(ray_serve, "prefix", str(tiny_dir), scale) as url:
        wait_for(lambda: metrics(url).get("lmscale_replicas") == 2, 30, "two replicas reporting")
        before = replica_tokens(url)
        history = "A long shared opening of the conversation, the same in every turn. " * 4
        for turn in range(6):
            answer = complete(url, history, 8)
            assert answer.status_code == 200
            history += answer.json()["choices"][0]["text"] + f" And turn {turn}? "
        time.sleep(1.5)  # a report or two
        moved = {r: v - before.get(r, 0) for r, v in replica_tokens(url).items()}
        assert sorted(moved.values()) == [0, 6 * 8], moved  # all six turns on one replica
        stats = metrics(url)
        assert (
            stats["lmscale_prefix_cache_hits_total"]
            > 0.5 * stats["lmscale_prefix_cache_queries_total"]
        )  # turns 2..6 found the earlier turns cached


def test_a_burst_scales_up_and_idle_scales_back_down(ray_serve, tiny_dir):
    scale = ScaleOptions(
        autoscale=(1, 2), threads=1, target_ongoing_requests=2, upscale_delay_s=0.5,
        downscale_delay_s=2.0, metrics_interval_s=0.25,
    )  # fmt: skip
    with deployed(ray_serve, "auto", str(tiny_dir), scale) as url:
        assert running_replicas("auto") == 1
        stop, results = threading.Event(), []

        def client():
            while not stop.is_set():
                results.append(stream_completion(url, "Once upon a time", 300))

        threads = [threading.Thread(target=client) for _ in range(8)]
        for t in threads:
            t.start()
        try:
            wait_for(lambda: running_replicas("auto") >= 2, 60, "a second replica")
            wait_for(lambda: metrics(url).get("lmscale_replicas") == 2, 20, "its reports")
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=60)
        assert results and all(r["status"] == 200 and r["done"] for r in results)
        # One client keeps streaming through the scale-down: a replica stopping drains its
        # streams, so none of them is cut off.
        stop.clear()
        results.clear()
        light = threading.Thread(target=client)
        light.start()
        try:
            wait_for(lambda: running_replicas("auto") == 1, 60, "the scale-down to one replica")
            wait_for(lambda: len(engine_pids("auto")) == 1, 60, "the second replica to stop")
        finally:
            stop.set()
            light.join(timeout=60)
        assert results and all(r["status"] == 200 and r["done"] for r in results)


def engine_pids(app: str) -> list[int]:
    title = f"ServeReplica:{app}:engine"
    return [p.pid for p in psutil.process_iter(["cmdline"]) if title in " ".join(p.info["cmdline"] or [])]  # fmt: skip


def test_a_replica_killed_under_load_fails_only_its_requests_and_comes_back(two_replicas):
    url = two_replicas
    wait_for(lambda: len(engine_pids("fixed")) == 2, 30, "two replica processes")
    stop, results = threading.Event(), []

    def client(i: int):
        while not stop.is_set():
            results.append(stream_completion(url, f"Client {i} says", 200))

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(client, i) for i in range(8)]
        wait_for(lambda: len(results) >= 8, 60, "load on both replicas")
        victim = engine_pids("fixed")[0]
        os.kill(victim, signal.SIGKILL)
        time.sleep(3)
        stop.set()
        for f in futures:
            f.result(timeout=90)  # no client hangs
    complete_ = [r for r in results if r["status"] == 200 and r["done"]]
    failed = [r for r in results if r not in complete_]
    assert 0 < len(failed) < len(complete_)  # the victim's streams, and only those
    for r in complete_:
        assert not r["errors"] and r["finish"] in (["length"], ["stop"])  # none cut short
    for r in failed:
        if r["status"] == 200:  # failed mid-stream: an error event, and no [DONE]
            assert r["errors"] and not r["done"], r
        else:  # refused before the first byte: a retriable 503 in OpenAI's shape
            assert r["status"] == 503 and r["retry_after"] and r["body"]["error"]["message"]
    wait_for(lambda: running_replicas("fixed") == 2 and victim not in engine_pids("fixed")
             and len(engine_pids("fixed")) == 2, 90, "Ray to replace the replica")  # fmt: skip
    answers = [complete(url, f"After {i}") for i in range(6)]
    assert all(a.status_code == 200 for a in answers)


# The official client's conformance tests, through two replicas of the bundled model.
from test_openai_api import (  # noqa: E402
    test_chat_completion_plain_and_streaming_agree,  # noqa: F401
    test_completion_plain_and_streaming_agree_and_stop_at_length,  # noqa: F401
    test_logprobs_have_openais_shape,  # noqa: F401
    test_models_lists_the_served_model,  # noqa: F401
    test_stop_strings_seed_and_n,  # noqa: F401
)


@pytest.fixture(scope="module")
def client(ray_serve):
    import openai

    scale = ScaleOptions(replicas=2, threads=1)
    with deployed(ray_serve, "smol", MODEL, scale, served=MODEL) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
