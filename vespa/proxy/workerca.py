"""Trusting Vast's HTTPS workers: their root CA, downloaded once and cached, bundled with certifi.

Vast workers present certificates from Vast's own root CA, published at
`{console}/static/jvastai_root.cer`. The worker leg (vespa/proxy/leg.py) verifies workers against one
file: certifi's bundle plus that CA. The file name carries a hash of its content, so a refreshed
CA gets a new file and a new TLS context, never a stale cached one.

Python 3.13's `ssl.create_default_context` sets X509 strict mode, which refuses Vast's CA (it has
no keyUsage extension at all); the leg clears that flag and keeps OpenSSL's default checks.
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

from vespa.errors import WorkerCaUnavailable

log = logging.getLogger("vespa")

CA_PATH = "/static/jvastai_root.cer"
FETCH_TIMEOUT_S = 15
MAX_CA_BYTES = 1024 * 1024
# A worker with a foreign certificate fails every time: refetching the CA each time would hammer
# the console for nothing, while a rotated CA is caught within this many seconds.
REFRESH_INTERVAL_S = 60.0
# Each emulator run (--demo) has its own CA, hence its own 230 KB bundle: old ones are removed.
# A day is far longer than any proxy needs to open its file (the leg keeps the loaded context).
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
    """Where the CA comes from, and the bundle file the worker leg verifies workers against."""

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


def is_verify_failure(message: str) -> bool:
    # OpenSSL's wording, as aiohttp and mitmproxy pass it on: "certificate verify failed: <reason>".
    return "certificate verify failed" in message.lower()
