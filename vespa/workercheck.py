"""Vets a worker the autoscaler assigned, before the signed request is sent to it.

mitmproxy cannot resend a flow to another server once its own connect failed (the `error` hook
cannot answer, and the flow is over), so Vespa opens a plain TCP connection to the worker first:
refused or too slow means nothing was sent, and Router.route routes the same request_idx again.
The probe costs one round trip; a worker that dies between the probe and mitmproxy's own connect
still gets the JSON `worker_unavailable` answer of vespa/errorpage.py.
"""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass
from typing import Callable, Iterable
from urllib.parse import urlsplit

from vespa import wire
from vespa.errors import BadRouteAnswer, WorkerConnectTimeout, WorkerUnavailable

Address = tuple[str, int]
LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain"})
ANY = frozenset({"", "0.0.0.0", "::"})


@dataclass(frozen=True, slots=True)
class WorkerCheck:
    connect_timeout_s: float
    # The proxy's own listening addresses, asked at each call (mitmproxy may add listeners).
    listen_addrs: Callable[[], Iterable[Address]]

    async def __call__(self, ready: wire.RouteReady) -> None:
        parts = urlsplit(ready.url)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        if self.is_self(host, port):
            # Not retried: the autoscaler (or whoever answers in its place) must not loop us.
            raise BadRouteAnswer(f"the autoscaler gave a worker URL that points at this proxy: {ready.url}")
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), self.connect_timeout_s)
        except asyncio.TimeoutError:
            raise WorkerConnectTimeout(
                f"no connection to the worker {ready.url} within {self.connect_timeout_s:g} s; "
                "the request was not processed and may be retried"
            ) from None
        except OSError as e:
            raise WorkerUnavailable(
                f"could not connect to the worker {ready.url} ({e.strerror or e}); "
                "the request was not processed and may be retried"
            ) from None
        writer.transport.abort()  # a probe: nothing to say, no need to wait for a clean close

    def is_self(self, host: str, port: int) -> bool:
        for listen_host, listen_port, *_ in self.listen_addrs():
            if listen_port == port and (listen_host in ANY or host == listen_host or _is_local(host)):
                return True
        return False


def _is_local(host: str) -> bool:
    if host.lower() in LOCAL_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
