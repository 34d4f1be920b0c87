"""Vespa as a Python module: start the proxy from code, use `client.url`, stop it.

    async with VastClient("my-endpoint", endpoint_key, port=0) as client:
        OpenAI(base_url=client.url + "/v1", api_key="not-used")...

It takes what the launcher takes, resolved the same way: `instance` (prod, alpha, candidate) sets
the autoscaler and console URLs, `autoscaler_url` / `console_url` (or env VAST_URL) override them,
and `worker_ca` is a file with Vast's worker root CA instead of downloading it from the console.

`VastClient` runs mitmproxy's DumpMaster in a thread of its own (with its own event loop, so
blocking clients called from the caller's loop cannot stall the proxy), with the same Vespa
addon and the same options as `scripts/run.sh`, so there is one implementation. The key is
handed to the addon object and the URLs and CA file to mitmproxy's options in this process:
none of them is put in os.environ (which child processes would inherit) or in process arguments.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Mapping, Sequence

from mitmproxy import exceptions, hooks, options
from mitmproxy.tools.dump import DumpMaster

from vespa.cli import console
from vespa.proxy.addon import Vespa
from vespa.cli.console import Endpoint
from vespa.errors import VespaError
from vespa.cli.instances import INSTANCES, Instance

__all__ = ["Endpoint", "ProxyStartError", "VastClient", "fetch_endpoint_key", "list_endpoints"]

DEFAULT_PORT = 8010
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0
# mitmproxy keeps one master per process (mitmproxy.ctx.master): each new connection is handed
# to ctx.master (proxy/mode_servers.py, 11.0.2 and 12.3.1), so a second proxy in the same process
# would route the first one's clients through its own addon. One running VastClient per process.
_running: VastClient | None = None
_running_lock = threading.Lock()


class ProxyStartError(VespaError):
    status, type = 500, "start_failed"


def _instance(instance: str) -> Instance:
    try:
        return INSTANCES[instance]
    except KeyError:
        raise ValueError(f"unknown Vast instance {instance!r}; use one of {', '.join(INSTANCES)}") from None


def _console_url(instance: str, console_url: str | None) -> str:
    # The same order as the launcher: explicit, then env VAST_URL (as the vastai CLI), then the instance.
    return (console_url or os.environ.get("VAST_URL") or _instance(instance).console_url).rstrip("/")


def _autoscaler_url(instance: str, autoscaler_url: str | None) -> str:
    # As the launcher's --autoscaler-url: no environment variable, the instance's by default.
    return (autoscaler_url or _instance(instance).autoscaler_url).rstrip("/")


def list_endpoints(account_key: str, instance: str = "prod", *, console_url: str | None = None) -> list[Endpoint]:
    """The account's endpoints (name, state, max_workers, api_key); [] when it has none.

    Blocking (a plain HTTP call). Raises vespa.errors.KeyRejected / ConsoleError, each with `.hint`.
    """
    return console.list_endpoints(account_key, _console_url(instance, console_url))


def fetch_endpoint_key(
    account_key: str, endpoint_name: str, instance: str = "prod", *, console_url: str | None = None
) -> str:
    """The endpoint's own key, fetched with the account key.

    Blocking. Raises vespa.errors.EndpointNotFound (with the names the account has),
    KeyRejected or ConsoleError, each with `.message` and `.hint`.
    """
    return console.fetch_endpoint_key(account_key, endpoint_name, _console_url(instance, console_url))


class VastClient:
    """A Vespa proxy for one endpoint, running in a thread and event loop of its own.

    `port=0` picks a free port; `url` is the real address once started. `instance`,
    `autoscaler_url`, `console_url` (else env VAST_URL) and `worker_ca` are the launcher's
    --instance, --autoscaler-url, --console-url and `--set vespa_worker_ca=FILE`. Errors at start
    (bad options, unreadable worker_ca, port taken) raise ProxyStartError, an unknown instance
    ValueError; errors per request are answered to the client as JSON, as with `scripts/run.sh`.
    """

    def __init__(
        self,
        endpoint_name: str | Sequence[str] | None,
        api_key: str | Mapping[str, str],
        port: int = DEFAULT_PORT,
        host: str = "127.0.0.1",
        *,
        instance: str = "prod",
        autoscaler_url: str | None = None,
        console_url: str | None = None,
        worker_ca: str | os.PathLike[str] | None = None,
        default_cost: float | str | None = None,
        route_deadline_s: int | None = None,
        config: str | os.PathLike[str] | None = None,
    ) -> None:
        # Several endpoints: a list of names (or `config`, a TOML file of them) and a mapping of
        # name to endpoint key; requests choose by model or X-Vast-Endpoint, as with run.sh.
        names = [endpoint_name] if isinstance(endpoint_name, str) else list(endpoint_name or [])
        if not (names or config) or not api_key:
            raise ValueError("VastClient needs the endpoint name and its endpoint key (see fetch_endpoint_key)")
        if isinstance(api_key, Mapping) != (len(names) != 1):
            raise ValueError("give one endpoint name and its key, or several names (or config=) and a dict of their keys")
        self.endpoint_name = ",".join(names)
        self._api_key = api_key if isinstance(api_key, str) else None
        self._endpoint_keys = dict(api_key) if isinstance(api_key, Mapping) else {}
        self.host = host
        self.port = port
        self.autoscaler_url = _autoscaler_url(instance, autoscaler_url)
        # Where the worker leg downloads Vast's worker root CA (the workers are HTTPS) unless
        # worker_ca names a file with it: the launcher passes the same vespa_console_url.
        self.console_url = _console_url(instance, console_url)
        self._options: dict[str, object] = {"vespa_console_url": self.console_url}
        if worker_ca is not None and os.fspath(worker_ca):  # "" is no file, as the option's default
            # Checked (exists, is a certificate) by the addon at start, as for the launcher.
            self._options["vespa_worker_ca"] = str(Path(worker_ca).expanduser())
        if default_cost is not None:
            self._options["vespa_default_cost"] = str(default_cost)
        if route_deadline_s is not None:
            self._options["vespa_route_deadline_s"] = route_deadline_s
        if config is not None:
            self._options["vespa_config"] = str(Path(config).expanduser())
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_requested: asyncio.Event | None = None
        self._finished: concurrent.futures.Future[None] | None = None

    def __repr__(self) -> str:  # no key in reprs, tracebacks or logs
        return f"VastClient(endpoint_name={self.endpoint_name!r}, url={self.url!r})"

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # --- the caller's side ------------------------------------------------------------------
    async def start(self) -> None:
        """Listen; returns once the port accepts connections.

        mitmproxy runs in its own thread and event loop, so the caller may use blocking
        clients (requests, the sync OpenAI SDK) from its own loop without stalling the proxy.
        """
        global _running
        if self._thread is not None:
            raise RuntimeError("this VastClient is already started")
        with _running_lock:
            if _running is not None:
                raise ProxyStartError(
                    f"another VastClient ({_running.endpoint_name!r} at {_running.url}) runs in this process",
                    hint="mitmproxy allows one proxy per process: stop it first, or serve each endpoint from its "
                    "own process (scripts/run.sh --endpoint NAME --port N, or a VastClient per process).",
                )
            _running = self
        ready: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._finished = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._thread_main, args=(ready,), name=f"vespa-proxy-{self.endpoint_name}", daemon=True
        )
        self._thread.start()
        try:
            self.port = await asyncio.wrap_future(ready)
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Stop listening, close open connections and the addon's sessions; the thread ends."""
        global _running
        thread, loop, stop_requested, finished = self._thread, self._loop, self._stop_requested, self._finished
        if thread is None or finished is None:
            return
        if loop is not None and stop_requested is not None:
            with contextlib.suppress(RuntimeError):  # the loop already closed
                loop.call_soon_threadsafe(stop_requested.set)
        try:
            await asyncio.shield(asyncio.wrap_future(finished))
        finally:
            await asyncio.to_thread(thread.join)
            self._thread = self._loop = self._stop_requested = self._finished = None
            with _running_lock:
                if _running is self:
                    _running = None

    async def run_forever(self) -> None:
        """Start (if needed) and serve until cancelled (e.g. Ctrl-C under asyncio.run), then stop."""
        if self._thread is None:
            await self.start()
        assert self._finished is not None
        try:
            await asyncio.shield(asyncio.wrap_future(self._finished))
        finally:
            await self.stop()

    # --- the proxy's thread -----------------------------------------------------------------
    def _thread_main(self, ready: concurrent.futures.Future[int]) -> None:
        assert self._finished is not None
        try:
            asyncio.run(self._serve(ready))
        except BaseException as e:
            if not ready.done():
                ready.set_exception(e)
            self._finished.set_exception(e)
        else:
            if not ready.done():
                ready.set_exception(ProxyStartError("the proxy stopped while starting"))
            self._finished.set_result(None)

    async def _serve(self, ready: concurrent.futures.Future[int]) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_requested = asyncio.Event()
        master, addon = self._make_master()  # inside the running loop: Master.__init__ takes it
        task = asyncio.create_task(master.run(), name=f"vespa proxy {self.endpoint_name}")
        try:
            ready.set_result(await self._listening_port(master, task))
            await asyncio.wait([task, asyncio.ensure_future(self._stop_requested.wait())],
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            await self._close(master, addon, task)

    def _make_master(self) -> tuple[DumpMaster, Vespa]:
        opts = options.Options(
            listen_host=self.host,
            listen_port=self.port,
            mode=[f"reverse:{self.autoscaler_url}"],
        )
        # Applied as the addon registers its options, as `--set` is for `mitmdump -s`.
        # flow_detail belongs to the dumper, which is off here; kept so the options read as run.sh's.
        opts.update_defer(
            vespa_endpoint=self.endpoint_name,
            vespa_autoscaler_url=self.autoscaler_url,
            connection_strategy="lazy",
            flow_detail=0,
            **self._options,
        )
        master = DumpMaster(opts, with_termlog=False, with_dumper=False)
        # ErrorCheck calls sys.exit(1) on any error logged during start-up; in-process that
        # would end the caller's program. Start-up failures are raised from start() instead.
        errorcheck = master.addons.get("errorcheck")
        master.addons.remove(errorcheck)
        errorcheck.finish()  # its log handler sits on the root logger until then
        addon = Vespa(api_key=self._api_key, key_source="VastClient(api_key=...)", endpoint_keys=self._endpoint_keys)
        try:
            master.addons.add(addon)
            # As mitmproxy's script loader does: add() alone configures only the addons already
            # in the chain, so the new one is configured with every option here.
            master.addons.invoke_addon_sync(addon, hooks.ConfigureHook(set(master.options.keys())))
        except exceptions.OptionsError as e:
            raise ProxyStartError(str(e)) from None
        return master, addon

    async def _listening_port(self, master: DumpMaster, task: asyncio.Task[None]) -> int:
        proxyserver = master.addons.get("proxyserver")
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if task.done():
                task.result()  # raises what ended it
                raise ProxyStartError("the proxy stopped while starting")
            for server in proxyserver.servers:
                if server.last_exception is not None:
                    raise ProxyStartError(
                        f"cannot listen on {self.host}:{self.port}: {server.last_exception}",
                        hint="Pick another port (port=0 picks a free one), or stop what listens there.",
                    )
                if server.is_running and server.listen_addrs:
                    return server.listen_addrs[0][1]
            await asyncio.sleep(0.01)
        raise ProxyStartError(f"the proxy did not start listening within {START_TIMEOUT_S:.0f} s")

    @staticmethod
    async def _close(master: DumpMaster, addon: Vespa, task: asyncio.Task[None]) -> None:
        """Stop listening and end open client connections (mitmdump leaves both to process exit:
        proxyserver has no done hook), then let mitmproxy run its done hooks."""
        proxyserver = master.addons.get("proxyserver")
        try:
            await proxyserver.servers.update([])
            for handler in list(proxyserver.connections.values()):
                if handler.client in handler.transports:  # else it is closing already
                    handler.close_connection(handler.client)
            deadline = time.monotonic() + STOP_TIMEOUT_S
            while proxyserver.connections and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        finally:
            master.shutdown()
            await task  # the addon's done() stops its worker leg

    async def __aenter__(self) -> VastClient:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
