"""The OpenAI-compatible HTTP API: /v1/models, /v1/completions, /v1/chat/completions and /health, served by
the HTTP front (http_front.py) on its own server, beside the gateway.

Every request becomes one `moe.v1.GenerateRequest` on token ids and runs through the gateway's
`RequestAPI.generate`, the path gRPC clients take: admission, sampling, logprobs, `n`, errors and metrics
are the same for both. docs/api.md lists the fields, what each maps to, and what is refused.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import AsyncIterator, Callable, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from moe_service.engine.scheduler import SchedulerConfig
from moe_service.engine.tokenizer import Tokenizer
from moe_service.serving.gateway.chat import ChatError, ChatTemplate
from moe_service.serving.gateway.openai_models import APIError, ChatRequest, CompletionRequest, Sampling
from moe_service.serving.gateway.requests import GatewayError
from moe_service.transport.pb import moe_pb2


class GatewayAccess(Protocol):
    """What the HTTP API needs of the gateway (http_front.RemoteGateway reaches it through a handle)."""

    tokenizer: Tokenizer
    model: str  # the model setting: where the chat template is read from
    limits: SchedulerConfig

    def check_auth(self, metadata: list[tuple[str, str]]) -> None: ...

    def generate(self, request: moe_pb2.GenerateRequest, method: str, workload: str | None,
                 interval: int = 1) -> AsyncIterator[moe_pb2.GenerateResponse]: ...

    async def serving(self) -> bool: ...


class HTTPFrontend:
    """Turns OpenAI requests into GenerateRequests for `gateway` and its answers into OpenAI responses."""

    def __init__(self, gateway: GatewayAccess, model_name: str) -> None:
        self.gateway, self.model_name = gateway, model_name
        self.tokenizer = gateway.tokenizer
        self.chat = ChatTemplate.load(gateway.model)
        self.created = int(time.time())

    # ---- requests in -------------------------------------------------------------------------

    def check(self, request: Request, body: Sampling) -> None:
        try:
            self.gateway.check_auth([("authorization", request.headers.get("authorization", ""))])
        except GatewayError:
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key") from None
        if body.model and body.model != self.model_name:
            raise APIError(404, f"the model '{body.model}' does not exist; this service serves '{self.model_name}'",
                           "model", "model_not_found")
        body.refuse_unsupported()

    def completion_prompt(self, body: CompletionRequest) -> list[int]:
        p = body.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise APIError(400, "one prompt per request: send a string or a list of token ids", "prompt")
            p = p[0]
        if isinstance(p, str):
            try:
                return self.tokenizer.encode(p)
            except ValueError as e:
                raise APIError(400, str(e), "prompt") from None
        return list(p)

    def chat_prompt(self, body: ChatRequest) -> list[int]:
        messages = [{**(m.model_extra or {}), "role": m.role, "content": m.text()} for m in body.messages]
        try:
            text = self.chat.render(messages)
            # a checkpoint's template writes BOS itself (as transformers' apply_chat_template encodes it)
            return self.tokenizer.encode(text, add_bos=not self.chat.from_checkpoint)
        except (ChatError, ValueError) as e:
            raise APIError(400, str(e), "messages") from None

    def generate_request(self, prompt: list[int], body: Sampling, logprobs: int | None, request_id: str
                         ) -> moe_pb2.GenerateRequest:
        limits = self.gateway.limits
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens is None:  # as OpenAI: as long as the model allows (here: the sequence limit)
            max_tokens = max(1, min(limits.max_new_tokens, limits.max_seq_len - len(prompt)))
        params = moe_pb2.SamplingParams(
            max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=max(0, body.top_k),
            stop_strings=body.stops(), ignore_eos=body.ignore_eos)
        if body.seed is not None:
            params.seed = body.seed
        if logprobs is not None:
            params.logprobs = logprobs
        req = moe_pb2.GenerateRequest(params=params, n=body.n, request_id=request_id)
        req.token_ids.ids.extend(prompt)
        return req

    # ---- answers out -------------------------------------------------------------------------

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def chat_logprobs(self, r: moe_pb2.GenerateResponse) -> dict:
        def entry(token_id: int, logprob: float) -> dict:
            text = self.token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(self.tokenizer.token_bytes(token_id))}

        return {**entry(r.token_id, r.logprob),
                "top_logprobs": [entry(t.token_id, t.logprob) for t in r.top_logprobs]}

    def completion_logprobs(self, tokens: list[moe_pb2.GenerateResponse], offset: int) -> dict:
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for r in tokens:
            out["tokens"].append(self.token_text(r.token_id))
            out["token_logprobs"].append(r.logprob)
            top: dict[str, float] = {}
            for t in r.top_logprobs:  # best first; two tokens with one text (parts of a character) keep the best
                top.setdefault(self.token_text(t.token_id), t.logprob)
            out["top_logprobs"].append(top)
            out["text_offset"].append(offset)
            offset += len(r.text)
        return out


# a stream=false answer is awaited whole: the gateway may send it many tokens to a message (fewer hops)
WHOLE_ANSWER_INTERVAL = 16


async def _first(gateway: GatewayAccess, req: moe_pb2.GenerateRequest, method: str, request: Request, streamed: bool
                 ) -> tuple[moe_pb2.GenerateResponse, AsyncIterator[moe_pb2.GenerateResponse]]:
    """Starts the generation and waits for its first message, so that a refusal is still an HTTP status."""
    stream = gateway.generate(req, method, request.headers.get("x-moe-workload"),
                              1 if streamed else WHOLE_ANSWER_INTERVAL).__aiter__()
    try:
        return await stream.__anext__(), stream
    except GatewayError as e:
        raise APIError.of(e) from None


def _sse(obj: dict | str) -> bytes:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, separators=(',', ':'))}\n\n".encode()


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def build_http_app(gateway: GatewayAccess, model_name: str) -> FastAPI:
    front = HTTPFrontend(gateway, model_name)
    app = FastAPI(title="moe-service", docs_url=None, redoc_url=None)

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        err = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        return APIError(400, f"{'.'.join(loc) or 'body'}: {err.get('msg', 'invalid request')}",
                        ".".join(loc) or None, "invalid_value").response()

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = await gateway.serving()
        return JSONResponse({"status": "ok" if ok else "unavailable"}, status_code=200 if ok else 503)

    @app.get("/-/healthz")
    async def healthz() -> PlainTextResponse:
        # what Serve's own proxy answers here, which KubeRay asks before sending the head pod traffic
        ok = await gateway.serving()
        return PlainTextResponse("success" if ok else "unavailable", status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        front.check(request, Sampling())
        return {"object": "list", "data": [{
            "id": model_name, "object": "model", "created": front.created, "owned_by": "moe-service",
            "max_model_len": gateway.limits.max_seq_len}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        front.check(request, body)
        rid = request.headers.get("x-request-id") or uuid.uuid4().hex
        prompt = front.completion_prompt(body)
        req = front.generate_request(prompt, body, body.logprobs, rid)
        first, stream = await _first(gateway, req, "completions", request, body.stream)
        head = {"id": f"cmpl-{rid}", "object": "text_completion", "created": int(time.time()), "model": model_name}
        want_lp = body.logprobs is not None
        if body.stream:
            offsets = [0] * body.n  # each choice's text so far, for logprobs' text_offset

            def choice(r: moe_pb2.GenerateResponse) -> dict:
                c = {"index": r.index, "text": r.text, "logprobs": None, "finish_reason": r.finish_reason or None}
                if want_lp and not r.finish_reason:
                    c["logprobs"] = front.completion_logprobs([r], offsets[r.index])
                offsets[r.index] += len(r.text)
                return c

            return _sse_response(first, stream, head, choice, len(prompt), body, rid)
        choices, cached = await _collect(first, stream, body.n)
        out = []
        for i, (tokens, text, reason) in enumerate(choices):
            out.append({"index": i, "text": text, "finish_reason": reason,
                        "logprobs": front.completion_logprobs(tokens, 0) if want_lp else None})
        generated = sum(len(t) for t, _, _ in choices)
        return JSONResponse({**head, "choices": out, "usage": _usage(len(prompt), generated, cached)},
                            headers={"x-request-id": rid})

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        front.check(request, body)
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        rid = request.headers.get("x-request-id") or uuid.uuid4().hex
        prompt = front.chat_prompt(body)
        req = front.generate_request(prompt, body, (body.top_logprobs or 0) if body.logprobs else None, rid)
        first, stream = await _first(gateway, req, "chat.completions", request, body.stream)
        head = {"id": f"chatcmpl-{rid}", "created": int(time.time()), "model": model_name}
        if body.stream:
            def choice(r: moe_pb2.GenerateResponse) -> dict:
                if r.finish_reason:
                    return {"index": r.index, "delta": {"content": r.text} if r.text else {}, "logprobs": None,
                            "finish_reason": r.finish_reason}
                return {"index": r.index, "delta": {"content": r.text}, "finish_reason": None,
                        "logprobs": {"content": [front.chat_logprobs(r)]} if body.logprobs else None}

            chunk = {**head, "object": "chat.completion.chunk"}
            roles = tuple({**chunk, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                 "logprobs": None, "finish_reason": None}]} for i in range(body.n))
            return _sse_response(first, stream, chunk, choice, len(prompt), body, rid, roles)
        choices, cached = await _collect(first, stream, body.n)
        out = []
        for i, (tokens, text, reason) in enumerate(choices):
            out.append({"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
                        "logprobs": {"content": [front.chat_logprobs(r) for r in tokens]} if body.logprobs else None})
        generated = sum(len(t) for t, _, _ in choices)
        return JSONResponse({**head, "object": "chat.completion", "choices": out,
                             "usage": _usage(len(prompt), generated, cached)}, headers={"x-request-id": rid})

    return app


def _sse_response(first: moe_pb2.GenerateResponse, stream: AsyncIterator[moe_pb2.GenerateResponse], head: dict,
                  choice: Callable[[moe_pb2.GenerateResponse], dict], prompt_tokens: int, body: Sampling, rid: str,
                  preamble: tuple[dict, ...] = ()) -> StreamingResponse:
    """Server-sent events: `preamble`, then a chunk per message of the stream (its choice made by `choice`),
    the usage chunk if asked for, and [DONE]. An error after the first token (the status is sent by then)
    comes as one event with the error object."""
    async def events() -> AsyncIterator[bytes]:
        generated = cached = 0
        try:
            for p in preamble:
                yield _sse(p)
            r: moe_pb2.GenerateResponse | None = first
            while r is not None:
                generated += not r.finish_reason
                cached = max(cached, r.usage.cached_tokens)
                yield _sse({**head, "choices": [choice(r)]})
                r = await anext(stream, None)
            if body.stream_options and body.stream_options.include_usage:
                yield _sse({**head, "choices": [], "usage": _usage(prompt_tokens, generated, cached)})
            yield _sse("[DONE]")
        except GatewayError as e:
            yield _sse(APIError.of(e).body())
        finally:
            await stream.aclose()

    return StreamingResponse(events(), media_type="text/event-stream", headers={"x-request-id": rid})


async def _collect(first: moe_pb2.GenerateResponse, stream: AsyncIterator[moe_pb2.GenerateResponse], n: int
                   ) -> tuple[list[tuple[list[moe_pb2.GenerateResponse], str, str]], int]:
    """Each choice's token messages, text and finish reason, from a whole stream; and the prompt tokens
    the prefix cache held (the most any choice found: the prompt is counted once)."""
    tokens: list[list] = [[] for _ in range(n)]
    texts = [""] * n
    reasons = [""] * n
    cached = 0
    try:
        r: moe_pb2.GenerateResponse | None = first
        while r is not None:
            texts[r.index] += r.text
            if r.finish_reason:
                reasons[r.index] = r.finish_reason
                cached = max(cached, r.usage.cached_tokens)
            else:
                tokens[r.index].append(r)
            r = await anext(stream, None)
    except GatewayError as e:
        raise APIError.of(e) from None
    finally:
        await stream.aclose()
    return list(zip(tokens, texts, reasons)), cached
