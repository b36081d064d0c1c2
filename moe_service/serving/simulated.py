"""A SIMULATED cluster (`simulate` in the service settings): expert workers compute the real answer on a small
model, then hold it until the cost model's time for their share on a named device and expert shape,
dilated by `time_scale` (an H200 expert stage takes tens of microseconds, below this machine's floor for
one layer call); gateways may route by a Zipf trace instead of the gate. Sleeping costs no CPU, so 8-16
simulated workers run on a small machine beside the real gateway, gRPC, controller and rebalancing.

Every time that comes from here is simulated: processes export `moe_simulated{device,shape,time_scale}`,
and the simulated bench divides measured times by `time_scale` and labels them."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch


@dataclass(frozen=True)
class Simulation:
    device: str = "H200"  # a costmodel device name
    shape: str = "DeepSeek-V2-Lite"  # whose expert shape the held time is for (costmodel.SHAPES or a preset)
    time_scale: float = 1000.0  # real seconds per simulated second
    # expert ids from a trace instead of the gate: "zipf:EXPONENT", or "window:PATH", a recorded load window
    # (JSON [MoE layers, E] routed-token counts, as `moe-service placement --json` writes under "load")
    routing: str | None = None
    seed: int = 0

    @classmethod
    def from_dict(cls, d: dict) -> "Simulation":
        from moe_service.capacity.costmodel import device

        known = set(cls.__dataclass_fields__)
        if set(d) - known:
            raise ValueError(f"unknown simulate settings {sorted(set(d) - known)}; known: {sorted(known)}")
        sim = cls(**d)
        device(sim.device)  # a clear error for an unknown one
        sim.args()
        if not sim.time_scale > 0:
            raise ValueError(f"simulate.time_scale must be > 0, got {sim.time_scale}")
        r = sim.routing
        if r is not None and not ((r.startswith("zipf:") and float(r[5:]) >= 0)
                                  or (r.startswith("window:") and Path(r[7:]).is_file())):
            raise ValueError(f"simulate.routing must be 'zipf:EXPONENT' or 'window:PATH' of an existing file, got {r!r}")
        return sim

    def to_dict(self) -> dict:
        return asdict(self)

    def args(self):
        from moe_service.capacity.simulate import model_args

        return model_args(self.shape)

    def hold(self) -> Callable[[torch.Tensor], float]:
        """ids [N, K] (a worker's share of one layer call, -1 = none) -> the real seconds its answer takes."""
        from moe_service.capacity.costmodel import device, share_seconds, worker_cost

        cost = worker_cost(self.args(), device(self.device))

        def seconds(ids: torch.Tensor) -> float:
            counts = torch.bincount(ids[ids >= 0].reshape(-1).long())
            return self.time_scale * share_seconds(cost, counts[counts > 0].numpy())

        return seconds

    def trace(self, args) -> "TraceRouter | None":
        """The served model's (`args`) router by this trace, or None (route by the gate)."""
        from moe_service.capacity.simulate import topk_weights, trace, zipf_weights

        if self.routing is None:
            return None
        k = args.num_experts_per_tok
        g = torch.Generator().manual_seed(self.seed)
        if self.routing.startswith("zipf:"):
            weights = zipf_weights(len(args.moe_layers), args.n_routed_experts, float(self.routing[5:]), g)
        else:  # weights whose draws include each expert as often as the window recorded
            rng = np.random.default_rng(self.seed)
            recorded = trace(args, self.routing[7:])
            weights = np.stack([topk_weights(row / max(row.sum(), 1e-12) * k, k, rng) for row in recorded])
        return TraceRouter(args.moe_layers, args.hidden_size, weights, g)

    def export(self, registry) -> None:
        from prometheus_client import Gauge

        Gauge("moe_simulated", "1: this process runs a SIMULATED device; its expert times are held to the cost "
              "model's, dilated by time_scale.", ["device", "shape", "time_scale"],
              registry=registry).labels(self.device, self.shape, str(self.time_scale)).set(1)


def route_by_trace(model, router: "TraceRouter") -> None:
    """Every MoE layer of `model` chooses its experts by the trace (its gate still gives the weights): a
    model-load-time swap, so nothing in the step path knows about simulation."""
    for layer in model.layers:
        if layer.is_moe:
            layer.mlp.gate = TracedGate(layer.mlp.gate, router, layer.layer)


class TracedGate(torch.nn.Module):
    def __init__(self, gate: torch.nn.Module, router: "TraceRouter", layer: int) -> None:
        super().__init__()
        self.gate, self.router, self.layer = gate, router, layer

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights, ids = self.gate(x)
        return weights, self.router.route(self.layer, x, ids.shape[1])


class TraceRouter:
    """Expert ids from a trace: each MoE layer's experts have weights ([L, E], e.g. Zipf's 1/rank^s with the
    hot ones differing per layer). A row's K experts are a Gumbel top-k over the log-weights with noise
    hashed from the row's values, so routing is a function of the hidden states: the same requests route
    the same way every time, and a rebalance (which changes no hidden state) changes no token."""

    def __init__(self, moe_layers: list[int], hidden: int, weights: np.ndarray, g: torch.Generator) -> None:
        self.shares = {layer: torch.as_tensor(w / w.sum(), dtype=torch.float64) for layer, w in zip(moe_layers, weights)}
        self.log_shares = {layer: s.log().float() for layer, s in self.shares.items()}
        self.project = {layer: torch.randn(hidden, weights.shape[1], generator=g) for layer in moe_layers}

    def route(self, layer: int, x: torch.Tensor, k: int) -> torch.Tensor:
        """x [N, D] -> experts [N, k] (int64), distinct per row."""
        z = x.float().cpu() @ self.project[layer]
        u = torch.frac(z.abs() * 1e4).clamp(1e-6, 1 - 1e-6)  # uniform-looking, a function of the row's values
        return (self.log_shares[layer] - torch.log(-torch.log(u))).topk(k, dim=-1).indices.to(x.device)

    def load(self, k: int) -> np.ndarray:
        """The trace's expected routed pairs per token [MoE layers, E] when each token takes k distinct
        experts, as `simulate` takes a load."""
        from moe_service.capacity.simulate import topk_inclusion

        rng = np.random.default_rng(0)
        return np.stack([topk_inclusion(s.numpy(), k, rng) for s in self.shares.values()])
