"""Prometheus metrics and the one-line request log: a sub-addon of Vespa.

It sits in `Vespa.addons`, so mitmproxy runs each of its hooks right after Vespa's for the
same event and it sees every flow as Vespa left it: the stream callable already set (so it
can count streamed bytes), the client's own request back in place, Vespa's error answers.
It only observes: it never changes what the client gets, and a bug here is logged, not raised.

Each instance has its own CollectorRegistry: two proxies in one process (two VastClients)
must neither share counters nor clash on the global registry's metric names.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from mitmproxy import http
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from vespa.observe.health import is_reserved

log = logging.getLogger("vespa.requests")

# Seconds: from a warm worker (milliseconds) to a cold start (minutes, up to the route deadline).
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

StreamFn = Callable[[bytes], "bytes | Iterable[bytes]"]


@dataclass(slots=True)
class Track:
    """What is known of one request between its headers and its end."""

    method: str
    path: str  # without the query: a client may put its own secrets there
    start: float
    streamed: bool = False
    bytes: int = 0


class Telemetry:
    def __init__(self) -> None:
        self.endpoint = ""  # set by Vespa.configure; the log shows it for requests never routed
        self.tracks: dict[str, Track] = {}
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "vespa_requests", "Requests answered, by endpoint, HTTP status and Vespa error type "
            "(endpoint '-': never routed; error_type 'none': no error; status 'none': the connection "
            "failed before any answer).",
            ["endpoint", "status", "error_type"], registry=r,
        )
        self.route_seconds = Histogram(
            "vespa_route_seconds", "Time to get a worker from /route/, polls and retries included, by endpoint.",
            ["endpoint"], buckets=BUCKETS, registry=r,
        )
        self.workload = Counter(
            "vespa_workload", "Workload units (cost) sent to /route/, by endpoint: what the autoscaler scales on.",
            ["endpoint"], registry=r,
        )
        self.fallbacks = Counter(
            "vespa_fallbacks", "Requests sent to a fallback endpoint because theirs had no worker ready in time.",
            ["endpoint", "fallback"], registry=r,
        )
        self.ttfb_seconds = Histogram(
            "vespa_time_to_first_byte_seconds", "From the client's request headers to the worker's response headers.",
            buckets=BUCKETS, registry=r,
        )
        self.duration_seconds = Histogram(
            "vespa_request_duration_seconds", "From the client's request headers to the end of the response.",
            buckets=BUCKETS, registry=r,
        )
        self.polls = Counter("vespa_route_polls", "Re-polls of /route/ while the endpoint had no worker ready.", registry=r)
        self.retries = Counter(
            "vespa_route_retries", "/route/ calls retried after a connect error, timeout, 429 or 5xx.", registry=r
        )
        self.response_bytes = Counter(
            "vespa_response_bytes", "Response body bytes passed to clients, streamed or not.", registry=r
        )
        self.in_flight_gauge = Gauge(
            "vespa_requests_in_flight", "Requests received and not yet answered in full.", registry=r
        )
        self.in_flight_gauge.set_function(lambda: len(self.tracks))

    @property
    def in_flight(self) -> int:
        return len(self.tracks)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    # --- hooks (sync: they only count) ------------------------------------------------------
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if not flow.live or is_reserved(flow.request.path):
            return
        path = flow.request.path.split("?", 1)[0]
        self.tracks[flow.id] = Track(flow.request.method, path, time.monotonic())

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        track = self.tracks.get(flow.id)
        if track is None or flow.response is None:
            return
        if "worker" in _facts(flow):
            self.ttfb_seconds.observe(time.monotonic() - track.start)
        if flow.response.stream:
            track.streamed = True
            flow.response.stream = _counting(flow.response.stream, track)

    def response(self, flow: http.HTTPFlow) -> None:
        self._finish(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._finish(flow)

    def done(self) -> None:
        self.tracks.clear()

    # --- the end of a request ---------------------------------------------------------------
    def _finish(self, flow: http.HTTPFlow) -> None:
        track = self.tracks.pop(flow.id, None)
        if track is None:
            return
        try:
            self._record(flow, track)
        except Exception:  # observing must never break the proxy
            log.exception("vespa: metrics failed for %s %s", track.method, track.path)

    def _record(self, flow: http.HTTPFlow, track: Track) -> None:
        total_s = time.monotonic() - track.start
        resp = flow.response
        status = str(resp.status_code) if resp is not None else "none"
        error_type = (resp.headers.get("x-vespa-error") if resp is not None else None) or (
            "connection_error" if flow.error else "none"
        )
        if not track.streamed and resp is not None:
            track.bytes = len(resp.raw_content or b"")
        facts = _facts(flow)
        endpoint = facts.get("endpoint") or "-"
        self.requests.labels(endpoint, status, error_type).inc()
        self.duration_seconds.observe(total_s)
        self.response_bytes.inc(track.bytes)
        if "route_ms" in facts:
            self.route_seconds.labels(endpoint).observe(facts["route_ms"] / 1000)
            self.polls.inc(facts.get("polls") or 0)
            self.retries.inc(facts.get("retries") or 0)
        if isinstance(facts.get("cost"), (int, float)):
            self.workload.labels(endpoint).inc(facts["cost"])
        fallback = ""
        if facts.get("fallback_from"):
            self.fallbacks.labels(facts["fallback_from"], endpoint).inc()
            fallback = f" fallback_from={facts['fallback_from']}"
        log.info(
            "vespa: %s %s endpoint=%s worker=%s status=%s%s route_ms=%s total_ms=%.0f cost=%s bytes=%d polls=%s retries=%s%s",
            track.method, track.path, facts.get("endpoint") or self.endpoint or "-", facts.get("worker") or "-",
            status, "" if error_type == "none" else f" error={error_type}", _num(facts.get("route_ms")),
            total_s * 1000, _num(facts.get("cost")), track.bytes, facts.get("polls", "-"), facts.get("retries", "-"),
            fallback,
        )


def _facts(flow: http.HTTPFlow) -> dict[str, Any]:
    """The routing facts Vespa keeps in flow.metadata['vespa'] once a worker is assigned."""
    facts = flow.metadata.get("vespa")
    return facts if isinstance(facts, dict) else {}


def _num(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if isinstance(value, float) and value >= 10 else str(value)


def _counting(inner: bool | StreamFn, track: Track) -> StreamFn:
    """Wrap the stream callable Vespa set (or True) to count the bytes that pass."""

    def count(chunk: bytes) -> bytes | Iterable[bytes]:
        track.bytes += len(chunk)
        return chunk if inner is True else inner(chunk)

    return count
