"""Vespa's JSON error reply in place of mitmproxy's own HTML error page.

When the worker cannot be reached, breaks, or a limit trips, mitmproxy's http layer runs the
`error` hook and then answers the client itself with a small HTML page (`make_error_response` for
HTTP/1, an inline HEADERS+DATA in `Http2Connection._handle_event` for HTTP/2). No documented hook
can change that reply: assigning `flow.response` in `error()` is ignored (11.0.2 and 12.3.1).

So this module installs one narrow patch, at the one place every stream's error reaches the
client's connection layer: `HttpLayer.event_to_child` (identical in 11.0.2 and 12.3.1). When it
carries a `ResponseProtocolError` for the client:
- before any response header went out, it sends a normal response instead (headers, JSON body,
  end of message) through the same connection layer, so HTTP/1, HTTP/2 and HTTP/3 frame it
  themselves; then it passes the error on re-coded as "no reply", so the connection is closed
  (HTTP/1) or the stream reset if still open (HTTP/2) exactly as before, minus the HTML;
- after the headers went out (a broken stream), it first sends an SSE `event: error` when the
  response is `text/event-stream`, then lets the error end the connection without a clean
  terminator (no final zero-length chunk; an RST_STREAM on HTTP/2), so no client mistakes a
  truncated answer for a complete one.
Malformed HTTP/1 request heads never reach a stream; `_http1.make_error_response` is swapped for
the JSON version too. `install()` runs in the addon's `load`, `uninstall()` in `done`.

`explain(message, status)` maps mitmproxy's error text to a VespaError; other modules (TLS) add
their own mapping with `register()`, and the addon can name the cause of a failure it provokes
itself (a timeout that aborts the worker connection) with `note()`.
"""

from __future__ import annotations

import json
import logging
import weakref
from typing import Callable, Iterator

from mitmproxy import http
from mitmproxy.net.http.http1 import assemble_response
from mitmproxy.proxy import layer
from mitmproxy.proxy.layers import http as http_layer
from mitmproxy.proxy.layers.http import _http1
from mitmproxy.proxy.layers.http import (
    ResponseData,
    ResponseEndOfMessage,
    ResponseHeaders,
    ResponseProtocolError,
)

from vespa.errors import (
    BadRequest,
    BodyTooLarge,
    VespaError,
    WorkerBroke,
    WorkerResponseTooLarge,
    WorkerUnavailable,
)

log = logging.getLogger("vespa.errorpage")

try:  # mitmproxy 12: an ErrorCode enum that knows its HTTP status
    from mitmproxy.proxy.layers.http import ErrorCode

    NO_REPLY = ErrorCode.KILL

    def _status(event: ResponseProtocolError) -> int | None:
        return event.code.http_status_code()

except ImportError:  # mitmproxy 11: the code is the HTTP status itself, 444 meaning "no reply"
    from mitmproxy.net.http import status_codes

    NO_REPLY = status_codes.NO_RESPONSE

    def _status(event: ResponseProtocolError) -> int | None:
        return None if event.code == NO_REPLY else event.code


Explainer = Callable[[str, int], "VespaError | None"]

# Texts of failures where the request never left the proxy (GetHttpConnection's error:
# the connect or the TLS handshake to the worker failed), measured on 11.0.2 and 12.3.1.
NOT_SENT = (
    "connect call failed",
    "connection refused",
    "connect timed out",
    "timed out",
    "name or service not known",
    "no address associated",
    "nodename nor servname",
    "network is unreachable",
    "no route to host",
    "multiple exceptions",
)

_explainers: list[Explainer] = []
_causes: weakref.WeakKeyDictionary[http.HTTPFlow, VespaError] = weakref.WeakKeyDictionary()
_installed = 0
_original_event_to_child = http_layer.HttpLayer.event_to_child
_original_make_error_response = _http1.make_error_response


def register(explainer: Explainer) -> None:
    """Add a mapping tried before the built-in one (first registered, first asked)."""
    if explainer not in _explainers:
        _explainers.append(explainer)


def note(flow: http.HTTPFlow, err: VespaError) -> None:
    """The cause of the failure about to happen on `flow` (the addon aborts a connection)."""
    _causes[flow] = err


