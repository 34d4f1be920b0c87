"""The measurements, one coroutine per figure of issue 8. Each returns plain JSON-able data.

Paths are interleaved in rounds (and their order rotated), so a burst of load from someone
else on the shared machine falls on every path alike rather than on one.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from bench import load
from bench.emu_proc import EmulatorProcess
from bench.load import Targets
from bench.proxies import PeakRss, Proc, cpu_s
from bench.stats import summary
from vespa import wire

LATENCY_PATHS = ("direct-backend", "bare-mitm", "direct-worker", "two-step", "vespa")
SSE_PATHS = ("direct-backend", "bare-mitm-stream", "direct-worker", "two-step", "vespa", "bare-mitm")


@dataclass(frozen=True)
class Plan:
    name: str
    latency_n: dict[int, int]  # concurrency -> requests per path
    rounds: int
    sse_streams: int  # per path
    sse_concurrency: int
    sse_tokens: int
    sse_ttft_ms: float
    sse_tokens_per_s: float
    rss_streams: int
    rss_tokens: int
    rss_tokens_per_s: float
    large_bytes: int
    cold_windows: int
    cold_clients: int
    cold_s: float
    sequential: int
    wan_requests: int  # per path, sequential, across the WAN (bench/conn_phases.py)


PLANS = {
    "full": Plan("full", {1: 300, 16: 960, 64: 1280}, rounds=4, sse_streams=32, sse_concurrency=4, sse_tokens=16,
                 sse_ttft_ms=100, sse_tokens_per_s=50, rss_streams=200, rss_tokens=12, rss_tokens_per_s=4,
                 large_bytes=1 << 30, cold_windows=3, cold_clients=4, cold_s=5, sequential=1000,
                 wan_requests=100),
    "quick": Plan("quick", {1: 60, 16: 160, 64: 256}, rounds=2, sse_streams=8, sse_concurrency=4, sse_tokens=12,
                  sse_ttft_ms=100, sse_tokens_per_s=50, rss_streams=50, rss_tokens=8, rss_tokens_per_s=4,
                  large_bytes=64 << 20, cold_windows=1, cold_clients=3, cold_s=2.5, sequential=100,
                  wan_requests=30),
    # For the smoke test: every phase runs, nothing is worth reading.
    "tiny": Plan("tiny", {1: 4, 16: 16, 64: 64}, rounds=1, sse_streams=2, sse_concurrency=2, sse_tokens=3,
                 sse_ttft_ms=20, sse_tokens_per_s=200, rss_streams=4, rss_tokens=3, rss_tokens_per_s=20,
                 large_bytes=1 << 20, cold_windows=1, cold_clients=1, cold_s=0.5, sequential=5,
                 wan_requests=3),
}


async def latency(t: Targets, plan: Plan, pids: dict[str, int]) -> dict[str, Any]:
    """Small non-streamed requests: latency and requests/s per path and concurrency.

    `pids` maps a path to the proxy process on it, whose CPU time per request is recorded.
    """
    out: dict[str, Any] = {}
    for c, n in plan.latency_n.items():
        sessions = {p: load.session(c) for p in LATENCY_PATHS}
        try:
            lat: dict[str, list[float]] = {p: [] for p in LATENCY_PATHS}
            walls: dict[str, list[tuple[int, float]]] = {p: [] for p in LATENCY_PATHS}  # (requests, s) per round
            cpu = dict.fromkeys(pids, 0.0)
            for p in LATENCY_PATHS:  # warm-up: open the pools, and Vespa's to the autoscaler
                await load.closed_loop(t.sender(p), sessions[p], 2 * c, c)
            per_round = max(c, n // plan.rounds)
            for r in range(plan.rounds):
                order = LATENCY_PATHS[r % len(LATENCY_PATHS):] + LATENCY_PATHS[: r % len(LATENCY_PATHS)]
                for p in order:
                    cpu0 = cpu_s(pids[p]) if p in pids else 0.0
                    ms, wall = await load.closed_loop(t.sender(p), sessions[p], per_round, c)
                    if p in pids:
                        cpu[p] += cpu_s(pids[p]) - cpu0
                    lat[p] += ms
                    walls[p].append((len(ms), wall))
        finally:
            for s in sessions.values():
                await s.close()
        out[str(c)] = {
            p: summary(lat[p]) | {"rps": len(lat[p]) / sum(w for _, w in walls[p]),
                                  "rps_rounds": [k / w for k, w in walls[p]]}
            | ({"proxy_cpu_ms": 1000 * cpu[p] / len(lat[p])} if p in pids else {})
            for p in LATENCY_PATHS
        }
    return out


async def sse(t: Targets, emu: EmulatorProcess, plan: Plan) -> dict[str, Any]:
    """Time to first token and gaps between tokens, per path."""
    emu.configure(ttft_ms=plan.sse_ttft_ms, tokens_per_s=plan.sse_tokens_per_s)
    timings: dict[str, list[load.StreamTiming]] = {p: [] for p in SSE_PATHS}
    stream_s = (plan.sse_ttft_ms / 1000) + plan.sse_tokens / plan.sse_tokens_per_s
    sessions = {p: load.session(plan.sse_concurrency) for p in SSE_PATHS}
    try:
        rounds = 2 if plan.sse_streams >= 2 * plan.sse_concurrency else 1
        for r in range(rounds):
            for p in SSE_PATHS[r:] + SSE_PATHS[:r]:
                left = plan.sse_streams // rounds

                async def client(k: int, p: str = p) -> None:
                    nonlocal left
                    # Staggered: streams of equal length started together would reach the proxy
                    # in bursts and time its queueing, not its added latency.
                    await asyncio.sleep(k * stream_s / plan.sse_concurrency)
                    while left > 0:
                        left -= 1
                        timings[p].append(await load.sse_once(t.sender(p), sessions[p], plan.sse_tokens))

                await asyncio.gather(*(client(k) for k in range(plan.sse_concurrency)))
    finally:
        for s in sessions.values():
            await s.close()
    return {
        "ttft_ms_config": plan.sse_ttft_ms,
        "gap_ms_config": 1000 / plan.sse_tokens_per_s,
        "tokens": plan.sse_tokens,
        "paths": {
            p: {
                "ttft": summary([x.ttft_ms for x in ts]),
                "gap": summary([g for x in ts for g in x.gaps_ms]),
            }
            for p, ts in timings.items()
        },
    }


async def rss_streams(t: Targets, emu: EmulatorProcess, plan: Plan, procs: dict[str, Proc]) -> dict[str, Any]:
    """Proxy memory with many concurrent slow streams, against its own idle RSS."""
    emu.configure(ttft_ms=200, tokens_per_s=plan.rss_tokens_per_s)
    out: dict[str, Any] = {}
    for path, proc in procs.items():
        idle = proc.rss_mb()
        open_now = peak_open = 0

        def opened() -> None:
            nonlocal open_now, peak_open
            open_now += 1
            peak_open = max(peak_open, open_now)

        async def one(s: Any) -> None:
            nonlocal open_now
            try:
                await load.sse_once(t.sender(path), s, plan.rss_tokens, on_open=opened)
            finally:
                open_now -= 1

        async with load.session(0) as s:
            with PeakRss(proc.proc.pid) as peak:
                await asyncio.gather(*(one(s) for _ in range(plan.rss_streams)))
        out[path] = {"streams": plan.rss_streams, "peak_open": peak_open, "idle_mb": idle, "peak_mb": peak.peak,
                     "growth_mb": peak.peak - idle}
    return out


async def large(t: Targets, plan: Plan, vespa: Proc) -> dict[str, Any]:
    """One big streamed download: Vespa's RSS growth, and its throughput against the worker's."""
    auth = urlencode(wire.auth_query(t.auth_data))
    direct = await load.download(f"{t.auth_data['url']}/large?size={plan.large_bytes}&{auth}", plan.large_bytes)
    idle = vespa.rss_mb()
    with PeakRss(vespa.proc.pid) as peak:
        through = await load.download(f"{t.vespa}/large?size={plan.large_bytes}", plan.large_bytes)
    return {"bytes": plan.large_bytes, "idle_mb": idle, "peak_mb": peak.peak, "growth_mb": peak.peak - idle,
            "direct_worker_mb_s": direct, "vespa_mb_s": through}


async def cold_start(t: Targets, emu: EmulatorProcess, plan: Plan) -> dict[str, Any]:
    """First byte after the worker turns ready, and how often Vespa polls /route/ meanwhile."""
    delays: list[float] = []
    rates: list[float] = []
    steady: list[float] = []
    send = t.sender("vespa")
    async with load.session(0) as s:
        for _ in range(plan.cold_windows):
            start = time.monotonic()
            ready_at = emu.set_cold(plan.cold_s)
            first_bytes: list[float] = []

            async def one() -> None:
                resp = await send(s, "/echo", load.ECHO_PAYLOAD)
                first_bytes.append(time.monotonic())
                async with resp:
                    await resp.read()
                if resp.status != 200:
                    raise load.BenchError(f"cold request answered {resp.status}")

            await asyncio.gather(*(one() for _ in range(plan.cold_clients)))
            delays += [(fb - ready_at) * 1000 for fb in first_bytes]
            polls = [x for x in emu.route_times(start) if x < ready_at]
            rates.append(len(polls) / plan.cold_clients / (ready_at - start))
            # After the first second's quick re-polls: the pace of a long cold start.
            late = [x for x in polls if x >= start + 1.0]
            if ready_at - start > 1.5:
                steady.append(len(late) / plan.cold_clients / (ready_at - start - 1.0))
    return {"cold_s": plan.cold_s, "samples": len(delays), "first_byte_after_ready_ms": summary(delays),
            "polls_per_s": summary(rates), "polls_per_s_after_1s": summary(steady) if steady else None}


async def sequential(send: load.Send, n: int, new_connection_each: bool) -> None:
    """`n` requests one after another, for counting the connections they cost upstream.

    Vespa is driven with a new client connection per request, as curl would: it must pool
    its own route calls across clients, not lean on the client's keep-alive.
    """
    async with load.session(1, force_close=new_connection_each) as s:
        for _ in range(n):
            await load.echo_once(send, s)
