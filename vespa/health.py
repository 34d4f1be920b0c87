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
from typing import TYPE_CHECKING

import aiohttp
from mitmproxy import http

from vespa.errors import VespaError

if TYPE_CHECKING:
    from vespa.metrics import Telemetry
    from vespa.routing import Router

PREFIX = "/_vespa/"
# A health checker may poll every second; the autoscaler sees at most one probe per TTL.
PROBE_TTL_S = 5.0
PROBE_TIMEOUT_S = 3.0


def is_reserved(path: str) -> bool:
    return path.startswith(PREFIX) or path.split("?", 1)[0] == PREFIX.rstrip("/")


class UnknownStatusPage(VespaError):
    status, type = 404, "unknown_vespa_path"
    default_hint = f"{PREFIX} is reserved for the proxy: it serves {PREFIX}health and {PREFIX}metrics (GET)."


@dataclass(frozen=True, slots=True)
class Probe:
    """One GET {autoscaler}/pubkey/."""

    reachable: bool
    latency_ms: float | None
    error: str | None
    at: float  # time.monotonic() of the answer


class Health:
    def __init__(self, telemetry: Telemetry) -> None:
        self.telemetry = telemetry
        self._probe: Probe | None = None
        self._probing: asyncio.Task[Probe] | None = None
        self._router: Router | None = None

    def close(self) -> None:
        if self._probing is not None:
            self._probing.cancel()
            self._probing = None

    async def answer(self, flow: http.HTTPFlow, router: Router | None) -> None:
        """Answer a request under the reserved prefix; nothing reaches the autoscaler or a worker."""
        path = flow.request.path.split("?", 1)[0]
        if flow.request.method in ("GET", "HEAD") and path == PREFIX + "health":
            status, report = await self.report(router)
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

    async def report(self, router: Router | None) -> tuple[int, dict]:
        report: dict = {"status": "ok", "endpoint": None, "autoscaler": None, "in_flight": self.telemetry.in_flight}
        if router is None:
            return 503, {**report, "status": "unavailable", "reason": "Vespa is not configured (see the proxy's start-up log)"}
        report["endpoint"] = router.settings.endpoint
        probe = await self._fresh_probe(router)
        report["autoscaler"] = {
            "url": router.settings.autoscaler_url,
            **{k: v for k, v in asdict(probe).items() if k != "at"},
            "checked_s_ago": round(time.monotonic() - probe.at, 1),
        }
        if not probe.reachable:
            reason = f"cannot reach the autoscaler at {router.settings.autoscaler_url}: {probe.error}"
            return 503, {**report, "status": "unavailable", "reason": reason}
        return 200, report

    async def _fresh_probe(self, router: Router) -> Probe:
        if router is not self._router:  # reconfigured: the old answer was about another autoscaler
            self.close()
            self._router, self._probe = router, None
        if self._probe is not None and time.monotonic() - self._probe.at < PROBE_TTL_S:
            return self._probe
        # One probe at a time: a burst of health checks shares it.
        if self._probing is None or self._probing.done():
            self._probing = asyncio.ensure_future(self._run_probe(router))
        probe = await asyncio.shield(self._probing)
        if router is self._router:
            self._probe = probe
        return probe

    @staticmethod
    async def _run_probe(router: Router) -> Probe:
        start = time.monotonic()
        try:
            status = await router.probe(PROBE_TIMEOUT_S)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            return Probe(False, None, f"{type(e).__name__} {e}".strip(), time.monotonic())
        latency_ms = round((time.monotonic() - start) * 1000, 1)
        if status >= 500:
            return Probe(False, latency_ms, f"GET /pubkey/ answered {status}", time.monotonic())
        return Probe(True, latency_ms, None, time.monotonic())
