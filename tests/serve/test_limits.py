"""Bad input, limits, auth, disconnects and shutdown, against real servers of a tiny model."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import NAME, serve
from serving import free_port, sse_events

from lmscale.checkpoint import save_model_dir
from lmscale.config import to_dict

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def url(tiny_server):
    return tiny_server


def post(url, path, body, **kwargs):
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    headers = {"Content-Type": "application/json"} | kwargs.pop("headers", {})
    return httpx.post(url + path, content=content, headers=headers, timeout=60, **kwargs)


CHAT = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
COMPLETION = {"model": NAME, "prompt": "ROMEO:", "max_tokens": 4}


@pytest.mark.parametrize(
    "path, body, needle",
    [
        ("/v1/completions", "{not json", "not valid JSON"),
        ("/v1/completions", COMPLETION | {"temperature": "hot"}, "temperature"),
        ("/v1/completions", COMPLETION | {"model": "gpt-9"}, "does not exist"),
        ("/v1/completions", COMPLETION | {"max_tokens": 100_000}, "maximum context length"),
        ("/v1/completions", COMPLETION | {"top_p": 1.5}, "top_p"),
        ("/v1/completions", COMPLETION | {"temperature": -1}, "temperature"),
        ("/v1/completions", COMPLETION | {"n": 0}, "n"),
        ("/v1/completions", COMPLETION | {"prompt": [1, 10**9]}, "outside the vocabulary"),
        ("/v1/completions", COMPLETION | {"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ("/v1/completions", {"prompt": "x"}, "model"),
        ("/v1/chat/completions", CHAT | {"messages": []}, "messages"),
        ("/v1/chat/completions", CHAT | {"messages": [{"role": "robot", "content": "x"}]}, "role"),
        ("/v1/chat/completions", CHAT | {"top_logprobs": 50, "logprobs": True}, "top_logprobs"),
        ("/v1/chat/completions", [1, 2], "valid dictionary"),
    ],
)
def test_bad_input_is_a_400_with_an_openai_error(url, path, body, needle):
    response = post(url, path, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert needle in error["message"] and error["type"] == "invalid_request_error"


def test_unknown_path_and_method_are_openai_errors(url):
    assert httpx.get(url + "/v1/nothing").json()["error"]["type"] == "not_found_error"
    assert httpx.get(url + "/v1/completions").status_code == 405


def test_request_size_limit(url):
    response = post(url, "/v1/completions", COMPLETION | {"prompt": "x" * (2 << 20)})
    assert response.status_code == 413 and "exceeds" in response.json()["error"]["message"]


def test_api_key(tiny):
    server, engine = serve(tiny, api_key="s3cret")
    with server as base:
        assert post(base, "/v1/completions", COMPLETION).status_code == 401
        wrong = post(base, "/v1/completions", COMPLETION, headers={"Authorization": "Bearer no"})
        assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
        ok = post(base, "/v1/completions", COMPLETION, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert httpx.get(base + "/health").status_code == 200  # health needs no key
    engine.close()


def test_full_queue_is_a_429_with_retry_after(tiny):
    server, engine = serve(tiny, max_num_seqs=1, max_waiting=0)
    with server as base, httpx.Client(timeout=60) as client:
        long = COMPLETION | {"max_tokens": 100, "stream": True}
        with client.stream("POST", base + "/v1/completions", json=long) as first:
            next(first.iter_lines())  # running: the one slot is taken
            second = post(base, "/v1/completions", COMPLETION)
            assert second.status_code == 429 and second.headers["retry-after"] == "1"
            assert second.json()["error"]["type"] == "rate_limit_error"
    engine.close()


def metric(base: str, name: str) -> float:
    for line in httpx.get(base + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


def test_client_disconnect_frees_the_slot_and_blocks(url):
    with httpx.Client(timeout=60) as client:
        body = COMPLETION | {"max_tokens": 120, "stream": True, "temperature": 0.9}
        with client.stream("POST", url + "/v1/completions", json=body) as response:
            lines = response.iter_lines()
            next(lines), next(lines)
            assert metric(url, "lmscale_running_requests") == 1
            assert metric(url, "lmscale_kv_blocks_used") > 0
    deadline = time.monotonic() + 5
    while metric(url, "lmscale_running_requests") or metric(url, "lmscale_kv_blocks_used"):
        assert time.monotonic() < deadline, "the dropped stream still holds its slot"
        time.sleep(0.05)


def test_metrics_count_requests_tokens_and_latencies(url):
    post(url, "/v1/completions", COMPLETION)
    text = httpx.get(url + "/metrics").text
    assert 'lmscale_requests_total{endpoint="/v1/completions",status="200"}' in text
    assert metric(url, "lmscale_generation_tokens_total") >= 4
    assert metric(url, "lmscale_time_to_first_token_seconds_count") >= 1
    assert metric(url, "lmscale_kv_blocks_total") > 0


def test_metrics_report_prefix_cache_hits_of_a_shared_prompt(url):
    counts = ("lmscale_prefix_cache_queries_total", "lmscale_prefix_cache_hits_total")
    before = [metric(url, name) for name in counts]
    shared = [3 + (7 * i) % 500 for i in range(40)]  # ids no other test sends
    for tail in ([11, 12, 13], [21, 22, 23]):
        body = COMPLETION | {"prompt": shared + tail, "temperature": 0}
        assert post(url, "/v1/completions", body).status_code == 200
    queries, hits = (metric(url, name) - b for name, b in zip(counts, before, strict=True))
    assert (queries, hits) == (2 * 43, 32)  # the second found 2 full blocks of 16
    total_queries, total_hits = (metric(url, name) for name in counts)
    assert metric(url, "lmscale_prefix_cache_hit_rate") == pytest.approx(total_hits / total_queries)


def test_sigterm_finishes_the_stream_in_flight_then_exits(tiny, tmp_path):
    model, tokenizer = tiny
    folder = save_model_dir(
        tmp_path / "tiny", model.state_dict(),
        {"model": to_dict(model.config), "tokenizer": tokenizer.settings}, tokenizer.to_json(),
    )  # fmt: skip
    port = free_port()
    env = os.environ | {"PYTHONPATH": str(REPO / "src")}
    server = subprocess.Popen(
        [sys.executable, "-m", "lmscale", "serve", "--model", str(folder), "--port", str(port),
         "--served-model-name", NAME],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(base + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline and server.poll() is None
                time.sleep(0.1)
        events: list[str] = []
        body = COMPLETION | {"max_tokens": 60, "stream": True, "temperature": 0}

        def read():
            with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as r:
                events.extend(sse_events(r))

        reader = threading.Thread(target=read)
        reader.start()
        while not events and reader.is_alive():
            time.sleep(0.01)
        server.send_signal(signal.SIGTERM)
        reader.join(timeout=60)
        # uvicorn re-raises the signal once drained: dying "by SIGTERM" is the clean exit here
        assert server.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        server.kill()
    assert events[-1] == "[DONE]"  # the request in flight was finished, not cut
    finished = [json.loads(e)["choices"][0]["finish_reason"] for e in events[:-1]]
    assert finished[-1] in ("length", "stop")
    with pytest.raises(httpx.TransportError):
        httpx.get(base + "/health")  # and nothing new is accepted
