"""The OpenAI API's shapes as this service reads them: request bodies (pydantic), the fields it refuses,
and errors as OpenAI clients expect them."""

from __future__ import annotations

from typing import Any

import grpc
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from moe_service.engine.sampling import MAX_LOGPROBS, MAX_SAMPLES
from moe_service.serving.gateway.requests import GatewayError

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.UNAUTHENTICATED: 401, grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
ERROR_TYPE = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
              429: "rate_limit_error", 503: "service_unavailable_error", 504: "timeout_error"}

# Fields OpenAI defines that this service does not implement: present with a value that asks for the
# feature, they get a 400 naming them (a silently ignored `tools` would look like a model that never calls them)
UNSUPPORTED = {
    "tools": lambda v: bool(v), "functions": lambda v: bool(v),
    "tool_choice": lambda v: v not in (None, "none"), "function_call": lambda v: v not in (None, "none"),
    "response_format": lambda v: v is not None and not (isinstance(v, dict) and v.get("type") == "text"),
    "logit_bias": lambda v: bool(v), "presence_penalty": lambda v: v not in (None, 0),
    "frequency_penalty": lambda v: v not in (None, 0), "best_of": lambda v: v not in (None, 1),
    "echo": lambda v: bool(v), "suffix": lambda v: bool(v), "audio": lambda v: v is not None,
    "modalities": lambda v: v not in (None, ["text"]), "prediction": lambda v: v is not None,
}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    @classmethod
    def of(cls, e: GatewayError) -> "APIError":
        status = HTTP_STATUS.get(e.code, 500)
        headers = {"retry-after": str(max(1, round(e.retry_after_ms / 1000)))} if e.retry_after_ms else None
        return cls(status, e.message, code=e.code.name.lower(), headers=headers)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": ERROR_TYPE.get(self.status, "internal_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown fields are ignored; known unsupported ones refused

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)  # an extension (vLLM's): 0 or -1 = no cut
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=MAX_SAMPLES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # an extension (vLLM's)

    def refuse_unsupported(self) -> None:
        for name, value in (self.model_extra or {}).items():
            check = UNSUPPORTED.get(name)
            if check is not None and check(value):
                raise APIError(400, f"'{name}' is not supported by this service (docs/api.md lists what is)", name,
                               "unsupported_parameter")

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise APIError(400, "stop takes at most 4 non-empty strings", "stop")
        return stops


class CompletionRequest(Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            parts = []
            for part in self.content:
                if part.get("type") != "text":
                    raise APIError(400, f"message content of type {part.get('type')!r} is not supported; send text",
                                   "messages")
                parts.append(str(part.get("text", "")))
            return "".join(parts)
        return self.content or ""


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
