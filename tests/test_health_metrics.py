"""`/_vespa/health`, `/_vespa/metrics` and the one-line request log, through real mitmdump processes.

Health and metrics are answered by the proxy (no route call, no worker call); metrics count
exactly what a test sent; the log has every field and no secret, even at debug level.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from typing import Iterator

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Proxy, demo_config, endpoint_key, free_port, run_proxy
from vespa.observe import health
from vespa.emulator import Emulator
from vespa.observe.metrics import Telemetry

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def metrics(proxy: Proxy) -> dict[tuple[str, tuple], float]:
    r = requests.get(proxy.url + "/_vespa/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text) for s in family.samples
    }


def raw_body(r: requests.Response) -> bytes:
    """The body bytes as they crossed the wire (no decoding), which is what the proxy counts."""
    return b"".join(r.raw.stream(decode_content=False))


@pytest.fixture(scope="module")
def own_emulator() -> Iterator[Emulator]:
    """Counts must be exact, so these tests get an emulator and proxies no other test touches."""
    with Emulator(demo_config()) as emu:
        yield emu


# --- health ---------------------------------------------------------------------------------
def test_health_ok_is_answered_by_the_proxy_itself(proxy: Proxy, emulator) -> None:
    t0 = time.monotonic()
    r = requests.get(proxy.url + "/_vespa/health")
    assert r.status_code == 200, r.text
    report = r.json()
    assert report["status"] == "ok" and report["endpoint"] == "demo" and report["in_flight"] == 0
    auto = report["autoscaler"]
    assert auto["url"] == emulator.autoscaler_url and auto["reachable"] is True and auto["latency_ms"] >= 0
    assert "reason" not in report and "X-Vespa-Error" not in r.headers
    assert not [x for x in emulator.records.route if x.time >= t0]
    assert not [x for x in emulator.records.worker if x.time >= t0]


def test_health_503_with_the_reason_when_the_autoscaler_is_down() -> None:
    down = f"http://127.0.0.1:{free_port()}"
    with run_proxy(down, "demo", "ep-some-key") as proxy:
        r = requests.get(proxy.url + "/_vespa/health")
    assert r.status_code == 503, r.text
    report = r.json()
    assert report["status"] == "unavailable" and report["endpoint"] == "demo"
    assert report["reason"].startswith(f"cannot reach the autoscaler at {down}")
    assert report["autoscaler"]["reachable"] is False and report["autoscaler"]["latency_ms"] is None


def test_reserved_prefix_only(proxy: Proxy, emulator) -> None:
    t0 = time.monotonic()
    for method, path in (("GET", "/_vespa/nope"), ("POST", "/_vespa/health"), ("GET", "/_vespa")):
        r = requests.request(method, proxy.url + path)
        assert r.status_code == 404 and r.headers["X-Vespa-Error"] == "unknown_vespa_path", (method, path)
        assert "/_vespa/health" in r.json()["error"]["hint"]
    assert not [x for x in emulator.records.route if x.time >= t0]
    # The backend's own paths that merely contain the prefix are routed as usual.
    r = requests.get(proxy.url + "/echo/_vespa/health")
    assert r.status_code == 200 and r.json()["path"] == "/echo/_vespa/health"


class CountingRouter:
    """Just what Health uses of the addon's setup (health.Target)."""

    def __init__(self, url: str = "http://autoscaler.invalid") -> None:
        self.endpoint, self.autoscaler_url = "ep", url
        self.calls = 0

    async def probe(self, timeout_s: float) -> int:
        self.calls += 1
        await asyncio.sleep(0.05)
        return 200


async def test_health_probe_is_cached_and_shared_by_concurrent_checks(monkeypatch) -> None:
    h = health.Health(Telemetry())
    router = CountingRouter()
    answers = await asyncio.gather(*(h.report(router) for _ in range(5)))
    assert [status for status, _ in answers] == [200] * 5 and router.calls == 1
    await h.report(router)
    assert router.calls == 1  # within the TTL: no new call
    monkeypatch.setattr(health, "PROBE_TTL_S", 0.0)
    await h.report(router)
    assert router.calls == 2
    other = CountingRouter("http://other.invalid")  # reconfigured: the old answer does not count
    status, report = await h.report(other)
    assert other.calls == 1 and report["autoscaler"]["url"] == "http://other.invalid"
    h.close()


# --- metrics --------------------------------------------------------------------------------
def test_metrics_count_what_was_sent(own_emulator: Emulator) -> None:
    emu = own_emulator
    with run_proxy(emu.autoscaler_url, "demo", endpoint_key(emu, "demo")) as proxy:
        received = 0
        for _ in range(3):
            r = requests.post(proxy.url + "/v1/chat/completions", json=CHAT, stream=True)
            assert r.status_code == 200
            received += len(raw_body(r))
        for _ in range(2):
            r = requests.post(proxy.url + "/v1/completions", json={"prompt": "p", "max_tokens": 5, "stream": True},
                              stream=True)
            assert r.headers["content-type"].startswith("text/event-stream")
            received += len(raw_body(r))
        emu.set_cold("demo", 0.5)  # the next request polls /route/ while no worker is ready
        r = requests.post(proxy.url + "/v1/chat/completions", json=CHAT, stream=True)
        assert r.status_code == 200
        received += len(raw_body(r))
        r = requests.post(proxy.url + "/v1/chat/completions", json=CHAT, headers={"X-Serverless-Cost": "-1"},
                          stream=True)
        assert r.status_code == 400
        received += len(raw_body(r))
        assert requests.get(proxy.url + "/_vespa/health").status_code == 200  # not a request to count
        m = metrics(proxy)
    assert m[("vespa_requests_total", (("endpoint", "demo"), ("error_type", "none"), ("status", "200")))] == 6
    assert m[("vespa_requests_total", (("endpoint", "demo"), ("error_type", "bad_cost"), ("status", "400")))] == 1
    assert sum(v for (name, _), v in m.items() if name == "vespa_requests_total") == 7
    assert m[("vespa_route_seconds_count", (("endpoint", "demo"),))] == 6
    assert m[("vespa_workload_total", (("endpoint", "demo"),))] == 6.0
    assert m[("vespa_time_to_first_byte_seconds_count", ())] == 6
    assert m[("vespa_request_duration_seconds_count", ())] == 7
    assert m[("vespa_response_bytes_total", ())] == received
    assert m[("vespa_route_polls_total", ())] >= 1
    assert m[("vespa_route_retries_total", ())] == 0
    assert m[("vespa_requests_in_flight", ())] == 0
    assert len(emu.records.worker) == 6


