"""The addon's hooks in-process (mitmproxy's taddons), without a network where none is needed."""

from __future__ import annotations

import json
import socket

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons, tflow

from mitmproxy.addons.proxyserver import Proxyserver

from vespa.addon import Vespa
from vespa.routing import Router


@pytest.fixture
def addon(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("VAST_API_KEY", "ep-secret-key-1234")
    monkeypatch.setenv("VAST_ENDPOINT", "demo")  # lets the configure() at load time pass
    a = Vespa()
    # Proxyserver declares stream_large_bodies, which the addon must refuse.
    with taddons.context(a, Proxyserver()) as tctx:
        # A closed port: nothing listens there, so a route attempt fails fast.
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            closed = s.getsockname()[1]
        tctx.configure(a, vespa_endpoint="demo", vespa_autoscaler_url=f"http://127.0.0.1:{closed}")
        yield a, tctx


def error_of(flow) -> dict:
    assert flow.response is not None, "the addon must answer itself"
    assert flow.response.headers["content-type"] == "application/json"
    body = json.loads(flow.response.content)["error"]
    assert flow.response.headers["x-vespa-error"] == body["type"]
    assert body["message"] and body["hint"]
    return body


def test_missing_endpoint_stops_startup(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VAST_API_KEY", "k")
    monkeypatch.delenv("VAST_ENDPOINT", raising=False)
    a = Vespa()
    with taddons.context(a) as tctx:
        with pytest.raises(exceptions.OptionsError, match="vespa_endpoint=NAME"):
            tctx.configure(a, vespa_endpoint="")


def test_missing_key_stops_startup_and_says_where_to_put_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VAST_API_KEY", raising=False)
    monkeypatch.setenv("VAST_ENDPOINT", "demo")
    a = Vespa()
    with taddons.context(a) as tctx:
        with pytest.raises(exceptions.OptionsError, match="VAST_API_KEY"):
            tctx.configure(a, vespa_route_deadline_s=5)


@pytest.mark.parametrize("opts, why", [
    ({"vespa_default_cost": "-3"}, "vespa_default_cost"),
    ({"vespa_autoscaler_url": "run.vast.ai"}, "http"),
    ({"vespa_route_deadline_s": 0}, "positive"),
    ({"stream_large_bodies": "1m"}, "stream_large_bodies"),
])
def test_bad_options_are_refused(addon, opts: dict, why: str) -> None:
    a, tctx = addon
    with pytest.raises(exceptions.OptionsError, match=why):
        tctx.configure(a, **opts)


async def test_bad_cost_header_gets_400_and_never_routes(addon) -> None:
    a, _ = addon
    f = tflow.tflow(live=True)
    f.request.headers["X-Serverless-Cost"] = "-5"
    await a.requestheaders(f)
    assert f.response.status_code == 400
    assert error_of(f)["type"] == "bad_cost"
    assert not a.flights


async def test_non_json_body_gets_400(addon) -> None:
    a, _ = addon
    f = tflow.tflow(live=True)
    f.request.method = "POST"
    f.request.content = b"not json"
    await a.requestheaders(f)
    await a.request(f)
    assert f.response.status_code == 400
    assert error_of(f)["type"] == "bad_body"
    assert not a.flights


async def test_unreachable_autoscaler_fails_closed_with_502(addon) -> None:
    a, _ = addon
    f = tflow.tflow(live=True)
    original_url = f.request.url
    await a.requestheaders(f)
    await a.request(f)
    assert f.response.status_code == 502
    assert error_of(f)["type"] == "autoscaler_unreachable"
    assert f.request.url == original_url
    assert f.response.headers["retry-after"]


async def test_unexpected_exception_is_answered_not_forwarded(addon, monkeypatch: pytest.MonkeyPatch) -> None:
    a, _ = addon

    async def boom(self, cost, check=None):
        raise RuntimeError("boom")

    monkeypatch.setattr(Router, "route", boom)
    f = tflow.tflow(live=True)
    await a.requestheaders(f)
    await a.request(f)
    assert f.response.status_code == 500
    assert error_of(f)["type"] == "internal_error"
    assert "Traceback" not in f.response.text


async def test_flows_loaded_from_file_are_left_alone(addon) -> None:
    a, _ = addon
    f = tflow.tflow(live=False)
    await a.requestheaders(f)
    await a.request(f)
    assert f.response is None and not a.flights


async def test_a_live_flow_the_addon_never_saw_is_answered_not_forwarded(addon) -> None:
    # After a script reload, request() meets flows whose headers went through the old instance.
    a, _ = addon
    f = tflow.tflow(live=True)
    original_url = f.request.url
    await a.request(f)
    assert f.response.status_code == 503
    assert error_of(f)["type"] == "not_routed"
    assert f.request.url == original_url and f.response.headers["retry-after"]


@pytest.mark.parametrize("body", [
    b'\xef\xbb\xbf{"a": 1}',  # UTF-8 with a byte-order mark
    '{"a": 1}'.encode("utf-16"),
])
async def test_json_the_worker_cannot_read_gets_400(addon, body: bytes) -> None:
    a, _ = addon
    f = tflow.tflow(live=True)
    f.request.method = "POST"
    f.request.content = body
    await a.requestheaders(f)
    await a.request(f)
    assert f.response.status_code == 400
    assert error_of(f)["type"] == "bad_body"
