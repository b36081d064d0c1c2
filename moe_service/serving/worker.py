"""The expert worker actor: loads the (layer, expert) replicas it is given and serves moe.v1.Expert."""

from __future__ import annotations

import os
import time

import ray
import torch

from moe_service.checkpoint import load_experts
from moe_service.transport.expert_server import ExpertServicer, HostedLayer, RunningServer, start_expert_server
from moe_service.transport.options import TLSConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ExpertWorker:
    """Plain class; `ExpertWorkerActor` below is its Ray actor. Async methods run on the actor's loop,
    which also runs the grpc.aio server."""

    def __init__(self, worker_id: int, model: str, dtype: str, slots_per_layer: int,
                 bind_host: str | None = None, tls: TLSConfig | None = None) -> None:
        self.worker_id, self.model, self.slots_per_layer = worker_id, model, slots_per_layer
        self.dtype = DTYPES[dtype]
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.bind_host, self.tls = bind_host, tls
        self.server: RunningServer | None = None
        self.servicer: ExpertServicer | None = None
        self.pairs: list[tuple[int, int]] = []
        self.load_seconds = 0.0
        self.reads: list[str] = []  # checkpoint tensors read by the last load (tests check the share)

    def _load(self, pairs: list[tuple[int, int]]) -> dict[int, HostedLayer]:
        from moe_service.checkpoint import open_source

        t0 = time.perf_counter()
        src = open_source(self.model)
        E = src.args.n_routed_experts
        hosted = {l: HostedLayer.build(m, ids, E)
                  for l, (m, ids) in load_experts(src, pairs, self.dtype, self.device).items()}
        self.load_seconds = time.perf_counter() - t0
        self.args = src.args
        self.reads = list(src.reads)
        return hosted

    async def start(self, pairs: list[tuple[int, int]]) -> str:
        """Load the experts, start the server; returns its address. Raises with the reason on failure."""
        import asyncio

        self.pairs = sorted(map(tuple, pairs))
        hosted = await asyncio.get_running_loop().run_in_executor(None, self._load, self.pairs)
        self.servicer = ExpertServicer(
            hosted, worker_id=str(self.worker_id), hidden_size=self.args.hidden_size,
            num_experts=self.args.n_routed_experts, slots_per_layer=self.slots_per_layer)
        host = self.bind_host or ray.util.get_node_ip_address()
        self.server = await start_expert_server(self.servicer, host=host, port=0, tls=self.tls)
        self.address = f"{host}:{self.server.port}"
        return self.address

    async def load(self, pairs: list[tuple[int, int]]) -> float:
        """Host exactly `pairs` from now on. Replicas kept are reused; new ones load before the swap,
        so no call ever waits for weights. Returns seconds spent loading."""
        import asyncio

        assert self.servicer is not None
        want = sorted(map(tuple, pairs))
        if want == self.pairs:
            return 0.0
        hosted = await asyncio.get_running_loop().run_in_executor(None, self._load, want)
        self.servicer.set_hosted(hosted)
        self.pairs = want
        return self.load_seconds

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
