"""The Python API: VastClient in-process, fetch_endpoint_key and list_endpoints, against the emulator.

The brief's examples call blocking clients (the sync OpenAI SDK, requests) from inside
`async def main()`; they are run here exactly that way. The README's example is read from
README.md at test time and run as a user's script against an emulator with HTTPS workers.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import openai
import pytest
import requests

from tests.conftest import REPO, endpoint_key, free_port
from vespa import VastClient, fetch_endpoint_key, list_endpoints
from vespa.cli import launcher
from vespa.api import ProxyStartError
from vespa.emulator import Emulator, EmulatorConfig, EndpointConfig
from vespa.emulator.backend import DEFAULT_MAX_TOKENS, completion_text
from vespa.errors import EndpointNotFound, KeyRejected

CHAT = {"model": "llama-2-7b", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 6}


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def proxy_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("vespa-proxy")]


def client_for(emulator, name: str = "demo", **kw) -> VastClient:
    return VastClient(name, endpoint_key(emulator, name), port=0, autoscaler_url=emulator.autoscaler_url, **kw)


async def test_start_on_a_free_port_stream_with_openai_then_stop_leaves_nothing(emulator) -> None:
    tasks_before = asyncio.all_tasks()
    client = client_for(emulator)
    await client.start()
    assert client.port != 0 and client.url == f"http://127.0.0.1:{client.port}"
    assert listening(client.port) and client.running
    # The key went to the addon object, not into this process's environment.
    assert os.environ.get("VAST_API_KEY") != endpoint_key(emulator, "demo")

    t0 = time.monotonic()
    oai = openai.OpenAI(base_url=f"{client.url}/v1", api_key="not-used", max_retries=0)
    arrivals, parts = [], []
    for chunk in oai.chat.completions.create(**CHAT, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic())
            parts.append(chunk.choices[0].delta.content)
    whole = oai.chat.completions.create(**CHAT).choices[0].message.content
    assert "".join(parts) == whole and len(parts) >= 6
    # Streamed as produced: the chunks came over a span, not in one burst at the end.
    assert arrivals[-1] - arrivals[0] > 0.5 * (len(parts) - 1) / emulator.config.tokens_per_s
    workers = [r for r in emulator.records.worker if r.time >= t0]
    assert len(workers) == 2 and all(r.signature_ok and r.reached_backend for r in workers)

    await client.stop()
    assert not client.running and not proxy_threads()
    assert not listening(client.port)
    assert asyncio.all_tasks() - tasks_before - {asyncio.current_task()} == set()
    await client.stop()  # a second stop is harmless


async def test_brief_example_fetch_key_then_requests_through_url(emulator) -> None:
    """The brief's 'Auto-Fetching Endpoint Key' example, with the emulator's console and autoscaler."""
    endpoint_key_ = fetch_endpoint_key(
        account_key=emulator.config.account_key, endpoint_name="demo-b", console_url=emulator.console_url
    )
    assert endpoint_key_ == endpoint_key(emulator, "demo-b")
    async with VastClient(endpoint_name="demo-b", api_key=endpoint_key_, port=0,
                          autoscaler_url=emulator.autoscaler_url) as client:
        response = requests.get(f"{client.url}/v1/models")
        assert response.status_code == 200 and response.json()["object"] == "list"
        response = requests.post(f"{client.url}/v1/chat/completions", json=CHAT)
        assert response.json()["choices"][0]["message"]["content"]
    assert not listening(client.port) and not proxy_threads()


def test_list_endpoints_and_errors_carry_hints(emulator) -> None:
    names = [ep.name for ep in list_endpoints(emulator.config.account_key, console_url=emulator.console_url)]
    assert names == ["demo", "demo-b"]
    with pytest.raises(EndpointNotFound) as err:
        fetch_endpoint_key(emulator.config.account_key, "dmeo", console_url=emulator.console_url)
    assert "demo" in err.value.message and "Did you mean 'demo'" in err.value.hint
    with pytest.raises(KeyRejected) as err:
        list_endpoints(endpoint_key(emulator, "demo"), console_url=emulator.console_url)
    assert "account key" in err.value.hint and endpoint_key(emulator, "demo") not in str(err.value) + err.value.hint
    with pytest.raises(ValueError, match="prod, alpha, candidate"):
        list_endpoints("k", instance="beta")


async def test_run_forever_serves_until_cancelled(emulator) -> None:
    client = client_for(emulator)
    task = asyncio.create_task(client.run_forever())
    while not client.running or client.port == 0:
        await asyncio.sleep(0.01)
    r = await asyncio.to_thread(requests.post, f"{client.url}/v1/completions", json={"prompt": "p", "max_tokens": 3})
    assert r.status_code == 200
    port = client.port
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not listening(port) and not proxy_threads()


async def test_one_proxy_per_process_and_start_errors_are_raised(emulator) -> None:
    async with client_for(emulator) as first:
        second = client_for(emulator, "demo-b")
        with pytest.raises(ProxyStartError) as err:
            await second.start()
        assert "one proxy per process" in err.value.hint
        assert listening(first.port)
    # The port is taken: the error says so instead of mitmproxy's sys.exit ending the program.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = VastClient("demo", endpoint_key(emulator, "demo"), port=taken.getsockname()[1],
                          autoscaler_url=emulator.autoscaler_url)
        with pytest.raises(ProxyStartError) as err:
            await busy.start()
        assert "cannot listen" in err.value.message and "port=0" in err.value.hint
    assert not proxy_threads()
    with pytest.raises(ProxyStartError, match="vespa_autoscaler_url"):
        await VastClient("demo", "k", port=free_port(), autoscaler_url="ftp://nowhere").start()
    # And after all of that a new client starts fine.
    async with client_for(emulator) as again:
        assert requests.get(f"{again.url}/v1/models").status_code == 200


# --- parity with the launcher: instance, console_url, worker_ca --------------------------------
README = REPO / "README.md"
README_ENDPOINT = "my-endpoint"  # the name the README's example uses


@pytest.fixture(scope="module")
def https_emulator() -> Iterator[Emulator]:
    """As on Vast: HTTPS workers whose root CA only the console serves, so the proxy needs the right
    console (or the CA file) to reach any worker. No internet here: prod's console is unreachable."""
    config = EmulatorConfig(endpoints=[EndpointConfig(name=README_ENDPOINT, workers=1)], https=True,
                            ttft_ms=5, tokens_per_s=500.0)
    with Emulator(config) as emu:
        yield emu


