"""Trusting Vast's HTTPS workers: their root CA, downloaded once and cached, bundled with certifi.

Vast workers present certificates from Vast's own root CA, published at
`{console}/static/jvastai_root.cer`. mitmproxy verifies upstream TLS itself, against the single
file in its option `ssl_verify_upstream_trusted_ca`; so Vespa writes certifi's bundle plus that
CA into one file and points the option at it. The file name carries a hash of its content,
because mitmproxy caches its TLS contexts by that path (`net/tls.py: create_proxy_server_context`
is an lru_cache): a refreshed CA under the same name would never be loaded.

No strict-mode relaxation is needed: mitmproxy builds its upstream context with pyOpenSSL, which
does not set X509_V_FLAG_X509_STRICT (only Python's own `ssl.create_default_context` does, from
3.13), and OpenSSL's default checks accept Vast's CA (it has no keyUsage extension at all).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import certifi
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from mitmproxy import ctx, exceptions

from vespa import wire
from vespa.errors import WorkerCaUnavailable, WorkerTlsFailed

log = logging.getLogger("vespa")

CA_PATH = "/static/jvastai_root.cer"
FETCH_TIMEOUT_S = 15
MAX_CA_BYTES = 1024 * 1024
# A worker with a foreign certificate fails every time: refetching the CA each time would hammer
# the console for nothing, while a rotated CA is caught within this many seconds.
REFRESH_INTERVAL_S = 60.0
# Each emulator run (--demo) has its own CA, hence its own 230 KB bundle: old ones are removed.
# A day is far longer than any proxy needs to open its file (mitmproxy keeps the loaded context).
STALE_BUNDLE_S = 24 * 3600


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vespa" / "worker-ca"


def ca_url(console_url: str) -> str:
    return console_url.rstrip("/") + CA_PATH


def cached_ca_path(console_url: str) -> Path:
    """One file per console (scheme, host, port): alpha, candidate and emulators have their own CAs."""
    parts = urlsplit(console_url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return cache_dir() / f"{parts.hostname}_{port}.pem"


def to_pem(data: bytes) -> bytes:
    """The certificate(s) in `data` as PEM; Vast serves PEM, but a DER .cer is read too."""
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        try:
            certs = [x509.load_der_x509_certificate(data)]
        except ValueError:
            raise ValueError("not a PEM or DER certificate") from None
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def write_bundle(ca_pem: bytes) -> Path:
    """certifi's bundle plus `ca_pem`, under a name that changes with the content."""
    body = Path(certifi.where()).read_bytes().rstrip(b"\n") + b"\n\n# Vast worker root CA\n" + ca_pem
    path = cache_dir() / f"bundle-{hashlib.sha256(body).hexdigest()[:16]}.pem"
    if not path.exists():
        _write_atomic(path, body)
        _remove_stale_bundles(keep=path)
    return path


def _remove_stale_bundles(keep: Path) -> None:
    cutoff = time.time() - STALE_BUNDLE_S
    for old in keep.parent.glob("bundle-*.pem"):
        try:
            if old != keep and old.stat().st_mtime < cutoff:
                old.unlink()
        except OSError:
            pass  # another proxy removed it first


