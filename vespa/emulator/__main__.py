"""`python -m vespa.emulator`: run the emulator until SIGINT/SIGTERM.

Prints one JSON line to stdout when every server listens (a launcher reads it) and
human-readable lines to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys

from vespa.emulator import Emulator, EmulatorConfig, EndpointConfig

DEMO_ACCOUNT_KEY = "demo-account-key"
DEMO_ENDPOINT_KEY = "demo-endpoint-key"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m vespa.emulator",
        description="Run a local emulation of Vast.ai Serverless (autoscaler, console API, workers, "
        "OpenAI-style backend) on 127.0.0.1. Prints one JSON line with the URLs and keys when ready; "
        "stops on SIGINT/SIGTERM.",
    )
    p.add_argument("--endpoint", default="vespa-demo", help="endpoint name (default: %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="workers of the endpoint (default: %(default)s)")
    p.add_argument(
        "--also", action="append", default=[], metavar="NAME",
        help="another endpoint, with one worker and no cold start (repeatable)",
    )
    p.add_argument(
        "--generation",
        choices=("B", "C"),
        default="C",
        help="signature generation the workers verify (default: %(default)s)",
    )
    p.add_argument(
        "--cold-start",
        type=float,
        default=0.0,
        metavar="S",
        help="seconds from the first route call until a worker is ready (default: %(default)s)",
    )
    p.add_argument(
        "--ttft-ms", type=float, default=20, help="backend time to first token (default: %(default)s)"
    )
    p.add_argument(
        "--tokens-per-s", type=float, default=200.0, help="backend token rate (default: %(default)s)"
    )
    p.add_argument(
        "--https",
        action="store_true",
        help="workers serve HTTPS with certificates from the emulator's own root CA, served at "
        "{console}/static/jvastai_root.cer (as on Vast, where workers are HTTPS)",
    )
    p.add_argument(
        "--wan-ms",
        type=float,
        default=0.0,
        metavar="D",
        help="delay every byte to and from the autoscaler and the workers by D ms each way, and each "
        "new connection by one more round trip, like a far-away Vast (default: %(default)s = loopback)",
    )
    p.add_argument("--autoscaler-port", type=int, default=0, help="autoscaler port (default: 0 = a free one)")
    p.add_argument("--console-port", type=int, default=0, help="console API port (default: 0 = a free one)")
    p.add_argument(
        "--demo-keys",
        action="store_true",
        help=f"use the fixed keys {DEMO_ACCOUNT_KEY!r} and {DEMO_ENDPOINT_KEY!r} instead of random "
        "ones; VESPA_EMU_ACCOUNT_KEY and VESPA_EMU_ENDPOINT_KEY, when set, win over both",
    )
    return p.parse_args(argv)


def build_config(args: argparse.Namespace) -> EmulatorConfig:
    ep = EndpointConfig(
        name=args.endpoint, workers=args.workers, generation=args.generation, cold_start_s=args.cold_start
    )
    config = EmulatorConfig(
        endpoints=[ep, *(EndpointConfig(name=name, workers=1) for name in args.also)],
        ttft_ms=args.ttft_ms,
        tokens_per_s=args.tokens_per_s,
        autoscaler_port=args.autoscaler_port,
        console_port=args.console_port,
        https=args.https,
        wan_delay_ms=args.wan_ms,
    )
    # Unset keys stay random, so a forgotten flag never exposes a guessable key.
    if account_key := os.environ.get("VESPA_EMU_ACCOUNT_KEY") or (
        DEMO_ACCOUNT_KEY if args.demo_keys else None
    ):
        config.account_key = account_key
    if endpoint_key := os.environ.get("VESPA_EMU_ENDPOINT_KEY") or (
        DEMO_ENDPOINT_KEY if args.demo_keys else None
    ):
        ep.api_key = endpoint_key
    return config


def ready_line(emu: Emulator) -> str:
    endpoints = [
        {"name": ep.name, "api_key": ep.api_key, "workers": [w.url for w in emu.workers(ep.name)]}
        for ep in emu.config.endpoints
    ]
    return json.dumps(
        {
            "autoscaler_url": emu.autoscaler_url,
            "console_url": emu.console_url,
            "backend_url": emu.backend_url,
            "account_key": emu.config.account_key,
            "endpoints": endpoints,
        }
    )


def describe(emu: Emulator) -> str:
    lines = [
        "Vast emulator ready (Ctrl-C to stop)",
        f"  autoscaler  {emu.autoscaler_url}   (POST /route/, GET /pubkey/)",
        f"  console     {emu.console_url}   (GET /api/v0/endptjobs/, GET /static/jvastai_root.cer)",
        f"  backend     {emu.backend_url}",
        f"  account key {emu.config.account_key}",
    ]
    for ep in emu.config.endpoints:
        lines.append(f"  endpoint    {ep.name}  key {ep.api_key}  generation {ep.generation}")
        lines.extend(f"    worker    {w.url}" for w in emu.workers(ep.name))
    return "\n".join(lines)


async def run(config: EmulatorConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with Emulator(config) as emu:
        print(ready_line(emu), flush=True)
        print(describe(emu), file=sys.stderr, flush=True)
        await stop.wait()
        print("Vast emulator stopping", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    config = build_config(parse_args(argv))
    try:
        config.validate()
    except ValueError as e:
        print(f"vespa.emulator: {e}", file=sys.stderr)
        return 2
    try:
        asyncio.run(run(config))
    except OSError as e:
        print(f"vespa.emulator: cannot listen: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
