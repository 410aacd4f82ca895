"""Hot reload and the quality gauges, through a real server on 127.0.0.1.

The served model is a small random Llama saved as a native folder; its adapters are LoRA
adapters with random weights (so each changes the greedy output), saved as `lmscale finetune`
saves them.
"""

import json
import shutil
import threading
import time

import httpx
import pytest
from model_folders import PROMPT, save_model, save_random_adapter
from prometheus_client.parser import text_string_to_metric_families
from serving import running, sse_events

from lmscale.checkpoint import load_pretrained
from lmscale.engine.config import EngineConfig
from lmscale.engine.quality import window_loss
from lmscale.finetune.adapter import load_adapter
from lmscale.serve.server import ServeOptions, build_app
from lmscale.tokenizer import Tokenizer

KEY = "admin-secret"
ADMIN = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def folders(shakespeare_dir, tmp_path_factory):
    """The base model, two adapters of it, an adapter of another model, a corrupt adapter."""
    tokenizer = Tokenizer.load(shakespeare_dir / "tokenizer.json")
    root = tmp_path_factory.mktemp("reload")
    base = save_model(root / "base", tokenizer, seed=0)
    other = save_model(root / "other", tokenizer, seed=1)
    folders = {
        "base": base, "other_model": other,
        "smaller": save_model(root / "smaller", tokenizer, seed=0, n_layers=2),
        "ad1": save_random_adapter(base, root / "ad1", seed=1),
        "ad2": save_random_adapter(base, root / "ad2", seed=2),
        "foreign": save_random_adapter(other, root / "foreign", seed=3),
    }  # fmt: skip
    corrupt = shutil.copytree(folders["ad2"], root / "corrupt")
    weights = corrupt / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    folders["corrupt"] = corrupt
    probe = root / "probe.txt"
    probe.write_text(" ".join([PROMPT] * 20))
    folders["probe"] = probe
    return folders


def serving(folders, adapter="ad1", **options):
    options = {
        "model": str(folders["base"]), "adapter": str(folders[adapter]), "admin_key": KEY,
        "engine": EngineConfig(max_num_seqs=16), "served_name": "m",
    } | options  # fmt: skip
    app, _ = build_app(ServeOptions(**options))
    return running(app)


