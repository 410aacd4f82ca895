"""Write deploy/grafana-dashboard.json: the live view of `lmscale serve`, as PromQL over lmscale's
metric names (see `lmscale.serve.metrics`).

    python scripts/make_grafana_dashboard.py        # rewrites deploy/grafana-dashboard.json

The dashboard is generated rather than edited by hand so that every panel's selector carries the
`instance` variable, and the panels tile the grid without overlaps. tests/serve/test_prometheus.py
runs every expression in it against a real Prometheus scraping a real server.
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "deploy" / "grafana-dashboard.json"
SEL = 'instance=~"$instance"'
RATE = "$__rate_interval"

# (title, unit, [(expr, legend)], description), in rows of panels.
ROWS = {
    "Traffic": [
        ("Requests by status", "reqps",
         [(f"sum by (status) (rate(lmscale_requests_total{{{SEL}}}[{RATE}]))", "{{status}}")],
         "Answered /v1 requests per second, by HTTP status"),
        ("Tokens per second", "short",
         [(f"sum(rate(lmscale_generation_tokens_total{{{SEL}}}[{RATE}]))", "generated"),
          (f"sum(rate(lmscale_prompt_tokens_total{{{SEL}}}[{RATE}]))", "prompt")],
         "Generated and prompt tokens per second"),
        ("Time to first token", "s",
         [(f"histogram_quantile({q}, sum by (le) (rate("
           f"lmscale_time_to_first_token_seconds_bucket{{{SEL}}}[{RATE}])))", f"p{int(q * 100)}")
          for q in (0.5, 0.99)],
         "From a request's arrival to its first token"),
        ("Inter-token latency", "s",
         [(f"histogram_quantile({q}, sum by (le) (rate("
           f"lmscale_inter_token_latency_seconds_bucket{{{SEL}}}[{RATE}])))", f"p{int(q * 100)}")
          for q in (0.5, 0.99)],
         "Between consecutive tokens of a stream"),
        ("Error ratio", "percentunit",
         [(f'(sum(rate(lmscale_requests_total{{{SEL}, status!~"2.."}}[{RATE}])) or vector(0))'
           f" / sum(rate(lmscale_requests_total{{{SEL}}}[{RATE}]))", "errors")],
         "Share of /v1 requests answered with an error (4xx and 5xx)"),
    ],
    "Engine": [
        ("Batch", "short",
         [(f"sum(lmscale_running_requests{{{SEL}}})", "running"),
          (f"sum(lmscale_queue_depth{{{SEL}}})", "waiting"),
          (f"sum(lmscale_max_num_seqs{{{SEL}}})", "max_num_seqs")],
         "Requests in the running batch and waiting for a slot"),
        ("Batch occupancy and step fill", "percentunit",
         [(f"avg(lmscale_batch_occupancy{{{SEL}}})", "running / max_num_seqs"),
          (f"sum(rate(lmscale_step_tokens_total{{{SEL}}}[{RATE}])) / sum(rate("
           f"lmscale_engine_steps_total{{{SEL}}}[{RATE}])) / max(lmscale_token_budget{{{SEL}}})",
           "tokens per step / budget")],
         "How full the batch is, in requests and in tokens per step"),
        ("KV cache in use", "percentunit",
         [(f"sum(lmscale_kv_blocks_used{{{SEL}}}) / sum(lmscale_kv_blocks_total{{{SEL}}})",
           "blocks used")],
         "Share of the KV-cache pool's blocks held by requests"),
        ("Prefix-cache hit rate", "percentunit",
         [(f"sum(rate(lmscale_prefix_cache_hits_total{{{SEL}}}[{RATE}])) / sum(rate("
           f"lmscale_prefix_cache_queries_total{{{SEL}}}[{RATE}]))", "recent"),
          (f"avg(lmscale_prefix_cache_hit_rate{{{SEL}}})", "since start")],
         "Prompt tokens found cached instead of computed"),
        ("Replicas and compiled decode", "short",
         [(f"sum(lmscale_replicas{{{SEL}}})", "replicas"),
          (f"min(lmscale_decode_compiled{{{SEL}}})", "decode compiled")],
         "Engine replicas answering; 1 once the compiled decode graphs serve"),
    ],
    "Resources": [
        ("CPU", "short",
         [(f"rate(process_cpu_seconds_total{{{SEL}}}[{RATE}])", "{{instance}} cores")],
         "CPU seconds per second of the server process"),
        ("Memory", "bytes",
         [(f"process_resident_memory_bytes{{{SEL}}}", "{{instance}} resident"),
          (f"lmscale_gpu_memory_allocated_bytes{{{SEL}}}", "{{instance}} GPU allocated"),
          (f"lmscale_gpu_memory_reserved_bytes{{{SEL}}}", "{{instance}} GPU reserved")],
         "Resident memory of the process; CUDA memory (0 without a GPU)"),
    ],
    "Quality": [
        ("Probe perplexity", "short",
         [(f"lmscale_probe_perplexity{{{SEL}}}", "{{instance}}")],
         "Perplexity of the --probe text under the served weights, scored in idle moments"),
        ("Prompt loss", "short",
         [(f"lmscale_prompt_loss{{{SEL}}}", "latest prompts"),
          (f"sum(rate(lmscale_prompt_loss_nats_total{{{SEL}}}[{RATE}])) / sum(rate("
           f"lmscale_prompt_loss_tokens_total{{{SEL}}}[{RATE}]))", "recent window")],
         "Mean per-token loss (nats) of incoming prompts: a rise means the traffic drifts away "
         "from what the model knows"),
        ("Probe age", "s",
         [(f"time() - lmscale_probe_timestamp_seconds{{{SEL}}}", "{{instance}}")],
         "Seconds since the probe was last scored (it waits for idle moments)"),
        ("Reloads", "short",
         [(f"sum by (result) (increase(lmscale_reloads_total{{{SEL}}}[1h]))", "{{result}}"),
          (f"sum(lmscale_engines_draining{{{SEL}}})", "draining")],
         "Reloads in the last hour, done and refused; old engines still finishing requests"),
        ("Served model", "none",
         [(f"max by (model, adapter) (lmscale_model_info{{{SEL}}})", "{{model}} {{adapter}}")],
         "What each server serves now"),
    ],
}

RELOAD_ANNOTATION = f"changes(lmscale_model_loaded_timestamp_seconds{{{SEL}}}[1m]) > 0"


def panel(panel_id: int, title: str, unit: str, targets, description: str, x: int, y: int):
    return {
        "id": panel_id, "type": "timeseries", "title": title, "description": description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": 8, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
        "targets": [
            {"refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend,
             "datasource": {"type": "prometheus", "uid": "${datasource}"}}
            for i, (expr, legend) in enumerate(targets)
        ],
    }  # fmt: skip


def dashboard() -> dict:
    panels, y, panel_id = [], 0, 1
    for row, entries in ROWS.items():
        panels.append({"id": panel_id, "type": "row", "title": row, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})  # fmt: skip
        panel_id, y = panel_id + 1, y + 1
        for i, (title, unit, targets, description) in enumerate(entries):
            x = (i % 3) * 8
            if i and i % 3 == 0:
                y += 8
            panels.append(panel(panel_id, title, unit, targets, description, x, y))
            panel_id += 1
        y += 8
    return {
        "title": "lmscale serving", "uid": "lmscale-serving", "schemaVersion": 39,
        "version": 1, "editable": True, "refresh": "10s", "tags": ["lmscale"],
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus",
             "label": "Prometheus"},
            {"name": "instance", "type": "query", "label": "Server",
             "datasource": {"type": "prometheus", "uid": "${datasource}"},
             "query": {"query": "label_values(lmscale_model_info, instance)", "refId": "I"},
             "definition": "label_values(lmscale_model_info, instance)",
             "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2,
             "current": {"text": "All", "value": "$__all"}},
        ]},
        "annotations": {"list": [
            {"name": "Reloads", "enable": True, "iconColor": "orange",
             "datasource": {"type": "prometheus", "uid": "${datasource}"},
             "expr": RELOAD_ANNOTATION, "step": "15s", "titleFormat": "model reloaded",
             "textFormat": "{{instance}}"},
        ]},
        "panels": panels,
    }  # fmt: skip


def expressions(board: dict) -> list[str]:
    """Every PromQL expression of a dashboard: panel targets and annotations."""
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    return exprs + [a["expr"] for a in board["annotations"]["list"] if "expr" in a]


if __name__ == "__main__":
    OUT.write_text(json.dumps(dashboard(), indent=2) + "\n")
    print(f"wrote {OUT} ({len(expressions(dashboard()))} expressions)")
