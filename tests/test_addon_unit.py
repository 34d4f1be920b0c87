"""The addon's hooks in-process (mitmproxy's taddons), with a real worker leg behind them."""

from __future__ import annotations

import json
import socket

import pytest
from mitmproxy import exceptions
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.test import taddons, tflow

from vespa.proxy import addon as addon_module
from vespa.proxy.addon import Vespa
from vespa.proxy.leg import FACTS_HEADER

KEY = "ep-secret-key-1234"


@pytest.fixture
def addon(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("VAST_API_KEY", KEY)
    monkeypatch.setenv("VAST_ENDPOINT", "demo")  # lets the configure() at load time pass
    a = Vespa()
    with taddons.context(a, Proxyserver()) as tctx:
        # A closed port: nothing listens there, so a route attempt fails fast.
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            closed = s.getsockname()[1]
        tctx.configure(a, vespa_endpoint="demo", vespa_autoscaler_url=f"http://127.0.0.1:{closed}")
        yield a, tctx
        a.done()


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
    ({"vespa_max_headers": 0}, "positive"),
    ({"vespa_worker_ca": "/nonexistent/ca.pem"}, "no such file"),
])
def test_bad_options_are_refused(addon, opts: dict, why: str) -> None:
    a, tctx = addon
    with pytest.raises(exceptions.OptionsError, match=why):
        tctx.configure(a, **opts)


def test_the_addon_sets_what_it_needs_of_mitmproxy(addon) -> None:
    a, tctx = addon
    tctx.configure(a, connection_strategy="eager")
    assert tctx.options.connection_strategy == "lazy"  # no wasted connect to the reverse target
    tctx.configure(a, vespa_max_body_kb=64)
    assert tctx.options.body_size_limit == "64k"  # refused before it is held


@pytest.mark.parametrize("modes, expected", [
    (["reverse:http://127.0.0.1:9/"], "http://127.0.0.1:9/"),
    (["reverse:https://run.vast.ai@8010"], "https://run.vast.ai"),
    (["regular"], None),
    ([], None),
])
def test_the_reverse_target_names_the_autoscaler(modes: list[str], expected: str | None) -> None:
    assert addon_module._reverse_target(modes) == expected


async def test_a_flow_goes_to_the_worker_leg_with_its_path_untouched(addon) -> None:
    a, _ = addon
    f = tflow.tflow(live=True)
    f.request.path = "//echo/a?x=1"
    await a.requestheaders(f)
    assert f.response is None
    assert (f.request.host, f.request.port) == ("127.0.0.1", a.setup.leg.port)
    assert f.request.path == "//echo/a?x=1"


async def test_client_credentials_are_masked_on_the_flow(addon) -> None:
    a, _ = addon
    f = tflow.tflow(live=True)
    secret = "sk-proj-VERYSECRETKEY9876"
    f.request.headers["Authorization"] = f"Bearer {secret}"
    f.request.headers["X-Api-Key"] = secret
    f.request.headers["Cookie"] = "session=abcdefghijklmnop"
    await a.requestheaders(f)
    shown = bytes(f.request.headers.fields.__repr__(), "utf-8")
    assert b"VERYSECRET" not in shown and b"abcdefgh" not in shown
    assert f.request.headers["authorization"] == "Bearer ...9876"
    assert f.request.headers["x-api-key"] == "...9876"


@pytest.mark.parametrize("path", ["*", "example.com:443", "http://other.example/x"])
async def test_targets_that_are_not_paths_get_400_before_any_route(addon, path: str) -> None:
    a, _ = addon
    f = tflow.tflow(live=True)
    f.request.path = path
    await a.requestheaders(f)
    assert f.response.status_code == 400 and error_of(f)["type"] == "bad_request"


async def test_too_many_headers_get_431(addon) -> None:
    a, tctx = addon
    tctx.configure(a, vespa_max_headers=50)
    f = tflow.tflow(live=True)
    f.request.headers.fields = tuple((b"x-h%d" % i, b"v") for i in range(51))
    await a.requestheaders(f)
    assert f.response.status_code == 431 and error_of(f)["type"] == "too_many_headers"


async def test_the_leg_facts_are_shown_and_never_reach_the_client(addon) -> None:
    a, _ = addon
    f = tflow.tflow(live=True, resp=False)
    original = (f.request.scheme, f.request.host, f.request.port)
    await a.requestheaders(f)
    a.request(f)
    facts = {"endpoint": "demo", "worker": "https://10.0.0.7:4433", "request_idx": 7, "cost": 1.0,
             "route_ms": 3.2, "polls": 0, "retries": 0}
    f.response = tflow.tresp()
    f.response.headers[FACTS_HEADER] = json.dumps(facts)
    f.response.headers["content-type"] = "text/event-stream"
    a.responseheaders(f)
    assert FACTS_HEADER.lower() not in {k.lower() for k in f.response.headers}
    assert f.response.stream
    # mitmweb's list shows where the request went; no Vespa header is left on it
    assert (f.request.scheme, f.request.host, f.request.port) == ("https", "10.0.0.7", 4433)
    assert f.metadata["vespa"]["worker"] == "https://10.0.0.7:4433" and f.metadata["vespa"]["streamed"] is True
    assert "demo @ https://10.0.0.7:4433" in f.comment
    a.response(f)
    assert not a.flows and original[0] == "http"


async def test_flows_loaded_from_file_are_left_alone(addon) -> None:
    a, _ = addon
    f = tflow.tflow(live=False)
    url = f.request.url
    await a.requestheaders(f)
    a.request(f)
    assert f.response is None and not a.flows and f.request.url == url


async def test_a_live_flow_the_addon_never_saw_is_answered_not_forwarded(addon) -> None:
    # After a script reload, request() meets flows whose headers went through the old instance.
    a, _ = addon
    f = tflow.tflow(live=True)
    original_url = f.request.url
    a.request(f)
    assert f.response.status_code == 503
    assert error_of(f)["type"] == "not_routed"
    assert f.request.url == original_url and f.response.headers["retry-after"]


async def test_a_dead_worker_leg_is_answered_not_forwarded(addon) -> None:
    a, _ = addon
    a.setup.leg.stop()
    f = tflow.tflow(live=True)
    await a.requestheaders(f)
    assert f.response.status_code == 503 and "worker leg exited" in error_of(f)["message"]
