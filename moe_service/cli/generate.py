"""`moe-service generate`: in this process with the reference engine, or from a running service (--address).
Both take the gRPC API's per-request settings: --n samples (seed + i for sample i), --logprobs K, and
(from a service) --request-id."""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from dataclasses import replace
from typing import Callable

from moe_service.cli.common import add_model_args, add_sampling_args, model_source, parse_ids, sampling
from moe_service.engine.sampling import MAX_LOGPROBS, MAX_REQUEST_ID, MAX_SAMPLES
from moe_service.model.args import DTYPES


def check_args(ns: argparse.Namespace) -> None:
    """The service's limits, checked before a model is loaded or a connection made."""
    if not 1 <= ns.n <= MAX_SAMPLES:
        raise ValueError(f"--n must be in [1, {MAX_SAMPLES}], got {ns.n}")
    if ns.logprobs is not None and not 0 <= ns.logprobs <= MAX_LOGPROBS:
        raise ValueError(f"--logprobs must be in [0, {MAX_LOGPROBS}], got {ns.logprobs}")
    if ns.request_id is not None:
        if not ns.address:
            raise ValueError("--request-id needs --address: the id is the service's, echoed on every message; "
                             "an in-process run has no request to name")
        if len(ns.request_id) > MAX_REQUEST_ID:
            raise ValueError(f"--request-id has {len(ns.request_id)} characters; at most {MAX_REQUEST_ID}")


def sample_params(params, n: int) -> list:
    """One SamplingParams per sample: sample i of a seeded request has seed + i (as the gateway does)."""
    return [params if params.seed is None or i == 0 else replace(params, seed=(params.seed + i) % 2**63)
            for i in range(n)]


class Printer:
    """One sample without --logprobs streams as it comes (text, or ids with --ids). Otherwise each sample is
    printed whole at its end: its text (prefixed `[i] ` when n > 1) on stdout, then on stderr one line per
    token, `[i] ID 'TEXT': LOGPROB | top: ID 'TEXT': LOGPROB, ...` (TEXT where a tokenizer is at hand and
    not --ids), then its finish line."""

    def __init__(self, n: int, ids: bool, logprobs: int | None, decode: Callable[[list[int]], str] | None):
        self.streaming, self.tagged, self.ids, self.decode = n == 1 and logprobs is None, n > 1, ids, decode
        self.parts: dict[int, list[str]] = defaultdict(list)
        self.lines: dict[int, list[str]] = defaultdict(list)

    def _tok(self, t: int) -> str:
        return str(t) if self.decode is None else f"{t} {self.decode([t])!r}"

    def token(self, i: int, token_id: int, text: str, lp) -> None:
        """A token (token_id -1: text only), with lp = (logprob, [(token_id, logprob), ...]) or None."""
        if self.ids and token_id < 0:
            return
        if self.streaming:
            sys.stdout.write(f"{token_id} " if self.ids else text)
            sys.stdout.flush()
        else:
            self.parts[i].append(str(token_id) if self.ids else text)
        if lp is not None:
            top = ", ".join(f"{self._tok(t)}: {v:.4f}" for t, v in lp[1])
            self.lines[i].append(f"[{i}] {self._tok(token_id)}: {lp[0]:.4f}" + (f" | top: {top}" if top else ""))

    def finish(self, i: int, reason: str, usage: dict | None = None) -> None:
        end = f"finish: {reason}" + (f"; {usage}" if usage else "")
        if self.streaming:
            print(f"\n[{end}]", file=sys.stderr, flush=True)
            return
        text = (" " if self.ids else "").join(self.parts.pop(i, []))
        print((f"[{i}] " if self.tagged else "") + text, flush=True)
        for line in self.lines.pop(i, []):
            print(line, file=sys.stderr)
        print(f"[{i}] {end}" if self.tagged else f"[{end}]", file=sys.stderr, flush=True)


def _from_service(ns: argparse.Namespace, params) -> int:
    from moe_service.client import Client

    out = Printer(ns.n, ns.ids, ns.logprobs, None)
    kwargs = {"token_ids": parse_ids(ns.token_ids)} if ns.token_ids else {"prompt": ns.prompt}
    rid = None
    with Client(ns.address, api_key=ns.api_key) as client:
        for t in client.generate(**kwargs, params=params, n=ns.n, request_id=ns.request_id or ""):
            if rid is None:
                rid = t.request_id
                print(f"[request_id: {rid}]", file=sys.stderr, flush=True)
            if t.token_id >= 0 or t.text:
                lp = None if t.logprob is None else (t.logprob, list(t.top_logprobs))
                out.token(t.index, t.token_id, t.text, lp)
            if t.finish_reason:
                out.finish(t.index, t.finish_reason, t.usage)
    return 0


def cmd_generate(ns: argparse.Namespace) -> int:
    check_args(ns)
    params = sampling(ns)
    if ns.address:
        return _from_service(ns, params)
    from moe_service.checkpoint import load_model
    from moe_service.engine.engine import Engine
    from moe_service.engine.tokenizer import load_tokenizer

    source = model_source(ns)
    model = load_model(source, dtype=DTYPES[ns.dtype], progress=True)
    tok = load_tokenizer(source, model.args)
    ids = parse_ids(ns.token_ids) if ns.token_ids else tok.encode(ns.prompt or "")
    out = Printer(ns.n, ns.ids, ns.logprobs, None if ns.ids else tok.decode)
    for step in Engine(model, tok).stream([list(ids) for _ in range(ns.n)], sample_params(params, ns.n)):
        out.token(step.index, step.token, step.piece, step.logprobs)
        if step.finish_reason:
            out.finish(step.index, step.finish_reason)
    return 0


def add_parsers(sub) -> None:
    gen = sub.add_parser("generate", help="generate text, in-process or from a running service (--address)")
    add_model_args(gen)
    add_sampling_args(gen)
    gen.add_argument("prompt", nargs="?", default="")
    gen.add_argument("--token-ids", help="the prompt as token ids instead of text, e.g. '1 72 101'")
    gen.add_argument("--ids", action="store_true", help="print token ids instead of text")
    gen.add_argument("--address", help="HOST:PORT of a running service; default: run the model in this process")
    gen.add_argument("--api-key", default=None)
    gen.add_argument("--n", type=int, default=1, help=f"samples of the prompt (1..{MAX_SAMPLES}); with --seed S "
                     "sample i uses seed S+i; with n > 1 each sample is printed at its end as '[i] TEXT'")
    gen.add_argument("--logprobs", type=int, default=None, metavar="K",
                     help=f"print on stderr each token's log-probability (the model's, before temperature, top-p "
                     f"and top-k) and its K most likely alternatives (0..{MAX_LOGPROBS})")
    gen.add_argument("--request-id", default=None, help="with --address only: an id the service echoes on every "
                     "message (printed on stderr; default: one the service makes up)")
    gen.set_defaults(fn=cmd_generate)
