"""The benchmark harness runs end to end (tiny counts) and writes its table; figures are not checked.

Speed is measured by bench/run.sh and read by people, never asserted here.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_tiny_plan_runs_every_phase(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--plan", "tiny", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    for phase in ("latency", "sse", "rss_streams", "large", "cold", "connections", "wan", "https_loopback"):
        assert phase in results, phase
    assert set(results["latency"]) == {"1", "16", "64"}
    # Every stream delivered all its tokens through every path, including Vespa.
    assert all(p["ttft"]["n"] == 2 for p in results["sse"]["paths"].values())
    assert results["rss_streams"]["vespa"]["peak_open"] >= 1
    assert results["cold"]["first_byte_after_ready_ms"]["p50"] >= 0  # not before the worker was ready
    assert results["connections"]["vespa"] >= 1
    # Across the WAN every path answered, and Vespa cannot beat one round trip per leg it makes.
    wan = results["wan"]["paths"]
    assert all(wan[p]["n"] == 3 for p in ("vespa-fresh", "vespa-kept", "two-step"))
    assert wan["vespa-fresh"]["p50_rtt"] >= 1.8 and wan["two-step"]["p50_rtt"] >= 1.8
    for client in ("fresh", "kept"):
        for c in ("1", "16"):
            assert results["https_loopback"][client][c]["vespa-https"]["n"] >= int(c)
    md = (tmp_path / "results.md").read_text()
    assert "Vespa's own cost" in md and "| figure | p50 | p99 |" in md
    assert "WAN 25 ms one way" in md and "HTTPS / plain-HTTP workers" in md
    assert results["machine"]["mitmproxy"] in md
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "results.png").read_bytes().startswith(b"\x89PNG")


def test_bench_runs_only_the_phases_asked_for(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--plan", "tiny", "--phases", "wan", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert "wan" in results and "latency" not in results and "https_loopback" not in results
    assert "WAN 25 ms one way" in (tmp_path / "results.md").read_text()


def test_bench_refuses_an_unknown_phase() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--phases", "latency,warp"],
        cwd=REPO, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 2 and "warp" in proc.stderr