def explain(message: str, status: int = 502) -> VespaError:
    """The VespaError for mitmproxy's error text (`flow.error.msg`) and the status it would send."""
    for explainer in _explainers:
        if (err := explainer(message, status)) is not None:
            return err
    low = message.lower()
    if status == 413 or "body exceeds" in low:
        if low.startswith("response"):
            return WorkerResponseTooLarge(f"the worker's answer is larger than the proxy allows ({message})")
        return BodyTooLarge(f"the request body is larger than the proxy allows ({message})")
    if 400 <= status < 500:
        return BadRequest(f"the proxy could not read the request: {message}")
    if any(text in low for text in NOT_SENT):
        return WorkerUnavailable(
            f"could not connect to the worker ({message}); the request was not processed and may be retried"
        )
    return WorkerBroke(f"the connection to the worker failed ({message})")


def install() -> None:
    global _installed
    _installed += 1
    if _installed == 1:
        http_layer.HttpLayer.event_to_child = _event_to_child
        _http1.make_error_response = _json_error_response


def uninstall() -> None:
    global _installed
    _installed = max(0, _installed - 1)
    if _installed == 0:
        http_layer.HttpLayer.event_to_child = _original_event_to_child
        _http1.make_error_response = _original_make_error_response


def sse_error_event(err: VespaError) -> bytes:
    return b"event: error\ndata: " + json.dumps(err.to_json()).encode() + b"\n\n"


# --- the patch -------------------------------------------------------------------------------------
def _event_to_child(
    self: http_layer.HttpLayer, child: layer.Layer | http_layer.HttpStream, event: object
) -> Iterator:
    if isinstance(event, ResponseProtocolError) and child is self.connections.get(self.context.client):
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            yield from _reply(self, child, stream, event)
            return
    yield from _original_event_to_child(self, child, event)


def _reply(
    layer_: http_layer.HttpLayer, child: layer.Layer, stream: http_layer.HttpStream, event: ResponseProtocolError
) -> Iterator:
    send = _original_event_to_child
    flow = stream.flow
    status = _status(event)
    cause = _causes.pop(flow, None)
    headers_sent = stream.server_state == stream.state_stream_response_body
    if not headers_sent and status is not None:
        err = cause or explain(event.message, status)
        response = http.Response.make(err.status, err.body(), err.headers())
        if not (flow.request.is_http2 or flow.request.is_http3):
            response.headers["connection"] = "close"  # the error path closes it below anyway
        flow.response = response  # what mitmweb and -w files show is what the client got
        _log(flow, err)
        yield from send(layer_, child, ResponseHeaders(event.stream_id, response, False))
        yield from send(layer_, child, ResponseData(event.stream_id, response.raw_content or b""))
        yield from send(layer_, child, ResponseEndOfMessage(event.stream_id))
        event = ResponseProtocolError(event.stream_id, event.message, NO_REPLY)
    elif headers_sent and (status is not None or cause is not None) and _is_sse(flow):
        err = cause or WorkerBroke(
            f"the worker's stream broke before its end ({event.message}); the answer is incomplete",
            hint="Do not use the partial answer as if it were complete; send the request again.",
        )
        _log(flow, err)
        yield from send(layer_, child, ResponseData(event.stream_id, sse_error_event(err)))
    yield from send(layer_, child, event)


def _is_sse(flow: http.HTTPFlow) -> bool:
    return flow.response is not None and flow.response.headers.get("content-type", "").startswith("text/event-stream")


def _log(flow: http.HTTPFlow, err: VespaError) -> None:
    flow.comment = (flow.comment + " | " if flow.comment else "") + f"vespa: {err.type}: {err.message}"
    flow.marked = ":warning:"
    # The path without its query: clients put tokens there.
    log.warning("vespa: %s %s -> %s: %s", flow.request.method, flow.request.path.partition("?")[0], err.type, err.message)


def _json_error_response(status_code: int, message: str = "") -> bytes:
    """`_http1.make_error_response`, same signature, with Vespa's JSON instead of HTML."""
    err = explain(message, status_code)
    response = http.Response.make(err.status, err.body(), {**err.headers(), "Connection": "close"})
    return assemble_response(response)
