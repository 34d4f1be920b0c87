"""The reserved prefix `/_vespa/`: health and metrics, answered by the proxy itself.

These paths are answered in `requestheaders`, before any route call, so they are never
forwarded and cost no worker time. Backends do not serve `/_vespa/...`, so nothing of
theirs is shadowed; every other path goes to the endpoint as before.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass
from typing import Protocol

import aiohttp
from mitmproxy import http

from vespa.errors import VespaError

PREFIX = "/_vespa/"
# A health checker may poll every second; the autoscaler sees at most one probe per TTL.
PROBE_TTL_S = 5.0
PROBE_TIMEOUT_S = 3.0


def is_reserved(path: str) -> bool:
    return path.startswith(PREFIX) or path.split("?", 1)[0] == PREFIX.rstrip("/")


class UnknownStatusPage(VespaError):
    status, type = 404, "unknown_vespa_path"
    default_hint = f"{PREFIX} is reserved for the proxy: it serves {PREFIX}health and {PREFIX}metrics (GET)."


class Counts(Protocol):
    """What health needs of the metrics (vespa.observe.metrics.Telemetry), without importing them."""

    @property
    def in_flight(self) -> int: ...

    def render(self) -> tuple[bytes, str]: ...


class Target(Protocol):
    """What the proxy is set up to call (vespa.proxy.addon.Setup)."""

    endpoint: str
    autoscaler_url: str
    endpoints: tuple[str, ...]
    states: dict[str, dict]  # endpoint -> {"state": "ready" | "cold" | "unknown", ...}

    async def probe(self, timeout_s: float) -> int: ...


@dataclass(frozen=True, slots=True)
class Probe:
    """One GET {autoscaler}/pubkey/."""

    reachable: bool
    latency_ms: float | None
    error: str | None
    at: float  # time.monotonic() of the answer


class Health:
    def __init__(self, telemetry: Counts) -> None:
        self.telemetry = telemetry
        self._probe: Probe | None = None
        self._probing: asyncio.Task[Probe] | None = None
        self._target: Target | None = None

    def close(self) -> None:
        if self._probing is not None:
            self._probing.cancel()
            self._probing = None

    async def answer(self, flow: http.HTTPFlow, target: Target | None) -> None:
        """Answer a request under the reserved prefix; nothing reaches the autoscaler or a worker."""
        path = flow.request.path.split("?", 1)[0]
        if flow.request.method in ("GET", "HEAD") and path == PREFIX + "health":
            status, report = await self.report(target)
            flow.response = http.Response.make(
                status, json.dumps(report, indent=2) + "\n",
                {"Content-Type": "application/json", "Cache-Control": "no-store"},
            )
        elif flow.request.method in ("GET", "HEAD") and path == PREFIX + "metrics":
            body, content_type = self.telemetry.render()
            flow.response = http.Response.make(200, body, {"Content-Type": content_type, "Cache-Control": "no-store"})
        else:
            err = UnknownStatusPage(f"no such proxy page: {flow.request.method} {path}")
            flow.response = http.Response.make(err.status, err.body(), err.headers())

    async def report(self, target: Target | None) -> tuple[int, dict]:
        report: dict = {"status": "ok", "endpoint": None, "autoscaler": None, "in_flight": self.telemetry.in_flight}
        if target is None:
            return 503, {**report, "status": "unavailable", "reason": "Vespa is not configured (see the proxy's start-up log)"}
        report["endpoint"] = target.endpoint
        report["endpoints"] = {
            name: {"state": "unknown", **target.states.get(name, {})} for name in getattr(target, "endpoints", ())
        }
        probe = await self._fresh_probe(target)
        report["autoscaler"] = {
            "url": target.autoscaler_url,
            **{k: v for k, v in asdict(probe).items() if k != "at"},
            "checked_s_ago": round(time.monotonic() - probe.at, 1),
        }
        if not probe.reachable:
            reason = f"cannot reach the autoscaler at {target.autoscaler_url}: {probe.error}"
            return 503, {**report, "status": "unavailable", "reason": reason}
        return 200, report

    async def _fresh_probe(self, target: Target) -> Probe:
        if target is not self._target:  # reconfigured: the old answer was about another autoscaler
            self.close()
            self._target, self._probe = target, None
        if self._probe is not None and time.monotonic() - self._probe.at < PROBE_TTL_S:
            return self._probe
        # One probe at a time: a burst of health checks shares it.
        if self._probing is None or self._probing.done():
            self._probing = asyncio.ensure_future(self._run_probe(target))
        probe = await asyncio.shield(self._probing)
        if target is self._target:
            self._probe = probe
        return probe

    @staticmethod
    async def _run_probe(target: Target) -> Probe:
        start = time.monotonic()
        try:
            status = await target.probe(PROBE_TIMEOUT_S)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:  # OSError: the worker leg is gone
            return Probe(False, None, f"{type(e).__name__} {e}".strip(), time.monotonic())
        latency_ms = round((time.monotonic() - start) * 1000, 1)
        if status >= 500:
            return Probe(False, latency_ms, f"GET /pubkey/ answered {status}", time.monotonic())
        return Probe(True, latency_ms, None, time.monotonic())