@pytest.fixture
def clean_env(monkeypatch, tmp_path) -> Path:
    """No Vast variables from the caller's shell; a worker-CA cache of this test's own."""
    for name in [n for n in os.environ if n.startswith("VAST_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path


def readme_python_example() -> str:
    """The first ```python block under README's "### From Python", as a reader copies it."""
    text = README.read_text()
    section = text.split("\n### From Python\n", 1)
    assert len(section) == 2, "README.md has no '### From Python' section"
    block = re.search(r"^```python\n(.*?)^```$", section[1], re.S | re.M)
    assert block, "no ```python block under '### From Python' in README.md"
    return block.group(1)


def leg_processes() -> list[int]:
    """This process's children running the worker leg (`python -m vespa.proxy.leg`)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue  # ended meanwhile
        if ppid == os.getpid() and b"vespa.proxy.leg" in cmdline:
            pids.append(int(stat.parent.name))
    return pids


def chat(client: VastClient) -> requests.Response:
    return requests.post(f"{client.url}/v1/chat/completions", json=CHAT, timeout=30)


def test_readme_python_example_runs_as_is_against_the_emulator(https_emulator, clean_env) -> None:
    """The README's code, unchanged, as a user's script: keys and URLs come from its environment."""
    emu = https_emulator
    code = readme_python_example()
    assert "VAST_ACCOUNT_KEY" in code  # the reader's key is not pasted into the code
    env = {k: v for k, v in os.environ.items() if not k.startswith("VAST_")}
    env |= {
        "VAST_ACCOUNT_KEY": emu.config.account_key,
        "VAST_URL": emu.console_url,  # read by fetch_endpoint_key and VastClient, as by the launcher
        "VAST_AUTOSCALER_URL": emu.autoscaler_url,
        "PYTHONPATH": str(REPO),  # what `pip install .` gives a user
    }
    t0 = time.monotonic()
    run = subprocess.run([sys.executable, "-"], input=code, capture_output=True, text=True, cwd=clean_env,
                         env=env, timeout=120)
    assert run.returncode == 0, f"the README example failed:\n{run.stderr[-3000:]}"
    url, _, streamed = run.stdout.partition("\n")
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", url)
    assert streamed == completion_text(DEFAULT_MAX_TOKENS)
    # It went the real way: the endpoint key from the console, a signed request to an HTTPS worker
    # trusted through the CA of the console VAST_URL names.
    console = [(r.path, r.status_code) for r in emu.records.console if r.time >= t0]
    assert ("/api/v0/endptjobs/", 200) in console and ("/static/jvastai_root.cer", 200) in console
    worker = [r for r in emu.records.worker if r.time >= t0]
    assert len(worker) == 1 and worker[0].signature_ok and worker[0].reached_backend
    assert emu.workers(README_ENDPOINT)[0].url.startswith("https://")


async def test_console_url_and_worker_ca_reach_https_workers_and_stay_out_of_env_and_args(
    https_emulator, clean_env
) -> None:
    emu = https_emulator
    key = endpoint_key(emu, README_ENDPOINT)
    environ_before = dict(os.environ)
    nowhere = f"http://127.0.0.1:{free_port()}"  # a console that does not answer

    # console_url: the worker CA is downloaded from that console.
    async with VastClient(README_ENDPOINT, key, port=0, autoscaler_url=emu.autoscaler_url,
                          console_url=emu.console_url) as client:
        r = await asyncio.to_thread(chat, client)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == completion_text(CHAT["max_tokens"])
        # Keys and URLs went to the addon and its leg through memory and the leg's stdin only.
        legs = leg_processes()
        assert len(legs) == 1
        seen = Path(f"/proc/{legs[0]}/cmdline").read_bytes() + Path(f"/proc/{legs[0]}/environ").read_bytes()
        private = {"endpoint key": key, "account key": emu.config.account_key,
                   "console URL": emu.console_url, "autoscaler URL": emu.autoscaler_url}
        # Names only in a failure: the leg's environment is the caller's, not for test logs.
        assert [name for name, value in private.items() if value.encode() in seen] == []
    assert dict(os.environ) == environ_before

    # worker_ca: the CA from a file; the console is never asked.
    ca_file = clean_env / "vast-root.cer"
    ca_file.write_bytes(emu.ca.pem())
    async with VastClient(README_ENDPOINT, key, port=0, autoscaler_url=emu.autoscaler_url,
                          console_url=nowhere, worker_ca=ca_file) as client:
        r = await asyncio.to_thread(chat, client)
        assert r.status_code == 200, r.text

    # Neither: the default console (prod's, or here one that does not answer) cannot give the CA.
    async with VastClient(README_ENDPOINT, key, port=0, autoscaler_url=emu.autoscaler_url,
                          console_url=nowhere) as client:
        r = await asyncio.to_thread(chat, client)
        assert r.status_code == 502 and r.json()["error"]["type"] == "worker_ca_unavailable"
        assert nowhere in r.text
    assert dict(os.environ) == environ_before


async def test_a_worker_ca_that_is_no_file_is_a_start_error(emulator, clean_env) -> None:
    missing = clean_env / "no-such-ca.pem"
    with pytest.raises(ProxyStartError, match="no such file") as err:
        await client_for(emulator, worker_ca=missing).start()
    assert str(missing) in err.value.message
    assert not proxy_threads()


@pytest.mark.parametrize("argv, kwargs", [
    ([], {}),
    (["--instance", "alpha"], {"instance": "alpha"}),
    (["--instance", "candidate", "--console-url", "http://127.0.0.1:9/"],
     {"instance": "candidate", "console_url": "http://127.0.0.1:9/"}),
    (["--autoscaler-url", "http://127.0.0.1:8/"], {"autoscaler_url": "http://127.0.0.1:8/"}),
])
@pytest.mark.parametrize("vast_url", [None, "https://console.example.test/"])
def test_urls_are_resolved_as_the_launcher_resolves_them(clean_env, monkeypatch, argv, kwargs, vast_url) -> None:
    if vast_url:
        monkeypatch.setenv("VAST_URL", vast_url)
    args, _ = launcher.parse_args(["--endpoint", "e", *argv])
    expected = launcher.service_urls(args)
    client = VastClient("e", "k", **kwargs)
    assert (client.autoscaler_url, client.console_url) == (expected.autoscaler_url, expected.console_url)


def test_list_and_fetch_take_the_console_from_vast_url_as_vastclient_does(emulator, clean_env, monkeypatch) -> None:
    monkeypatch.setenv("VAST_URL", emulator.console_url)
    assert [ep.name for ep in list_endpoints(emulator.config.account_key)] == ["demo", "demo-b"]
    assert fetch_endpoint_key(emulator.config.account_key, "demo") == endpoint_key(emulator, "demo")
    assert VastClient("demo", "k").console_url == emulator.console_url
    with pytest.raises(ValueError, match="prod, alpha, candidate"):
        VastClient("demo", "k", instance="beta")


async def test_one_client_for_several_endpoints_chooses_by_model(tmp_path) -> None:
    """VastClient takes several names and a dict of their keys (or config=): the same catalog,
    choice and /v1/models as the launcher's; the keys stay in the object."""
    import openai

    from vespa.emulator import Emulator, EmulatorConfig, EndpointConfig

    config = EmulatorConfig(endpoints=[EndpointConfig(name="big", workers=1), EndpointConfig(name="small", workers=1)],
                            ttft_ms=1, tokens_per_s=1000.0)
    async with Emulator(config) as emu:
        keys = {ep.name: ep.api_key for ep in emu.config.endpoints}
        cfg = tmp_path / "eps.toml"
        cfg.write_text('[[endpoint]]\nname = "big"\naliases = ["large"]\n[[endpoint]]\nname = "small"\n')
        for kwargs in ({"endpoint_name": ["big", "small"]}, {"endpoint_name": None, "config": cfg}):
            async with VastClient(api_key=keys, port=0, autoscaler_url=emu.autoscaler_url,
                                  console_url=emu.console_url, **kwargs) as client:
                assert all(k not in os.environ.values() for k in keys.values())
                oai = openai.AsyncOpenAI(base_url=client.url + "/v1", api_key="x", max_retries=0)
                models = {m.id async for m in oai.models.list()}
                assert {"big", "small"} <= models
                for model, endpoint in (("big", "big"), ("small", "small")):
                    before = len(emu.records.route)
                    r = await oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], max_tokens=2)
                    assert r.choices[0].message.content
                    assert [rec.endpoint for rec in emu.records.route[before:] if rec.ready] == [endpoint]
    with pytest.raises(ValueError):
        VastClient(["big", "small"], "one-key-for-two")
