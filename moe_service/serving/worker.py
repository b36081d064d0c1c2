"""The expert worker actor: loads the (layer, expert) replicas it is given and serves moe.v1.Expert."""

from __future__ import annotations

import asyncio
import os
import time

import ray
import torch

from moe_service.checkpoint import open_source
from moe_service.checkpoint.loader import fill_experts
from moe_service.metrics import WorkerMetrics, serve_metrics
from moe_service.model.experts import RoutedExperts
from moe_service.transport.expert_server import ExpertServicer, HostedLayer, RunningServer, start_expert_server
from moe_service.transport.memory import keep_large_buffers
from moe_service.transport.options import TLSConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ExpertWorker:
    """Plain class; `ExpertWorkerActor` below is its Ray actor. Async methods run on the actor's loop,
    which also runs the grpc.aio server; weight loading runs on a separate thread."""

    def __init__(self, worker_id: int, model: str, dtype: str, slots_per_layer: int,
                 bind_host: str | None = None, tls: TLSConfig | None = None, torch_threads: int | None = None) -> None:
        if torch_threads:
            torch.set_num_threads(torch_threads)
        keep_large_buffers()  # a large dispatch's buffers are reused, not mapped afresh per call
        self.worker_id, self.model, self.slots_per_layer = worker_id, model, slots_per_layer
        self.dtype = DTYPES[dtype]
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.bind_host, self.tls = bind_host, tls
        self.server: RunningServer | None = None
        self.servicer: ExpertServicer | None = None
        self.hosted: dict[int, HostedLayer] = {}
        self.pairs: list[tuple[int, int]] = []
        self.reads: list[str] = []  # checkpoint tensors read by the last load (tests check the share)
        self.metrics = WorkerMetrics(worker_id)
        self.started = asyncio.Event()  # a rebalance's load() may arrive while start() still runs

    def _load(self, pairs: list[tuple[int, int]]) -> dict[int, HostedLayer]:
        """Hosted layers for `pairs`: replicas already here are copied, only new ones are read."""
        t0 = time.perf_counter()
        src = open_source(self.model)
        args = self.args = src.args
        by_layer: dict[int, list[int]] = {}
        for layer, expert in sorted(pairs):
            by_layer.setdefault(layer, []).append(expert)
        hosted = {}
        with torch.no_grad():
            for layer, experts in by_layer.items():
                module = RoutedExperts(len(experts), args.hidden_size, args.moe_intermediate_size).to(
                    device=self.device, dtype=self.dtype)
                old = self.hosted.get(layer)
                fresh = []
                for slot, e in enumerate(experts):
                    if old is not None and e in old.expert_ids:
                        j = old.expert_ids.index(e)
                        module.gate_up_proj.data[slot].copy_(old.experts.gate_up_proj.data[j])
                        module.down_proj.data[slot].copy_(old.experts.down_proj.data[j])
                    else:
                        fresh.append((slot, e))
                if fresh:
                    part = RoutedExperts(len(fresh), args.hidden_size, args.moe_intermediate_size).to(
                        device=self.device, dtype=self.dtype)
                    fill_experts(src, part, [(layer, e) for _, e in fresh], self.dtype)
                    for j, (slot, _) in enumerate(fresh):
                        module.gate_up_proj.data[slot].copy_(part.gate_up_proj.data[j])
                        module.down_proj.data[slot].copy_(part.down_proj.data[j])
                hosted[layer] = HostedLayer.build(module.eval(), experts, args.n_routed_experts)
        self.reads = list(src.reads)
        self.metrics.load_seconds.labels(self.metrics.worker).set(time.perf_counter() - t0)
        self.metrics.hosted.labels(self.metrics.worker).set(len(pairs))
        return hosted

    async def start(self, pairs: list[tuple[int, int]]) -> dict[str, str]:
        """Load the experts, start the server; returns its address and the metrics address."""
        self.pairs = sorted(map(tuple, pairs))
        self.hosted = await asyncio.get_running_loop().run_in_executor(None, self._load, self.pairs)
        self.servicer = ExpertServicer(
            self.hosted, worker_id=str(self.worker_id), hidden_size=self.args.hidden_size,
            num_experts=self.args.n_routed_experts, slots_per_layer=self.slots_per_layer,
            on_call=self.metrics.on_call)
        host = self.bind_host or ray.util.get_node_ip_address()
        self.server = await start_expert_server(self.servicer, host=host, port=0, tls=self.tls)
        metrics_port = serve_metrics(self.metrics.registry, host=host)
        self.started.set()
        return {"address": f"{host}:{self.server.port}", "metrics": f"{host}:{metrics_port}"}

    async def load(self, pairs: list[tuple[int, int]]) -> float:
        """Host exactly `pairs` from now on. New replicas load on a side thread before the swap, so no
        call ever waits for weights; calls already running finish on the set they started with."""
        await self.started.wait()
        assert self.servicer is not None
        want = sorted(map(tuple, pairs))
        if want == self.pairs:
            return 0.0
        t0 = time.perf_counter()
        hosted = await asyncio.get_running_loop().run_in_executor(None, self._load, want)
        self.hosted = hosted
        self.servicer.set_hosted(hosted)
        self.pairs = want
        return time.perf_counter() - t0

    def ping(self) -> dict:
        return {"worker_id": self.worker_id, "pid": os.getpid(), "hosted": self.pairs, "device": self.device,
                "node_id": ray.get_runtime_context().get_node_id(), "reads": self.reads}

    async def set_serving(self, serving: bool) -> None:
        if self.server is not None:
            await self.server.set_serving(serving)

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(grace=1.0)
            self.server = None


ExpertWorkerActor = ray.remote(max_restarts=0, max_concurrency=16)(ExpertWorker)
