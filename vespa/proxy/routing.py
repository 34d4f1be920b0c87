"""Asks the autoscaler's `/route/` for a worker: the one retry loop for routing.

One shared aiohttp session keeps a keep-alive pool to the autoscaler, so a run of requests
costs one TCP/TLS handshake, and awaiting it never blocks mitmproxy's event loop.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import random
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, TypeVar

import aiohttp

from vespa import wire
from vespa.keys import mask
from vespa.errors import (
    AutoscalerUnreachable,
    BadRouteAnswer,
    EndpointNotFound,
    KeyRejected,
    NoWorkerInTime,
    RouteTimeout,
    WorkerUnavailable,
)

log = logging.getLogger("vespa.proxy.routing")

# Re-poll delays while the endpoint has no worker: the first is quick (a worker may be
# moments away), then they grow to about one poll a second, the SDK's pace.
POLL_FIRST_S = 0.1
POLL_CAP_S = 1.0
PROGRESS_EVERY_S = 5.0
RETRY_BASE_S = 0.2
RETRY_CAP_S = 2.0

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Routed:
    """A worker assignment plus what it took to get it (for logs, comments and metrics)."""

    ready: wire.RouteReady
    route_ms: float
    polls: int
    retries: int


@dataclass(frozen=True, slots=True)
class RouterSettings:
    autoscaler_url: str
    endpoint: str
    api_key: str
    key_source: str = "env VAST_API_KEY"
    deadline_s: float = 600.0
    call_timeout_s: float = 10.0
    max_attempts: int = 4


class Router:
    def __init__(self, settings: RouterSettings) -> None:
        self.settings = settings
        self._url = settings.autoscaler_url.rstrip("/") + "/route/"
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    def _client(self) -> aiohttp.ClientSession:
        # Created on first use, inside the running loop that will own it. Never re-created after
        # close(): a route still running when the options change would leak a fresh session.
        if self._closed:
            raise AutoscalerUnreachable("the proxy was reconfigured or stopped while this request was routed",
                                        hint="Retry the request.")
        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers={"Authorization": f"Bearer {self.settings.api_key}"},
                timeout=aiohttp.ClientTimeout(total=self.settings.call_timeout_s),
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60),
                # The autoscaler never sets cookies we need; skip the jar's per-call work.
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    async def close(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def probe(self, timeout_s: float) -> int:
        """GET /pubkey/ on the pooled session: the cheapest autoscaler call (no load, no auth
        needed), for /_vespa/health. Returns the HTTP status; raises aiohttp/timeout errors."""
        url = self.settings.autoscaler_url.rstrip("/") + "/pubkey/"
        async with self._client().get(url, timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            await resp.read()
            return resp.status

    async def route(self, cost: float, use: Callable[[wire.RouteReady], Awaitable[T]]) -> tuple[Routed, T]:
        """Get a ready worker, polling while the endpoint wakes up, until the deadline, and
        return it with what `use` (the request sent to it) returned.

        When `use` raises WorkerUnavailable (nothing reached the worker: refused, connect
        timeout, its 429) the worker is skipped and the same request_idx is routed again,
        inside this one loop, bounded by attempts and deadline.
        """
        s = self.settings
        start = time.monotonic()
        deadline = start + s.deadline_s
        request_idx, polls, retries, skipped = 0, 0, 0, 0
        next_progress = start + PROGRESS_EVERY_S
        while True:
            answer, used = await self._call(wire.RouteRequest(s.endpoint, cost, request_idx), deadline)
            retries += used
            if isinstance(answer, wire.RouteReady):
                routed = Routed(answer, (time.monotonic() - start) * 1000, polls, retries)
                try:
                    return routed, await use(answer)
                except WorkerUnavailable as e:
                    skipped += 1
                    delay = min(RETRY_CAP_S, RETRY_BASE_S * 2**skipped) * random.uniform(0.5, 1.0)
                    if skipped >= s.max_attempts or time.monotonic() + delay >= deadline:
                        raise
                    log.info("worker %s skipped (%s); routing request %d again", answer.url, e.message, answer.request_idx)
                    retries += 1
                    request_idx = answer.request_idx or request_idx
                    await asyncio.sleep(delay)
                    continue
            # Re-polls carry the same request_idx so the autoscaler does not count the load twice.
            request_idx = answer.request_idx or request_idx
            now = time.monotonic()
            if now >= next_progress:
                log.info("waiting for a worker of %r (%s), %.0f s so far", s.endpoint, answer.status, now - start)
                next_progress = now + PROGRESS_EVERY_S
            delay = min(POLL_CAP_S, POLL_FIRST_S * 2**polls) * random.uniform(0.8, 1.0)
            if now + delay >= deadline:
                raise NoWorkerInTime(
                    f"no worker of endpoint {s.endpoint!r} became ready within {s.deadline_s:.0f} s "
                    f"(autoscaler status: {answer.status})"
                )
            polls += 1
            await asyncio.sleep(delay)

    async def _call(self, body: wire.RouteRequest, deadline: float) -> tuple[wire.RouteReady | wire.RouteWaiting, int]:
        """One route call, retried on connect errors, timeouts, 429 and 5xx; never on 4xx."""
        s = self.settings
        for attempt in range(s.max_attempts):
            try:
                async with self._client().post(self._url, json=body.to_json()) as resp:
                    data = await resp.read()
                    status = resp.status
            except asyncio.TimeoutError:
                failure: Exception = RouteTimeout(
                    f"the autoscaler did not answer /route/ within {s.call_timeout_s:g} s"
                )
            except aiohttp.ClientConnectorError as e:
                if e.os_error.errno == errno.EMFILE:  # no socket, so nothing was sent
                    failure = WorkerUnavailable(
                        "the proxy has no file descriptor left to call the autoscaler (Too many open files); "
                        "the request was not processed and may be retried",
                        hint="Too many requests at once for this process's open-file limit (ulimit -n); retry shortly.",
                    )
                else:
                    failure = AutoscalerUnreachable(
                        f"cannot reach the autoscaler at {s.autoscaler_url}: {type(e).__name__} {e}".strip()
                    )
            except aiohttp.ClientError as e:
                failure = AutoscalerUnreachable(
                    f"cannot reach the autoscaler at {s.autoscaler_url}: {type(e).__name__} {e}".strip()
                )
            else:
                if status == 200:
                    return wire.parse_route_answer(data), attempt
                if status != 429 and status < 500:
                    raise self._rejection(status, data)
                failure = AutoscalerUnreachable(
                    f"the autoscaler answered {status} to /route/", hint="Vast's router is busy or failing; retry shortly."
                )
            delay = min(RETRY_CAP_S, RETRY_BASE_S * 2**attempt) * random.uniform(0.5, 1.0)
            if attempt + 1 == s.max_attempts or time.monotonic() + delay >= deadline:
                raise failure
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    def _rejection(self, status: int, data: bytes) -> Exception:
        s = self.settings
        detail = _error_text(data)
        if status in (401, 403):
            return KeyRejected(
                f"the autoscaler rejected the endpoint key for {s.endpoint!r} ({status}: {detail})",
                hint=(
                    f"The key (from {s.key_source}, ending {mask(s.api_key)}) must be the ENDPOINT key of "
                    f"{s.endpoint!r}, not the account key. Start with scripts/run.sh --account-key "
                    "(or VAST_ACCOUNT_KEY) and Vespa fetches the endpoint key for you."
                ),
            )
        if status in (400, 404):
            return EndpointNotFound(
                f"the autoscaler does not know endpoint {s.endpoint!r} ({status}: {detail})",
                hint="Check the name: scripts/run.sh --list shows your endpoints.",
            )
        return BadRouteAnswer(f"the autoscaler answered {status} to /route/: {detail}")


def _error_text(data: bytes) -> str:
    """The autoscaler's error message, whether it says `error`, `error_msg` or plain text."""
    try:
        body = json.loads(data)
    except ValueError:
        return data[:200].decode(errors="replace") or "no body"
    if isinstance(body, dict):
        return str(body.get("error_msg") or body.get("error") or body)[:200]
    return str(body)[:200]
