"""The gateway's request API: Generate, Forward and ModelInfo, with admission, auth and the errors a
client gets (gRPC statuses, and retry hints when refused for lack of room). The Serve deployment and the
HTTP API both call these."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from dataclasses import replace
from typing import TYPE_CHECKING, AsyncIterator

import grpc
import torch

from moe_service.engine.runner import StepDeadline
from moe_service.engine.sampling import MAX_REQUEST_ID, MAX_SAMPLES, SamplingParams
from moe_service.engine.scheduler import Rejected
from moe_service.engine.sequence import check_tokens
from moe_service.model.args import DTYPES
from moe_service.model.summary import summarize
from moe_service.serving.config import key_matches
from moe_service.serving.gateway.streaming import TokenStream
from moe_service.transport.codec import encode
from moe_service.transport.pb import moe_pb2

if TYPE_CHECKING:
    from moe_service.serving.gateway.gateway import Gateway

STATUS_OF = {"invalid": grpc.StatusCode.INVALID_ARGUMENT, "exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
             "deadline": grpc.StatusCode.DEADLINE_EXCEEDED, "unavailable": grpc.StatusCode.UNAVAILABLE,
             "cancelled": grpc.StatusCode.CANCELLED, "internal": grpc.StatusCode.INTERNAL,
             "unauthenticated": grpc.StatusCode.UNAUTHENTICATED}
MAX_FORWARD_TOKENS = 8192


class GatewayError(Exception):
    """An error for the client: a gRPC status and a message that says what is allowed; with
    `retry_after_ms`, when a retry may succeed (sent as gRPC's grpc-retry-pushback-ms trailer)."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after_ms: int | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.retry_after_ms = code, message, retry_after_ms

    def __reduce__(self):  # Serve ships exceptions between processes
        return (GatewayError, (self.code, self.message, self.retry_after_ms))


def check_auth(metadata: list[tuple[str, str]], key: str | None) -> None:
    """UNAUTHENTICATED unless the metadata (or HTTP headers) carry 'authorization: Bearer <key>'."""
    if not key:
        return
    for k, v in metadata:
        if k.lower() == "authorization" and key_matches(v, key):
            return
    raise GatewayError(grpc.StatusCode.UNAUTHENTICATED,
                       "missing or wrong API key: send metadata 'authorization: Bearer <key>'")


class RequestAPI:
    def __init__(self, gateway: "Gateway") -> None:
        self.gw = gateway
        self.completions: deque[float] = deque(maxlen=4096)  # when recent requests finished (retry hints)

    def check_auth(self, metadata: list[tuple[str, str]]) -> None:
        check_auth(metadata, self.gw.api_key)

    # ---- Generate ---------------------------------------------------------------------------------

    def _prompt(self, request: moe_pb2.GenerateRequest) -> list[int]:
        which = request.WhichOneof("prompt")
        if which == "token_ids":
            return list(request.token_ids.ids)
        if which == "text":
            try:
                return self.gw.tokenizer.encode(request.text)
            except ValueError as e:
                raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT, "prompt is missing: set text or token_ids")

    @staticmethod
    def _params(p: moe_pb2.SamplingParams) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=p.max_new_tokens or 32, temperature=p.temperature, top_p=p.top_p or 1.0, top_k=p.top_k,
            seed=p.seed if p.HasField("seed") else None, stop_token_ids=tuple(p.stop_token_ids),
            stop_strings=tuple(p.stop_strings), ignore_eos=p.ignore_eos,
            logprobs=p.logprobs if p.HasField("logprobs") else None)

    def _request(self, request: moe_pb2.GenerateRequest) -> tuple[list[int], list[SamplingParams], str]:
        """The prompt, one SamplingParams per sample (sample i of a seeded request has seed + i), the id."""
        n = request.n or 1
        if n > MAX_SAMPLES:
            raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT, f"n is {n}; this service allows at most {MAX_SAMPLES}")
        rid = request.request_id or uuid.uuid4().hex
        if len(rid) > MAX_REQUEST_ID:
            raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"request_id has {len(rid)} characters; at most {MAX_REQUEST_ID}")
        params = self._params(request.params)
        samples = [params if params.seed is None or i == 0 else replace(params, seed=(params.seed + i) % 2**63)
                   for i in range(n)]
        return self._prompt(request), samples, rid

    def _rejected(self, e: Rejected, arrived: float, method: str) -> GatewayError:
        """Counts a refused request, and says when to retry one refused for lack of room."""
        code = STATUS_OF[e.kind]
        m = self.gw.metrics
        m.requests.labels(method, code.name).inc()
        m.rejected.labels(e.cause).inc()
        m.rejection.observe(time.monotonic() - arrived)
        if code != grpc.StatusCode.RESOURCE_EXHAUSTED:
            return GatewayError(code, str(e))
        # the time the requests waiting now take to start, at the recent rate of completions
        now = time.monotonic()
        recent = sum(1 for t in self.completions if t > now - 10.0) / 10.0
        waiting = self.gw.engine.stats()["waiting"]
        retry = int(min(30_000, max(100, 1000 * (waiting + 1) / recent))) if recent else 1000
        # the trailer is gRPC's retry pushback; Serve's proxy forwards trailers only with a stream's
        # results, so the hint is in the message as well
        return GatewayError(code, f"{e} (retry in about {retry} ms)", retry)

    def workload_index(self, name: str | None) -> int:
        """A client's x-moe-workload tag as the engine carries it: a listed class, else "other"."""
        names = self.gw.cfg.workloads
        return names.index(name) if name in names else len(names)

    async def generate(self, request: moe_pb2.GenerateRequest, timeout_s: float | None = None,
                       method: str = "Generate", workload: str | None = None) -> AsyncIterator[moe_pb2.GenerateResponse]:
        """Streams the request's tokens; with n samples, theirs interleaved as they come, each message with
        its index, and each sample ending with its own finish message. `method` labels the metrics."""
        gw = self.gw
        arrived = time.monotonic()
        if not gw.accepting():
            raise GatewayError(grpc.StatusCode.UNAVAILABLE, "the service is draining; send requests elsewhere")
        # while experts are being replaced requests are still taken: steps wait (within the expert call
        # timeout and each request's deadline) for the controller to bring them back
        prompt, samples, rid = self._request(request)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        m = gw.metrics
        seqs = []
        try:
            for i, params in enumerate(samples):
                def emit(ev, i=i) -> None:
                    loop.call_soon_threadsafe(events.put_nowait, (i, ev))

                seqs.append(gw.engine_loop.submit(prompt, params, emit, timeout_s or gw.cfg.request_timeout_s,
                                                  self.workload_index(workload)))
        except Rejected as e:
            for s in seqs:
                gw.engine_loop.cancel(s)
            raise self._rejected(e, arrived, method) from None
        m.prompt_tokens.inc(len(prompt))
        t_start = time.monotonic()
        last = [t_start] * len(seqs)
        code = grpc.StatusCode.CANCELLED
        running = len(seqs)
        stream = TokenStream(rid, request.stream_interval, len(seqs))
        try:
            while running:
                batch = [await events.get()]
                while stream.coalesces and not events.empty():  # the stream is behind: what is ready goes out together
                    batch.append(events.get_nowait())
                now = time.monotonic()
                for i, (kind, payload) in batch:
                    if kind == "token":
                        (m.itl.observe(now - last[i]) if last[i] != t_start else m.ttft.observe(now - t_start))
                        last[i] = now
                        m.generated_tokens.inc()
                        resp = stream.token(i, *payload)
                        if resp is not None:
                            yield resp
                    elif kind == "finish":
                        running -= 1
                        for resp in stream.finish(i, *payload):
                            yield resp
                    else:
                        err_kind, message = payload
                        code = STATUS_OF.get(err_kind, grpc.StatusCode.INTERNAL)
                        raise GatewayError(code, message)
                for resp in stream.ready():
                    yield resp
            code = grpc.StatusCode.OK
            self.completions.append(now)
            m.duration.observe(now - t_start)
        finally:
            m.requests.labels(method, code.name).inc()
            for s in seqs:
                if not s.finished:
                    gw.engine_loop.cancel(s)  # the client went away (or a sample failed): free its slot

    # ---- Forward, ModelInfo -------------------------------------------------------------------

    async def forward(self, request: moe_pb2.ForwardRequest, timeout_s: float | None = None) -> moe_pb2.ForwardResponse:
        gw = self.gw
        seqs = [list(s.ids) for s in request.sequences]
        V = gw.args.vocab_size
        if not seqs or any(not s for s in seqs):
            raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT, "sequences must hold at least one non-empty sequence")
        total = sum(map(len, seqs))
        if total > MAX_FORWARD_TOKENS:
            raise GatewayError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"sequences hold {total} tokens; Forward accepts at most {MAX_FORWARD_TOKENS}")
        for i, s in enumerate(seqs):
            try:
                check_tokens(s, V, gw.args.max_position_embeddings, f"sequences[{i}]")
            except ValueError as e:
                raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        targets = [list(t.ids) for t in request.targets]
        if targets and (len(targets) != len(seqs) or any(len(t) != len(s) for t, s in zip(targets, seqs))):
            raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT, "targets must match sequences one to one, same lengths")
        if targets and any(not 0 <= t < V for ts in targets for t in ts):
            raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT, f"targets hold a token id outside [0, {V})")
        T = max(map(len, seqs))
        dev = gw.device
        ids = torch.tensor([s + [0] * (T - len(s)) for s in seqs], device=dev)
        lengths = torch.tensor([len(s) for s in seqs], device=dev)
        deadline = time.monotonic() + (timeout_s or gw.cfg.request_timeout_s)
        try:
            logits = await asyncio.wrap_future(gw.engine_loop.run_job(lambda: gw.forward(ids, lengths, deadline)))
        except StepDeadline as e:
            raise GatewayError(grpc.StatusCode.DEADLINE_EXCEEDED, str(e)) from None
        resp = moe_pb2.ForwardResponse(lengths=[len(s) for s in seqs])
        if targets:
            tgt = torch.tensor([t + [0] * (T - len(t)) for t in targets], device=dev)
            lp = logits.log_softmax(-1).gather(-1, tgt[..., None]).squeeze(-1)
            encode(lp, resp.target_logprobs)
        else:
            encode(logits, resp.logits)
        return resp

    def model_info(self) -> moe_pb2.ModelInfoResponse:
        gw = self.gw
        s = summarize(gw.args, DTYPES[gw.cfg.dtype])
        c = gw.engine.config
        keys = ("layers", "moe_layers", "hidden_size", "vocab_size", "attention_heads", "routed_experts_per_layer",
                "shared_experts_per_layer", "experts_per_token", "topk_method", "params_total",
                "params_active_per_token", "kv_cache_bytes_per_token", "dtype", "max_position_embeddings")
        return moe_pb2.ModelInfoResponse(
            name=str(s["name"]), expert_workers=len(gw.follower.info["addresses"]), **{k: s[k] for k in keys},
            limits=moe_pb2.ServiceLimits(
                max_prompt_tokens=c.prompt_limit, max_new_tokens=c.max_new_tokens,
                max_concurrent_requests=c.max_running, max_queued_requests=c.max_queue,
                request_timeout_s=gw.cfg.request_timeout_s, kv_cache_capacity_tokens=c.capacity,
                max_forward_tokens=MAX_FORWARD_TOKENS))
