"""What made a run directory: RUN/provenance.json, one entry per stage that ran there.

Each entry records the versions of python, torch, torchvision, numpy and pydensecrf, the
git commit of this repository and whether the work tree had uncommitted changes, the
command line, the device and the time. A stage that runs again replaces its own entry.
"""

from __future__ import annotations

import datetime
import json
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from wsss import rundir as R
from wsss.files import write_json
from wsss.paths import REPO_ROOT

PACKAGES = ("torch", "torchvision", "numpy", "pydensecrf2")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git() -> dict:
    def run(*args):
        return subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=10)

    try:
        commit = run("rev-parse", "HEAD")
        status = run("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    if commit.returncode != 0:
        return {"commit": None, "dirty": None}
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def facts(device: str | None = None) -> dict:
    """The provenance of work done now in this process."""
    import torch

    if device is None:
        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()})"
    return {"python": platform.python_version(), **{p: _version(p) for p in PACKAGES}, **_git(),
            "command": sys.argv, "device": device, "host": platform.node(),
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def record(run_dir: str | Path, stage: str, device: str | None = None) -> Path:
    """Write (or replace) ``stage``'s entry of RUN/provenance.json."""
    path = Path(run_dir) / R.PROVENANCE
    try:
        entries = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        entries = {}
    entries[stage] = facts(device)
    return write_json(path, entries)
