"""The Prometheus series the package's processes export, read from their registries (not from its source)."""

from __future__ import annotations


def exported_names() -> set[str]:
    """Every metric and sample name a gateway, an expert worker and the controller export: `moe_x` and,
    for a counter, `moe_x_total`; for a histogram its `_bucket`, `_count` and `_sum` once observed."""
    from prometheus_client import CollectorRegistry

    from moe_service.serving.metrics import ControllerMetrics, GatewayMetrics, WorkerMetrics

    names = set()
    for m in (GatewayMetrics(CollectorRegistry()), WorkerMetrics(0, CollectorRegistry()),
              ControllerMetrics(CollectorRegistry())):
        for metric in m.registry.collect():
            names.add(metric.name)
            names.update(s.name for s in metric.samples)
            if metric.type == "counter":  # a labelled counter has no samples until first used
                names.add(metric.name + "_total")
    return names
