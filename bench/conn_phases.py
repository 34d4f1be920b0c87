"""Phases about what connections cost (issue 12): a far-away Vast, and HTTPS workers on loopback.

Each phase starts its own emulator process(es) and Vespa proxy (the launcher's command, whatever
bench/proxies.py starts), so it needs nothing from the other phases and can run alone
(`python -m bench --phases wan,https`).

wan    The emulator's WAN knob puts the autoscaler and 4 HTTPS workers 25 ms away each way
       (RTT 50 ms; a new TCP connection costs one more RTT). Sequential small POSTs, reported in
       round trips (ms / RTT), p50 and p99:
         vespa-fresh  a new client connection to Vespa per request (curl, `requests.post`)
         vespa-kept   one kept-alive client connection (`requests.Session`, the OpenAI SDK)
         two-step     by hand: /route/ then the worker, one pooled aiohttp session (the limit, ~2 RTT)
       The client-to-Vespa leg is loopback, as it is for users.
legs   Where the worker leg runs (issue 12: measure the options): one emulator with HTTPS workers,
       Vespa with its leg in a process of its own (the default) and Vespa with it in a thread of
       the proxy's process, side by side, fresh and kept-alive clients at c=1, 16 and 32, with
       bare mitmproxy to the backend as the reference of the stretch target at c=32.
https  On loopback, two emulators alike but for their workers' scheme, each with its own Vespa:
       HTTPS against plain-HTTP workers, with a new client connection per request and with
       kept-alive clients, each at c=1 (latency) and c=16 (throughput); the headline figures are
       ratios (and p50 differences) within the same run.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import tempfile
from typing import Any, Iterator

import aiohttp

from bench import load, proxies
from bench.emu_proc import EmulatorProcess, EmuOptions
from bench.load import Targets
from bench.phases import Plan
from bench.stats import summary

WAN_DELAY_MS = 25.0
WAN_WORKERS = 4
WAN_PATHS = ("vespa-fresh", "vespa-kept", "two-step")
HTTPS_PATHS = ("vespa-http", "vespa-https")
HTTPS_CONCURRENCY = (1, 16)
LEG_PATHS = ("vespa-process", "vespa-thread", "bare-mitm")
LEG_CONCURRENCY = (1, 16, 32)


@contextlib.contextmanager
def emulators_and_vespas(*options: EmuOptions) -> Iterator[list[tuple[EmulatorProcess, Targets]]]:
    """One emulator process and one Vespa in front of it per `options`, started side by side
    (each takes seconds to start). Vespa's worker-CA cache is a folder thrown away after."""
    with contextlib.ExitStack() as stack:
        cache = stack.enter_context(tempfile.TemporaryDirectory(prefix="vespa-bench-cache-"))
        emus = _enter_together(stack, [EmulatorProcess(o) for o in options])
        infos = [emu.info for emu in emus]
        assert all(infos)
        vespas = _enter_together(stack, [
            proxies.vespa_proxy(i.autoscaler_url, i.console_url, i.endpoint, i.api_key, env={"XDG_CACHE_HOME": cache})
            for i in infos if i is not None
        ])
        out = []
        for emu, info, vespa in zip(emus, infos, vespas):
            assert info is not None
            emu.configure(ttft_ms=0, tokens_per_s=1e6)
            out.append((emu, Targets(backend=info.backend_url, worker=info.worker_urls[0],
                                     autoscaler=info.autoscaler_url, endpoint=info.endpoint, api_key=info.api_key,
                                     vespa=vespa.url)))
        yield out


def _enter_together(stack: contextlib.ExitStack, cms: list[Any]) -> list[Any]:
    """Enter context managers in threads at once; each one entered is exited by `stack`."""
    with concurrent.futures.ThreadPoolExecutor(len(cms)) as pool:
        futures = [pool.submit(cm.__enter__) for cm in cms]
        concurrent.futures.wait(futures)
    for cm, f in zip(cms, futures):
        if f.exception() is None:
            stack.push(cm)
    for f in futures:
        if f.exception() is not None:
            raise f.exception()  # type: ignore[misc]
    return [f.result() for f in futures]


def _rotated(paths: tuple[str, ...], r: int) -> tuple[str, ...]:
    k = r % len(paths)
    return paths[k:] + paths[:k]


