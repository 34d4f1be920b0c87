"""Client-side measurement: the five ways to reach the model, and timed loops over them.

Each "path" is one way a client gets a request to the backend:
  direct-backend   the backend itself (baseline of bare mitmproxy)
  bare-mitm        mitmdump with no addon, reverse-proxying to the backend
  direct-worker    a worker, signed with a route answer fetched once (the physical limit)
  two-step         /route/ then the worker, by hand with a pooled aiohttp client
  vespa            mitmdump + vespa_addon.py (the launcher's command)
Bare mitmproxy points at the backend, because a worker refuses unsigned bodies; so its
cost is compared with direct-backend, and Vespa's with direct-worker.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import aiohttp

ECHO_PAYLOAD = {"model": "bench", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
JSON = {"Content-Type": "application/json"}

Send = Callable[[aiohttp.ClientSession, str, dict[str, Any]], Awaitable[aiohttp.ClientResponse]]


class BenchError(RuntimeError):
    """A request failed: the bench stops rather than time errors."""


@dataclass
class Targets:
    backend: str
    worker: str
    autoscaler: str
    endpoint: str
    api_key: str = field(repr=False)
    bare: str = ""
    bare_stream: str = ""
    vespa: str = ""
    auth_data: dict[str, Any] = field(default_factory=dict)  # one route answer, reused by direct-worker

    async def route(self, session: aiohttp.ClientSession) -> dict[str, Any]:
        async with session.post(
            self.autoscaler + "/route/",
            json={"endpoint": self.endpoint, "cost": 1.0},
            headers={"Authorization": f"Bearer {self.api_key}"},
        ) as r:
            answer = await r.json()
        if r.status != 200 or "url" not in answer:
            raise BenchError(f"/route/ answered {r.status}: {answer}")
        return answer

    def wrapped(self, auth_data: dict[str, Any], payload: dict[str, Any]) -> bytes:
        return json.dumps({"auth_data": auth_data, "payload": payload}).encode()

    def sender(self, path: str) -> Send:
        """A function that starts `POST <path-specific URL><api path>` and returns the response."""

        def plain(base: str) -> Send:
            async def send(s: aiohttp.ClientSession, api: str, payload: dict[str, Any]) -> aiohttp.ClientResponse:
                return await s.post(base + api, data=json.dumps(payload).encode(), headers=JSON)
            return send

        async def direct_worker(s: aiohttp.ClientSession, api: str, payload: dict[str, Any]) -> aiohttp.ClientResponse:
            return await s.post(self.auth_data["url"] + api, data=self.wrapped(self.auth_data, payload), headers=JSON)

        async def two_step(s: aiohttp.ClientSession, api: str, payload: dict[str, Any]) -> aiohttp.ClientResponse:
            auth = await self.route(s)
            return await s.post(auth["url"] + api, data=self.wrapped(auth, payload), headers=JSON)

        return {
            "direct-backend": plain(self.backend),
            "bare-mitm": plain(self.bare),
            "bare-mitm-stream": plain(self.bare_stream),
            "direct-worker": direct_worker,
            "two-step": two_step,
            "vespa": plain(self.vespa),
        }[path]


def session(limit: int, force_close: bool = False, ssl_context: ssl.SSLContext | None = None) -> aiohttp.ClientSession:
    """force_close: a new connection per request, as curl or `requests.post` would open."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, force_close=force_close, ssl=ssl_context or True),
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=600),
    )


def worker_ssl_context(ca_pem: bytes) -> ssl.SSLContext:
    """Trusts the emulator's worker CA; like Vast's SDK, without Python 3.13's strict X.509 mode,
    which rejects Vast's root (see vespa/emulator/tls.py)."""
    context = ssl.create_default_context(cadata=ca_pem.decode())
    context.verify_flags &= ~ssl.VERIFY_X509_STRICT
    return context


async def echo_once(send: Send, s: aiohttp.ClientSession) -> float:
    """One small non-streamed request; returns its latency in ms (headers to last byte)."""
    t0 = time.perf_counter()
    resp = await send(s, "/echo", ECHO_PAYLOAD)
    async with resp:
        body = await resp.read()
    ms = (time.perf_counter() - t0) * 1000
    if resp.status != 200:
        raise BenchError(f"{resp.url} answered {resp.status}: {body[:300]!r}")
    return ms


async def closed_loop(send: Send, s: aiohttp.ClientSession, n: int, concurrency: int) -> tuple[list[float], float]:
    """`n` requests by `concurrency` clients, each sending its next as soon as one ends."""
    left = n
    latencies: list[float] = []

    async def client() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            latencies.append(await echo_once(send, s))

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return latencies, time.perf_counter() - t0


@dataclass
class StreamTiming:
    first_byte_ms: float  # response headers received
    ttft_ms: float  # first token's event received
    gaps_ms: list[float]  # between consecutive token events
    tokens: int


async def sse_once(send: Send, s: aiohttp.ClientSession, max_tokens: int, on_open: Callable[[], None] | None = None) -> StreamTiming:
    payload = {"model": "bench", "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens, "stream": True}
    t0 = time.perf_counter()
    resp = await send(s, "/v1/chat/completions", payload)
    first_byte = time.perf_counter()
    if on_open is not None:
        on_open()
    times: list[float] = []
    async with resp:
        if resp.status != 200:
            raise BenchError(f"{resp.url} answered {resp.status}: {(await resp.read())[:300]!r}")
        # readline stamps each event as it arrives; a proxy that buffers shows as one burst.
        while line := await resp.content.readline():
            if line.startswith(b"data: {"):
                delta = json.loads(line[6:])["choices"][0]["delta"]
                if delta.get("content"):
                    times.append(time.perf_counter())
    if len(times) != max_tokens:
        raise BenchError(f"expected {max_tokens} tokens, got {len(times)}")
    return StreamTiming(
        first_byte_ms=(first_byte - t0) * 1000,
        ttft_ms=(times[0] - t0) * 1000,
        gaps_ms=[(b - a) * 1000 for a, b in zip(times, times[1:])],
        tokens=len(times),
    )


async def download(url: str, size: int) -> float:
    """GET `url` and count the bytes without keeping them; returns MB/s."""
    got = 0
    t0 = time.perf_counter()
    async with session(1) as s, s.get(url) as resp:
        if resp.status != 200:
            raise BenchError(f"{url} answered {resp.status}: {(await resp.read())[:300]!r}")
        async for chunk in resp.content.iter_chunked(1 << 20):
            got += len(chunk)
    if got != size:
        raise BenchError(f"downloaded {got} of {size} bytes from {url}")
    return size / 1e6 / (time.perf_counter() - t0)