def _write_atomic(path: Path, data: bytes) -> None:
    """Two proxies may share the cache: a reader sees the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


async def download(console_url: str) -> bytes:
    url = ca_url(console_url)
    hint = (
        f"Check the network and the console URL (vespa_console_url), or download {url} yourself "
        "and pass it with --set vespa_worker_ca=PATH."
    )
    try:
        timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as resp:
            data = await resp.content.read(MAX_CA_BYTES + 1)
            status = resp.status
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        raise WorkerCaUnavailable(f"cannot download Vast's worker CA from {url}: {type(e).__name__} {e}", hint) from None
    if status != 200:
        raise WorkerCaUnavailable(f"cannot download Vast's worker CA from {url}: HTTP {status}", hint)
    try:
        return to_pem(data[:MAX_CA_BYTES])
    except ValueError as e:
        raise WorkerCaUnavailable(f"{url} did not hold a certificate ({e})", hint) from None


@dataclass
class WorkerTrust:
    """Where the CA comes from, and the bundle file mitmproxy should verify workers against."""

    console_url: str
    override: Path | None = None  # vespa_worker_ca: a CA file the user chose; never downloaded
    bundle: Path | None = None
    _ca_pem: bytes | None = field(default=None, repr=False)
    _loading: asyncio.Task[Path] | None = field(default=None, repr=False)
    _refreshed_at: float = float("-inf")

    async def ensure(self) -> Path:
        """The bundle path; the first call loads the CA (cache or download), concurrent calls share it."""
        if self.bundle is not None:
            return self.bundle
        if self._loading is None or self._loading.done():
            # Done without a bundle means it failed: the next request tries again.
            self._loading = asyncio.ensure_future(self._load())
        return await asyncio.shield(self._loading)

    async def _load(self) -> Path:
        if self.override is not None:
            pem = to_pem(await asyncio.to_thread(self.override.read_bytes))
        else:
            cached = cached_ca_path(self.console_url)
            pem = await asyncio.to_thread(_read_valid, cached)
            if pem is None:
                pem = await download(self.console_url)
                await asyncio.to_thread(_write_atomic, cached, pem)
                log.info("vespa: downloaded the worker CA from %s to %s", ca_url(self.console_url), cached)
        return await self._use(pem)

    async def _use(self, pem: bytes) -> Path:
        self.bundle = await asyncio.to_thread(write_bundle, pem)
        self._ca_pem = pem
        return self.bundle

    def refresh_soon(self) -> asyncio.Task[bool] | None:
        """After a failed verification: download the CA again (at most once a minute).

        Returns the task, which yields True when the CA changed (the caller then points mitmproxy
        at the new bundle), or None when no refresh is due.
        """
        if self.override is not None or time.monotonic() - self._refreshed_at < REFRESH_INTERVAL_S:
            return None
        self._refreshed_at = time.monotonic()
        return asyncio.ensure_future(self._refresh())

    async def _refresh(self) -> bool:
        try:
            pem = await download(self.console_url)
        except WorkerCaUnavailable as e:
            log.warning("vespa: %s", e.message)
            return False
        if pem == self._ca_pem:
            return False
        await asyncio.to_thread(_write_atomic, cached_ca_path(self.console_url), pem)
        await self._use(pem)
        log.warning("vespa: Vast's worker CA changed at %s; using the new one", ca_url(self.console_url))
        return True


def _read_valid(path: Path) -> bytes | None:
    """The cached CA, or None when it is missing or damaged (then it is downloaded again)."""
    try:
        return to_pem(path.read_bytes())
    except (OSError, ValueError):
        return None


class WorkerTls:
    """The addon's side: options, the bundle in mitmproxy's `ssl_verify_upstream_trusted_ca`,
    and a CA refresh when a worker fails verification. Hooks call `configure`, `prepare`, `failed`."""

    def __init__(self) -> None:
        self.trust: WorkerTrust | None = None
        self.user_bundle = False  # the user set ssl_verify_upstream_trusted_ca: theirs wins

    @staticmethod
    def add_options(loader) -> None:
        loader.add_option(
            "vespa_console_url", str, "https://console.vast.ai",
            f"Vast console the worker root CA is downloaded from ({CA_PATH}), once, then cached "
            "under $XDG_CACHE_HOME/vespa (default ~/.cache/vespa).",
        )  # fmt: skip
        loader.add_option(
            "vespa_worker_ca", str, "",
            "A file with Vast's worker root CA (PEM or DER) to use instead of downloading it.",
        )

    def configure(self, updated: set[str]) -> None:
        opts = ctx.options
        if "ssl_insecure" in updated and opts.ssl_insecure:
            log.warning(
                "vespa: ssl_insecure is set: worker certificates are NOT verified, so anyone on the path "
                "to a worker can read and answer your requests (prompts, keys in payloads). Use it only to debug."
            )
        if "ssl_verify_upstream_trusted_ca" in updated:
            ours = self.trust is not None and str(self.trust.bundle) == opts.ssl_verify_upstream_trusted_ca
            self.user_bundle = bool(opts.ssl_verify_upstream_trusted_ca) and not ours
            if self.user_bundle:
                log.info("vespa: workers are verified against your ssl_verify_upstream_trusted_ca only; "
                         "it must hold Vast's root CA")  # fmt: skip
        if self.trust is not None and not updated & {"vespa_console_url", "vespa_worker_ca"}:
            return
        if not wire.is_http_url(opts.vespa_console_url):
            raise exceptions.OptionsError(
                f"vespa: vespa_console_url must be an http(s) URL, got {opts.vespa_console_url!r}."
            )
        override = None
        if opts.vespa_worker_ca:
            override = Path(opts.vespa_worker_ca).expanduser()
            try:
                to_pem(override.read_bytes())
            except (OSError, ValueError) as e:
                raise exceptions.OptionsError(f"vespa: vespa_worker_ca={opts.vespa_worker_ca!r}: {e}") from None
        self.trust = WorkerTrust(opts.vespa_console_url, override)

    async def prepare(self, worker_url: str) -> None:
        """Before a flow goes to `worker_url`: make sure mitmproxy verifies it against Vast's CA.
        Raises WorkerCaUnavailable (the flow must then not be sent)."""
        if not worker_url.startswith("https://") or self.trust is None:
            return
        if ctx.options.ssl_insecure or self.user_bundle:
            return
        _point_mitmproxy_at(await self.trust.ensure())

    def failed(self, message: str) -> None:
        """A flow's connection failed with `message`; if it was certificate verification, refresh the CA."""
        if self.trust is None or self.user_bundle or not is_verify_failure(message):
            return
        task = self.trust.refresh_soon()
        if task is not None:
            task.add_done_callback(self._refreshed)

    def _refreshed(self, task: asyncio.Task[bool]) -> None:
        if not task.cancelled() and task.exception() is None and task.result() and self.trust and self.trust.bundle:
            _point_mitmproxy_at(self.trust.bundle)


def is_verify_failure(message: str) -> bool:
    # mitmproxy's wording in proxy/layers/tls.py (11 and 12): "Certificate verify failed: <reason>".
    return "certificate verify failed" in message.lower()


def explain_tls(message: str, status: int) -> WorkerTlsFailed | None:
    """For vespa.errorpage: a worker whose certificate did not verify gets Vespa's JSON 502."""
    if not is_verify_failure(message):
        return None
    return WorkerTlsFailed(f"the worker's TLS certificate was refused ({message}); nothing was sent to it")


def _point_mitmproxy_at(bundle: Path) -> None:
    if ctx.options.ssl_verify_upstream_trusted_ca != str(bundle):
        ctx.options.update(ssl_verify_upstream_trusted_ca=str(bundle))
