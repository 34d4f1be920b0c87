"""The autoscaler: `POST /route/` hands out signed worker assignments, `GET /pubkey/` the PEM.

Follows ../shared/vast-protocol.md section 1: a 200 with `url` when a worker is ready, a 200
without `url` while none is (cold start, stopped endpoint), 400/401 as `{error, error_msg}`.
"""

from __future__ import annotations

import itertools
import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from vespa.emulator.keys import find_key
from vespa.emulator.records import RouteRecord, Records
from vespa.emulator.signing import SigningKey
from vespa.wire import signed_message

if TYPE_CHECKING:
    from vespa.emulator import EndpointConfig
    from vespa.emulator.worker import Worker

# Arbitrary, but far from 0 so a client that confuses "new request" (0) with an id shows up.
FIRST_REQUEST_IDX = 55501


class RouteError(Exception):
    def __init__(self, status: int, error: str, error_msg: str) -> None:
        super().__init__(error_msg)
        self.status, self.error, self.error_msg = status, error, error_msg

    def body(self) -> dict[str, str]:
        # Both spellings: the hand-written docs read `error`, the generated spec `error_msg`.
        return {"error": self.error, "error_msg": self.error_msg}


@dataclass
class EndpointState:
    """The autoscaler's view of one endpoint."""

    config: EndpointConfig
    workers: list[Worker]
    woke_at: float | None = None  # the first route call: a cold endpoint starts loading then
    cold_until: float = 0.0
    counted_load: float = 0.0
    request_idxs: set[int] = field(default_factory=set)
    _turn: int = 0

    def waiting_status(self, now: float) -> str | None:
        """Why no worker can be handed out right now, or None when one can."""
        if self.config.state == "stopped":
            return "endpoint stopped"
        if not self.workers:
            return "No workers"
        assert self.woke_at is not None
        if now < max(self.woke_at + self.config.cold_start_s, self.cold_until):
            return "Loading"
        return None

    def next_worker(self) -> Worker:
        worker = self.workers[self._turn % len(self.workers)]
        self._turn += 1
        return worker


class Autoscaler:
    def __init__(self, endpoints: dict[str, EndpointState], key: SigningKey, records: Records) -> None:
        self._endpoints = endpoints
        self._by_key = {state.config.api_key: state for state in endpoints.values()}
        self._key = key
        self._records = records
        self._request_idxs = itertools.count(FIRST_REQUEST_IDX)
        self._reqnums: dict[int, itertools.count[int]] = {}
        self._url_signatures: dict[str, str] = {}

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/route/", self._route)
        app.router.add_get("/pubkey/", self._pubkey)
        return app

    async def _pubkey(self, request: web.Request) -> web.Response:
        return web.Response(text=self._key.public_pem(), content_type="text/plain")

    async def _route(self, request: web.Request) -> web.Response:
        rec = RouteRecord(
            time=time.monotonic(),
            endpoint=None,
            cost=None,
            request_idx_in=None,
            request_idx_out=None,
            status_code=200,
            ready=False,
            worker_url=None,
            key_source=None,
            headers=dict(request.headers),
        )
        try:
            answer = self._answer(request, await request.read(), rec)
            rec.signature = answer.get("signature")
        except RouteError as e:
            rec.status_code = e.status
            answer = e.body()
        self._records.route.append(rec)
        return web.json_response(answer, status=rec.status_code)

    def _answer(self, request: web.Request, raw: bytes, rec: RouteRecord) -> dict[str, Any]:
        body = _json_object(raw)
        key, rec.key_source = find_key(request.headers, body, request.query)
        rec.endpoint, rec.cost, rec.request_idx_in = (
            body.get("endpoint"),
            body.get("cost"),
            body.get("request_idx"),
        )
        state = self._authorize(key, rec.endpoint)
        if state.config.route_answer is not None:
            return dict(state.config.route_answer)
        cost = _cost(body)
        request_idx = self._request_idx(state, body.get("request_idx") or 0, cost)
        rec.request_idx_out = request_idx
        name = state.config.name
        now = time.monotonic()
        if state.woke_at is None:
            state.woke_at = now
        status = state.waiting_status(now)
        if status is not None:
            return {
                "endpoint": name,
                "status": status,
                "request_idx": request_idx,
                "__request_id": _request_id(),
            }
        worker = state.next_worker()
        rec.ready, rec.worker_url = True, worker.url
        return self._ready(worker, name, cost, request_idx)

    def _authorize(self, key: str | None, endpoint: Any) -> EndpointState:
        by_key = self._by_key.get(key) if key is not None else None
        if by_key is None:
            raise _unauthorized("authenticate_endpoint_apikey: invalid api_key")
        if not isinstance(endpoint, str) or not endpoint:
            raise _bad_request("missing required parameter: endpoint")
        if endpoint not in self._endpoints:
            raise _bad_request(f"endpoint {endpoint} not found")
        if by_key.config.name != endpoint:
            raise _unauthorized(f"authenticate_endpoint_apikey: invalid api_key for endpoint {endpoint}")
        return by_key

    def _request_idx(self, state: EndpointState, given: Any, cost: int | float) -> int:
        """A known id is a re-poll or retry of the same request: its load was counted already."""
        if not isinstance(given, int) or isinstance(given, bool) or given < 0:
            raise _bad_request("request_idx must be a non-negative integer")
        if given in state.request_idxs:
            return given
        request_idx = next(self._request_idxs)
        state.request_idxs.add(request_idx)
        state.counted_load += cost
        return request_idx

    def _ready(self, worker: Worker, endpoint: str, cost: int | float, request_idx: int) -> dict[str, Any]:
        reqnum = next(self._reqnums.setdefault(worker.id, itertools.count(1)))
        answer: dict[str, Any] = {
            "endpoint": endpoint,
            "url": worker.url,
            "cost": cost,
            "reqnum": reqnum,
            "request_idx": request_idx,
        }
        if worker.generation == "B":
            answer["signature"] = self._key.sign(signed_message(answer, "B"))
        else:
            # Generation C signs only the URL, so the signature is the same for every request.
            if worker.url not in self._url_signatures:
                self._url_signatures[worker.url] = self._key.sign(signed_message(answer, "C"))
            answer["signature"] = self._url_signatures[worker.url]
        answer["__request_id"] = _request_id()
        return answer


def _bad_request(error_msg: str) -> RouteError:
    return RouteError(400, "Invalid endpoint or missing required parameters", error_msg)


def _unauthorized(error_msg: str) -> RouteError:
    return RouteError(401, "Authentication failed", error_msg)


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise _bad_request("the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise _bad_request("the body must be a JSON object")
    return body


def _cost(body: dict[str, Any]) -> int | float:
    """The cost exactly as parsed: its JSON type is echoed, since gen-B signatures cover it."""
    cost = body.get("cost")
    if cost is None:
        raise _bad_request("missing required parameter: cost")
    if not isinstance(cost, (int, float)) or isinstance(cost, bool) or not math.isfinite(cost) or cost < 0:
        raise _bad_request("cost must be a non-negative number")
    return cost


def _request_id() -> str:
    return str(uuid.uuid4())
