"""DeepSeekMoE: shared experts plus gated routed experts. Where the routed experts run is injected."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from moe_service.model.args import ModelArgs
from moe_service.model.experts import RoutedExperts
from moe_service.model.gate import Gate
from moe_service.model.layers import MLP

# N tokens, D hidden, K experts per token


class Pending(Protocol):
    """One layer's routed experts in flight."""

    def wait(self) -> torch.Tensor:
        """-> [N, D]: sum_k weights[n, k] * expert_{ids[n, k]}(hidden[n])"""
        ...


class Dispatcher(Protocol):
    """Runs a layer's routed experts somewhere else (the service's workers). The model sends the layer's
    tokens, runs its shared experts meanwhile, then waits for the answer."""

    def send(self, layer: int, hidden: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> Pending:
        """hidden [N, D], weights [N, K], ids [N, K] (int64 expert ids)"""
        ...


class StageClock(Protocol):
    """Times stages of a step for metrics: `mark()` now, `add(stage, mark)` the time since that mark."""

    def mark(self) -> object: ...

    def add(self, stage: str, since: object) -> None: ...


class MoE(nn.Module):
    def __init__(self, args: ModelArgs, layer: int, with_routed_experts: bool = True) -> None:
        super().__init__()
        self.layer = layer
        self.gate = Gate(args)
        # the gateway builds its MoE layers without routed experts: those live on the workers
        self.experts = (
            RoutedExperts(args.n_routed_experts, args.hidden_size, args.moe_intermediate_size)
            if with_routed_experts else None
        )
        self.shared_experts = (
            MLP(args.hidden_size, args.moe_intermediate_size * args.n_shared_experts)
            if args.n_shared_experts else None
        )

    def forward(self, x: torch.Tensor, dispatcher: Dispatcher | None = None,
                clock: StageClock | None = None) -> torch.Tensor:
        """x [N, D] -> [N, D]"""
        t0 = clock.mark() if clock is not None else None
        weights, ids = self.gate(x)  # [N, K], [N, K]
        if clock is not None:
            clock.add("gating", t0)
        if dispatcher is not None:
            pending = dispatcher.send(self.layer, x, weights, ids)
        elif self.experts is not None:
            routed = self.experts(x, weights, ids)
        else:
            raise RuntimeError(f"layer {self.layer} has no local routed experts and no dispatcher was given")
        # with a dispatcher the routed experts are in flight now: the shared ones overlap them
        shared = self.shared_experts(x) if self.shared_experts is not None else None
        if dispatcher is not None:
            routed = pending.wait()
        return routed if shared is None else routed + shared