async def wan(plan: Plan) -> dict[str, Any]:
    """Sequential requests across a 25 ms WAN, per path, in round trips."""
    rtt_ms = 2 * WAN_DELAY_MS
    options = EmuOptions(workers=WAN_WORKERS, https=True, wan_delay_ms=WAN_DELAY_MS)
    with emulators_and_vespas(options) as [(emu, t)]:
        assert emu.info is not None
        sessions = {
            "vespa-fresh": load.session(1, force_close=True),
            "vespa-kept": load.session(1),
            "two-step": load.session(0, ssl_context=load.worker_ssl_context(emu.info.ca_pem)),
        }
        senders = {"vespa-fresh": t.sender("vespa"), "vespa-kept": t.sender("vespa"), "two-step": t.sender("two-step")}
        ms: dict[str, list[float]] = {p: [] for p in WAN_PATHS}
        try:
            # Warm-up: Vespa fetches the worker CA and opens its route connection; the pooled
            # clients meet every worker once (the autoscaler hands them out in turn).
            for p in WAN_PATHS:
                for _ in range(1 if p == "vespa-fresh" else WAN_WORKERS):
                    await load.echo_once(senders[p], sessions[p])
            # Request by request in turn, not in rounds: a kept-alive connection idle while the
            # other paths run a round would outlive aiohttp's 15 s keep-alive and be reopened,
            # which no sequential client sees.
            for i in range(plan.wan_requests):
                for p in _rotated(WAN_PATHS, i):
                    ms[p].append(await load.echo_once(senders[p], sessions[p]))
        finally:
            for s in sessions.values():
                await s.close()
    paths = {}
    for p, values in ms.items():
        stats = summary(values)
        paths[p] = stats | {"p50_rtt": stats["p50"] / rtt_ms, "p99_rtt": stats["p99"] / rtt_ms}
    return {"delay_ms": WAN_DELAY_MS, "rtt_ms": rtt_ms, "workers": WAN_WORKERS, "paths": paths}


async def https_loopback(plan: Plan) -> dict[str, Any]:
    """Vespa with HTTPS workers against Vespa with plain-HTTP workers, same run, per client kind."""
    out: dict[str, Any] = {}
    with emulators_and_vespas(EmuOptions(https=False), EmuOptions(https=True)) as [(_, plain), (_, tls)]:
        senders = {"vespa-http": plain.sender("vespa"), "vespa-https": tls.sender("vespa")}
        for client, force_close in (("fresh", True), ("kept", False)):
            out[client] = {}
            for c in HTTPS_CONCURRENCY:
                out[client][str(c)] = await _closed_loops(senders, plan.latency_n[c], c, plan.rounds, force_close)
    return out


async def _closed_loops(senders: dict[str, load.Send], n: int, c: int, rounds: int, force_close: bool) -> dict[str, Any]:
    """`n` requests per path by `c` clients, in rounds that alternate the paths."""
    paths = tuple(senders)
    sessions: dict[str, aiohttp.ClientSession] = {p: load.session(c, force_close=force_close) for p in paths}
    lat: dict[str, list[float]] = {p: [] for p in paths}
    walls: dict[str, list[tuple[int, float]]] = {p: [] for p in paths}
    try:
        for p in paths:  # warm-up: Vespa's CA download and route connection, the client pools
            await load.closed_loop(senders[p], sessions[p], 2 * c, c)
        per_round = max(c, n // rounds)
        for r in range(rounds):
            for p in _rotated(paths, r):
                ms, wall = await load.closed_loop(senders[p], sessions[p], per_round, c)
                lat[p] += ms
                walls[p].append((len(ms), wall))
    finally:
        for s in sessions.values():
            await s.close()
    return {
        p: summary(lat[p]) | {"rps": len(lat[p]) / sum(w for _, w in walls[p]),
                              "rps_rounds": [k / w for k, w in walls[p]]}
        for p in paths
    }


async def legs(plan: Plan) -> dict[str, Any]:
    """The worker leg in its own process against the same leg in a thread, same run."""
    out: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        cache = stack.enter_context(tempfile.TemporaryDirectory(prefix="vespa-bench-cache-"))
        emu = stack.enter_context(EmulatorProcess(EmuOptions(https=True)))
        info = emu.info
        assert info is not None
        emu.configure(ttft_ms=0, tokens_per_s=1e6)
        proxies_ = _enter_together(stack, [
            proxies.vespa_proxy(info.autoscaler_url, info.console_url, info.endpoint, info.api_key,
                                env={"XDG_CACHE_HOME": cache}, leg=mode)
            for mode in ("process", "thread")
        ] + [proxies.bare_proxy(info.backend_url)])
        targets = [
            Targets(backend=info.backend_url, worker=info.worker_urls[0], autoscaler=info.autoscaler_url,
                    endpoint=info.endpoint, api_key=info.api_key, vespa=p.url, bare=p.url)
            for p in proxies_
        ]
        senders = {"vespa-process": targets[0].sender("vespa"), "vespa-thread": targets[1].sender("vespa"),
                   "bare-mitm": targets[2].sender("bare-mitm")}
        for client, force_close in (("fresh", True), ("kept", False)):
            out[client] = {}
            for c in LEG_CONCURRENCY:
                out[client][str(c)] = await _closed_loops(senders, plan.latency_n[min(c, 16)], c, plan.rounds, force_close)
    return out
