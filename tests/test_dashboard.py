"""The Grafana dashboard: generated, in sync with its ConfigMap, and querying only metrics that exist."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

from tests.support.metrics import exported_names

ROOT = Path(__file__).resolve().parents[1]


def test_dashboard_and_configmap_are_generated_and_in_sync():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_dashboard.py"), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
    cm = yaml.safe_load((ROOT / "k8s" / "grafana-dashboard-configmap.yaml").read_text())
    assert json.loads(cm["data"]["moe-service.json"]) == json.loads((ROOT / "k8s" / "grafana" / "moe-service.json").read_text())


def test_dashboard_has_the_views_operators_need_and_only_real_metrics():
    names = exported_names()
    d = json.loads((ROOT / "k8s" / "grafana" / "moe-service.json").read_text())
    titles = " ".join(p["title"].lower() for p in d["panels"])
    for must in ("tokens/s", "time to first token", "inter-token", "per-worker load", "layer, expert", "replicas"):
        assert must in titles, must
    assert any(p["type"] == "heatmap" for p in d["panels"])
    exprs = [t["expr"] for p in d["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\b(moe_[a-z_]+)", e)}
    # histogram panels use the _bucket series; counters their _total
    missing = {m for m in used if m not in names and m.removesuffix("_bucket") not in names}
    assert not missing, missing
