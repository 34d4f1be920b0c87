"""From results.json to the markdown table and the PNG: `python -m bench.report results.json`.

Every headline figure is a difference or a ratio against a baseline measured in the same
run. Differences are taken between percentiles (p50 minus p50, p99 minus p99).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.conn_phases import HTTPS_PATHS, WAN_PATHS
from bench.phases import LATENCY_PATHS, SSE_PATHS


@dataclass
class Figure:
    name: str
    p50: float | None
    p99: float | None
    unit: str
    target: str = ""
    met: bool | None = None

    def row(self) -> str:
        verdict = {True: "met", False: "**missed**", None: ""}[self.met]
        return f"| {self.name} | {_n(self.p50)} | {_n(self.p99)} | {self.unit} | {self.target} | {verdict} |"


def _n(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x:.2f}" if abs(x) < 10 else f"{x:.0f}"


def _diff(a: dict[str, float], b: dict[str, float], *minus: dict[str, float]) -> tuple[float, float]:
    return tuple(a[q] - b[q] - sum(m[q] for m in minus) for q in ("p50", "p99"))  # type: ignore[return-value]


def figures(r: dict[str, Any]) -> list[Figure]:
    """Headline figures of the phases present in `r` (--phases may have run only some)."""
    phases = (("latency", _latency_figures), ("sse", lambda sse: _sse_figures(sse["paths"])),
              ("rss_streams", _rss_figures), ("large", _large_figures), ("cold", _cold_figures),
              ("connections", _connection_figures), ("wan", _wan_figures),
              ("https_loopback", _https_figures), ("legs", _leg_figures))
    return [figure for key, make in phases if key in r for figure in make(r[key])]


def _latency_figures(lat: dict[str, Any]) -> list[Figure]:
    out: list[Figure] = []
    for c, paths in lat.items():
        mitm = _diff(paths["bare-mitm"], paths["direct-backend"])
        route = _diff(paths["two-step"], paths["direct-worker"])
        own = _diff(paths["vespa"], paths["two-step"], {"p50": mitm[0], "p99": mitm[1]})
        out += [
            Figure(f"c={c}: mitmproxy's own cost (bare − direct-backend)", *mitm, "ms"),
            Figure(f"c={c}: route call (two-step − direct-worker)", *route, "ms"),
            Figure(f"c={c}: Vespa added vs physical limit (vespa − direct-worker)", *_diff(paths["vespa"], paths["direct-worker"]), "ms"),
            Figure(f"c={c}: Vespa vs manual two-step (vespa − two-step)", *_diff(paths["vespa"], paths["two-step"]), "ms"),
            Figure(f"c={c}: Vespa's own cost (vespa − two-step − mitmproxy's cost)", *own, "ms",
                   "p50 ≤ 1 ms at c=1" if c == "1" else "", own[0] <= 1.0 if c == "1" else None),
        ]
    for c, paths in lat.items():
        ratios = [v / b for v, b in zip(paths["vespa"]["rps_rounds"], paths["bare-mitm"]["rps_rounds"])]
        overall = paths["vespa"]["rps"] / paths["bare-mitm"]["rps"]
        out.append(Figure(f"c={c}: throughput vespa / bare-mitm (overall; worst round)", overall, min(ratios), "ratio",
                          "≥ 0.90 at c=64" if c == "64" else "", overall >= 0.9 if c == "64" else None))
    for c, paths in lat.items():
        v, b = paths["vespa"].get("proxy_cpu_ms"), paths["bare-mitm"].get("proxy_cpu_ms")
        if v is not None and b is not None:
            out.append(Figure(f"c={c}: proxy CPU per request, vespa − bare-mitm (vespa total in p99 column)", v - b, v,
                              "ms"))
    return out


def _sse_figures(sse: dict[str, Any]) -> list[Figure]:
    ttft = _diff(sse["vespa"]["ttft"], sse["two-step"]["ttft"])
    return [
        Figure("SSE: route call (two-step − direct-worker TTFT)", *_diff(sse["two-step"]["ttft"], sse["direct-worker"]["ttft"]), "ms"),
        Figure("SSE: Vespa TTFT − (direct + route call) = vespa − two-step", *ttft, "ms", "≤ 3 ms", ttft[0] <= 3.0),
        Figure("SSE: inter-token gap, vespa − direct-worker", *_diff(sse["vespa"]["gap"], sse["direct-worker"]["gap"]), "ms",
               "|p99| ≤ 2 ms", abs(_diff(sse["vespa"]["gap"], sse["direct-worker"]["gap"])[1]) <= 2.0),
        Figure("SSE: bare mitmproxy, buffering (default) TTFT − direct-backend",
               *_diff(sse["bare-mitm"]["ttft"], sse["direct-backend"]["ttft"]), "ms"),
    ]


def _rss_figures(rs: dict[str, Any]) -> list[Figure]:
    v, b = rs["vespa"], rs["bare-mitm-stream"]
    return [
        Figure(f"RSS, {v['streams']} concurrent streams: Vespa growth over idle (peak total in p99 column)",
               v["growth_mb"], v["peak_mb"], "MB", "total ≤ 250 MB", v["peak_mb"] <= 250),
        Figure(f"RSS, {b['streams']} concurrent streams: bare mitmproxy growth (peak total)", b["growth_mb"], b["peak_mb"], "MB"),
    ]


def _large_figures(lg: dict[str, Any]) -> list[Figure]:
    return [
        Figure(f"RSS while streaming {lg['bytes'] >> 20} MiB through Vespa: growth (peak total)", lg["growth_mb"],
               lg["peak_mb"], "MB", "growth ≤ 50 MB", lg["growth_mb"] <= 50),
        Figure("Large download throughput, vespa / direct-worker", lg["vespa_mb_s"] / lg["direct_worker_mb_s"], None,
               "ratio"),
    ]


def _cold_figures(cold: dict[str, Any]) -> list[Figure]:
    fb = cold["first_byte_after_ready_ms"]
    polls = cold["polls_per_s"]
    steady = cold["polls_per_s_after_1s"]
    return [
        Figure(f"Cold start ({cold['cold_s']:g} s): first byte after the worker turns ready", fb["p50"], fb["p99"], "ms",
               "median ≤ 1000 ms", fb["p50"] <= 1000),
        Figure("Cold start: route polls per second per request, whole wait", polls["p50"], polls["p99"], "1/s"),
        Figure("Cold start: route polls per second per request, after the first second",
               steady["p50"] if steady else None, steady["p99"] if steady else None, "1/s", "about 1",
               steady["p50"] <= 1.25 if steady else None),
    ]


def _connection_figures(cn: dict[str, Any]) -> list[Figure]:
    out: list[Figure] = []
    out.append(Figure(f"Connections to the autoscaler for {cn['requests']} sequential requests, a new client "
                      "connection each: vespa (two-step with a pooled client)", cn["vespa"], cn["two-step"], "count",
                      "1, or a few", cn["vespa"] <= 3))
    if "vespa-eager" in cn:
        out.append(Figure("… the same with connection_strategy=eager (mitmproxy's default)", cn["vespa-eager"], None,
                          "count"))
    return out


def _wan_figures(wan: dict[str, Any]) -> list[Figure]:
    p = wan["paths"]
    where = f"WAN {wan['delay_ms']:g} ms one way, {wan['workers']} HTTPS workers, sequential"
    fresh, kept, limit = p["vespa-fresh"], p["vespa-kept"], p["two-step"]
    return [
        Figure(f"{where}: Vespa, a new client connection per request", fresh["p50_rtt"], fresh["p99_rtt"], "RTT",
               "p50 ≤ 2.4", fresh["p50_rtt"] <= 2.4),
        Figure(f"{where}: Vespa, one kept-alive client connection", kept["p50_rtt"], kept["p99_rtt"], "RTT",
               "p50 ≤ 2.3, p99 ≤ 2.6", kept["p50_rtt"] <= 2.3 and kept["p99_rtt"] <= 2.6),
        Figure(f"{where}: two-step by hand, one pooled session (the limit)", limit["p50_rtt"], limit["p99_rtt"], "RTT"),
    ]


def _https_figures(h: dict[str, Any]) -> list[Figure]:
    out: list[Figure] = []
    for client, label in (("fresh", "a new client connection per request"), ("kept", "kept-alive clients")):
        c16, c1 = h[client]["16"], h[client]["1"]
        plain, tls = c16["vespa-http"], c16["vespa-https"]
        ratios = [a / b for a, b in zip(tls["rps_rounds"], plain["rps_rounds"])]
        overall = tls["rps"] / plain["rps"]
        lat = _diff(c1["vespa-https"], c1["vespa-http"])
        out += [
            Figure(f"Loopback, {label}: c=16 throughput, HTTPS / plain-HTTP workers (overall; worst round)",
                   overall, min(ratios), "ratio", "≥ 0.90", overall >= 0.9),
            Figure(f"Loopback, {label}: c=1 latency, HTTPS − plain-HTTP workers", *lat, "ms", "p50 ≤ 0.5 ms",
                   lat[0] <= 0.5),
        ]
    return out


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        f"Run of {m['date']}, plan `{r['plan']['name']}`, {r.get('wall_s', 0):.0f} s: {m['cpu']}, {m['cores']} cores, "
        f"{m['os']}; Python {m['python']}, mitmproxy {m['mitmproxy']}, aiohttp {m['aiohttp']}; "
        f"load average at start {', '.join(f'{x:.2f}' for x in m['load_avg_at_start'])}.",
        "",
        "Headline figures (differences of percentiles: p50 − p50, p99 − p99; ratios where said):",
        "",
        "| figure | p50 | p99 | unit | target | |",
        "|---|---|---|---|---|---|",
        *(f.row() for f in figures(r)),
    ]
    tables = (("latency", _latency_table), ("sse", _sse_table), ("wan", _wan_table),
              ("https_loopback", _https_table), ("legs", _leg_table))
    lines += [line for key, make in tables if key in r for line in make(r[key])]
    return "\n".join(lines) + "\n"


def _latency_table(lat: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "Small non-streamed requests (`POST /echo`), latency p50 / p99 in ms and requests/s:",
        "",
        "| concurrency | " + " | ".join(LATENCY_PATHS) + " |",
        "|---|" + "---|" * len(LATENCY_PATHS),
    ]
    for c, paths in lat.items():
        cells = [f"{_n(paths[p]['p50'])} / {_n(paths[p]['p99'])} ms, {paths[p]['rps']:.0f}/s" for p in LATENCY_PATHS]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return lines


def _sse_table(sse: dict[str, Any]) -> list[str]:
    lines = [
        "",
        f"SSE ({sse['tokens']} tokens, backend TTFT {sse['ttft_ms_config']:g} ms, one token every "
        f"{sse['gap_ms_config']:g} ms), p50 / p99 in ms:",
        "",
        "| | " + " | ".join(SSE_PATHS) + " |",
        "|---|" + "---|" * len(SSE_PATHS),
    ]
    for what in ("ttft", "gap"):
        cells = [f"{_n(sse['paths'][p][what]['p50'])} / {_n(sse['paths'][p][what]['p99'])}" for p in SSE_PATHS]
        lines.append(f"| {what} | " + " | ".join(cells) + " |")
    return lines


def _wan_table(wan: dict[str, Any]) -> list[str]:
    lines = [
        "",
        f"Across a WAN of {wan['delay_ms']:g} ms one way (RTT {wan['rtt_ms']:g} ms), {wan['workers']} HTTPS workers, "
        "sequential `POST /echo`:",
        "",
        "| path | p50 | p99 | p50 | p99 | requests |",
        "|---|---|---|---|---|---|",
    ]
    for p in WAN_PATHS:
        x = wan["paths"][p]
        lines.append(f"| {p} | {_n(x['p50'])} ms | {_n(x['p99'])} ms | {x['p50_rtt']:.2f} RTT | {x['p99_rtt']:.2f} RTT "
                     f"| {x['n']} |")
    return lines


def _loops_table(title: str, data: dict[str, Any], paths: tuple[str, ...],
                 ratio: tuple[str, str, str] | None = None) -> list[str]:
    """Closed-loop results by client kind and concurrency: p50 / p99 and requests/s per path, and
    `ratio` = (column title, numerator path, denominator path) of their throughputs."""
    lines = ["", title, "", "| client | concurrency | " + " | ".join(paths) + (f" | {ratio[0]} |" if ratio else " |"),
             "|---|---|" + "---|" * (len(paths) + bool(ratio))]
    for client, by_c in data.items():
        for c, result in by_c.items():
            cells = [f"{_n(result[p]['p50'])} / {_n(result[p]['p99'])} ms, {result[p]['rps']:.0f}/s" for p in paths]
            if ratio:
                cells.append(f"{result[ratio[1]]['rps'] / result[ratio[2]]['rps']:.2f}")
            lines.append(f"| {client} | {c} | " + " | ".join(cells) + " |")
    return lines


def _https_table(h: dict[str, Any]) -> list[str]:
    return _loops_table("Loopback, Vespa with HTTPS workers against Vespa with plain-HTTP workers (`POST /echo`), "
                        "latency p50 / p99 in ms and requests/s:", h, HTTPS_PATHS,
                        ("throughput HTTPS / HTTP", "vespa-https", "vespa-http"))


def _leg_figures(legs: dict[str, Any]) -> list[Figure]:
    out: list[Figure] = []
    for client in ("fresh", "kept"):
        for c in ("1", "16", "32"):
            paths = legs[client][c]
            proc, thread = paths["vespa-process"], paths["vespa-thread"]
            out.append(Figure(f"Leg in a process / leg in a thread, {client} clients, c={c}: throughput (p50 latency "
                              f"difference, ms, in the p99 column)", proc["rps"] / thread["rps"],
                              proc["p50"] - thread["p50"], "ratio", "", None))
        c32 = legs[client]["32"]
        ratio = c32["vespa-process"]["rps"] / c32["bare-mitm"]["rps"]
        out.append(Figure(f"Throughput at c=32, {client} clients: Vespa (leg process) / bare mitmproxy to the backend",
                          ratio, c32["vespa-thread"]["rps"] / c32["bare-mitm"]["rps"], "ratio (thread in p99 column)",
                          "stretch ≥ 1.0", ratio >= 1.0))
    return out


def _leg_table(legs: dict[str, Any]) -> list[str]:
    from bench.conn_phases import LEG_PATHS

    return _loops_table("Loopback, HTTPS workers: the worker leg in its own process, in a thread, and bare "
                        "mitmproxy to the backend (`POST /echo`), latency p50 / p99 in ms and requests/s:",
                        legs, LEG_PATHS)


PLOTTED = ("latency", "sse", "rss_streams", "large")


def plot(r: dict[str, Any], path: Path) -> bool:
    """The PNG of the issue-8 phases; False (no file) when one of them did not run."""
    if any(k not in r for k in PLOTTED):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 2, figsize=(13, 9))
    lat = r["latency"]
    concs = list(lat)
    width = 0.8 / len(LATENCY_PATHS)
    for i, p in enumerate(LATENCY_PATHS):
        xs = [j + i * width for j in range(len(concs))]
        ax[0][0].bar(xs, [lat[c][p]["p50"] for c in concs], width, label=p)
        ax[0][0].scatter(xs, [lat[c][p]["p99"] for c in concs], marker="_", color="black", s=80)
        ax[0][1].bar(xs, [lat[c][p]["rps"] for c in concs], width, label=p)
    for a, title in ((ax[0][0], "small request latency, ms (bar p50, tick p99)"), (ax[0][1], "requests/s")):
        a.set_xticks([j + 0.4 - width / 2 for j in range(len(concs))], [f"c={c}" for c in concs])
        a.set_title(title)
        a.legend(fontsize=8)
    sse = r["sse"]["paths"]
    names = [p for p in SSE_PATHS if p != "bare-mitm"]
    for k, what in enumerate(("ttft", "gap")):
        xs = [j + k * 0.4 for j in range(len(names))]
        ax[1][0].bar(xs, [sse[p][what]["p50"] for p in names], 0.4, label=f"{what} p50")
        ax[1][0].scatter(xs, [sse[p][what]["p99"] for p in names], marker="_", color="black", s=80)
    ax[1][0].set_xticks([j + 0.2 for j in range(len(names))], names, fontsize=8)
    ax[1][0].set_title("SSE, ms (bar p50, tick p99)")
    ax[1][0].legend(fontsize=8)
    rs, lg = r["rss_streams"], r["large"]
    labels = ["vespa idle", f"vespa {rs['vespa']['streams']} streams", "bare idle",
              f"bare {rs['bare-mitm-stream']['streams']} streams", "vespa idle", f"vespa {lg['bytes'] >> 20} MiB"]
    values = [rs["vespa"]["idle_mb"], rs["vespa"]["peak_mb"], rs["bare-mitm-stream"]["idle_mb"],
              rs["bare-mitm-stream"]["peak_mb"], lg["idle_mb"], lg["peak_mb"]]
    ax[1][1].bar(range(len(values)), values, color=["#999", "C0", "#999", "C1", "#999", "C2"])
    ax[1][1].set_xticks(range(len(values)), labels, fontsize=8, rotation=15)
    ax[1][1].set_title("proxy RSS, MB (peak)")
    m = r["machine"]
    fig.suptitle(f"Vespa bench {m['date']}: {m['cpu']} x{m['cores']}, Python {m['python']}, mitmproxy {m['mitmproxy']}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


if __name__ == "__main__":
    src = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results" / "results.json")
    results = json.loads(src.read_text())
    print(markdown(results))
    plot(results, src.with_suffix(".png"))
