"""What mitmweb, `-w` files and replays show of a Vespa flow.

mitmweb lists `comment` and `marked` but never `metadata`, so the one-line comment carries the
facts a user looks for (what was sent, where it went, what it cost, how it ended); metadata
keeps them in machine form (`~meta` filters, saved flows). Streamed bodies are not stored by
mitmproxy 11 (12 has `store_streamed_bodies`, unbounded), hence the bounded tap below.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Protocol

from mitmproxy import http

KIB = 1024


class Setup(Protocol):
    """What `vespa.status` shows of the proxy's setup (vespa.proxy.addon.Setup), without importing it."""

    endpoint: str
    endpoints: tuple[str, ...]
    autoscaler_url: str
    keys: dict[str, str]
    states: dict[str, dict]
    last_route_ms: float | None


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
    flow.comment = comment({"sent": sent(flow.request)})


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
    facts = flow.metadata.setdefault("vespa", {})
    facts["status"] = status
    note(flow, _outcome(bool(facts.get("streamed")), tap), failed=status >= 400)


def fail(flow: http.HTTPFlow, tap: Tap | None) -> None:
    """mitmproxy's error hook: the worker was unreachable or the stream broke."""
    if tap is not None and flow.response is not None:
        flow.response.raw_content = bytes(tap.buf)  # what arrived before the break
    if flow.marked == MARK and flow.metadata.get("vespa", {}).get("outcome"):
        return  # already said why (vespa/proxy/errorpage.py answered the client): keep that
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


def _outcome(streamed: bool, tap: Tap | None) -> str:
    """`streamed 1.2 KiB`, `353 B`: "streamed" only for answers the worker streamed."""
    kind = "streamed " if streamed else ""
    if tap is None:
        return f"{kind}(not kept: vespa_capture_kb=0)"
    text = f"{kind}{_size(tap.seen)}"
    if tap.truncated:
        text += f", kept the first {_size(len(tap.buf))} (vespa_capture_kb)"
    return text


def comment(facts: dict[str, Any]) -> str:
    """What mitmweb's Comment column shows, most telling first, since only its start is visible:
    `demo @ https://w:1 200 route=4ms streamed 1.2 KiB | POST /v1/chat/completions (93 B) idx=7
    cost=1.0 polls=0 retries=0`, built from whatever of the facts exist yet. A failure leads with
    its status and reason (`400 bad_body: ...`)."""
    head = []
    if "worker" in facts:
        head.append(f"{facts['endpoint']} @ {facts['worker']}")
    if facts.get("fallback_from"):
        head.append(f"(fallback from {facts['fallback_from']}: {facts.get('fallback_reason', 'cold')})")
    if "status" in facts:
        head.append(str(facts["status"]))
    if "route_ms" in facts:
        head.append(f"route={facts['route_ms']:.0f}ms")
    if "outcome" in facts:
        head.append(facts["outcome"])
    elif "worker" in facts:
        head.append("streaming" if facts.get("streamed") else "answering")
    else:
        head.append("waiting for a worker")
    rest = []
    if s := facts.get("sent"):
        size = "" if s["bytes"] is None else f" ({_size(s['bytes'])})"
        rest.append(f"{s['method']} {s['path']}{size}")
    if "worker" in facts:
        rest.append(f"idx={facts['request_idx']} cost={facts['cost']} polls={facts['polls']} retries={facts['retries']}")
    return " ".join(head) + (" | " + " ".join(rest) if rest else "")


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
