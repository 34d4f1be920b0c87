"""HTTPS workers, verified with Vast's root CA as fetched from the console (issue 5).

The emulator's workers serve certificates from its own root CA, shaped like Vast's (no keyUsage
extension, pathlen 0), at {console}/static/jvastai_root.cer. Every proxy here runs with
certificate verification on: no test sets ssl_insecure. Each proxy gets its own cache directory
(XDG_CACHE_HOME), so nothing touches the user's ~/.cache.
"""

from __future__ import annotations

import json
import socket
import ssl
import time
from pathlib import Path
from typing import Iterator

import pytest
import requests
from cryptography import x509

from tests.conftest import free_port, run_proxy
from vespa.emulator import Emulator, EmulatorConfig, EndpointConfig
from vespa.emulator.tls import CertAuthority
from vespa.proxy.workerca import CA_PATH, cached_ca_path

CHAT = {"model": "m", "messages": [{"role": "user", "content": "Hello over TLS"}], "stream": True}


@pytest.fixture(scope="module")
def emu() -> Iterator[Emulator]:
    config = EmulatorConfig(
        https=True,
        endpoints=[
            EndpointConfig(name="secure", workers=2),
            EndpointConfig(name="impostor", workers=1, untrusted_cert=True),
        ],
        ttft_ms=5,
        tokens_per_s=500.0,
    )
    with Emulator(config) as emu:
        yield emu


def key(emu: Emulator, name: str) -> str:
    return next(ep.api_key for ep in emu.config.endpoints if ep.name == name)


def ca_fetches(emu: Emulator) -> int:
    return sum(1 for r in emu.records.console if r.path == CA_PATH)


def https_proxy(emu: Emulator, endpoint: str, cache: Path, *options: str, console_url: str | None = None):
    return run_proxy(
        emu.autoscaler_url, endpoint, key(emu, endpoint),
        f"vespa_console_url={console_url or emu.console_url}", *options,
        env={"XDG_CACHE_HOME": str(cache)},
    )  # fmt: skip


def sse_events(resp: requests.Response) -> list[str]:
    return [line[len("data: "):] for line in resp.iter_lines(decode_unicode=True) if line.startswith("data: ")]


def test_emulator_ca_has_vasts_quirk(emu: Emulator) -> None:
    """Strict X.509 (Python 3.13's default) rejects it; OpenSSL's default checks accept it."""
    ca = x509.load_pem_x509_certificate(requests.get(emu.console_url + CA_PATH, timeout=5).content)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 0
    with pytest.raises(x509.ExtensionNotFound):
        ca.extensions.get_extension_for_class(x509.KeyUsage)
    host, port = emu.workers("secure")[0].url.removeprefix("https://").split(":")

    def handshake(strict: bool) -> None:
        context = ssl.create_default_context(cadata=emu.ca.pem().decode())
        context.verify_flags = (context.verify_flags | ssl.VERIFY_X509_STRICT) if strict else (
            context.verify_flags & ~ssl.VERIFY_X509_STRICT
        )
        with socket.create_connection((host, int(port)), timeout=5) as raw:
            context.wrap_socket(raw, server_hostname=host).close()  # checks the IP SAN too

    with pytest.raises(ssl.SSLCertVerificationError, match="keyCertSign"):
        handshake(strict=True)
    handshake(strict=False)


def test_stream_over_verified_https_and_the_ca_is_fetched_once(emu: Emulator, tmp_path: Path) -> None:
    before = ca_fetches(emu)
    with https_proxy(emu, "secure", tmp_path) as proxy:
        for _ in range(3):
            with requests.post(proxy.url + "/v1/chat/completions", json=CHAT, stream=True, timeout=30) as resp:
                assert resp.status_code == 200, resp.text
                assert resp.headers["content-type"].startswith("text/event-stream")
                events = sse_events(resp)
            assert len(events) > 2 and events[-1] == "[DONE]"
            assert json.loads(events[0])["object"] == "chat.completion.chunk"
        log = proxy.log()
    assert ca_fetches(emu) - before == 1
    served = [r for r in emu.records.worker[-3:] if r.signature_ok]
    assert len(served) == 3 and all(r.auth_data["url"].startswith("https://") for r in served)
    cached = tmp_path / "vespa" / "worker-ca"
    bundles = list(cached.glob("bundle-*.pem"))
    assert len(bundles) == 1 and emu.ca.pem() in bundles[0].read_bytes()
    assert "ssl_insecure" not in log

    # A restart with the same cache: no download at all.
    with https_proxy(emu, "secure", tmp_path) as proxy:
        resp = requests.post(proxy.url + "/v1/chat/completions", json={**CHAT, "stream": False}, timeout=30)
        assert resp.status_code == 200, resp.text
        assert resp.json()["object"] == "chat.completion"
    assert ca_fetches(emu) - before == 1


