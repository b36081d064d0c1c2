"""How a Generate stream's tokens become messages.

`stream_interval` 0 (today's clients send it): one message per token, the token in `token_id` and `text`.
k >= 1: a message's tokens are in `tokens`: a sample's first token at once (the time to first token is not
delayed), then one message per k tokens, and with k = 1 whatever is ready each time the gateway's loop gets
to the stream (several tokens when it is behind). Fewer messages carry the same tokens through the replica's
streaming, Ray and Serve's proxy (docs/performance.md, "Ingress").
"""

from __future__ import annotations

from moe_service.transport.pb import moe_pb2


class TokenStream:
    def __init__(self, request_id: str, interval: int, samples: int) -> None:
        self.request_id, self.interval = request_id, interval
        self.coalesces = interval >= 1
        self.pending: list[list[moe_pb2.StreamedToken]] = [[] for _ in range(samples)]
        self.started = [False] * samples

    def token(self, i: int, token_id: int, piece: str, logprobs) -> moe_pb2.GenerateResponse | None:
        """Sample i's next token: its message, if one goes out now."""
        if not self.coalesces:
            resp = moe_pb2.GenerateResponse(token_id=token_id, text=piece, index=i, request_id=self.request_id)
            if logprobs is not None:
                resp.logprob = logprobs[0]
                resp.top_logprobs.extend(moe_pb2.TopLogprob(token_id=t, logprob=v) for t, v in logprobs[1])
            return resp
        tok = moe_pb2.StreamedToken(token_id=token_id, text=piece)
        if logprobs is not None:
            tok.logprob = logprobs[0]
            tok.top_logprobs.extend(moe_pb2.TopLogprob(token_id=t, logprob=v) for t, v in logprobs[1])
        self.pending[i].append(tok)
        if not self.started[i] or (self.interval >= 2 and len(self.pending[i]) >= self.interval):
            self.started[i] = True
            return self._flush(i)
        return None

    def finish(self, i: int, reason: str, usage: dict) -> list[moe_pb2.GenerateResponse]:
        """Sample i's last messages: its tokens still held, then its finish."""
        held = [self._flush(i)] if self.pending[i] else []
        return held + [moe_pb2.GenerateResponse(token_id=-1, finish_reason=reason, usage=moe_pb2.Usage(**usage),
                                                index=i, request_id=self.request_id)]

    def ready(self) -> list[moe_pb2.GenerateResponse]:
        """With interval 1, every sample's tokens made so far: the loop has caught up with the engine."""
        if self.interval != 1:
            return []
        return [self._flush(i) for i, held in enumerate(self.pending) if held]

    def _flush(self, i: int) -> moe_pb2.GenerateResponse:
        tokens, self.pending[i] = self.pending[i], []
        last = tokens[-1]
        resp = moe_pb2.GenerateResponse(token_id=last.token_id, text="".join(t.text for t in tokens), index=i,
                                        request_id=self.request_id, tokens=tokens)
        if last.HasField("logprob"):
            resp.logprob = last.logprob
            resp.top_logprobs.extend(last.top_logprobs)
        return resp
