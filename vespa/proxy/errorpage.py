"""Vespa's JSON error reply in place of mitmproxy's own HTML error page.

The worker leg (vespa/proxy/leg.py) answers every failure past the proxy with Vespa's JSON itself.
What is left for mitmproxy to answer: a body over `body_size_limit` (413), a request head it
cannot parse, and the worker leg unreachable. For those it runs the `error` hook and then
answers the client with a small HTML page (`make_error_response` for HTTP/1, an inline
HEADERS+DATA in `Http2Connection._handle_event` for HTTP/2); no documented hook can change that
reply (assigning `flow.response` in `error()` is ignored, 11.0.2 and 12.3.1).

So this module installs one narrow patch, at the one place every stream's error reaches the
client's connection layer: `HttpLayer.event_to_child` (identical in 11.0.2 and 12.3.1). When it
carries a `ResponseProtocolError` for the client before any response header went out, it sends
a normal response instead (headers, JSON body, end of message) through the same connection
layer, so HTTP/1, HTTP/2 and HTTP/3 frame it themselves; then it passes the error on re-coded
as "no reply", so the connection is closed (HTTP/1) or the stream reset if still open (HTTP/2)
exactly as before, minus the HTML. After the headers went out nothing is added: the cut stream
(no final chunk, or RST_STREAM) tells the client the answer is incomplete.
Malformed HTTP/1 request heads never reach a stream; `_http1.make_error_response` is swapped for
the JSON version too. `install()` runs in the addon's `load`, `uninstall()` in `done`.
"""

from __future__ import annotations

import logging
from typing import Iterator

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

from vespa.observe import inspection
from vespa.errors import BadRequest, BodyTooLarge, LegUnreachable, VespaError, WorkerBroke

log = logging.getLogger("vespa.proxy.errorpage")

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


# Texts of failures where the request never left the proxy (the connect to the worker leg
# failed), measured on 11.0.2 and 12.3.1.
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
    "too many open files",
)

_installed = 0
_original_event_to_child = http_layer.HttpLayer.event_to_child
_original_make_error_response = _http1.make_error_response


def explain(message: str, status: int = 502) -> VespaError:
    """The VespaError for mitmproxy's error text (`flow.error.msg`) and the status it would send."""
    low = message.lower()
    if status == 413 or "body exceeds" in low:
        return BodyTooLarge("the request body is over the proxy's limit (vespa_max_body_kb); it was not read")
    if 400 <= status < 500:
        return BadRequest(f"the proxy could not read the request: {message}")
    if any(text in low for text in NOT_SENT):
        return LegUnreachable(
            f"could not reach Vespa's worker leg ({message}); the request was not processed and may be retried"
        )
    return WorkerBroke(f"the connection to Vespa's worker leg failed ({message})")


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
    headers_sent = stream.server_state == stream.state_stream_response_body
    if not headers_sent and status is not None:
        err = explain(event.message, status)
        response = http.Response.make(err.status, err.body(), err.headers())
        if not (flow.request.is_http2 or flow.request.is_http3):
            response.headers["connection"] = "close"  # the error path closes it below anyway
        flow.response = response  # what mitmweb and -w files show is what the client got
        _log(flow, err)
        yield from send(layer_, child, ResponseHeaders(event.stream_id, response, False))
        yield from send(layer_, child, ResponseData(event.stream_id, response.raw_content or b""))
        yield from send(layer_, child, ResponseEndOfMessage(event.stream_id))
        event = ResponseProtocolError(event.stream_id, event.message, NO_REPLY)
    yield from send(layer_, child, event)


def _log(flow: http.HTTPFlow, err: VespaError) -> None:
    inspection.note(flow, f"{err.status} {err.type}: {err.message}", failed=True)
    # The path without its query: clients put tokens there.
    log.warning("vespa: %s %s -> %s: %s", flow.request.method, flow.request.path.partition("?")[0], err.type, err.message)


def _json_error_response(status_code: int, message: str = "") -> bytes:
    """`_http1.make_error_response`, same signature, with Vespa's JSON instead of HTML."""
    err = explain(message, status_code)
    response = http.Response.make(err.status, err.body(), {**err.headers(), "Connection": "close"})
    return assemble_response(response)
