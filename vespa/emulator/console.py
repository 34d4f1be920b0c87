"""The account-level web API: `GET /api/v0/endptjobs/` lists endpoints and their keys, and
`GET /static/jvastai_root.cer` serves the root CA of the HTTPS workers (PEM, as Vast serves it).

Follows ../shared/vast-protocol.md section 3, including the 3 requests/s rate limit, because
a client that lists endpoints on every request must be caught by the tests.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from aiohttp import web

from vespa.emulator.keys import find_key
from vespa.emulator.records import ConsoleRecord, KeySource, Records

if TYPE_CHECKING:
    from vespa.emulator import EmulatorConfig, EndpointConfig

USER_ID = 7
FIRST_ENDPOINT_ID = 4242
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """A token bucket per key: `rate` requests per second, bursts of up to max(rate, 1)."""

    def __init__(self) -> None:
        self._buckets: dict[str, _Bucket] = {}

    def allow(self, key: str, rate: float) -> bool:
        now = time.monotonic()
        capacity = max(rate, 1.0)
        bucket = self._buckets.setdefault(key, _Bucket(capacity, now))
        bucket.tokens = min(capacity, bucket.tokens + (now - bucket.updated) * rate)
        bucket.updated = now
        if bucket.tokens < 1:
            return False
        bucket.tokens -= 1
        return True


class Console:
    def __init__(self, config: EmulatorConfig, records: Records, ca_pem: bytes) -> None:
        self._config = config
        self._ca_pem = ca_pem
        self._records = records
        self._limiter = RateLimiter()
        self._created_at = time.time()

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._record])
        app.router.add_get("/api/v0/endptjobs/", self._endptjobs)
        app.router.add_get("/static/jvastai_root.cer", self._root_ca)
        return app

    @web.middleware
    async def _record(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        _, source = await _key_of(request)
        rec = ConsoleRecord(time.monotonic(), request.method, request.path, 500, source)
        try:
            response = await handler(request)
        except web.HTTPException as e:
            rec.status_code = e.status
            raise
        finally:
            self._records.console.append(rec)
        rec.status_code = response.status
        return response

    async def _root_ca(self, request: web.Request) -> web.Response:
        # A static file on Vast: no key needed, no rate limit.
        return web.Response(body=self._ca_pem, content_type="application/x-x509-ca-cert")

    async def _endptjobs(self, request: web.Request) -> web.Response:
        key, _ = await _key_of(request)
        rate = self._config.console_rate_limit
        if rate is not None and not self._limiter.allow(key or "", rate):
            return web.json_response(
                {"detail": f"API requests too frequent endpoint threshold={rate}"}, status=429
            )
        if key != self._config.account_key:
            body = {"success": False, "error": "auth_error", "msg": "Invalid user key"}
            return web.json_response(body, status=401)
        if not self._config.endpoints:
            body = {"success": False, "error": "invalid_args", "msg": "No endpoints for user found"}
            return web.json_response(body, status=400)
        results = [self._describe(i, ep) for i, ep in enumerate(self._config.endpoints)]
        return web.json_response({"success": True, "results": results})

    def _describe(self, index: int, ep: EndpointConfig) -> dict[str, Any]:
        return {
            "id": FIRST_ENDPOINT_ID + index,
            "endpoint_name": ep.name,
            "api_key": ep.api_key,
            "user_id": USER_ID,
            "created_at": self._created_at,
            "endpoint_state": ep.state,
            "min_load": 0.0,
            "min_cold_load": 0.0,
            "target_util": 0.9,
            "cold_mult": 2.5,
            "cold_workers": 0,
            "max_workers": ep.max_workers,
            "max_queue_time": ep.max_queue_time,
            "target_queue_time": 10.0,
            "inactivity_timeout": None,
            "auto_delete_in_seconds": None,
            "auto_delete_due_24h": False,
        }


async def _key_of(request: web.Request) -> tuple[str | None, KeySource | None]:
    return find_key(request.headers, _json_body(await request.read()), request.query)


def _json_body(raw: bytes) -> dict[str, Any]:
    """The CLI sends its key as a JSON body on the GET; anything else carries no key."""
    try:
        body = json.loads(raw) if raw else {}
    except (ValueError, UnicodeDecodeError):
        return {}
    return body if isinstance(body, dict) else {}
