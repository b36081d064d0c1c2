"""DeepSeekMoE: shared experts plus gated routed experts. Where the routed experts run is injected."""

from __future__ import annotations

import time
from typing import Callable, Protocol

import torch
from torch import nn

from moe_service.model.args import ModelArgs
from moe_service.model.experts import RoutedExperts
from moe_service.model.gate import Gate
from moe_service.model.layers import MLP

# N tokens, D hidden, K experts per token


class ExpertBackend(Protocol):
    """Computes one layer's routed experts: sum_k weights[n, k] * expert_{experts[n, k]}(x[n]).

    It may answer with a function that returns the result (a remote backend that has sent the
    dispatch): the shared experts run before it is called."""

    def __call__(self, layer: int, x: torch.Tensor, weights: torch.Tensor,
                 experts: torch.Tensor) -> "torch.Tensor | Callable[[], torch.Tensor]":
        """x [N, D], weights [N, K], experts [N, K] -> [N, D]"""
        ...


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

    def forward(self, x: torch.Tensor, backend: ExpertBackend | None = None,
                hook: Callable[[str, float], None] | None = None) -> torch.Tensor:
        """x [N, D] -> [N, D]"""
        t0 = time.perf_counter()
        weights, experts = self.gate(x)
        if hook is not None:
            hook("gating", time.perf_counter() - t0)
        if backend is not None:
            routed = backend(self.layer, x, weights, experts)
        elif self.experts is not None:
            routed = self.experts(x, weights, experts)
        else:
            raise RuntimeError(f"layer {self.layer} has no local routed experts and no expert backend was given")
        # with a remote backend the routed experts are in flight now: the shared ones overlap them
        shared = self.shared_experts(x) if self.shared_experts is not None else None
        out = routed() if callable(routed) else routed
        return out if shared is None else out + shared
