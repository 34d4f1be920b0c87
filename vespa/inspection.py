"""What mitmweb, `-w` files and replays show of a Vespa flow.

mitmweb lists `comment` and `marked` but never `metadata`, so the one-line comment carries the
facts a user looks for (what was sent, where it went, what it cost, how it ended); metadata
keeps them in machine form (`~meta` filters, saved flows). Streamed bodies are not stored by
mitmproxy 11 (12 has `store_streamed_bodies`, unbounded), hence the bounded tap below.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mitmproxy import http


if TYPE_CHECKING:
    from vespa.addon import Setup

KIB = 1024


@dataclass(slots=True)
class Tap:
    """`flow.response.stream` callable that passes chunks through untouched and keeps the first
    `limit` bytes, so a 1 GB stream costs at most `limit` bytes of memory."""

    limit: int
    buf: bytearray = field(default_factory=bytearray)
    seen: int = 0

    def __call__(self, chunk: bytes) -> bytes:
        self.seen += len(chunk)
        room = self.limit - len(self.buf)
        if room > 0:
            self.buf += chunk[:room]
        return chunk

    @property
    def truncated(self) -> bool:
        return self.seen > len(self.buf)


MARK = ":warning:"


def start(flow: http.HTTPFlow) -> None:
    """A new pass over the flow: a replay runs the hooks again on the same flow object, so the
    facts and marker of the previous pass are stale."""
    flow.metadata.pop("vespa", None)
    if flow.marked == MARK:
        flow.marked = ""


def finish(flow: http.HTTPFlow, tap: Tap | None, failure: str | None = None) -> None:
    """The response is complete: keep the streamed copy, say how it ended (`failure`: Vespa's
    own error answer, `503 worker_unavailable: ...`)."""
    assert flow.response is not None
    if tap is not None:
        # raw_content, not content: the bytes as they came (maybe still gzip), no re-encoding,
        # and mitmproxy does not send them again (the stream already went out).
        flow.response.raw_content = bytes(tap.buf)
    status = flow.response.status_code
    if failure is not None:
        return note(flow, failure, failed=True)
    streamed = bool(flow.metadata.get("vespa", {}).get("streamed"))
    note(flow, _outcome(status, streamed, tap), failed=status >= 400)


def fail(flow: http.HTTPFlow, tap: Tap | None) -> None:
    """mitmproxy's error hook: the worker was unreachable or the stream broke."""
    if tap is not None and flow.response is not None:
        flow.response.raw_content = bytes(tap.buf)  # what arrived before the break
    msg = flow.error.msg if flow.error else "unknown error"
    got = f" after {_size(tap.seen)}" if tap is not None else ""
    note(flow, f"error{got}: {msg}", failed=True)


def note(flow: http.HTTPFlow, outcome: str, failed: bool) -> None:
    facts = flow.metadata.setdefault("vespa", {})
    facts.setdefault("sent", sent(flow.request))
    facts["outcome"] = outcome
    flow.comment = comment(facts)
    if failed:
        flow.marked = MARK


def sent(request: http.Request) -> dict[str, Any]:
    """The client's request, in the short form the comment shows."""
    body = request.raw_content
    # Without the query: it may carry the client's own tokens, and mitmweb shows the full URL anyway.
    path = request.path.partition("?")[0]
    return {"method": request.method, "path": path, "bytes": None if body is None else len(body)}


def _outcome(status: int, streamed: bool, tap: Tap | None) -> str:
    """`200 streamed 1.2 KiB`, `200 353 B`: "streamed" only for answers the worker streamed."""
    kind = "streamed " if streamed else ""
    if tap is None:
        return f"{status} {kind}(not kept: vespa_capture_kb=0)"
    text = f"{status} {kind}{_size(tap.seen)}"
    if tap.truncated:
        text += f", kept the first {_size(len(tap.buf))} (vespa_capture_kb)"
    return text


def comment(facts: dict[str, Any]) -> str:
    """`POST /v1/chat/completions (93 B) -> demo @ http://w:1 idx=7 cost=1.0 route=4ms polls=0
    retries=0 -> 200 streamed 1.2 KiB`, built from whatever of the facts exist yet."""
    parts = []
    if s := facts.get("sent"):
        size = "" if s["bytes"] is None else f" ({_size(s['bytes'])})"
        parts.append(f"{s['method']} {s['path']}{size}")
    if "worker" in facts:
        parts.append(
            f"{facts['endpoint']} @ {facts['worker']} idx={facts['request_idx']} cost={facts['cost']} "
            f"route={facts['route_ms']:.0f}ms polls={facts['polls']} retries={facts['retries']}"
        )
    parts.append(facts.get("outcome", "in flight"))
    return "vespa: " + " -> ".join(parts)


def _size(n: int) -> str:
    if n < KIB:
        return f"{n} B"
    if n < KIB * KIB:
        return f"{n / KIB:.1f} KiB"
    return f"{n / KIB / KIB:.1f} MiB"


def status(setup: Setup | None, in_flight: int) -> str:
    """One line of JSON for `vespa.status`: readable in mitmweb's command bar, parseable from
    its REST API. The key shows only its source and last 4 characters."""
    if setup is None:
        return json.dumps({"configured": False, "in_flight": in_flight})
    one = len(setup.endpoints) == 1
    return json.dumps({
        "endpoint": setup.endpoint,
        "autoscaler": setup.autoscaler_url,
        **({"key": setup.keys[setup.endpoints[0]]} if one else {"keys": setup.keys}),
        "endpoints": {name: setup.states.get(name, {}).get("state", "unknown") for name in setup.endpoints},
        "last_route_ms": setup.last_route_ms,
        "in_flight": in_flight,
    })
