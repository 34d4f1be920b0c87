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
    for phase in ("latency", "sse", "rss_streams", "large", "cold", "connections"):
        assert phase in results, phase
    assert set(results["latency"]) == {"1", "16", "64"}
    # Every stream delivered all its tokens through every path, including Vespa.
    assert all(p["ttft"]["n"] == 2 for p in results["sse"]["paths"].values())
    assert results["rss_streams"]["vespa"]["peak_open"] >= 1
    assert results["cold"]["first_byte_after_ready_ms"]["p50"] >= 0  # not before the worker was ready
    assert results["connections"]["vespa"] >= 1
    md = (tmp_path / "results.md").read_text()
    assert "Vespa's own cost" in md and "| figure | p50 | p99 |" in md
    assert results["machine"]["mitmproxy"] in md
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "results.png").read_bytes().startswith(b"\x89PNG")
