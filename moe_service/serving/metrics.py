"""Every Prometheus metric of the service, in one place.

Each process (gateway replica, expert worker, controller) serves its own registry over HTTP
(`serve_metrics`); the controller also serves Prometheus HTTP service discovery listing them all,
so Prometheus finds every process on every node without a hand-written target list.
"""

from __future__ import annotations

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

prometheus_client.disable_created_metrics()  # one series per counter/histogram, no *_created twins

# sub-millisecond to seconds: per-layer RPCs sit near 1 ms, steps near 10-100 ms, requests in seconds
FAST_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
SLOW_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)

EXPERT_SERIES = ("expert", "layer", "off")  # per-(layer, expert) detail, per layer only, or none
STAGES = ("attention", "gating", "dispatch", "experts", "wire", "combine", "sampling")  # wire: part of experts


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None, expert_series: str = "expert",
                 workloads: tuple[str, ...] = ()) -> None:
        if expert_series not in EXPERT_SERIES:
            raise ValueError(f"expert_series must be one of {EXPERT_SERIES}, got {expert_series!r}")
        r = self.registry = registry or CollectorRegistry()
        self.expert_series = expert_series
        # requests
        self.requests = Counter("moe_requests", "Finished client requests by method and gRPC status code.",
                                ["method", "code"], registry=r)
        self.prompt_tokens = Counter("moe_prompt_tokens", "Prompt tokens of admitted requests.", registry=r)
        self.generated_tokens = Counter("moe_generated_tokens", "Tokens generated.", registry=r)
        self.ttft = Histogram("moe_time_to_first_token_seconds", "From request arrival to its first token.",
                              buckets=SLOW_BUCKETS, registry=r)
        self.itl = Histogram("moe_inter_token_latency_seconds", "Between consecutive tokens of one stream.",
                             buckets=FAST_BUCKETS, registry=r)
        self.duration = Histogram("moe_request_duration_seconds", "Whole request, arrival to last token.",
                                  buckets=SLOW_BUCKETS, registry=r)
        self.rejected = Counter("moe_rejected_requests", "Requests refused at admission, by cause: queue_full, "
                                "kv_capacity (can never fit the KV cache), prompt_too_long, invalid.", ["cause"], registry=r)
        self.rejection = Histogram("moe_rejection_seconds", "From a request's arrival at the gateway to its refusal.",
                                   buckets=FAST_BUCKETS, registry=r)
        self.loop_lag = Histogram("moe_event_loop_lag_seconds", "How late the gateway replica's event loop runs a "
                                  "timer (a blocked loop delays every stream and Serve's probes).",
                                  buckets=FAST_BUCKETS, registry=r)
        # steps
        self.stage = Histogram("moe_step_stage_seconds", "Time per stage of one forward step (summed over layers).",
                               ["stage"], buckets=FAST_BUCKETS, registry=r)
        self.step = Histogram("moe_step_seconds", "One scheduler step.", buckets=FAST_BUCKETS, registry=r)
        self.step_failures = Counter(
            "moe_step_failures", "Micro-batches of a step that failed, by cause: 'deadline' (their requests' "
            "deadline passed before the experts answered), 'error' (anything else).", ["cause"], registry=r)
        self.step_rows = Histogram("moe_step_batch_rows", "Sequences in one step.", buckets=SIZE_BUCKETS, registry=r)
        # speculative decoding (engine/speculative.py): acceptance rate = accepted / draft
        self.spec_draft = Counter("moe_spec_draft_tokens", "Draft tokens verified.", ["model"], registry=r)
        self.spec_accepted = Counter("moe_spec_accepted_tokens", "Draft tokens verified and kept.", ["model"], registry=r)
        self.spec_step_tokens = Histogram("moe_spec_tokens_per_step", "Tokens a decoding sequence gains in one step "
                                          "(1 + its accepted draft tokens).", ["model"],
                                          buckets=(1, 2, 3, 4, 5, 6, 7, 8, 9), registry=r)
        self.step_tokens = Histogram("moe_step_tokens", "Tokens processed in one step.", buckets=SIZE_BUCKETS,
                                     registry=r)
        self.running = Gauge("moe_scheduler_running_requests", "Sequences in the running batch.", registry=r)
        self.waiting = Gauge("moe_scheduler_waiting_requests", "Requests in the waiting queue.", registry=r)
        self.queue_capacity = Gauge("moe_scheduler_queue_capacity", "Waiting-queue bound.", registry=r)
        self.kv_used = Gauge("moe_kv_cache_used_tokens", "Tokens running sequences hold in the paged KV cache.",
                             registry=r)
        self.kv_capacity = Gauge("moe_kv_cache_capacity_tokens", "Tokens the paged KV cache holds.", registry=r)
        self.kv_blocks = Gauge("moe_kv_cache_blocks", "KV cache blocks by state: used (a running sequence's), "
                               "kept (a finished prompt's prefix, reusable until needed), free.", ["state"], registry=r)
        self.prefix_query = Counter("moe_prefix_cache_query_tokens", "Prompt tokens of admitted requests, looked up "
                                    "in the prefix cache.", registry=r)
        self.prefix_hit = Counter("moe_prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache (not "
                                  "computed again).", registry=r)
        self.preemptions = Counter("moe_preemptions", "Running sequences whose KV blocks were taken back for others; "
                                   "each computes its tokens again later.", registry=r)
        # per worker, as the gateway sees it
        self.rpc = Histogram("moe_expert_rpc_seconds", "RunExperts round trip seen by the gateway.", ["worker"],
                             buckets=FAST_BUCKETS, registry=r)
        self.rpc_compute = Histogram("moe_expert_compute_seconds", "Expert compute time reported by the worker.",
                                     ["worker"], buckets=FAST_BUCKETS, registry=r)
        self.rows = Counter("moe_expert_rows", "Token rows sent to each worker.", ["worker"], registry=r)
        self.bytes_sent = Counter("moe_expert_sent_bytes", "Activation bytes sent to each worker.", ["worker"],
                                  registry=r)
        self.bytes_received = Counter("moe_expert_received_bytes", "Bytes received from each worker.", ["worker"],
                                      registry=r)
        self.loss_stall = Histogram("moe_worker_loss_stall_seconds", "From a layer call finding a worker lost to "
                                    "its answer (its pairs answered by other replicas, or after a new table).",
                                    buckets=FAST_BUCKETS, registry=r)
        self.retries = Counter("moe_expert_retries", "Calls re-sent to another replica.", ["worker"], registry=r)
        self.failures = Counter("moe_expert_failures", "Calls that failed.", ["worker"], registry=r)
        # routing
        self.routed = Counter("moe_routed_tokens", "(token, expert) pairs routed, per MoE layer and expert.",
                              ["layer", "expert"] if expert_series == "expert" else ["layer"], registry=r)
        self.layer_tokens = Counter("moe_layer_tokens", "Tokens through each MoE layer's gate.", ["layer"],
                                        registry=r)
        # only with configured workload classes (x-moe-workload): series per (layer, expert, workload)
        self.workloads = (*workloads, "other") if workloads else ()
        self.routed_by_workload = Counter(
            "moe_routed_tokens_by_workload", "(token, expert) pairs routed, per MoE layer, expert and the client's "
            "workload class (x-moe-workload; unlisted or none: other).", ["layer", "expert", "workload"],
            registry=r) if workloads else None

    def observe_routing(self, layer: int, counts: list[int]) -> None:
        if self.expert_series == "off":
            return
        if self.expert_series == "layer":
            self.routed.labels(layer=str(layer)).inc(sum(counts))
            return
        for e, n in enumerate(counts):
            if n:
                self.routed.labels(layer=str(layer), expert=str(e)).inc(n)


