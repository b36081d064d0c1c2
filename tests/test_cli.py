"""The command line: what `moe-service serve` asks Ray for, from the GPUs there are."""

from __future__ import annotations

import pytest
import ray
import torch

from moe_service import cli


def _serve_args(*argv: str):
    return cli.build_parser().parse_args(["serve", *argv])


@pytest.fixture
def gpus(monkeypatch):
    """Pretend this host has n CUDA devices."""
    def set_gpus(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    return set_gpus


@pytest.mark.parametrize("host_gpus,workers,share", [(0, 2, 0.0), (1, 2, 0.3333), (2, 2, 0.5), (3, 2, 1.0),
                                                     (8, 2, 1.0), (1, 1, 0.5), (2, 4, 0.3333)])
def test_the_local_default_shares_the_gpus_that_exist(gpus, host_gpus, workers, share):
    gpus(host_gpus)
    cfg = cli._service_config(_serve_args("--workers", str(workers)))
    assert cfg["gpus_per_worker"] == cfg["gateway_gpus"] == share
    # Ray can place every actor: each GPU holds whole actors of `share` each
    if share:
        per_gpu = int(1 / share + 1e-9) if share < 1 else 1
        assert per_gpu * host_gpus >= workers + 1 and per_gpu * share <= 1.0


def test_explicit_settings_win(gpus):
    gpus(1)
    cfg = cli._service_config(_serve_args("--gpus-per-worker", "0.25", "--gateway-gpus", "0.5"))
    assert (cfg["gpus_per_worker"], cfg["gateway_gpus"]) == (0.25, 0.5)
    cfg = cli._service_config(_serve_args("--gpus-per-worker", "0"))
    assert (cfg["gpus_per_worker"], cfg["gateway_gpus"]) == (0.0, 0.3333)


def test_on_a_cluster_the_clusters_gpus_count_not_this_hosts(gpus, monkeypatch):
    gpus(0)  # the CLI's own host has none; the cluster does
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 64.0, "GPU": 8.0})
    cfg = cli._service_config(_serve_args("--ray-address", "auto", "--workers", "4"))
    assert cfg["gpus_per_worker"] == cfg["gateway_gpus"] == 1.0
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 64.0})
    cfg = cli._service_config(_serve_args("--ray-address", "auto"))
    assert cfg["gpus_per_worker"] == cfg["gateway_gpus"] == 0.0


def test_a_cluster_with_too_few_gpus_asks_for_the_settings(gpus, monkeypatch):
    gpus(4)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 64.0, "GPU": 2.0})
    with pytest.raises(ValueError, match="--gpus-per-worker and --gateway-gpus"):
        cli._service_config(_serve_args("--ray-address", "auto", "--workers", "2"))
    cfg = cli._service_config(_serve_args("--ray-address", "auto", "--gpus-per-worker", "0.5", "--gateway-gpus", "1"))
    assert (cfg["gpus_per_worker"], cfg["gateway_gpus"]) == (0.5, 1.0)