def test_worker_with_a_foreign_certificate_is_refused_with_json(emu: Emulator, tmp_path: Path) -> None:
    impostor = emu.workers("impostor")[0]
    before = ca_fetches(emu)
    with https_proxy(emu, "impostor", tmp_path) as proxy:
        for _ in range(2):
            resp = requests.post(proxy.url + "/v1/chat/completions", json=CHAT, timeout=30)
            assert resp.status_code == 502
            assert resp.headers["content-type"] == "application/json"
            assert resp.headers["x-vespa-error"] == "worker_tls_failed"
            err = resp.json()["error"]
            assert err["type"] == "worker_tls_failed"
            assert "unable to get local issuer certificate" in err["message"]
            assert "ssl_insecure" in err["hint"] and "Vast's root CA" in err["hint"]
    # The handshake failed, so the impostor never saw an HTTP request (nor the signed payload).
    assert not [r for r in emu.records.worker if r.worker_id == impostor.id]
    # The first download, then one refresh after the failure (a rotated CA), not one per failure.
    assert ca_fetches(emu) - before == 2


def test_a_stale_cached_ca_is_replaced_after_a_verification_failure(
    emu: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As after Vast rotates its CA: the cached one no longer verifies the workers."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cached = cached_ca_path(emu.console_url)
    cached.parent.mkdir(parents=True)
    cached.write_bytes(CertAuthority.generate("Vast's old CA").pem())
    before = ca_fetches(emu)
    with https_proxy(emu, "secure", tmp_path) as proxy:
        first = requests.post(proxy.url + "/v1/chat/completions", json=CHAT, timeout=30)
        assert first.status_code == 502 and first.json()["error"]["type"] == "worker_tls_failed"
        deadline = time.monotonic() + 20  # the refresh runs in the background; wait for it, not time it
        while (resp := requests.post(proxy.url + "/v1/chat/completions", json=CHAT, timeout=30)).status_code != 200:
            assert time.monotonic() < deadline, resp.text
            time.sleep(0.1)
    assert ca_fetches(emu) - before == 1
    assert cached.read_bytes() == emu.ca.pem()


def test_worker_ca_file_overrides_the_download(emu: Emulator, tmp_path: Path) -> None:
    ca_file = tmp_path / "vast-root.cer"
    ca_file.write_bytes(emu.ca.pem())
    before = ca_fetches(emu)
    with https_proxy(emu, "secure", tmp_path, f"vespa_worker_ca={ca_file}") as proxy:
        resp = requests.post(proxy.url + "/v1/chat/completions", json={**CHAT, "stream": False}, timeout=30)
        assert resp.status_code == 200, resp.text
    assert ca_fetches(emu) == before


def test_no_ca_means_no_request_to_the_worker(emu: Emulator, tmp_path: Path) -> None:
    """Fail closed: without the CA nothing can be verified, so nothing is sent."""
    dead_console = f"http://127.0.0.1:{free_port()}"
    sent_before = len(emu.records.worker)
    with https_proxy(emu, "secure", tmp_path, console_url=dead_console) as proxy:
        resp = requests.post(proxy.url + "/v1/chat/completions", json=CHAT, timeout=30)
    assert resp.status_code == 502
    err = resp.json()["error"]
    assert err["type"] == "worker_ca_unavailable"
    assert dead_console + CA_PATH in err["message"] and "vespa_worker_ca" in err["hint"]
    assert len(emu.records.worker) == sent_before


def test_unreadable_worker_ca_stops_the_start(emu: Emulator, tmp_path: Path) -> None:
    bogus = tmp_path / "not-a-cert.pem"
    bogus.write_text("hello")
    with run_proxy(
        emu.autoscaler_url, "secure", key(emu, "secure"), f"vespa_worker_ca={bogus}",
        env={"XDG_CACHE_HOME": str(tmp_path)}, wait=False,
    ) as proxy:  # fmt: skip
        assert proxy.proc.wait(timeout=30) != 0
        assert "vespa_worker_ca" in proxy.log() and "not a PEM or DER certificate" in proxy.log()