def test_in_flight_while_a_stream_runs(own_emulator: Emulator) -> None:
    emu = own_emulator
    slow, emu.config.tokens_per_s = emu.config.tokens_per_s, 10.0
    first_chunk, release = threading.Event(), threading.Event()
    total: list[int] = []

    def stream() -> None:
        body = {"prompt": "p", "max_tokens": 8, "stream": True}
        with requests.post(proxy.url + "/v1/completions", json=body, stream=True) as r:
            n = 0
            for chunk in r.iter_content(chunk_size=None):
                n += len(chunk)
                first_chunk.set()
            total.append(n)
        release.wait(10)

    try:
        with run_proxy(emu.autoscaler_url, "demo", endpoint_key(emu, "demo")) as proxy:
            t = threading.Thread(target=stream)
            t.start()
            assert first_chunk.wait(10)
            assert requests.get(proxy.url + "/_vespa/health").json()["in_flight"] == 1
            assert metrics(proxy)[("vespa_requests_in_flight", ())] == 1
            t.join(10)
            assert requests.get(proxy.url + "/_vespa/health").json()["in_flight"] == 0
            assert metrics(proxy)[("vespa_requests_in_flight", ())] == 0
            release.set()
    finally:
        emu.config.tokens_per_s = slow
        release.set()
    assert total and total[0] > 0


# --- the request log ------------------------------------------------------------------------
LINE = re.compile(
    r"vespa: (?P<method>[A-Z]+) (?P<path>\S+) endpoint=(?P<endpoint>\S+) worker=(?P<worker>\S+) "
    r"status=(?P<status>\d+)(?: error=(?P<error>\S+))? route_ms=(?P<route_ms>\S+) total_ms=(?P<total_ms>\d+) "
    r"cost=(?P<cost>\S+) bytes=(?P<bytes>\d+) polls=\S+ retries=\S+"
)


@pytest.mark.parametrize("flow_detail", ["0", "4"])
def test_request_log_has_the_fields_and_no_secret_at_debug_level(emulator, flow_detail: str) -> None:
    key = endpoint_key(emulator, "demo")
    t0 = time.monotonic()
    # --debug's setting; flow_detail 4 is mitmdump's most verbose flow dump (the launcher uses 0).
    with run_proxy(emulator.autoscaler_url, "demo", key, "termlog_verbosity=debug",
                   extra_args=("--flow-detail", flow_detail)) as proxy:
        plain = requests.post(proxy.url + "/v1/chat/completions", json=CHAT, headers={"X-Serverless-Cost": "3"})
        assert plain.status_code == 200
        streamed = requests.post(proxy.url + "/v1/completions", json={"prompt": "p", "max_tokens": 4, "stream": True})
        assert streamed.status_code == 200
        assert requests.get(proxy.url + "/echo?token=client-query-secret").status_code == 200
        assert requests.post(proxy.url + "/echo", data=b"not json").status_code == 400
        deadline = time.monotonic() + 10
        while proxy.log().count("vespa: ") < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        log = proxy.log()
    lines = {(m["method"], m["path"]): m for m in map(LINE.search, log.splitlines()) if m}
    chat = lines[("POST", "/v1/chat/completions")]
    assert chat["endpoint"] == "demo" and chat["worker"].startswith("http://127.0.0.1:")
    assert chat["status"] == "200" and chat["cost"] == "3.0" and int(chat["bytes"]) == len(plain.content)
    assert chat["route_ms"] != "-" and chat["error"] is None
    assert int(lines[("POST", "/v1/completions")]["bytes"]) == len(streamed.content)
    assert lines[("GET", "/echo")]["status"] == "200"  # logged without its query string
    bad = lines[("POST", "/echo")]
    assert bad["status"] == "400" and bad["error"] == "bad_body" and bad["worker"] == "-"
    signatures = [r.auth_data["signature"] for r in emulator.records.worker if r.time >= t0 and r.auth_data]
    assert len(signatures) == 3
    for secret in (key, *signatures, "serverless_signature", "auth_data"):
        assert secret not in log, f"{secret[:12]}... is in the proxy log"
    if flow_detail == "0":  # flow_detail 4 dumps the client's own request, query included, by design
        assert "client-query-secret" not in log
    else:  # the verbose dump did happen, and showed the client's request, not the signed one
        assert "User-Agent: python-requests" in log
