"""Observability proven with a real Prometheus: it discovers every process through the controller's
http_sd endpoint, scrapes them, and PromQL returns what was sent."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse
import urllib.request

import pytest
import torch

from moe_service.client import Client
from moe_service.serving.local import free_port, start_service
from tests.oracle import write_checkpoint
from tests.support import Pending, eventually
from tests.test_serving import ORACLE_CONFIG, service_config

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    shutil.which("prometheus") is None,
    reason="the 'prometheus' binary is not installed (Debian package 'prometheus'; scripts/setup.sh installs it)")]


@pytest.fixture(scope="module")
def service(ray_local, tmp_path_factory):
    path = tmp_path_factory.mktemp("prom-model")
    write_checkpoint(path, ORACLE_CONFIG)
    svc = start_service(service_config(path, workers=2, load_report_interval_s=0.5))
    yield svc
    svc.shutdown()


@pytest.fixture(scope="module")
def prometheus(ray_local, service, tmp_path_factory):
    sd = ray_local.get(service.controller().http_address.remote())
    d = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    (d / "prometheus.yml").write_text(f"""
global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: moe-service
    http_sd_configs:
      - url: http://{sd}/targets
        refresh_interval: 1s
""")
    proc = subprocess.Popen(
        ["prometheus", f"--config.file={d / 'prometheus.yml'}", f"--storage.tsdb.path={d / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=open(d / "prometheus.log", "w"))
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(20)


def query(base: str, promql: str):
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=5) as r:
        data = json.load(r)
    assert data["status"] == "success", data
    return data["data"]["result"]


def prometheus_says(base: str, promql: str, want: float, timeout_s: float = 60.0) -> None:
    """Queries until Prometheus returns `want` (scrapes are periodic); fails with the last answer."""
    def answer():
        try:
            res = query(base, promql)
        except OSError as e:  # Prometheus still starting
            return Pending(repr(e))
        value = float(res[0]["value"][1]) if res else None
        return True if value is not None and abs(value - want) < 1e-6 else Pending(value)

    eventually(answer, timeout_s, interval=0.5, what=f"{promql} == {want}")  # the next scrape is <= 1 s away


def test_prometheus_sees_every_process_and_the_right_numbers(service, prometheus):
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 257, (n,), generator=g).tolist() for n in (7, 19, 4, 11)]
    generated = []
    with Client(service.address) as client:
        for p in prompts:
            generated.append(len(client.generate_ids(p, max_new_tokens=6, ignore_eos=True)))
    from moe_service.checkpoint import open_source

    args = open_source(service.config["model"]).args
    top_k, moe_layers = args.num_experts_per_tok, len(args.moe_layers)
    # every prompt token is prefilled and every generated token but the last is fed back
    tokens = sum(len(p) + n - 1 for p, n in zip(prompts, generated))
    prometheus_says(prometheus, 'count(up{component="expert_worker"} == 1)', 2)
    prometheus_says(prometheus, 'count(up{component="gateway"} == 1)', 1)
    prometheus_says(prometheus, "count(moe_worker_rows_total)", 2)  # one series per worker
    prometheus_says(prometheus, 'sum(moe_requests_total{method="Generate",code="OK"})', len(prompts))
    prometheus_says(prometheus, "sum(moe_generated_tokens_total)", sum(generated))
    prometheus_says(prometheus, "sum(moe_routed_tokens_total)", tokens * top_k * moe_layers)
    # each gate saw every token: counted from the gate's input, apart from the routed pairs above
    prometheus_says(prometheus, "sum(moe_layer_tokens_total)", tokens * moe_layers)
    prometheus_says(prometheus, "sum(moe_worker_up)", 2)
    prometheus_says(prometheus, "count(moe_expert_rpc_seconds_count)", 2)  # the gateway sees both workers