def complete(url, max_tokens=24):
    body = {"model": "m", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}
    answer = httpx.post(url + "/v1/completions", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    return answer.json()["choices"][0]["text"]


def reload(url, timeout=120, **body):
    return httpx.post(url + "/admin/reload", json=body or None, headers=ADMIN, timeout=timeout)


def metrics(url) -> dict:
    """Every sample of /metrics: {(name, sorted labels): value}."""
    text = httpx.get(url + "/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def wait_for(condition, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
    return value


def test_reload_under_eight_streams_loses_no_request(folders):
    with serving(folders) as url:
        old = complete(url, max_tokens=400)
        results, first_tokens = [None] * 8, threading.Barrier(9)

        def stream(i):
            body = {"model": "m", "prompt": PROMPT, "max_tokens": 400, "temperature": 0,
                    "stream": True}  # fmt: skip
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
                events, waited = [], False
                for event in sse_events(r):
                    events.append(event)
                    if not waited:
                        first_tokens.wait(timeout=60)
                        waited = True
            results[i] = (r.status_code, events)

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        first_tokens.wait(timeout=60)  # every stream has begun on the old weights
        answer = reload(url, adapter=str(folders["ad2"]))
        assert answer.status_code == 200, answer.text
        assert answer.json()["adapter"] == str(folders["ad2"])
        assert answer.json()["draining"] == 1  # the 8 streams were still running
        new = complete(url, max_tokens=400)
        for thread in threads:
            thread.join(timeout=120)
        for status, events in results:
            assert status == 200 and events[-1] == "[DONE]"
            chunks = [json.loads(e) for e in events[:-1]]
            text = "".join(c["choices"][0]["text"] for c in chunks)
            assert text == old  # finished on the weights it started on
            assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
        assert new != old
        wait_for(lambda: httpx.get(url + "/admin/model", headers=ADMIN).json()["draining"] == 0)
        samples = metrics(url)
        assert samples[("lmscale_reloads_total", (("result", "ok"),))] == 1
        adapter = (("adapter", str(folders["ad2"])), ("model", str(folders["base"])))
        assert samples[("lmscale_model_info", adapter)] == 1
        # Counters carry the retired engine's totals: 10 requests' prompts in all.
        prompt = len(Tokenizer.load_pretrained(folders["base"]).encode(PROMPT))
        assert samples[("lmscale_prompt_tokens_total", ())] == 10 * prompt
        assert samples[("lmscale_engine_steps_total", ())] > 400
        back = reload(url, adapter=str(folders["ad1"]))
        assert back.status_code == 200 and complete(url, max_tokens=400) == old


def test_bad_folders_are_refused_while_the_old_model_answers(folders):
    with serving(folders) as url:
        before = complete(url)
        refusals = {
            "corrupt": reload(url, adapter=str(folders["corrupt"])),
            "foreign": reload(url, adapter=str(folders["foreign"])),
            "not_a_folder": reload(url, adapter=str(folders["base"] / "missing")),
            "other_shape": reload(url, model=str(folders["smaller"])),
        }
        for name, answer in refusals.items():
            assert answer.status_code == 400, (name, answer.text)
            error = answer.json()["error"]
            assert error["code"] == "invalid_model" and "still serving" in error["message"], name
            assert "\n" not in error["message"]
        assert "trained on another base" in refusals["foreign"].json()["error"]["message"]
        assert complete(url) == before  # the old weights answer on
        samples = metrics(url)
        assert samples[("lmscale_reloads_total", (("result", "refused"),))] == 4
        assert samples[("lmscale_reloads_total", (("result", "ok"),))] == 0
        served = httpx.get(url + "/admin/model", headers=ADMIN).json()
        assert served["adapter"] == str(folders["ad1"]) and served["last_error"]
        # A model of the same shape (a re-tuned one, say) is taken, without the adapter.
        assert reload(url, model=str(folders["other_model"])).status_code == 200
        assert httpx.get(url + "/admin/model", headers=ADMIN).json()["adapter"] is None
        assert complete(url) != before


def test_the_admin_api_needs_its_key(folders):
    with serving(folders) as url:
        assert reload(url).status_code == 200  # an empty body: the same folders read again
        no_key = httpx.post(url + "/admin/reload", json={})
        assert no_key.status_code == 401 and no_key.json()["error"]["message"]
        unknown = httpx.post(url + "/admin/reload", json={"weights": "x"}, headers=ADMIN)
        assert unknown.status_code == 400
    with serving(folders, admin_key=None) as url:
        off = httpx.post(url + "/admin/reload", json={}, headers=ADMIN)
        assert off.status_code == 403 and "--admin-key" in off.json()["error"]["message"]


def test_probe_and_prompt_loss_gauges_follow_the_weights(folders):
    with serving(folders, probe=str(folders["probe"])) as url:
        first = wait_for(lambda: metrics(url).get(("lmscale_probe_perplexity", ())))
        complete(url, max_tokens=4)
        scored = wait_for(lambda: metrics(url).get(("lmscale_prompt_loss_tokens_total", ())))
        # The prompt's loss is the served model's own, computed here the plain way.
        model, tokenizer = load_pretrained(folders["base"])
        load_adapter(model, folders["ad1"])
        ids = tokenizer.encode(PROMPT)
        total, n = window_loss(model, ids)
        samples = metrics(url)
        assert scored == n
        assert samples[("lmscale_prompt_loss", ())] == pytest.approx(total / n, rel=1e-4)
        assert samples[("lmscale_prompt_loss_nats_total", ())] == pytest.approx(total, rel=1e-4)
        switched = time.time()
        assert reload(url, adapter=str(folders["ad2"])).status_code == 200
        wait_for(lambda: metrics(url).get(("lmscale_probe_timestamp_seconds", ()), 0) > switched)
        second = metrics(url)[("lmscale_probe_perplexity", ())]
        assert second != pytest.approx(first, rel=1e-3)
        assert metrics(url)[("lmscale_probe_runs_total", ())] >= 2
        for name in ("process_cpu_seconds_total", "process_resident_memory_bytes",
                     "lmscale_batch_occupancy", "lmscale_max_num_seqs"):  # fmt: skip
            assert (name, ()) in samples, name
        assert samples[("lmscale_max_num_seqs", ())] == 16


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--probe", "/nonexistent/probe.txt"], "cannot read the probe text"),
        (["--probe-every", "0"], "--probe-every must be positive"),
        (["--adapter", "/nonexistent/adapter"], "is not an adapter folder"),
    ],
)
def test_bad_operating_arguments_are_one_line_errors(args, message):
    import subprocess
    import sys
    from pathlib import Path

    result = subprocess.run(
        [sys.executable, "-m", "lmscale", "serve", *args], capture_output=True, text=True,
        env={"PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src"),
             "PATH": "/usr/bin:/bin"}, timeout=120,
    )  # fmt: skip
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
