"""The pieces of scale-out serving that need no Ray cluster: the replicas' totals for /metrics,
the prefix router's block keys, and the command line's one-line errors."""

import subprocess
import sys
from pathlib import Path

import pytest

from lmscale.engine.prefix_cache import block_key
from lmscale.serve.replica_stats import ReplicaStatsBook

REPO = Path(__file__).resolve().parents[2]


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def stats(running: int, hits: int, compiled: int = 1) -> dict[str, int]:
    return {"num_running": running, "num_waiting": 0, "kv_blocks_used": 2 * running,
            "kv_blocks_total": 100, "block_size": 16, "num_preemptions": 0,
            "prompt_tokens_total": 10 * hits, "generation_tokens_total": 5 * hits,
            "prefix_cache_queries": 20 * hits, "prefix_cache_hits": hits,
            "decode_compiled": compiled}  # fmt: skip


def test_gauges_sum_live_replicas_and_counters_keep_what_stopped_replicas_counted():
    clock = Clock()
    book = ReplicaStatsBook(stale_s=3.0, clock=clock)
    book.report("a", stats(running=2, hits=4))
    book.report("b", stats(running=3, hits=6, compiled=0))
    totals, live = book.totals()
    assert live == 2 and totals["num_running"] == 5 and totals["kv_blocks_total"] == 200
    assert totals["prefix_cache_hits"] == 10 and totals["decode_compiled"] == 0
    clock.now = 2.0
    book.report("a", stats(running=1, hits=5))
    clock.now = 4.0  # b silent for 4 s: gone
    totals, live = book.totals()
    assert live == 1 and totals["num_running"] == 1 and totals["kv_blocks_total"] == 100
    assert totals["prefix_cache_hits"] == 5 + 6  # b's count stays: counters never go down
    assert totals["decode_compiled"] == 1 and set(book.per_replica()) == {"a"}


def test_no_replica_reports_zero():
    totals, live = ReplicaStatsBook().totals()
    assert live == 0 and totals["decode_compiled"] == 0 and totals["num_running"] == 0


def test_the_router_keys_full_prompt_blocks_as_the_engine_does():
    pytest.importorskip("ray")
    from lmscale.serve.prefix_router import prompt_block_keys

    prompt = list(range(40))  # two full blocks of 16, then 8 tokens without a key
    keys = prompt_block_keys(prompt, 16)
    first = block_key(None, tuple(range(16)))
    assert keys == [first, block_key(first, tuple(range(16, 32)))]
    assert prompt_block_keys(prompt[:15], 16) == []
    assert prompt_block_keys(prompt + [7], 16)[:2] == keys  # a longer turn shares the prefix


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--replicas", "0"], "--replicas must be at least 1"),
        (["--autoscale", "3:1"], "--autoscale needs 0 <= MIN <= MAX"),
        (["--autoscale", "two"], "--autoscale must be MIN:MAX"),
        (["--replicas", "2", "--autoscale", "1:2"], "not both"),
        (["--replicas", "2", "--threads-per-replica", "0"], "--threads-per-replica must be"),
    ],
)
def test_bad_scale_out_arguments_are_one_line_errors(args, message):
    result = subprocess.run(
        [sys.executable, "-m", "lmscale", "serve", *args], capture_output=True, text=True,
        env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"}, timeout=120,
    )  # fmt: skip
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_the_kuberay_manifest_builds_the_application():
    pytest.importorskip("ray")
    import importlib

    import yaml
    from ray.serve import Application

    from lmscale.errors import LmscaleError
    from lmscale.serve.scale_out import app_builder

    manifest = yaml.safe_load((REPO / "deploy" / "rayservice.yaml").read_text())
    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    (app,) = serve_config["applications"]
    module, name = app["import_path"].split(":")
    builder = getattr(importlib.import_module(module), name)
    assert builder is app_builder
    assert isinstance(builder(app["args"]), Application)
    with pytest.raises(LmscaleError, match="unknown lmscale args: replica"):
        builder({"replica": "2"})
