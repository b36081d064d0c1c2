"""`moe-service simulate`: a capacity planner over the cost model, with no Ray and no gRPC. SIMULATED: every
number it prints is a prediction from moe_service.capacity.costmodel, never a measurement.

A decode step of G gateways with B streams each: every gateway computes its dense part (weights and latent
KV cache read once), then for each MoE layer the G x B tokens are routed (by a trace: Zipf or a recorded
load window), dispatched to the workers by a placement, and the layer waits for its slowest worker plus the
network's round trip. A worker's share is the roofline of costmodel.worker_layer_seconds over its expected
touched replicas and pairs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moe_service.capacity.costmodel import (TERMS_HEADER, Device, dispatch_layer_seconds, expert_bytes,
                                            format_terms_ms, gateway_step_seconds, worker_cost)
from moe_service.model.args import ModelArgs
from moe_service.placement import Placement, plan
from moe_service.placement.timeaware import busiest_seconds, floor_seconds, layer_pairs

POLICIES = ("round-robin", "tokens", "time")


def model_args(source: str) -> ModelArgs:
    """A preset or embedded model's name, a checkpoint directory, a config.json, or a named real shape."""
    from moe_service.capacity.costmodel import SHAPES

    if source in SHAPES:
        return SHAPES[source]
    p = Path(source)
    if p.is_file():
        return ModelArgs.from_hf_config(json.loads(p.read_text()), name=p.parent.name)
    from moe_service.checkpoint import open_source

    return open_source(source).args


def trace(args: ModelArgs, spec: str, seed: int = 0) -> np.ndarray:
    """Routing load [MoE layers, E]: "zipf:1.2" (the hot experts differ per layer; each token's top-k are
    distinct experts drawn by those weights), or a JSON file holding a recorded load window ([L, E]
    counts, e.g. `moe-service placement --json`'s "load")."""
    L, E = len(args.moe_layers), args.n_routed_experts
    if spec.startswith("zipf:"):
        import torch

        shares = zipf_weights(L, E, float(spec.split(":", 1)[1]), torch.Generator().manual_seed(seed))
        rng = np.random.default_rng(seed)
        return np.stack([topk_inclusion(row, args.num_experts_per_tok, rng) for row in shares])
    data = json.loads(Path(spec).read_text())
    load = np.asarray(data.get("load", data) if isinstance(data, dict) else data, dtype=float)
    if load.shape != (L, E):
        raise ValueError(f"the trace {spec} is {load.shape}; this model routes over {(L, E)}")
    return load


def zipf_weights(num_layers: int, num_experts: int, exponent: float, g) -> np.ndarray:
    """Zipf weights [L, E]: rank r weighs 1/r^exponent, the ranks permuted per layer by the torch generator
    ``g``, so `simulate` and the live trace router (serving/simulated.py) draw the same hot experts for the
    same seed."""
    import torch

    ranked = np.arange(1, num_experts + 1, dtype=np.float64) ** -exponent
    return np.stack([ranked[torch.randperm(num_experts, generator=g).numpy()] for _ in range(num_layers)])


def topk_inclusion(shares: np.ndarray, k: int, rng: np.random.Generator, samples: int = 20000) -> np.ndarray:
    """How often each expert is among a token's k distinct experts when they are drawn by weight ``shares``
    without replacement (a Gumbel top-k, as serving/simulated.py's trace router draws them): [E], summing to
    k. A hot expert saturates at once per token, where the shares themselves would give it more pairs than
    there are tokens."""
    gumbel = np.log(shares) - np.log(-np.log(rng.random((samples, len(shares)))))
    top = np.argpartition(-gumbel, k - 1, axis=1)[:, :k]
    return np.bincount(top.ravel(), minlength=len(shares)) / samples


def topk_weights(inclusion: np.ndarray, k: int, rng: np.random.Generator, iterations: int = 30) -> np.ndarray:
    """Weights [E] whose draws of k distinct experts include each as often as ``inclusion`` [E] says (per token,
    summing to k, each at most 1): the inverse of `topk_inclusion`, by multiplicative updates. An expert
    never seen keeps a small weight, so k distinct ones always exist."""
    target = np.clip(inclusion, 1e-4, 1.0)
    weights = target / target.sum()
    for _ in range(iterations):
        weights *= target / np.maximum(topk_inclusion(weights, k, rng, samples=8000), 1e-4)
        weights /= weights.sum()
    return weights


