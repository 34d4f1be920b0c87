"""Summarise a py-spy `--format raw` profile (collapsed stacks) as text a person can read."""

from __future__ import annotations

from collections import Counter

TOP = 25


def summarize(raw: str) -> str:
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        own[_short(frames[-1])] += n
        for frame in set(map(_short, frames)):
            inclusive[frame] += n
    if not total:
        return "no samples\n"
    lines = [f"{total} samples", "", "own time (the frame itself was running):"]
    lines += [f"{100 * n / total:5.1f}%  {f}" for f, n in own.most_common(TOP)]
    lines += ["", "inclusive time of Vespa's and mitmproxy's HTTP frames:"]
    ours = [(f, n) for f, n in inclusive.most_common() if "vespa" in f or "/http" in f or "layers" in f]
    lines += [f"{100 * n / total:5.1f}%  {f}" for f, n in ours[:TOP]]
    return "\n".join(lines) + "\n"


def _short(frame: str) -> str:
    """`func (path/to/site-packages/pkg/mod.py:12)` -> `func (pkg/mod.py)`, so lines merge."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "lib/python3"):
        if marker in where:
            where = where.split(marker, 1)[1]
    return f"{name} ({where})"
