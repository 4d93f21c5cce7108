"""Default locations, resolved from the repository root (never from the working directory).

Override with the environment variables WSSS_DATA and WSSS_RUNS, or pass paths explicitly.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def data_dir() -> Path:
    return Path(os.environ.get("WSSS_DATA", REPO_ROOT / "data"))


def runs_dir() -> Path:
    return Path(os.environ.get("WSSS_RUNS", REPO_ROOT / "runs"))


def benchmark_root(size: str = "demo", seed: int = 0, scene: dict | None = None) -> Path:
    """Where the embedded benchmark of a given size lives by default: data/synthetic-SIZE[-sSEED],
    with ``-KEYVALUE`` per scene knob set (``scene``: wsss.data.synth.SynthParams fields), so
    benchmarks of other knobs live beside the default one instead of replacing it."""
    name = f"synthetic-{size}" if seed == 0 else f"synthetic-{size}-s{seed}"
    return data_dir() / "".join([name, *(f"-{k}{v:g}" for k, v in sorted((scene or {}).items()))])
