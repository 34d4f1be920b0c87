"""Several endpoints behind one proxy (issue 13), end to end: the by-hand mitmdump form with a
config file, the OpenAI SDK choosing by model and alias, the header override, /v1/models, cost
'auto' reaching /route/, and the cold-start fallback while the cold endpoint warms up."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterator

import openai
import pytest
import requests

from tests.conftest import Proxy, run_proxy
from vespa.emulator import Emulator, EmulatorConfig, EndpointConfig

FALLBACK_AFTER_S = 1
CONFIG = f"""
[[endpoint]]
name = "big"
aliases = ["meta-llama/Llama-3.3-70B-Instruct", "large"]
cost = "auto"
fallback = ["small"]
fallback_after_s = {FALLBACK_AFTER_S}

[[endpoint]]
name = "small"
aliases = ["tiny"]
"""


@pytest.fixture(scope="module")
def emu() -> Iterator[Emulator]:
    config = EmulatorConfig(
        endpoints=[EndpointConfig(name="big", workers=2), EndpointConfig(name="small", workers=1)],
        ttft_ms=5, tokens_per_s=1000.0,
    )
    with Emulator(config) as e:
        yield e


@pytest.fixture(scope="module")
def proxy(emu: Emulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    config = tmp_path_factory.mktemp("cfg") / "endpoints.toml"
    config.write_text(CONFIG)
    keys = {ep.name: ep.api_key for ep in emu.config.endpoints}
    # The by-hand form: one URL (the reverse target is the autoscaler), the config, keys in env.
    with run_proxy(emu.autoscaler_url, "", "", f"vespa_config={config}",
                   env={"VESPA_ENDPOINT_KEYS": json.dumps(keys)}) as p:
        yield p


def client(proxy: Proxy) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-client-not-forwarded", max_retries=0)


def served_by(emu: Emulator, since: float) -> list[str]:
    by_url = {w.url: name for name in ("big", "small") for w in emu.workers(name)}
    return [by_url[r.worker_url] for r in emu.records.route if r.time >= since and r.ready]


def test_model_and_alias_pick_the_endpoint_and_stream(proxy: Proxy, emu: Emulator) -> None:
    c = client(proxy)
    for model, endpoint in (("large", "big"), ("meta-llama/Llama-3.3-70B-Instruct", "big"), ("small", "small"),
                            ("tiny", "small")):
        t0 = time.monotonic()
        stream = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=5, stream=True)
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        assert text
        assert served_by(emu, t0) == [endpoint], model
        (worker,) = [w for w in emu.records.worker if w.time >= t0]
        assert worker.signature_ok and "x-vast-endpoint" not in {k.lower() for k in worker.headers}


def test_header_overrides_the_model_and_is_not_forwarded(proxy: Proxy, emu: Emulator) -> None:
    t0 = time.monotonic()
    r = requests.post(proxy.url + "/v1/chat/completions", headers={"X-Vast-Endpoint": "small"},
                      json={"model": "large", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert r.status_code == 200
    assert served_by(emu, t0) == ["small"]
    (worker,) = [w for w in emu.records.worker if w.time >= t0]
    assert "x-vast-endpoint" not in {k.lower() for k in worker.headers}


def test_unknown_model_is_a_404_naming_the_models(proxy: Proxy, emu: Emulator) -> None:
    t0 = time.monotonic()
    with pytest.raises(openai.NotFoundError) as info:
        client(proxy).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    err = info.value.body
    assert info.value.status_code == 404 and err["type"] == "model_not_found"
    assert info.value.code == "model_not_found"  # what the SDK shows of it
    for model in ("big", "large", "small", "tiny"):
        assert model in err["message"]
    assert not [r for r in emu.records.route if r.time >= t0]  # nothing routed, no worker woken


def test_models_are_listed_by_the_proxy_without_a_route_call(proxy: Proxy, emu: Emulator) -> None:
    t0 = time.monotonic()
    models = client(proxy).models.list()
    assert {(m.id, m.owned_by) for m in models} == {
        ("big", "big"), ("meta-llama/Llama-3.3-70B-Instruct", "big"), ("large", "big"),
        ("small", "small"), ("tiny", "small"),
    }
    assert not [r for r in emu.records.route if r.time >= t0]


def test_cost_auto_sends_max_tokens_to_route(proxy: Proxy, emu: Emulator) -> None:
    t0 = time.monotonic()
    for body in ({"max_tokens": 37}, {"max_completion_tokens": 41}, {"parameters": {"max_new_tokens": 43}}, {}):
        r = requests.post(proxy.url + "/v1/completions", json={"model": "big", "prompt": "p", **body})
        assert r.status_code == 200, r.text
    r = requests.post(proxy.url + "/v1/completions", headers={"X-Serverless-Cost": "7"},
                      json={"model": "big", "prompt": "p", "max_tokens": 99})
    assert r.status_code == 200
    costs = [r.cost for r in emu.records.route if r.time >= t0 and r.endpoint == "big"]
    assert costs == [37.0, 41.0, 43.0, 1.0, 7.0]
    # 'small' has the default cost: max_tokens is not its workload
    t1 = time.monotonic()
    requests.post(proxy.url + "/v1/completions", json={"model": "small", "prompt": "p", "max_tokens": 50})
    assert [r.cost for r in emu.records.route if r.time >= t1] == [1.0]


def test_a_cold_endpoint_falls_back_then_requests_return_once_it_is_warm(proxy: Proxy, emu: Emulator) -> None:
    cold_s = 5.0
    body = {"model": "big", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    emu.set_cold("big", cold_s)
    t0 = time.monotonic()
    first = requests.post(proxy.url + "/v1/chat/completions", json=body, timeout=30)
    first_s = time.monotonic() - t0
    assert first.status_code == 200
    assert first_s < FALLBACK_AFTER_S + 1  # waited for 'big' only fallback_after_s, then 'small' answered
    # The next ones go to the fallback at once: they are not made to wait for 'big' again.
    later = [requests.post(proxy.url + "/v1/chat/completions", json=body, timeout=30) for _ in range(3)]
    assert [r.status_code for r in later] == [200] * 3
    served = [r for r in emu.records.route if r.time >= t0 and r.ready]
    assert [r.endpoint for r in served if r.endpoint == "small"] == ["small"] * 4
    # While it is cold, exactly one route call keeps polling 'big' (one request_idx): the demand
    # the autoscaler sees to warm it up.
    polls = [r for r in emu.records.route if r.time >= t0 and r.endpoint == "big"]
    assert len({r.request_idx_out for r in polls}) == 1 and len(polls) >= 2
    health = requests.get(proxy.url + "/_vespa/health").json()
    assert health["endpoints"]["big"]["state"] == "cold"
    # Once 'big' is warm, requests return to it.
    deadline = time.monotonic() + cold_s + 10
    while time.monotonic() < deadline:
        t1 = time.monotonic()
        assert requests.post(proxy.url + "/v1/chat/completions", json=body, timeout=30).status_code == 200
        if served_by(emu, t1)[-1:] == ["big"]:
            break
        time.sleep(0.3)
    else:
        pytest.fail("requests never went back to 'big' after it warmed up")
    assert requests.get(proxy.url + "/_vespa/health").json()["endpoints"]["big"]["state"] == "ready"
    log = proxy.log()
    assert "fallback_from=big" in log and "warms up" in log


def test_bad_config_files_are_refused_at_start(emu: Emulator, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[endpoint]]\nname = "big"\nfallback = ["nope"]\n')
    with run_proxy(emu.autoscaler_url, "", "", f"vespa_config={bad}", wait=False) as p:
        p.proc.wait(30)
        assert p.proc.returncode != 0
        log = p.log()
    assert "bad.toml" in log and "nope" in log and "fallback" in log
