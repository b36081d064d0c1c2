"""The controller's HTTP surface, served on the controller's own event loop (so it reads the same
state the controller writes, with no lock): Prometheus service discovery, the controller's metrics,
stats, and the admin endpoint that changes state, which needs the admin key when one is set."""

from __future__ import annotations

import asyncio
import json
import urllib.parse
from dataclasses import dataclass
from typing import Awaitable, Callable

from moe_service.serving.config import key_matches

MAX_HEADER_BYTES = 16 << 10


@dataclass
class Routes:
    targets: Callable[[], list[dict]]
    metrics: Callable[[], bytes]
    stats: Callable[[], dict]
    rebalance: Callable[[bool], Awaitable[dict]]  # dry_run -> result
    admin_key: Callable[[], str | None]


async def serve_http(routes: Routes, host: str, port: int) -> asyncio.AbstractServer:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            status, ctype, body = await _respond(routes, reader)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
            status, ctype, body = 400, "text/plain", f"bad request: {e}".encode()
        head = (f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
        try:
            writer.write(head.encode() + body)
            await writer.drain()
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port, limit=MAX_HEADER_BYTES)


_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed"}
_HELP = b"GET /targets, /metrics or /stats; POST /rebalance[?dry_run=1] (authorization: Bearer <admin key>)"


async def _respond(routes: Routes, reader: asyncio.StreamReader) -> tuple[int, str, bytes]:
    request = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    method, target, _ = request[0].split(" ", 2)
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in request[1:] if line)}
    url = urllib.parse.urlparse(target)
    if method == "GET":
        if url.path == "/targets":
            return 200, "application/json", json.dumps(routes.targets()).encode()
        if url.path == "/metrics":
            return 200, "text/plain; version=0.0.4", routes.metrics()
        if url.path == "/stats":
            return 200, "application/json", json.dumps(routes.stats()).encode()
        return 404, "text/plain", _HELP
    if method == "POST" and url.path == "/rebalance":
        key = routes.admin_key()
        if key and not key_matches(headers.get("authorization", ""), key):
            return 401, "application/json", json.dumps(
                {"error": "POST /rebalance needs the admin key: send 'authorization: Bearer <key>'"}).encode()
        dry = urllib.parse.parse_qs(url.query).get("dry_run", ["0"])[0] in ("1", "true")
        return 200, "application/json", json.dumps(await routes.rebalance(dry)).encode()
    return (405 if url.path in ("/targets", "/metrics", "/stats", "/rebalance") else 404), "text/plain", _HELP