class WorkerMetrics:
    def __init__(self, worker_id: int, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.worker = str(worker_id)
        self.compute = Histogram("moe_worker_compute_seconds", "Expert compute per RunExperts call.", ["worker"],
                                 buckets=FAST_BUCKETS, registry=r)
        self.rows = Counter("moe_worker_rows", "Token rows processed.", ["worker"], registry=r)
        self.bytes_received = Counter("moe_worker_received_bytes", "Request bytes received.", ["worker"], registry=r)
        self.hosted = Gauge("moe_worker_hosted_replicas", "(layer, expert) replicas hosted.", ["worker"], registry=r)
        self.load_seconds = Gauge("moe_worker_weight_load_seconds", "Time the last weight load took.", ["worker"],
                                  registry=r)
        self.promotion = Histogram("moe_standby_promotion_seconds", "standby: host: parked standbys of a layer "
                                   "joining its module on the device, when lost replicas' pairs first reach them.",
                                   ["worker"], buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5), registry=r)

    def on_promote(self, layer: int, seconds: float) -> None:
        self.promotion.labels(self.worker).observe(seconds)

    def on_call(self, layer: int, rows: int, nbytes: int, seconds: float) -> None:
        self.compute.labels(self.worker).observe(seconds)
        self.rows.labels(self.worker).inc(rows)
        self.bytes_received.labels(self.worker).inc(nbytes)


class ControllerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None, expert_series: str = "expert") -> None:
        r = self.registry = registry or CollectorRegistry()
        self.expert_series = expert_series
        self.worker_up = Gauge("moe_worker_up", "1 while an expert worker is healthy.", ["worker"], registry=r)
        self.workers = Gauge("moe_workers", "Expert workers running.", registry=r)
        self.workers_target = Gauge("moe_workers_target", "Expert workers the autoscaler wants.", registry=r)
        self.restarts = Counter("moe_worker_restarts", "Expert worker restarts after a failure.", registry=r)
        self.replicas = Gauge("moe_expert_replicas", "Replicas of each expert.",
                              ["layer", "expert"] if expert_series == "expert" else ["layer"], registry=r)
        self.balancedness = Gauge("moe_layer_balancedness", "Mean over max worker load per MoE layer (1 = even).",
                                  ["layer"], registry=r)
        self.rebalances = Counter("moe_rebalances", "Placement changes applied.", registry=r)
        self.rebalance_seconds = Histogram("moe_rebalance_duration_seconds", "Time to apply a new placement.",
                                           buckets=SLOW_BUCKETS, registry=r)
        self.under_replicated = Gauge("moe_experts_under_replicated", "(layer, expert) pairs with fewer live "
                                      "replicas (on healthy workers) than min_replicas asks.", registry=r)
        self.redundancy_restored = Histogram(
            "moe_redundancy_restored_seconds", "From an expert falling below min_replicas live replicas (a worker "
            "lost) to every expert back at min_replicas.", buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300), registry=r)
        self.version = Gauge("moe_placement_version", "Version of the placement table.", registry=r)


def quantile(histogram: Histogram, q: float) -> float:
    """The q-quantile of an unlabelled histogram, as Prometheus's histogram_quantile estimates it from the
    buckets (linear within the bucket); 0 with no observations."""
    buckets = [(float(s.labels["le"]), s.value) for s in histogram.collect()[0].samples if s.name.endswith("_bucket")]
    total = buckets[-1][1] if buckets else 0.0
    if total == 0:
        return 0.0
    rank, lower, below = q * total, 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if upper == float("inf"):
                return lower
            return lower + (upper - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = upper, count
    return lower


def serve_metrics(registry: CollectorRegistry, host: str = "127.0.0.1",
                  ports: tuple[int, int] | None = None) -> int:
    """Serves the registry at http://host:port/metrics on a daemon thread; returns the port: the first
    free one of `ports` (inclusive; a NetworkPolicy can name them), or any free one."""
    for port in range(ports[0], ports[1] + 1) if ports else (0,):
        try:
            server, _ = start_http_server(port, addr=host, registry=registry)
            return server.server_port
        except OSError:  # taken: try the next
            continue
    raise OSError(f"no free port for /metrics in {ports[0]}-{ports[1]} on {host}")
