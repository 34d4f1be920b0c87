"""The Vast.ai Serverless wire format, shared by the addon and the emulator.

Everything here is pure: parsing and building the messages of ../shared/vast-protocol.md
(sections 1-2), with no I/O. Route answers are echoed to workers exactly as received,
because generation-B signatures cover `cost`, and 256 and 256.0 serialise differently.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Mapping
from urllib.parse import urlsplit

from vespa.errors import BadCost, BadRouteAnswer

# The keys a worker's AuthData requires (SDK data_types.py); extra keys are ignored.
AUTH_FIELDS = ("cost", "endpoint", "reqnum", "request_idx", "signature", "url")
# Fields covered by a generation-B signature (everything but the signature itself).
GEN_B_FIELDS = ("cost", "endpoint", "reqnum", "request_idx", "url")
QUERY_PREFIX = "serverless_"
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """Body of `POST {autoscaler}/route/`. A `request_idx` of 0 starts a new request."""

    endpoint: str
    cost: float
    request_idx: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"endpoint": self.endpoint, "cost": self.cost, "request_idx": self.request_idx}


@dataclass(frozen=True, slots=True)
class RouteReady:
    """A worker was assigned. `auth_data` is the whole answer, kept verbatim for the worker."""

    url: str
    request_idx: int
    auth_data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class RouteWaiting:
    """No worker is ready yet: poll again with the same `request_idx`."""

    status: str
    request_idx: int


def parse_route_answer(body: bytes) -> RouteReady | RouteWaiting:
    """Tell a ready answer from a waiting one by the presence of `url` (SDK RouteResponse)."""
    try:
        answer = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadRouteAnswer("the autoscaler's /route/ answer is not JSON") from None
    if not isinstance(answer, dict):
        raise BadRouteAnswer("the autoscaler's /route/ answer is not a JSON object")
    request_idx = answer.get("request_idx", 0)
    if not isinstance(request_idx, int) or isinstance(request_idx, bool):
        raise BadRouteAnswer("the autoscaler's /route/ answer has a non-integer request_idx")
    if "url" not in answer:
        if "status" not in answer:  # neither shape: polling it would wait out the whole deadline
            raise BadRouteAnswer("the autoscaler's /route/ answer has neither a worker url nor a status")
        return RouteWaiting(status=str(answer.get("status", "waiting for a worker")), request_idx=request_idx)
    missing = [k for k in AUTH_FIELDS if k not in answer]
    if missing:
        raise BadRouteAnswer(f"the autoscaler's /route/ answer lacks {', '.join(missing)}")
    url = answer["url"]
    if not isinstance(url, str) or not is_http_url(url):
        raise BadRouteAnswer(f"the autoscaler gave a worker URL that is not http(s): {url!r}")
    return RouteReady(url=url.rstrip("/"), request_idx=request_idx, auth_data=answer)


def is_http_url(url: str) -> bool:
    try:
        parts = urlsplit(url)
        parts.port  # raises on a bad port
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def parse_cost(value: str | None, default: float) -> float:
    """The `X-Serverless-Cost` header: a positive, finite number of workload units."""
    if value is None or value.strip() == "":
        return default
    try:
        cost = float(value)
    except ValueError:
        raise BadCost(f"X-Serverless-Cost must be a number, got {value[:40]!r}") from None
    if not math.isfinite(cost) or cost <= 0:
        raise BadCost(f"X-Serverless-Cost must be a positive, finite number, got {value[:40]!r}")
    return cost


def worker_body(auth_data: Mapping[str, Any], payload: bytes) -> bytes:
    """`{"auth_data": ..., "payload": ...}` with the client's JSON kept byte for byte.

    The caller has already checked `payload` is JSON; splicing avoids re-encoding it.
    """
    return b'{"auth_data": %s, "payload": %s}' % (json.dumps(auth_data).encode(), payload.strip() or b"{}")


def auth_query(auth_data: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The `serverless_*` query parameters that carry auth_data on GET/DELETE/HEAD (RB worker).

    Values are JSON-encoded scalars, so a float cost keeps its `.0` and the worker can tell
    256 from 256.0 when it rebuilds the signed message.
    """
    return [
        (QUERY_PREFIX + k, v if isinstance(v := auth_data[k], str) else json.dumps(v))
        for k in AUTH_FIELDS
    ]


def signed_message(auth_data: Mapping[str, Any], generation: str) -> bytes:
    """The exact bytes a route signature covers: Python's `json.dumps(indent=4, sort_keys=True)`."""
    if generation == "C":
        obj = {"url": auth_data["url"]}
    elif generation == "B":
        obj = {k: auth_data[k] for k in GEN_B_FIELDS}
    else:
        raise ValueError(f"unknown signature generation {generation!r}")
    return json.dumps(obj, indent=4, sort_keys=True).encode()
