"""`python -m bench [--quick] [--phases a,b]`: measure Vespa against its baselines, in one run, on this machine.

Starts the emulator (own process), bare mitmdump (twice: buffering as configured, and with
`stream_large_bodies=1` so SSE streams) and Vespa with the launcher's command, runs every
phase (or those named by --phases), and writes bench/results/results.{json,md,png}. The
phases `wan` and `https` (bench/conn_phases.py) start emulators and Vespas of their own.
Use bench/run.sh, which installs bench/requirements.txt first.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from bench import conn_phases, load, phases, proxies
from bench.emu_proc import EmulatorProcess
from bench.relay import CountingRelay

RESULTS = Path(__file__).resolve().parent / "results"
# Phase names as --phases takes them, in running order; the first six share one emulator.
SHARED_PHASES = ("latency", "sse", "rss", "large", "cold", "connections")
OWN_PHASES = ("wan", "https", "legs")
PHASES = SHARED_PHASES + OWN_PHASES


def phase_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in PHASES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown phase(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(PHASES)}")
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/run.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_const", dest="plan", const="quick", default="full",
                   help="small counts (about a minute): for development, not for the README")
    p.add_argument("--plan", choices=sorted(phases.PLANS), default="full", help="counts to use (default: %(default)s)")
    p.add_argument("--phases", type=phase_list, default=list(PHASES), metavar="A,B",
                   help=f"run only these phases (default: all of {','.join(PHASES)})")
    p.add_argument("--out", type=Path, default=RESULTS, help="output folder (default: bench/results)")
    p.add_argument("--profile", action="store_true",
                   help="also record Vespa's mitmdump with py-spy during the small-request phase (profile-vespa.txt)")
    return p.parse_args(argv)


def machine() -> dict[str, Any]:
    import mitmproxy.version

    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "mitmproxy": mitmproxy.version.VERSION,
        "aiohttp": aiohttp.__version__,
        "load_avg_at_start": os.getloadavg(),
    }


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


async def run(plan: phases.Plan, profile_to: Path | None, selected: list[str] | None = None) -> dict[str, Any]:
    selected = list(PHASES) if selected is None else selected
    results: dict[str, Any] = {"machine": machine(), "plan": dataclasses.asdict(plan)}
    if any(p in selected for p in SHARED_PHASES):
        await shared_phases(plan, profile_to, selected, results)
    if "wan" in selected:
        log(f"WAN, {conn_phases.WAN_DELAY_MS:g} ms one way, {conn_phases.WAN_WORKERS} HTTPS workers, "
            f"{plan.wan_requests} sequential requests per path ...")
        results["wan"] = await conn_phases.wan(plan)
    if "https" in selected:
        log("loopback, HTTPS workers against plain-HTTP workers ...")
        results["https_loopback"] = await conn_phases.https_loopback(plan)
    if "legs" in selected:
        log("loopback, the worker leg in its own process against the leg in a thread ...")
        results["legs"] = await conn_phases.legs(plan)
    return results


async def shared_phases(plan: phases.Plan, profile_to: Path | None, selected: list[str], results: dict[str, Any]) -> None:
    """The phases of issue 8: one emulator, bare mitmproxy and Vespa for all of them."""
    with contextlib.ExitStack() as stack:
        emu = stack.enter_context(EmulatorProcess())
        info = emu.info
        assert info is not None
        log(f"emulator up: autoscaler {info.autoscaler_url}, {len(info.worker_urls)} workers")
        vespa = stack.enter_context(proxies.vespa_proxy(info.autoscaler_url, info.console_url, info.endpoint, info.api_key))
        bare = stack.enter_context(proxies.bare_proxy(info.backend_url))
        bare_stream = stack.enter_context(proxies.bare_proxy(info.backend_url, "stream_large_bodies=1"))
        t = load.Targets(backend=info.backend_url, worker=info.worker_urls[0], autoscaler=info.autoscaler_url,
                         endpoint=info.endpoint, api_key=info.api_key, bare=bare.url, bare_stream=bare_stream.url,
                         vespa=vespa.url)
        async with load.session(1) as s:
            t.auth_data = await t.route(s)
        emu.configure(ttft_ms=0, tokens_per_s=1e6)

        if "latency" in selected:
            log("latency and throughput of small requests ...")
            with profiling(vespa, profile_to):
                results["latency"] = await phases.latency(t, plan, {"vespa": vespa.proc.pid, "bare-mitm": bare.proc.pid})
            emu.clear_records()
        if "sse" in selected:
            log("SSE time to first token and inter-token gaps ...")
            results["sse"] = await phases.sse(t, emu, plan)
            emu.clear_records()
        if "rss" in selected:
            log(f"RSS with {plan.rss_streams} concurrent streams ...")
            results["rss_streams"] = await phases.rss_streams(t, emu, plan, {"vespa": vespa, "bare-mitm-stream": bare_stream})
            emu.clear_records()
        if "large" in selected:
            log(f"RSS while streaming {plan.large_bytes >> 20} MiB ...")
            results["large"] = await phases.large(t, plan, vespa)
            emu.clear_records()
        if "cold" in selected:
            log("cold start ...")
            emu.configure(ttft_ms=0, tokens_per_s=1e6)
            results["cold"] = await phases.cold_start(t, emu, plan)
            emu.clear_records()
        if "connections" in selected:
            log(f"connections to the autoscaler for {plan.sequential} sequential requests ...")
            results["connections"] = await connections(t, plan, info.console_url)


async def connections(t: load.Targets, plan: phases.Plan, console_url: str) -> dict[str, Any]:
    """Connections to the autoscaler, counted by a relay in front of it, for sequential requests."""
    url = urlsplit(t.autoscaler)
    out: dict[str, Any] = {"requests": plan.sequential}
    async with CountingRelay(url.hostname or "127.0.0.1", url.port or 80) as relay:
        via = dataclasses.replace(t, autoscaler=relay.url)
        # Fresh proxies, so every connection they open counts. With eager (mitmproxy's default),
        # each client connection also opens one to the reverse target, which is the autoscaler.
        for name, strategy in (("vespa", "lazy"), ("vespa-eager", "eager")):
            before = relay.accepted
            with proxies.vespa_proxy(relay.url, console_url, t.endpoint, t.api_key, strategy) as fresh:
                via.vespa = fresh.url
                await phases.sequential(via.sender("vespa"), plan.sequential, new_connection_each=True)
            out[name] = relay.accepted - before
        before = relay.accepted
        await phases.sequential(via.sender("two-step"), plan.sequential, new_connection_each=False)
        out["two-step"] = relay.accepted - before
    return out


@contextlib.contextmanager
def profiling(proc: proxies.Proc, out: Path | None):
    """py-spy on the proxy process while the block runs (only with --profile)."""
    if out is None:
        yield
        return
    spy = Path(sys.executable).parent / "py-spy"
    raw = out.with_suffix(".raw")
    p = subprocess.Popen([str(spy), "record", "--pid", str(proc.proc.pid), "--rate", "250", "--format", "raw",
                          "--output", str(raw), "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        yield
    finally:
        p.send_signal(signal.SIGINT)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        if raw.exists():
            from bench.profile import summarize

            out.write_text(summarize(raw.read_text()))
            log(f"profile written to {out}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = phases.PLANS[args.plan]
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    results = asyncio.run(run(plan, args.out / "profile-vespa.txt" if args.profile else None, args.phases))
    results["wall_s"] = time.monotonic() - started
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    from bench import report

    md = report.markdown(results)
    (args.out / "results.md").write_text(md)
    try:
        if not report.plot(results, args.out / "results.png"):
            log(f"no results.png: it needs the phases {', '.join(report.PLOTTED)}")
    except ImportError:
        log("matplotlib is missing, so no results.png: bench/run.sh installs bench/requirements.txt")
    print(md)
    log(f"done in {results['wall_s']:.0f} s; wrote {args.out}/results.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
