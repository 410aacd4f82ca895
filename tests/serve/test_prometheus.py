"""A real Prometheus (Debian's package) scrapes a real `lmscale serve` process, and every PromQL
expression of deploy/grafana-dashboard.json returns data from it. SIGHUP reloads the server."""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from model_folders import PROMPT, save_model, save_random_adapter
from serving import free_port

from lmscale.tokenizer import Tokenizer

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROMETHEUS = shutil.which("prometheus")
KEY = "admin-secret"


def dashboard_expressions() -> list[str]:
    board = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    return exprs + [a["expr"] for a in board["annotations"]["list"] if "expr" in a]


def test_the_dashboard_is_what_its_script_writes():
    spec = importlib.util.spec_from_file_location(
        "make_grafana_dashboard", ROOT / "scripts" / "make_grafana_dashboard.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert json.loads((DEPLOY / "grafana-dashboard.json").read_text()) == script.dashboard()
    assert len(dashboard_expressions()) >= 20


def wait_until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition()
        except httpx.HTTPError:
            value = None
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)


@pytest.fixture(scope="module")
def server(shakespeare_dir, tmp_path_factory):
    """`lmscale serve` of a small model with an adapter and a probe, as a real process."""
    tokenizer = Tokenizer.load(shakespeare_dir / "tokenizer.json")
    root = tmp_path_factory.mktemp("prometheus")
    base = save_model(root / "base", tokenizer, seed=0)
    adapter = save_random_adapter(base, root / "adapter", seed=1)
    save_random_adapter(base, root / "retuned", seed=2)
    (root / "probe.txt").write_text(" ".join([PROMPT] * 10))
    port = free_port()
    command = [
        sys.executable, "-m", "lmscale", "serve", "--model", str(base), "--adapter",
        str(adapter), "--probe", str(root / "probe.txt"), "--probe-every", "1", "--eager",
        "--admin-key", KEY, "--port", str(port), "--served-model-name", "m",
    ]  # fmt: skip
    log = (root / "serve.log").open("w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=root)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(url + "/health").status_code == 200, 120, "the server")
        yield url, process, root
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
        log.close()


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory):
    """Prometheus on 127.0.0.1 with deploy/prometheus.yml, pointed at the server, 1 s scrapes."""
    if PROMETHEUS is None:
        pytest.skip("prometheus is not installed (Debian package 'prometheus')")
    url, _, _ = server
    root = tmp_path_factory.mktemp("tsdb")
    checked = subprocess.run(
        ["promtool", "check", "config", str(DEPLOY / "prometheus.yml")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    config["scrape_configs"][0]["static_configs"][0]["targets"] = [url.removeprefix("http://")]
    (root / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    process = subprocess.Popen(
        [PROMETHEUS, f"--config.file={root / 'prometheus.yml'}",
         f"--storage.tsdb.path={root / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=(root / "prometheus.log").open("w"),
    )  # fmt: skip
    api = f"http://127.0.0.1:{port}/api/v1"
    try:
        wait_until(lambda: httpx.get(api + "/targets").status_code == 200, 60, "prometheus")
        # Scraped at least twice before any test: a later reload is then a change it sees.
        wait_until(
            lambda: query(api, "count_over_time(lmscale_model_loaded_timestamp_seconds[1m]) > 1"),
            60, "prometheus's first scrapes",
        )  # fmt: skip
        yield api
    finally:
        process.terminate()
        process.wait(timeout=30)


def query(api: str, expr: str) -> list:
    expr = expr.replace("$__rate_interval", "20s").replace("$instance", ".*")
    answer = httpx.get(api + "/query", params={"query": expr}).json()
    assert answer["status"] == "success", (expr, answer)
    return answer["data"]["result"]


def traffic(url: str, n: int) -> None:
    for i in range(n):
        body = {"model": "m", "prompt": f"{PROMPT} {i}", "max_tokens": 16, "stream": i % 2 == 1}
        assert httpx.post(url + "/v1/completions", json=body, timeout=60).status_code == 200
    bad = httpx.post(url + "/v1/completions", json={"model": "nope", "prompt": "x"})
    assert bad.status_code == 400  # an error for the error-ratio panel


def samples(url: str, name: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics").text
    return {
        tuple(sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    }


def test_sighup_reloads_the_folders_from_disk(server, prometheus):
    url, process, root = server
    traffic(url, 4)
    before = samples(url, "lmscale_probe_perplexity")[()]
    # A re-tuning job wrote a new adapter over the old one; SIGHUP puts it into service.
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        shutil.copy(root / "retuned" / name, root / "adapter" / name)
    reloaded_at = time.time()
    os.kill(process.pid, signal.SIGHUP)
    wait_until(
        lambda: samples(url, "lmscale_reloads_total").get((("result", "ok"),)) == 1,
        60, "the SIGHUP reload",
    )  # fmt: skip
    wait_until(
        lambda: samples(url, "lmscale_probe_timestamp_seconds").get((), 0) > reloaded_at,
        60, "a probe of the new weights",
    )  # fmt: skip
    assert samples(url, "lmscale_probe_perplexity")[()] != pytest.approx(before, rel=1e-3)


def test_every_dashboard_expression_returns_data(server, prometheus):
    url, _, _ = server
    traffic(url, 6)
    missing = []
    for expr in dashboard_expressions():
        try:
            wait_until(lambda expr=expr: query(prometheus, expr), 30, expr)
        except AssertionError:
            missing.append(expr)
    assert not missing, f"no data for: {missing}"
    up = query(prometheus, 'up{job="lmscale"}')
    assert up and up[0]["value"][1] == "1"
