#!/usr/bin/env python3
"""Write the Grafana dashboard (k8s/grafana/moe-service.json) and its ConfigMap
(k8s/grafana-dashboard-configmap.yaml) from one definition. `--check` compares instead of writing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JSON_FILE = ROOT / "k8s" / "grafana" / "moe-service.json"
CONFIGMAP = ROOT / "k8s" / "grafana-dashboard-configmap.yaml"
DS = {"type": "prometheus", "uid": "${datasource}"}


def panel(pid: int, title: str, exprs: list[tuple[str, str]], x: int, y: int, w: int = 12, h: int = 8,
          kind: str = "timeseries", unit: str = "short") -> dict:
    p = {
        "id": pid, "type": kind, "title": title, "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "targets": [{"refId": chr(65 + i), "datasource": DS, "expr": e, "legendFormat": legend}
                    for i, (e, legend) in enumerate(exprs)],
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {},
    }
    if kind == "heatmap":
        p["targets"][0]["format"] = "heatmap"
        p["options"] = {"calculate": False, "yAxis": {"axisLabel": "layer"}, "cellGap": 1}
    return p


def q(metric: str, quantile: float, by: str = "") -> str:
    group = f"le{', ' + by if by else ''}"
    return f"histogram_quantile({quantile}, sum by ({group}) (rate({metric}_bucket[$__rate_interval])))"


def dashboard() -> dict:
    panels = [
        panel(1, "Generated tokens/s", [("sum(rate(moe_generated_tokens_total[$__rate_interval]))", "tokens/s"),
                                       ("sum(rate(moe_prompt_tokens_total[$__rate_interval]))", "prompt tokens/s")],
              0, 0),
        panel(2, "Requests/s by status", [("sum by (method, code) (rate(moe_requests_total[$__rate_interval]))",
                                          "{{method}} {{code}}")], 12, 0),
        panel(3, "Time to first token", [(q("moe_time_to_first_token_seconds", 0.5), "p50"),
                                         (q("moe_time_to_first_token_seconds", 0.99), "p99")], 0, 8, unit="s"),
        panel(4, "Inter-token latency", [(q("moe_inter_token_latency_seconds", 0.5), "p50"),
                                         (q("moe_inter_token_latency_seconds", 0.99), "p99")], 12, 8, unit="s"),
        panel(5, "Per-worker load (rows/s)", [("sum by (worker) (rate(moe_expert_rows_total[$__rate_interval]))",
                                              "worker {{worker}}")], 0, 16),
        panel(6, "Expert RPC p99 by worker", [(q("moe_expert_rpc_seconds", 0.99, "worker"), "worker {{worker}}")],
              12, 16, unit="s"),
        panel(7, "Routed tokens per (layer, expert)",
              [("sum by (layer, expert) (rate(moe_routed_tokens_total[$__rate_interval]))", "{{layer}}/{{expert}}")],
              0, 24, w=24, h=10, kind="heatmap"),
        panel(8, "Replicas per expert", [("sum by (layer) (moe_expert_replicas)", "layer {{layer}}")], 0, 34),
        panel(9, "Load balancedness per layer", [("moe_layer_balancedness", "layer {{layer}}")], 12, 34,
              unit="percentunit"),
        panel(10, "Expert workers", [("moe_workers", "running"), ("moe_workers_target", "target"),
                                     ("sum(moe_worker_up)", "healthy")], 0, 42),
        panel(11, "Scheduler", [("sum(moe_scheduler_running_requests)", "running"),
                                ("sum(moe_scheduler_waiting_requests)", "waiting"),
                                ("sum(moe_scheduler_queue_capacity)", "queue capacity")], 12, 42),
        panel(12, "KV cache blocks (paged)", [("sum by (state) (moe_kv_cache_blocks)", "{{state}}")], 0, 50),
        panel(13, "Step time by stage (p50)", [(q("moe_step_stage_seconds", 0.5, "stage"), "{{stage}}")], 12, 50,
              unit="s"),
        panel(14, "Rebalances", [("increase(moe_rebalances_total[1h])", "per hour"),
                                 (q("moe_rebalance_duration_seconds", 0.99), "p99 duration")], 0, 58),
        panel(15, "Prefix cache hit rate and preemptions",
              [("sum(rate(moe_prefix_cache_hit_tokens_total[$__rate_interval])) / "
                "sum(rate(moe_prefix_cache_query_tokens_total[$__rate_interval]))", "prompt tokens from the cache"),
               ("sum(rate(moe_preemptions_total[$__rate_interval]))", "preemptions/s")], 12, 58),
        panel(16, "Cache-aware routing (choices/s)",
              [("sum by (choice) (rate(ray_moe_router_choices_total[$__rate_interval]))", "{{choice}}")], 0, 66),
        panel(17, "Worker loss: stall and redundancy",
              [(q("moe_worker_loss_stall_seconds", 0.99), "p99 stall, loss to the layer's answer"),
               (q("moe_redundancy_restored_seconds", 0.5), "p50 until min_replicas again"),
               ("moe_experts_under_replicated", "experts under min_replicas")], 12, 66, unit="s"),
        panel(18, "Speculative decoding: draft acceptance",
              [("sum by (model) (rate(moe_spec_accepted_tokens_total[$__rate_interval])) / "
                "sum by (model) (rate(moe_spec_draft_tokens_total[$__rate_interval]))", "{{model}} accepted / drafted"),
               ("sum by (model) (rate(moe_spec_draft_tokens_total[$__rate_interval]))", "{{model}} drafted/s")], 0, 74),
        panel(19, "Speculative decoding: tokens per sequence-step",
              [(q("moe_spec_tokens_per_step", 0.5, "model"), "{{model}} p50"),
               (q("moe_spec_tokens_per_step", 0.9, "model"), "{{model}} p90")], 12, 74),
    ]
    return {
        "title": "moe-service", "uid": "moe-service", "schemaVersion": 39, "version": 1, "editable": True,
        "time": {"from": "now-1h", "to": "now"}, "refresh": "10s", "tags": ["moe", "ray", "llm"],
        "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus",
                                 "label": "Prometheus"}]},
        "panels": panels,
    }


def render() -> tuple[str, str]:
    text = json.dumps(dashboard(), indent=2) + "\n"
    indented = "".join("    " + line + "\n" for line in text.splitlines())
    cm = ("# Generated by scripts/gen_dashboard.py from the same definition as k8s/grafana/moe-service.json.\n"
          "# Grafana's dashboard sidecar (as in kube-prometheus-stack) loads ConfigMaps labelled grafana_dashboard=1.\n"
          "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: moe-grafana-dashboard\n  labels:\n"
          "    grafana_dashboard: \"1\"\ndata:\n  moe-service.json: |\n" + indented)
    return text, cm


if __name__ == "__main__":
    text, cm = render()
    if "--check" in sys.argv:
        ok = JSON_FILE.read_text() == text and CONFIGMAP.read_text() == cm
        print("up to date" if ok else "stale: run scripts/gen_dashboard.py")
        sys.exit(0 if ok else 1)
    JSON_FILE.parent.mkdir(parents=True, exist_ok=True)
    JSON_FILE.write_text(text)
    CONFIGMAP.write_text(cm)
    print(f"wrote {JSON_FILE} and {CONFIGMAP}")
