"""Unit tests for the pure wire format: route answers, cost header, worker body, query form."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vespa import wire
from vespa.errors import BadCost, BadRouteAnswer

# The machine is shared and slow at times: judge inputs, not how fast they were drawn.
fuzz = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])

READY = {
    "endpoint": "demo", "url": "http://127.0.0.1:9000/", "cost": 256, "reqnum": 7,
    "request_idx": 42, "signature": "c2ln", "__request_id": "abc",
}


def test_ready_answer_keeps_everything_verbatim() -> None:
    answer = wire.parse_route_answer(json.dumps(READY).encode())
    assert isinstance(answer, wire.RouteReady)
    assert answer.url == "http://127.0.0.1:9000"
    assert answer.request_idx == 42
    assert answer.auth_data == READY


def test_waiting_answer_has_no_url() -> None:
    answer = wire.parse_route_answer(b'{"endpoint": "demo", "status": "Loading", "request_idx": 5}')
    assert answer == wire.RouteWaiting(status="Loading", request_idx=5)


@pytest.mark.parametrize("body, why", [
    (b"<html>", "not JSON"),
    (b"[1]", "not a JSON object"),
    (json.dumps({**READY, "signature": None} | {"url": "ftp://x"}).encode(), "not http"),
    (json.dumps({k: v for k, v in READY.items() if k != "signature"}).encode(), "lacks signature"),
    (json.dumps({**READY, "request_idx": "7"}).encode(), "non-integer"),
])
def test_malformed_route_answers_are_rejected(body: bytes, why: str) -> None:
    with pytest.raises(BadRouteAnswer, match=why):
        wire.parse_route_answer(body)


@fuzz
@given(st.binary(max_size=300))
def test_route_answer_parser_never_crashes(body: bytes) -> None:
    try:
        wire.parse_route_answer(body)
    except BadRouteAnswer:
        pass


@fuzz
@given(st.dictionaries(st.sampled_from([*wire.AUTH_FIELDS, "status", "x"]),
                       st.one_of(st.none(), st.integers(), st.floats(), st.text(max_size=20)), max_size=8))
def test_route_answer_parser_on_json_objects(obj: dict) -> None:
    try:
        answer = wire.parse_route_answer(json.dumps(obj).encode())
    except BadRouteAnswer:
        return
    if isinstance(answer, wire.RouteReady):
        assert wire.is_http_url(answer.url) and set(wire.AUTH_FIELDS) <= set(obj)
    else:
        assert "url" not in obj


@pytest.mark.parametrize("value, expected", [(None, 1.0), ("", 1.0), ("500", 500.0), (" 2.5 ", 2.5)])
def test_cost_header(value: str | None, expected: float) -> None:
    assert wire.parse_cost(value, 1.0) == expected


@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf", "abc", "1e999"])
def test_bad_cost_header(value: str) -> None:
    with pytest.raises(BadCost):
        wire.parse_cost(value, 1.0)


@fuzz
@given(st.text(max_size=30))
def test_cost_parser_accepts_only_positive_finite(value: str) -> None:
    try:
        cost = wire.parse_cost(value, 1.0)
    except BadCost:
        return
    assert math.isfinite(cost) and cost > 0


def test_worker_body_splices_payload_byte_for_byte() -> None:
    payload = b'{"b": 1.50, "a": [1,2]}'
    body = wire.worker_body(READY, payload)
    assert payload in body
    decoded = json.loads(body)
    assert decoded["auth_data"] == READY and isinstance(decoded["auth_data"]["cost"], int)
    assert json.loads(wire.worker_body(READY, b""))["payload"] == {}


@fuzz
@given(st.floats(min_value=1e-3, max_value=1e9) | st.integers(min_value=1, max_value=10**9))
def test_query_form_keeps_cost_type(cost: float | int) -> None:
    auth = {**READY, "cost": cost}
    query = dict(wire.auth_query(auth))
    assert set(query) == {"serverless_" + k for k in wire.AUTH_FIELDS}
    assert json.loads(query["serverless_cost"]) == cost
    assert type(json.loads(query["serverless_cost"])) is type(cost)
    assert query["serverless_url"] == READY["url"]


def test_signed_messages_match_the_protocol() -> None:
    auth = {**READY, "url": "https://203.0.113.7:45123", "cost": 512, "endpoint": "my-vllm",
            "reqnum": 81234, "request_idx": 55501}
    assert wire.signed_message(auth, "C") == b'{\n    "url": "https://203.0.113.7:45123"\n}'
    assert wire.signed_message(auth, "B") == (
        b'{\n    "cost": 512,\n    "endpoint": "my-vllm",\n    "reqnum": 81234,\n'
        b'    "request_idx": 55501,\n    "url": "https://203.0.113.7:45123"\n}'
    )
