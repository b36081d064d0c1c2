"""A Python client for the service: `Client("host:port").generate(...)` streams tokens,
`.forward(token_ids)` returns logits as numpy."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moe_service.engine.sampling import SamplingParams
from moe_service.transport.codec import decode
from moe_service.transport.options import TLSConfig, grpc_options
from moe_service.transport.pb import moe_pb2, moe_pb2_grpc


@dataclass
class Token:
    token_id: int  # -1 on a sample's final message when it carries no token
    text: str
    finish_reason: str | None = None
    usage: dict | None = None
    index: int = 0  # which of the request's n samples
    logprob: float | None = None  # with logprobs=k: this token's, and the top k (token_id, logprob) pairs
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    request_id: str = ""


class Client:
    def __init__(self, address: str, api_key: str | None = None, tls: TLSConfig | None = None,
                 timeout_s: float | None = 300.0) -> None:
        opts = grpc_options()
        if tls is not None:
            self.channel = grpc.secure_channel(address, tls.channel_credentials(), opts + tls.channel_options())
        else:
            self.channel = grpc.insecure_channel(address, options=opts)
        self.stub = moe_pb2_grpc.InferenceStub(self.channel)
        self.metadata = [("authorization", f"Bearer {api_key}")] if api_key else []
        self.timeout_s = timeout_s

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    @staticmethod
    def _params(p: SamplingParams) -> moe_pb2.SamplingParams:
        msg = moe_pb2.SamplingParams(
            max_new_tokens=p.max_new_tokens, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k,
            stop_token_ids=list(p.stop_token_ids), stop_strings=list(p.stop_strings), ignore_eos=p.ignore_eos)
        if p.seed is not None:
            msg.seed = p.seed
        if p.logprobs is not None:
            msg.logprobs = p.logprobs
        return msg

    def generate(self, prompt: str | None = None, token_ids: list[int] | None = None,
                 params: SamplingParams | None = None, timeout_s: float | None = None, n: int = 1,
                 request_id: str = "", workload: str | None = None, stream_interval: int = 1,
                 **kwargs) -> Iterator[Token]:
        """Yields each token as the service produces it; each sample's last item has finish_reason and
        usage. With n > 1 the samples' tokens come interleaved, told apart by `index`. Sampling settings
        come as `params` or as keyword arguments (max_new_tokens=..., seed=..., logprobs=...). `workload` tags
        the request's class for the service's per-workload routing metrics (x-moe-workload).
        `stream_interval`: the service sends a message per that many tokens (1: whatever is ready, several
        when the stream is behind; 0: one message per token, as older clients ask); tokens come one by one
        here either way."""
        params = params or SamplingParams(**kwargs)
        req = moe_pb2.GenerateRequest(params=self._params(params), n=n, request_id=request_id,
                                      stream_interval=stream_interval)
        if token_ids is not None:
            req.token_ids.ids.extend(token_ids)
        else:
            req.text = prompt or ""
        metadata = self.metadata + ([("x-moe-workload", workload)] if workload else [])
        for r in self.stub.Generate(req, metadata=metadata, timeout=timeout_s or self.timeout_s):
            for t in r.tokens if r.tokens else [r]:
                if t is not r or not r.finish_reason:
                    yield Token(t.token_id, t.text, index=r.index, request_id=r.request_id,
                                logprob=t.logprob if t.HasField("logprob") else None,
                                top_logprobs=[(a.token_id, a.logprob) for a in t.top_logprobs])
            if r.finish_reason:
                u = r.usage
                yield Token(-1, "", index=r.index, request_id=r.request_id, finish_reason=r.finish_reason, usage={
                    "prompt_tokens": u.prompt_tokens, "generated_tokens": u.generated_tokens, "cached_tokens": u.cached_tokens,
                    "time_to_first_token_s": u.time_to_first_token_s, "total_time_s": u.total_time_s})

    def generate_ids(self, token_ids: list[int], **kwargs) -> list[int]:
        """The generated token ids of one prompt, collected."""
        return [t.token_id for t in self.generate(token_ids=token_ids, **kwargs) if t.token_id >= 0]

    def forward(self, token_ids: list[list[int]] | np.ndarray, targets: list[list[int]] | None = None) -> np.ndarray:
        """Logits `[B, T, vocab]` (rows padded after their length), or log p(targets) `[B, T]`."""
        req = moe_pb2.ForwardRequest()
        for s in token_ids:
            req.sequences.add().ids.extend(int(t) for t in s)
        for t in targets or []:
            req.targets.add().ids.extend(int(x) for x in t)
        resp = self.stub.Forward(req, metadata=self.metadata, timeout=self.timeout_s)
        out = resp.target_logprobs if targets else resp.logits
        return decode(out, "logits").numpy().copy()

    def model_info(self) -> moe_pb2.ModelInfoResponse:
        return self.stub.ModelInfo(moe_pb2.ModelInfoRequest(), metadata=self.metadata, timeout=self.timeout_s)

    def health(self, service: str = "") -> str:
        r = health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
