"""Vets a worker the autoscaler assigned, before the signed request is sent to it.

mitmproxy cannot resend a flow to another server once its own connect failed (the `error` hook
cannot answer, and the flow is over), so Vespa opens a plain TCP connection to the worker first:
refused or too slow means nothing was sent, and Router.route routes the same request_idx again.

The probe costs a round trip to a remote GPU, so a worker that answered (or passed a probe) in
the last `trust_s` seconds is not probed again: under steady traffic there is no probe at all.
The price: a trusted worker that has just died is found out by mitmproxy's own connect, and that
one request gets the JSON `worker_unavailable` answer of vespa/errorpage.py (not processed, may
be retried) instead of a silent re-route; the worker is then distrusted and probed again.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from typing import Callable, Iterable
from urllib.parse import urlsplit

from vespa import wire
from vespa.errors import BadRouteAnswer, WorkerConnectTimeout, WorkerUnavailable

Address = tuple[str, int]
LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain"})
ANY = frozenset({"", "0.0.0.0", "::"})
# Workers seen at once are few; past this many, the trust table starts over rather than grow.
MAX_TRUSTED = 1024


class WorkerCheck:
    def __init__(self, connect_timeout_s: float, listen_addrs: Callable[[], Iterable[Address]], trust_s: float = 0) -> None:
        self.connect_timeout_s = connect_timeout_s
        # The proxy's own listening addresses, asked at each call (mitmproxy may add listeners).
        self.listen_addrs = listen_addrs
        self.trust_s = trust_s
        self._trusted_until: dict[Address, float] = {}

    def trust(self, url: str) -> None:
        """The worker answered: skip its probe for a while."""
        if self.trust_s > 0:
            if len(self._trusted_until) >= MAX_TRUSTED:
                self._trusted_until.clear()
            self._trusted_until[_address(url)] = time.monotonic() + self.trust_s

    def distrust(self, url: str) -> None:
        self._trusted_until.pop(_address(url), None)

    async def __call__(self, ready: wire.RouteReady) -> None:
        host, port = address = _address(ready.url)
        if self.is_self(host, port):
            # Not retried: the autoscaler (or whoever answers in its place) must not loop us.
            raise BadRouteAnswer(f"the autoscaler gave a worker URL that points at this proxy: {ready.url}")
        if self._trusted_until.get(address, 0.0) > time.monotonic():
            return
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
        self.trust(ready.url)

    def is_self(self, host: str, port: int) -> bool:
        for listen_host, listen_port, *_ in self.listen_addrs():
            if listen_port == port and (listen_host in ANY or host == listen_host or _is_local(host)):
                return True
        return False


def _address(url: str) -> Address:
    parts = urlsplit(url)
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


def _is_local(host: str) -> bool:
    if host.lower() in LOCAL_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
