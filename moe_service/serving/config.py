"""Settings of one deployment of the service (what `moe-service serve` and the Serve config set)."""

from __future__ import annotations

import dataclasses
import hmac
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moe_service.engine.scheduler import SchedulerConfig
from moe_service.transport.options import TLSConfig

CONTROLLER_NAME = "moe_controller"
APP_NAME = "moe"  # the Serve application
GATEWAY_NAME = "MoEGateway"  # its ingress deployment
HTTP_FRONT_NAME = "MoEHTTPFront"  # the OpenAI HTTP API beside it


def overlap_pays(gpu_workers: bool) -> bool:
    """Whether work overlapping the expert calls (the shared experts, a second micro-batch's
    attention) pays: with GPU workers or enough cores, yes; where CPU workers share a few cores with
    the gateway it slows their compute more than it hides (measured in docs/performance.md)."""
    return gpu_workers or (os.cpu_count() or 1) > 4
NAMESPACE = "moe_service"
MAX_WORKLOADS = 8


@dataclass
class ServiceConfig:
    # model
    model: str = "coder"  # a preset name (coder: the embedded trained model), or a local Hugging Face directory
    served_model_name: str | None = None  # the OpenAI API's model id; default: the preset or directory name
    http_api: bool = True  # the OpenAI HTTP API, served by the HTTP front beside the gateway (off: gRPC only)
    http_host: str = "0.0.0.0"  # where the HTTP front listens (on the head node)
    http_port: int = 8000
    dtype: str = "float32"
    # speculative decoding: {method: mtp, tokens: k}: the model's multi-token-prediction layer drafts k tokens a
    # step, one step verifies them (engine/speculative.py); its MoE block's experts are placed like any layer's
    speculative: dict[str, Any] | None = None
    # routed experts on the workers: "fp8" block-quantizes a dense checkpoint's at load (128 x 128 blocks, as
    # DeepSeek-V3 ships them); an FP8 checkpoint's stay FP8 whatever this says. Computed in `dtype`.
    quantize: str | None = None
    # expert workers
    workers: int = 2
    gpus_per_worker: float = 1.0  # fractional allowed; 0 runs workers on CPU-only nodes
    cpus_per_worker: float = 0.0
    worker_resources: dict[str, float] = field(default_factory=dict)  # e.g. {"expert_worker": 1}
    replicas_per_worker: int | None = None  # replicas per layer per worker; default: all experts once + 25%
    redundant_experts: int = 0  # per layer, replicate this many experts on a second worker at start
    # every expert on at least this many distinct workers, after every plan and scale step (standbys take
    # the extra slots; placement/redundancy.py): a lost worker's pairs then always have a live replica.
    # None: 2 where the workers' memory holds the standbys, else 1 (decided at start: Controller._redundancy)
    min_replicas: int | None = None
    # where a standby's weights wait: "device" (ready at once), or "host": the worker node's memory (pinned),
    # joining the layer's module on the device when a lost replica's pairs first reach it (on a CPU worker,
    # the same memory either way). Unset min_replicas then asks the node's memory for the standbys' room.
    standby: str = "device"
    spread_workers: bool = True  # place workers on different nodes when possible
    expert_bind_host: str | None = None  # None: the node's IP (clusters); tests use 127.0.0.1
    # fixed port ranges (inclusive) for the workers' gRPC servers and every process's /metrics, so a
    # NetworkPolicy can name them (k8s/networkpolicy.yaml); None: any free port
    expert_port_range: tuple[int, int] | None = None
    metrics_port_range: tuple[int, int] | None = None
    worker_start_timeout_s: float = 300.0
    health_interval_s: float = 0.5
    # gateway (each replica: data-parallel attention with its own KV cache and scheduler)
    gateway_replicas: int = 1
    gateway_autoscaling: dict[str, Any] | None = None  # Serve autoscaling_config; overrides gateway_replicas
    # send a request to the replica holding the longest cached prefix of its prompt (serving/gateway/router.py);
    # off: Serve's default router (the less busy of two at random)
    cache_aware_routing: bool = True
    gateway_num_cpus: float = 1.0
    gateway_gpus: float = 0.0  # GPUs each replica asks Ray for (fractional allowed: share a node's GPUs)
    gateway_device: str | None = None  # where a replica computes; None: "cuda" if it sees one, else the CPU
    gateway_resources: dict[str, float] = field(default_factory=dict)  # e.g. {"gateway": 1} for a node group
    torch_threads: int | None = None  # CPU threads per expert worker; None: Ray's (OMP_NUM_THREADS)
    gateway_torch_threads: int | None = None  # CPU threads per gateway replica; None: Ray's
    # run the gateway's shared experts while the routed ones are on the wire; None: where overlap pays
    # (overlap_pays), with scheduler.micro_batches likewise (see overlap())
    overlap_shared_experts: bool | None = None
    expert_call_timeout_s: float = 30.0  # the most a worker's answer may take
    # a message to a worker is answered within this + expert_row_timeout_s per row it carries, or the worker
    # is taken for lost (its pairs go to another replica): generous for a CPU worker's largest prefill
    expert_message_timeout_s: float = 2.0
    expert_row_timeout_s: float = 0.01
    request_timeout_s: float = 300.0
    scheduler: dict[str, Any] = field(default_factory=dict)  # SchedulerConfig fields
    # metrics (each process serves its own /metrics; the controller serves http_sd at sd_port)
    # workload classes clients may tag requests with (gRPC metadata or HTTP header x-moe-workload); routed
    # tokens are then also counted per (layer, expert, workload), any other tag as "other". Empty: off.
    workloads: tuple[str, ...] = ()
    # a SIMULATED cluster (serving/simulated.py): {"device", "shape", "time_scale", "routing", "seed"}
    simulate: dict[str, Any] | None = None
    expert_metrics: str = "expert"  # per-(layer, expert) series: "expert", "layer" (coarsened) or "off"
    sd_port: int = 9095  # controller's HTTP: /targets (Prometheus http_sd), /metrics, /stats, /rebalance; 0 = free
    # load tracking, rebalancing and worker autoscaling
    load_window_s: float = 60.0  # routed-token counts older than this are forgotten
    load_report_interval_s: float = 1.0  # gateways send their counts this often
    rebalance_interval_s: float = 60.0  # 0: rebalance only on demand
    rebalance_min_gain: float = 0.05  # apply a new placement only if its objective improves this much
    # what a rebalance evens out: "tokens" (EPLB: routed tokens per worker; gain = balancedness) or "time"
    # (the cost model's predicted slowest worker for layer calls of `rebalance_batch` tokens, by default
    # the scheduler's max_running; gain = relative drop of the predicted expert stage), on `cost_device`
    # ("H100", "H200", "cpu" after `moe-service calibrate`); a simulated cluster uses its own device
    rebalance_objective: str = "tokens"
    rebalance_batch: int | None = None
    cost_device: str | None = None
    autoscaling: dict[str, Any] | None = None  # AutoscaleSettings fields (min_workers, max_workers, ...)
    confirm_timeout_s: float = 30.0  # a rebalance waits this long for gateways before dropping old replicas
    gateway_recent_s: float = 10.0  # ... for the gateways that reported this recently
    # security. The client API key and the admin key (POST /rebalance; default: the API key) come from
    # here, from a file (*_file, e.g. a mounted Kubernetes Secret) or from the environment
    # (MOE_SERVICE_API_KEY, MOE_SERVICE_ADMIN_API_KEY); prefer the last two, since these settings are
    # shown by Serve. TLS of the internal expert channels is on when any tls_* is set, and then needs all.
    api_key: str | None = None
    api_key_file: str | None = None
    admin_api_key: str | None = None
    admin_api_key_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_ca_file: str | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "ServiceConfig":
        d = dict(d or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown service settings {unknown}; known: {sorted(known)}")
        for name in ("expert_port_range", "metrics_port_range"):
            if d.get(name) is not None:
                lo, hi = d[name]
                if not 0 < lo <= hi < 65536:
                    raise ValueError(f"{name} must be [first, last] ports with 0 < first <= last < 65536, got {d[name]}")
                d[name] = (int(lo), int(hi))
        if d.get("workloads") is not None:
            d["workloads"] = tuple(str(w) for w in d["workloads"])
            if len(d["workloads"]) > MAX_WORKLOADS or "other" in d["workloads"] or len(set(d["workloads"])) < len(d["workloads"]):
                raise ValueError(f"workloads takes at most {MAX_WORKLOADS} distinct names other than 'other' "
                                 f"(each multiplies the routing series), got {list(d['workloads'])}")
        cfg = cls(**d)
        cfg.scheduler_config()  # validate early
        cfg.simulation()
        if cfg.rebalance_objective not in ("tokens", "time"):
            raise ValueError(f"rebalance_objective must be 'tokens' or 'time', got {cfg.rebalance_objective!r}")
        if cfg.rebalance_objective == "time":
            cfg.worker_seconds(None)
        if cfg.quantize not in (None, "fp8"):
            raise ValueError(f"quantize must be 'fp8' or unset, got {cfg.quantize!r}")
        if cfg.workers < 1:
            raise ValueError(f"workers must be >= 1, got {cfg.workers}")
        fewest = min(cfg.workers, (cfg.autoscaling or {}).get("min_workers", cfg.workers))
        if cfg.standby not in ("device", "host"):
            raise ValueError(f"standby must be 'device' or 'host', got {cfg.standby!r}")
        if cfg.min_replicas is not None and not 1 <= cfg.min_replicas <= fewest:
            raise ValueError(f"min_replicas must be between 1 and the fewest workers the service runs ({fewest}), "
                             f"got {cfg.min_replicas}")
        cfg.tls()  # a partial TLS configuration fails here, on every side
        return cfg

    def routed_layers(self, args) -> list[int]:
        """The layers whose routed experts the workers serve: the MoE layers, and with `speculative` the MoE
        multi-token-prediction layer(s) after them (DeepSeek-V3's draft)."""
        draft = [l for l in args.mtp_layers if args.is_moe_layer(l)] if self.speculative else []
        return [*args.moe_layers, *draft]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def redacted(self) -> dict[str, Any]:
        """The settings as shown to operators (`/stats`, logs): keys never."""
        d = self.to_dict()
        for name in ("api_key", "admin_api_key"):
            if d[name]:
                d[name] = "<redacted>"
        return d

    def tls(self) -> TLSConfig | None:
        """The internal channels' TLS: every process builds it here, so gateways and workers can never
        disagree on whether it is on. Partial settings are an error, not plaintext on one side."""
        files = {"tls_cert_file": self.tls_cert_file, "tls_key_file": self.tls_key_file, "tls_ca_file": self.tls_ca_file}
        if not any(files.values()):
            return None
        missing = [k for k, v in files.items() if not v]
        if missing:
            raise ValueError(f"TLS for the expert channels needs tls_cert_file, tls_key_file and tls_ca_file "
                             f"(mutual TLS); {missing} missing")
        return TLSConfig(self.tls_cert_file, self.tls_key_file, self.tls_ca_file)

    def simulation(self):
        """The simulated-cluster settings, or None for a real one."""
        from moe_service.serving.simulated import Simulation

        return Simulation.from_dict(self.simulate) if self.simulate is not None else None

    def worker_seconds(self, args):
        """The time objective's cost: (touched replicas, pairs, replicas with 2+ pairs) -> predicted seconds of
        one worker's share of a layer call, on the simulated device and shape, or `cost_device` with the
        served model's experts (`args`; None: only check the settings)."""
        from moe_service.capacity.costmodel import device, worker_cost

        sim = self.simulation()
        if sim is not None:
            return worker_cost(sim.args(), device(sim.device))
        if self.cost_device is None:
            raise ValueError("rebalance_objective 'time' needs cost_device (H100, H200, or cpu after "
                             "`moe-service calibrate`), or a simulated cluster")
        dev = device(self.cost_device)
        return None if args is None else worker_cost(args, dev)

    def tokens_per_call(self) -> int:
        """The layer-call size the time objective plans for."""
        return self.rebalance_batch or self.scheduler_config().max_running

    def model_name(self) -> str:
        return self.served_model_name or Path(self.model.rstrip("/")).name

    def resolved_api_key(self) -> str | None:
        return _secret(self.api_key, self.api_key_file, "MOE_SERVICE_API_KEY")

    def resolved_admin_key(self) -> str | None:
        return _secret(self.admin_api_key, self.admin_api_key_file, "MOE_SERVICE_ADMIN_API_KEY") or self.resolved_api_key()

    def overlap(self) -> tuple[bool, int]:
        """(shared experts during the expert calls, decode micro-batches): the one place the overlap policy
        is decided. Unset, both follow overlap_pays: with GPU workers or enough cores, overlap."""
        pays = overlap_pays(self.gpus_per_worker > 0)
        shared = pays if self.overlap_shared_experts is None else self.overlap_shared_experts
        return shared, self.scheduler.get("micro_batches") or (2 if pays else 1)

    def scheduler_config(self) -> SchedulerConfig:
        known = {f.name for f in dataclasses.fields(SchedulerConfig)}
        unknown = sorted(set(self.scheduler) - known)
        if unknown:
            raise ValueError(f"unknown scheduler settings {unknown}; known: {sorted(known)}")
        return SchedulerConfig(**{**self.scheduler, "micro_batches": self.overlap()[1]})


def _secret(value: str | None, file: str | None, env: str) -> str | None:
    if value:
        return value
    if file:
        return Path(file).read_text().strip() or None
    return os.environ.get(env) or None


def key_matches(presented: str, key: str) -> bool:
    """`presented` is an `authorization` header value; compared in constant time."""
    return hmac.compare_digest(presented.encode(), f"Bearer {key}".encode())