@dataclass
class Cluster:
    args: ModelArgs
    device: Device
    gateways: int
    workers: int
    streams_per_gateway: int
    context: int = 2048
    replicas_per_worker: int | None = None
    rtt_s: float = 50e-6  # network round trip per layer call
    software_s: float = 0.0  # the dispatch software's own cost per layer call
    link_bytes_s: float = 50e9  # each gateway's link

    @property
    def spw(self) -> int:
        E = self.args.n_routed_experts
        return self.replicas_per_worker or -(-E * 5 // (4 * self.workers))  # all experts once + 25%

    @property
    def expert_bytes_per_worker(self) -> int:
        """The routed-expert weights one worker holds: its replicas of every MoE layer."""
        return self.spw * len(self.args.moe_layers) * expert_bytes(self.args, self.device.expert_bytes_per_weight)

    def placement(self, load: np.ndarray, policy: str) -> Placement:
        L, E = load.shape
        if policy == "round-robin":
            return Placement.round_robin(L, E, self.workers, self.spw)
        pairs = self.gateways * self.streams_per_gateway * self.args.num_experts_per_tok
        return plan(load, self.workers, self.spw, objective=policy, worker_seconds=worker_cost(self.args, self.device),
                    pairs_per_step=pairs)

    def step(self, load: np.ndarray, placement: Placement) -> dict:
        """One decode step, term by term (SIMULATED)."""
        a, B = self.args, self.streams_per_gateway
        tokens = self.gateways * B
        cost = worker_cost(a, self.device)
        pairs = tokens * a.num_experts_per_tok
        expert = busiest_seconds(load, placement, cost, pairs)
        floor = [floor_seconds(lam, self.workers, cost) for lam in layer_pairs(load, pairs)]
        gateway_s = gateway_step_seconds(a, self.device, B, self.context)
        dispatch_s = len(a.moe_layers) * dispatch_layer_seconds(a, B, self.software_s, self.rtt_s, self.link_bytes_s,
                                                                self.device.itemsize)
        step_s = gateway_s + dispatch_s + float(expert.sum())
        return {"simulated": True, "step_s": step_s, "itl_s": step_s, "tokens_per_s": tokens / step_s,
                "gateway_s": gateway_s, "dispatch_s": dispatch_s, "experts_s": float(expert.sum()),
                "expert_stage_s_per_layer": float(np.mean(expert)), "expert_floor_s_per_layer": float(np.mean(floor)),
                "replicas": int(placement.replica_counts().sum())}


def run(model: str, device: Device, gateways: int, workers: int, streams: int, trace_spec: str = "zipf:1.2",
        rtt_s: float = 50e-6, context: int = 2048, policies: tuple[str, ...] = POLICIES,
        software_s: float = 0.0) -> dict:
    args = model_args(model)
    load = trace(args, trace_spec)
    c = Cluster(args, device, gateways, workers, streams, context, rtt_s=rtt_s, software_s=software_s)
    out = {"simulated": True, "model": args.name, "device": device.name, "gateways": gateways, "workers": workers,
           "streams_per_gateway": streams, "trace": trace_spec, "replicas_per_worker": c.spw,
           "expert_bytes_per_worker": c.expert_bytes_per_worker, "device_memory_bytes": device.memory_bytes,
           "policies": {}}
    for policy in policies:
        out["policies"][policy] = c.step(load, c.placement(load, policy))
    return out


def sweep_workers(model: str, device: Device, gateways: int, streams: int, worker_counts: list[int],
                  trace_spec: str = "zipf:1.2", policy: str = "tokens") -> list[dict]:
    args = model_args(model)
    load = trace(args, trace_spec)
    rows = []
    for w in worker_counts:
        c = Cluster(args, device, gateways, w, streams)
        rows.append({"workers": w, **c.step(load, c.placement(load, policy))})
    return rows


def format_results(r: dict) -> str:
    lines = [f"SIMULATED (cost model, not measured): {r['model']} on {r['device']}, {r['gateways']} gateway(s) x "
             f"{r['streams_per_gateway']} streams, {r['workers']} expert workers x {r['replicas_per_worker']} replicas "
             f"per layer, routing {r['trace']}",
             f"{'placement':>12}{'tokens/s':>11}{'ITL':>10}{TERMS_HEADER}{'per layer':>11}{'replicas':>10}"]
    for name, s in r["policies"].items():
        lines.append(f"{name:>12}{s['tokens_per_s']:11.0f}{s['itl_s'] * 1e3:8.2f}ms{format_terms_ms(s)}"
                     f"{s['expert_stage_s_per_layer'] * 1e6:9.1f}us{s['replicas']:10d}")
    held, memory = r["expert_bytes_per_worker"], r["device_memory_bytes"]
    lines.append(f"memory: each worker holds {held / 1e9:.1f} GB of routed experts"
                 + (f" of its {memory / 1e9:.0f} GB: {'fits' if held < memory else 'DOES NOT FIT, add workers'}"
                    if memory else ""))
    floor = next(iter(r["policies"].values()))["expert_floor_s_per_layer"]
    lines.append(f"floor: no placement's expert stage is predicted below {floor * 1e6:.1f} us per layer (every expert "
                 "read once, the work spread perfectly)")
    return "\n".join(lines)


def plot(model: str, device: Device, gateways: int, streams: int, trace_spec: str, path: Path) -> None:
    """Three panels, all SIMULATED: throughput against workers; before (round robin) against after a
    rebalance, with the floor no placement beats; the placements and the floor across layer-call sizes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    counts = [2, 4, 8, 16, 32]
    for policy in ("round-robin", "tokens", "time"):
        rows = sweep_workers(model, device, gateways, streams, counts, trace_spec, policy)
        axes[0].plot(counts, [r["tokens_per_s"] for r in rows], "o-", label=policy)
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("expert workers")
    axes[0].set_ylabel("tokens/s (simulated)")
    axes[0].set_title("throughput against workers")
    axes[0].legend()
    args = model_args(model)
    load = trace(args, trace_spec)
    c = Cluster(args, device, gateways, 8, streams)
    steps = [c.step(load, c.placement(load, p)) for p in POLICIES]
    axes[1].bar(["before\n(round robin)", "after: token-\nbalanced", "after: time-\naware"],
                [s["expert_stage_s_per_layer"] * 1e6 for s in steps], color=["C0", "C1", "C2"])
    axes[1].axhline(steps[0]["expert_floor_s_per_layer"] * 1e6, color="k", ls="--", label="floor (any placement)")
    axes[1].legend(loc="lower right")
    axes[1].set_ylabel("expert stage per layer, us (simulated)")
    axes[1].set_title(f"8 workers, {streams} streams: before against after a rebalance")
    batches = [1, 4, 16, 64, 256, 1024, 4096, 8192]
    curves: dict[str, list[float]] = {"round robin (before)": [], "token-balanced": [], "time-aware": [], "floor": []}
    for b in batches:
        cb = Cluster(args, device, gateways, 8, b)
        for name, policy in zip(curves, POLICIES):
            st = cb.step(load, cb.placement(load, policy))
            curves[name].append(st["expert_stage_s_per_layer"] * 1e6)
        curves["floor"].append(st["expert_floor_s_per_layer"] * 1e6)
    for (name, ys), style in zip(curves.items(), ("o-", "^-", "s-", "k--")):
        axes[2].plot(batches, ys, style, label=name)
    axes[2].set_xscale("log", base=2)
    axes[2].set_yscale("log")
    axes[2].set_xlabel("tokens per layer call (decode streams, or prefill tokens)")
    axes[2].set_ylabel("expert stage per layer, us (simulated)")
    axes[2].set_title("placements across batch sizes, 8 workers")
    axes[2].legend()
    fig.suptitle(f"SIMULATED with the cost model: {args.name} on {device.name}, routing {trace_spec}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
