"""Cold-start fallback (issue 13): an endpoint with a `fallback` list that has no worker ready
within `fallback_after_s` hands the request to its fallbacks, before a byte went to any worker,
while one route call keeps its demand visible to the autoscaler."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from vespa.errors import EndpointNotFound, KeyRejected, NoWorkerInTime, VespaError, WorkerUnavailable
from vespa.proxy import endpoints

if TYPE_CHECKING:
    from vespa.proxy.leg import Forwarded, WorkerLeg

log = logging.getLogger("vespa.proxy.leg")


@dataclass(frozen=True, slots=True)
class Outgoing:
    """The client's request as the leg read it: the body once, checked and parsed."""

    request: web.BaseRequest
    payload: bytes
    body: Any  # the parsed JSON, or None


class Claim:
    """Who sends a request: its first route call, or (once withdrawn) a fallback. Taking and
    withdrawing happen on one event loop, so exactly one of them wins."""

    def __init__(self) -> None:
        self.state = "open"

    def take(self) -> bool:
        if self.state == "open":
            self.state = "taken"
        return self.state == "taken"

    def withdraw(self) -> bool:
        if self.state == "open":
            self.state = "withdrawn"
        return self.state == "withdrawn"


# Failures that prove nothing reached any worker: a fallback may still take the request.
NOT_SENT = (NoWorkerInTime, WorkerUnavailable, EndpointNotFound, KeyRejected)


class ColdStarts:
    """Cold-start fallback (issue 13): when an endpoint with a `fallback` list has no worker
    ready within `fallback_after_s`, the request goes to its fallbacks in order, before a byte
    went to any worker. Its route call goes on polling, as the only one, so the autoscaler keeps
    seeing the demand and warms the endpoint up; meanwhile later requests go to the fallback at
    once, and return to the endpoint as soon as that call gets a worker."""

    def __init__(self, leg: WorkerLeg) -> None:
        self.leg = leg
        self.demand: dict[str, asyncio.Task[Forwarded | None]] = {}

    async def forward(self, spec: endpoints.EndpointSpec, out: Outgoing) -> Forwarded:
        fallbacks = self.leg.catalog.fallbacks(spec)
        if not fallbacks:
            forwarded = await self.leg.forward(spec, out)
            assert forwarded is not None
            return forwarded
        if spec.name in self.demand:
            return await self._fall_back(spec, fallbacks, out, f"{spec.name} is warming up")
        claim = Claim()
        task = asyncio.ensure_future(self.leg.forward(spec, out, claim))
        try:
            done, _ = await asyncio.wait({task}, timeout=spec.fallback_after_s)
        except asyncio.CancelledError:
            task.cancel()  # the client left before anything was decided
            raise
        if done or not claim.withdraw():
            forwarded = await task  # it got a worker (and sent the request) in time
            assert forwarded is not None
            return forwarded
        self._keep_demand(spec, task)
        return await self._fall_back(spec, fallbacks, out, f"no worker of {spec.name} ready within {spec.fallback_after_s:g} s")

    def _keep_demand(self, spec: endpoints.EndpointSpec, task: asyncio.Task[Forwarded | None]) -> None:
        self.demand[spec.name] = task
        self.leg.set_state(spec.name, "cold", "no worker ready; requests go to its fallback while it warms up")
        log.info("vespa: endpoint %s has no worker ready within %g s; sending its requests to %s while it warms up",
                 spec.name, spec.fallback_after_s, ", ".join(spec.fallback))

        def ended(t: asyncio.Task[Forwarded | None]) -> None:
            self.demand.pop(spec.name, None)
            if t.cancelled() or t.exception() is not None:
                self.leg.set_state(spec.name, "unknown")
            else:
                log.info("vespa: endpoint %s has a worker ready; its requests go to it again", spec.name)

        task.add_done_callback(ended)

    async def _fall_back(self, spec: endpoints.EndpointSpec, fallbacks: tuple[endpoints.EndpointSpec, ...],
                         out: Outgoing, reason: str) -> Forwarded:
        failure: VespaError | None = None
        for fallback in fallbacks:
            try:
                forwarded = await self.leg.forward(fallback, out)
            except NOT_SENT as e:
                failure = e
                continue
            assert forwarded is not None
            forwarded.facts.update(fallback_from=spec.name, fallback_reason=reason)
            return forwarded
        assert failure is not None
        raise failure

    async def close(self) -> None:
        for task in list(self.demand.values()):
            task.cancel()
