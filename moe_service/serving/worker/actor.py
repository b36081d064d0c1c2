"""The expert worker actor: loads the (layer, expert) replicas it is given and serves moe.v1.Expert."""

from __future__ import annotations

import asyncio
import os
import time

import ray
import torch

from moe_service.checkpoint import load_experts, open_source
from moe_service.checkpoint.loader import empty_experts
from moe_service.serving.metrics import WorkerMetrics, serve_metrics
from moe_service.model.args import DTYPES
from moe_service.serving.simulated import Simulation
from moe_service.serving.worker.servicer import ExpertServicer, HostedLayer
from moe_service.serving.worker.simulated import SimulatedServicer
from moe_service.transport.memory import device_memory, keep_large_buffers, process_memory, release_free_memory
from moe_service.transport.server import RunningServer, start_expert_server
from moe_service.transport.options import TLSConfig

Pairs = list[tuple[int, int]]


class ExpertWorker:
    """Plain class; `ExpertWorkerActor` below is its Ray actor. Async methods run on the actor's loop,
    which also runs the grpc.aio server; weight loading runs on a separate thread."""

    def __init__(self, worker_id: int, model: str, dtype: str, quantize: str | None = None, bind_host: str | None = None,
                 tls: TLSConfig | None = None, torch_threads: int | None = None,
                 port_range: tuple[int, int] | None = None, metrics_port_range: tuple[int, int] | None = None,
                 simulate: dict | None = None, standby: str = "device") -> None:
        if torch_threads:
            torch.set_num_threads(torch_threads)
        keep_large_buffers()  # a large dispatch's buffers are reused, not mapped afresh per call
        self.worker_id, self.model = worker_id, model
        self.dtype, self.quantize = DTYPES[dtype], quantize
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.standby = standby  # "host": the standbys it is given wait in host memory (pinned on a GPU node)
        self.bind_host, self.tls = bind_host, tls
        self.port_range, self.metrics_port_range = port_range, metrics_port_range
        self.server: RunningServer | None = None
        self.servicer: ExpertServicer | None = None
        self.hosted: dict[int, HostedLayer] = {}
        self.pairs: Pairs = []
        self.parked: Pairs = []  # those of `pairs` that are standbys parked in host memory
        self.addresses: dict[str, str] = {}
        self.reads: list[str] = []  # checkpoint tensors read so far (tests check each process reads its share)
        self.loads = 0  # weight loads after the first experts (tests check a restarted controller causes none)
        self.metrics = WorkerMetrics(worker_id)
        self.simulation = Simulation.from_dict(simulate) if simulate is not None else None
        if self.simulation is not None:
            self.simulation.export(self.metrics.registry)
        self.started = asyncio.Event()  # a rebalance's load() may arrive while start() still runs
        self.base_rss = process_memory()["VmRSS"]  # before any expert: what the process costs without them

    def _load(self, pairs: Pairs, parked: Pairs) -> None:
        """Host exactly `pairs` (`parked` of them in host memory), layer by layer: a layer's new module is built
        (replicas already here copied, new ones read) and swapped in before the next is built, so the memory a
        change needs at most is one layer's experts on top of what is hosted."""
        t0 = time.perf_counter()
        src = open_source(self.model)
        self.args = src.args
        by_layer: dict[int, tuple[list[int], list[int]]] = {}
        for layer, expert in pairs:
            by_layer.setdefault(layer, ([], []))[(layer, expert) in parked].append(expert)
        for layer in sorted(set(self.hosted) | set(by_layer)):
            hosted = dict(self.hosted)
            if layer not in by_layer:
                del hosted[layer]
            else:
                old, (active, standby) = self.hosted.get(layer), by_layer[layer]
                load = lambda experts, device, kept: load_experts(  # noqa: E731
                    src, [(layer, e) for e in experts], self.dtype, device, kept=kept and {layer: kept},
                    quantize=self.quantize)[layer][0]
                module = parked = None
                if standby:  # in host memory, pinned where a GPU copies from it
                    parked = load(standby, "cpu", (old.parked, old.parked_ids) if old and old.parked else None)
                    if self.device == "cuda":
                        for p in parked.parameters():
                            p.data = p.data.pin_memory()
                module = (load(active, self.device, (old.experts, old.expert_ids) if old else None) if active
                          else empty_experts(parked, 0, self.device))
                hosted[layer] = HostedLayer.build(module, active, self.args.n_routed_experts, parked, standby)
            self.hosted = hosted  # a call already running keeps the dict it started with
            if self.servicer is not None:
                self.servicer.set_hosted(hosted)
        self.reads += src.reads
        release_free_memory()  # the load's temporaries
        self.metrics.load_seconds.labels(self.metrics.worker).set(time.perf_counter() - t0)
        self.metrics.hosted.labels(self.metrics.worker).set(len(pairs))

    def _wanted(self, pairs: Pairs, standbys: Pairs) -> tuple[Pairs, Pairs]:
        pairs = sorted(map(tuple, pairs))
        return pairs, sorted(set(map(tuple, standbys)) & set(pairs)) if self.standby == "host" else []

    async def start(self, pairs: Pairs, standbys: Pairs = ()) -> dict[str, str]:
        """Load the experts (`standbys`: which of them are standbys), start the server; returns its address and
        the metrics address."""
        self.pairs, self.parked = self._wanted(pairs, standbys)
        await asyncio.get_running_loop().run_in_executor(None, self._load, self.pairs, self.parked)
        settings = dict(worker_id=str(self.worker_id), hidden_size=self.args.hidden_size,
                        num_experts=self.args.n_routed_experts, on_call=self.metrics.on_call,
                        on_promote=self.metrics.on_promote)
        self.servicer = (ExpertServicer(self.hosted, **settings) if self.simulation is None
                         else SimulatedServicer(self.hosted, hold=self.simulation.hold(), **settings))
        host = self.bind_host or ray.util.get_node_ip_address()
        self.server = await start_expert_server(self.servicer, host=host, ports=self.port_range, tls=self.tls)
        metrics_port = serve_metrics(self.metrics.registry, host=host, ports=self.metrics_port_range)
        self.addresses = {"address": f"{host}:{self.server.port}", "metrics": f"{host}:{metrics_port}"}
        self.started.set()
        return self.addresses

    async def load(self, pairs: Pairs, standbys: Pairs = ()) -> float:
        """Host exactly `pairs` from now on (`standbys`: which of them are standbys). New replicas load on a side
        thread, layer by layer, so no call ever waits for weights; calls already running finish on the layers
        they started with."""
        await self.started.wait()
        want, parked = self._wanted(pairs, standbys)
        if (want, parked) == (self.pairs, self.parked):
            return 0.0
        t0 = time.perf_counter()
        await asyncio.get_running_loop().run_in_executor(None, self._load, want, parked)
        self.loads += bool(self.pairs)  # a worker started empty (the service's start) loads its first experts here
        self.pairs, self.parked = want, parked
        return time.perf_counter() - t0

    def ping(self) -> dict:
        def nbytes(modules) -> int:
            return sum(p.numel() * p.element_size() for m in modules if m is not None for p in m.parameters())
        held = nbytes(h.experts for h in self.hosted.values())  # on its device (promoted standbys included)
        parked = nbytes(h.parked for h in self.hosted.values())  # standby: host, in host memory
        node = ray.get_runtime_context().get_node_id()
        return {"worker_id": self.worker_id, "pid": os.getpid(), "hosted": self.pairs, "device": self.device,
                "node_id": node, "reads": self.reads, "loads": self.loads,
                # what the hosted routed experts are stored as, and their bytes (FP8 scales included)
                "expert_dtypes": sorted({str(h.experts.gate_up_proj.dtype) for h in self.hosted.values()}),
                "expert_bytes": held + parked,
                # the memory they draw from (what `min_replicas` unset is decided on: placement/redundancy.py)
                "memory": {**device_memory(self.device, node), "held_bytes": held},
                "host_memory": {**device_memory("cpu", node), "held_bytes": parked}, "parked": self.parked,
                # resident memory now and at its peak (VmHWM: during every call so far), and before the experts
                "rss_bytes": (mem := process_memory())["VmRSS"], "peak_rss_bytes": mem["VmHWM"], "base_rss_bytes": self.base_rss,
                **self.addresses}

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(grace=1.0)
            self.server = None


ExpertWorkerActor = ray.remote(max_restarts=0, max_concurrency=16)(ExpertWorker)
