"""The header timeout: a client connection that has not sent a complete request head within
`vespa_header_timeout_s` of connecting is closed.

mitmproxy has no such timer: 11.0.2 only drops a connection after 600 s of silence (hard-coded),
12.2.1+ after `tcp_timeout`; a client that trickles a head byte by byte is never silent. So
thousands of half-sent heads (slowloris) would hold a socket and a file descriptor each for as
long as they like. One loop timer per connection, from `client_connected` until its first
`requestheaders` (a TLS handshake counts too); later requests on a kept-alive connection are
left to mitmproxy's own idle timeout. On expiry the connection is closed the way mitmproxy's
own commands close one (`ConnectionHandler.close_connection`, the same in 11.0.2 and 12.3.1).

The same class closes client sockets mitmproxy leaves open. When a flow fails while the client
is still sending (a body over `body_size_limit`: the 413 goes out while the upload goes on),
mitmproxy cancels the client's connection task, and if that task was waiting for the
connection's event lock at that moment (`server_event`), the cancellation skips its
`writer.close()` (11.0.2 and 12.3.1): the socket stays open, unread, until the client gives up,
and a client that sends a whole body before reading the answer waits forever. So when
mitmproxy reports the client gone (`client_disconnected`) and its socket is still open, it is
closed here.
"""

from __future__ import annotations

import asyncio
import logging

from mitmproxy import connection, ctx, http

log = logging.getLogger("vespa.proxy.headtimeout")

OPTION = "vespa_header_timeout_s"  # declared by vespa.proxy.limits


class HeadTimeout:
    """A sub-addon of vespa.proxy.addon.Vespa: one timer per client connection until its first head."""

    def __init__(self) -> None:
        self._timers: dict[str, asyncio.TimerHandle] = {}

    def client_connected(self, client: connection.Client) -> None:
        if OPTION not in ctx.options:
            return
        timeout_s = getattr(ctx.options, OPTION)
        if timeout_s <= 0:
            return
        loop = asyncio.get_running_loop()
        self._timers[client.id] = loop.call_later(timeout_s, self._expire, client, timeout_s)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self._cancel(flow.client_conn.id)

    def client_disconnected(self, client: connection.Client) -> None:
        self._cancel(client.id)
        handler = _handler(client)
        io = handler.transports.get(handler.client) if handler is not None else None
        if io is not None and io.writer is not None and not io.writer.is_closing():
            log.debug("vespa: closing %s, left open by mitmproxy", client.peername)
            io.writer.close()

    def done(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()

    def _cancel(self, client_id: str) -> None:
        timer = self._timers.pop(client_id, None)
        if timer is not None:
            timer.cancel()

    def _expire(self, client: connection.Client, timeout_s: int) -> None:
        self._timers.pop(client.id, None)
        handler = _handler(client)
        if handler is None:  # gone already
            return
        # Debug only: a flood of half-open connections must not flood the log as well.
        log.debug("vespa: closing %s: no complete request head within %d s (vespa_header_timeout_s)",
                  client.peername, timeout_s)
        handler.close_connection(handler.client)


def _handler(client: connection.Client):
    """mitmproxy's handler of this client connection (a ProxyConnectionHandler), or None."""
    proxyserver = ctx.master.addons.get("proxyserver")
    return getattr(proxyserver, "connections", {}).get(client.id)
