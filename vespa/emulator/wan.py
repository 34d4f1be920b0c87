"""A TCP relay that puts a wide-area network between a client and one emulator listener.

Every byte is delayed by `delay_s` each way, and a new connection pays one extra round trip
before its first byte reaches the server: on loopback `connect()` returns at once, where on a
real network the SYN / SYN-ACK exchange costs one RTT before the client can send. So a client
byte received at `t` on a connection accepted at `t0` reaches the server at
`max(t, t0 + 2 * delay) + delay`, and a server byte received at `t` reaches the client at
`t + delay`. A fresh plain-HTTP request then costs 2 RTT, a kept-alive one 1 RTT, and TLS
(which passes through untouched, as bytes) its own round trip(s) on top.

Chunks are scheduled by timestamp, not by sleeping after each one, so the link has latency
but no bandwidth cap (beyond a bounded in-flight buffer, like a TCP window). Order is kept
per direction; a FIN travels after the bytes before it, and a reset (RST) is passed on as
one, so a worker that crashes mid-stream looks the same from across the WAN.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import struct
from typing import Union

# In-flight bytes per direction before the sender is paused: a TCP window of sorts. At 25 ms
# one way it allows 16 MiB / 25 ms, far above what the emulator serves, so it caps memory,
# not throughput.
WINDOW_BYTES = 16 * 1024 * 1024


class _Eof:
    pass


class _Close:
    def __init__(self, reset: bool) -> None:
        self.reset = reset


EOF = _Eof()
Item = Union[bytes, _Eof, _Close]


def _abort_with_reset(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    transport.abort()  # type: ignore[attr-defined]


class _Direction:
    """One way of a connection: items wait in a queue until their delivery time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: collections.deque[tuple[float, Item]] = collections.deque()
        self._queued_bytes = 0
        self._timer: asyncio.TimerHandle | None = None
        self.src: asyncio.Transport | None = None
        self.dst: asyncio.Transport | None = None
        self.dst_side: _Side | None = None
        self._src_paused = False
        self._dst_full = False

    def push(self, when: float, item: Item) -> None:
        self._queue.append((when, item))
        if isinstance(item, bytes):
            self._queued_bytes += len(item)
            self._update_src()
        if self._timer is None:
            self._schedule()

    def _schedule(self) -> None:
        if self._queue and self.dst is not None:
            self._timer = self._loop.call_at(self._queue[0][0], self.flush)

    def flush(self) -> None:
        """Deliver every item that is due, in order; then wait for the next one."""
        self._timer = None
        if self.dst is None:
            return  # the upstream connection is not up yet: attach() flushes
        now = self._loop.time()
        while self._queue and self._queue[0][0] <= now:
            _, item = self._queue.popleft()
            if isinstance(item, bytes):
                self._queued_bytes -= len(item)
                if not self.dst.is_closing():
                    self.dst.write(item)
            elif isinstance(item, _Eof):
                if not self.dst.is_closing() and self.dst.can_write_eof():
                    self.dst.write_eof()
                if self.dst_side is not None:
                    self.dst_side.eof_sent()
            else:
                self._queue.clear()
                self._queued_bytes = 0
                if item.reset:
                    _abort_with_reset(self.dst)
                else:
                    self.dst.close()
                return
        self._update_src()
        self._schedule()

    def attach(self, side: _Side) -> None:
        self.dst_side = side
        self.dst = side.transport
        if self._timer is None:
            self.flush()

    def set_dst_full(self, full: bool) -> None:
        self._dst_full = full
        self._update_src()

    def _update_src(self) -> None:
        want_pause = self._dst_full or self._queued_bytes > WINDOW_BYTES
        if self.src is None or self.src.is_closing() or want_pause == self._src_paused:
            return
        self._src_paused = want_pause
        if want_pause:
            self.src.pause_reading()
        else:
            self.src.resume_reading()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._queue.clear()


class _Side(asyncio.Protocol):
    """One socket of a relayed connection; `out` is the direction its bytes travel in."""

    def __init__(self, conn: _Connection, out: _Direction, into: _Direction, first_byte_at: float) -> None:
        self._conn, self._out, self._into = conn, out, into
        self._first_byte_at = first_byte_at  # no byte leaves before (the handshake's round trip)
        self.transport: asyncio.Transport | None = None
        self._got_eof = self._sent_eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._out.src = transport

    def _when(self) -> float:
        return max(self._conn.loop.time(), self._first_byte_at) + self._conn.delay_s

    def data_received(self, data: bytes) -> None:
        self._out.push(self._when(), data)

    def eof_received(self) -> bool:
        self._got_eof = True
        self._out.push(self._when(), EOF)
        self._close_if_done()
        return True  # half-close: the other way stays open until its own FIN

    def eof_sent(self) -> None:
        self._sent_eof = True
        self._close_if_done()

    def _close_if_done(self) -> None:
        # FIN both ways: nothing more can travel on this socket, and asyncio would keep it open.
        if self._got_eof and self._sent_eof and self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._out.push(self._when(), _Close(reset=exc is not None))
        self._conn.side_lost()

    def pause_writing(self) -> None:
        self._into.set_dst_full(True)

    def resume_writing(self) -> None:
        self._into.set_dst_full(False)


class _Connection:
    def __init__(self, relay: WanRelay) -> None:
        self.relay = relay
        self.loop = relay.loop
        self.delay_s = relay.delay_s
        now = self.loop.time()
        self.up = _Direction(self.loop)  # client -> server
        self.down = _Direction(self.loop)  # server -> client
        self.client = _Side(self, self.up, self.down, now + 2 * self.delay_s)
        self.server: _Side | None = None
        self._lost = 0

    def accepted(self) -> _Side:
        task = self.loop.create_task(self._connect())
        self.relay._tasks.add(task)
        task.add_done_callback(self.relay._tasks.discard)
        return self.client

    async def _connect(self) -> None:
        host, port = self.relay.target
        try:
            _, server = await self.loop.create_connection(
                lambda: _Side(self, self.down, self.up, 0.0), host, port
            )
        except OSError:
            # The server is gone: the client sees a reset, one way later.
            self.down.attach(self.client)
            self.down.push(self.loop.time() + self.delay_s, _Close(reset=True))
            self.side_lost()
            return
        self.server = server
        self.down.attach(self.client)
        self.up.attach(server)

    def side_lost(self) -> None:
        self._lost += 1
        if self._lost == 2:
            self.up.cancel()
            self.down.cancel()
            self.relay._connections.discard(self)

    def abort(self) -> None:
        for side in (self.client, self.server):
            if side is not None and side.transport is not None:
                side.transport.abort()


class WanRelay:
    """Listens on 127.0.0.1:`port` (0: a free one) and relays to `target` across the WAN."""

    def __init__(self, target: tuple[str, int], delay_s: float) -> None:
        self.target = target
        self.delay_s = delay_s
        self.loop = asyncio.get_running_loop()
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def server(self) -> asyncio.Server | None:
        return self._server

    async def listen(self, host: str, port: int) -> int:
        """Start accepting; returns the port."""
        self._server = await self.loop.create_server(self._accept, host, port, reuse_address=True)
        return self._server.sockets[0].getsockname()[1]

    def _accept(self) -> _Side:
        conn = _Connection(self)
        self._connections.add(conn)
        return conn.accepted()

    def close_listener(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    def abort_connections(self) -> None:
        for conn in list(self._connections):
            conn.abort()
        self._connections.clear()

    async def close(self) -> None:
        self.close_listener()
        self.abort_connections()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
