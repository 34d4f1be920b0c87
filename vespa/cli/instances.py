"""The Vast deployments by name: where each one's autoscaler and console live.

Shared by the launcher (`--instance`) and the Python API (`instance=`), so both agree.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Instance:
    autoscaler_url: str
    console_url: str


INSTANCES = {
    "prod": Instance("https://run.vast.ai", "https://console.vast.ai"),
    "alpha": Instance("https://run-alpha.vast.ai", "https://alpha.vast.ai"),
    "candidate": Instance("https://run-candidate.vast.ai", "https://candidate.vast.ai"),
}
