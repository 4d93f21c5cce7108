"""Atomic file writes (a temporary file next to the target, renamed into place, so an
interrupted run never leaves a half-written file behind), and the run directory's
provenance rule: an output records the content hash of each file it was made from
(:func:`fingerprint`), and a stage that reads an output first checks that those files are
still the same (:func:`check_current`), so nothing downstream silently outlives its inputs;
a copied or moved run directory stays valid (hashes, not paths or mtimes)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path`` (".NAME.PID.tmp") to write; when the block
    finishes it replaces ``path`` in one rename, and on any error it is removed. The one
    atomic write of the project: every file of a run directory is written through it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_tmp(folder: str | Path, name: str = "*") -> int:
    """Delete the temporary files of :func:`atomic_path` (".NAME.PID.tmp", ``name`` a glob)
    that writers no longer running left in ``folder`` (killed between write and rename);
    returns how many."""
    removed = 0
    for path in Path(folder).glob(f".{name}.*.tmp") if Path(folder).is_dir() else ():
        pid = path.name.rsplit(".", 2)[-2]
        if pid.isdigit() and not _pid_alive(int(pid)):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # atomic_path removes its file on every error: one of ours is from an earlier run
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, Mapping):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, np.generic):
        return _clean(v.item())
    return v


def write_json(path: str | Path, obj) -> Path:
    """``obj`` as indented JSON, atomically; NaN and infinities become null (valid JSON)."""
    return write_text(path, json.dumps(_clean(obj), indent=2, default=str) + "\n")


def changed_settings(out_dir: Path, name: str, settings: dict, explain: dict[str, str] | None = None) -> list[str]:
    """What differs between ``settings`` and those recorded in ``out_dir/name`` (``explain``
    says what a changed key means, {"classifier": "classifier.pt"}); [] when they
    are the same or nothing is recorded."""
    path = Path(out_dir) / name
    if not path.is_file():
        return []
    old = json.loads(path.read_text())
    return [(explain or {}).get(k, k) for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)]


def folder_state(out_dir: Path, name: str, settings: dict, files: list[str], overwrite: bool,
                 explain: dict[str, str] | None = None) -> tuple[str, str]:
    """("keep" | "resume" | "recompute" | "run", why) for a stage that writes ``files`` into
    ``out_dir`` and records its settings in ``out_dir/name`` (see ``wsss.stages.training.state``);
    with ``overwrite`` whatever is there is recomputed."""
    if not (Path(out_dir) / name).is_file():
        return "run", "nothing made yet"
    if overwrite:
        return "recompute", "overwrite is on"
    if changed := changed_settings(out_dir, name, settings, explain):
        return "recompute", ", ".join(changed) + " changed"
    listing = set(os.listdir(out_dir))
    missing = sum(f not in listing for f in files)
    return ("resume", f"{missing} of {len(files)} to make") if missing else ("keep", "settings equal, all made")


def check_settings(out_dir: Path, name: str, settings: dict, overwrite: bool, what: str, option: str,
                   explain: dict[str, str] | None = None, pattern: str = "*") -> None:
    """Refuse to mix outputs made with other settings in one folder: ``out_dir/name`` records
    the settings of what is already there; unless overwriting, they must equal ``settings``.
    ``what`` names the outputs ("maps"), ``option`` the other way out ("maps_dir"), and
    ``explain`` says what a changed key means. With ``overwrite`` the old outputs
    (``pattern``) and then their record are deleted first, so that an interrupted
    recomputation never leaves old and new outputs together under the new record."""
    path = Path(out_dir) / name
    if overwrite:
        for old in Path(out_dir).glob(pattern) if path.is_file() else ():
            old.unlink()
        path.unlink(missing_ok=True)
    elif changed := changed_settings(out_dir, name, settings, explain):
        raise ValueError(f"{out_dir} holds {what} made with other settings (changed: {', '.join(changed)}; see "
                         f"{path}): pass --overwrite (overwrite=True) to recompute them, or choose another "
                         f"--{option.replace('_', '-')}")


def fingerprint(run_dir: str | Path, name: str) -> dict:
    """``{"file": name, "sha256": ...}`` of RUN/name: what an output records about an input file."""
    h = hashlib.sha256()
    with open(Path(run_dir) / name, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"file": name, "sha256": h.hexdigest()}


def stale_inputs(settings, run_dir: str | Path) -> list[str]:
    """The files named by the fingerprints anywhere inside ``settings`` (nested settings of
    earlier stages included) whose content is no longer the recorded one. Names are relative
    to ``run_dir``, the run directory the outputs were made in; a file not there (outputs
    used from outside their run directory) cannot be checked and is left out."""
    found = []
    if isinstance(settings, Mapping):
        if set(settings) == {"file", "sha256"}:
            path = Path(run_dir) / settings["file"]
            if path.is_file() and fingerprint(run_dir, settings["file"]) != dict(settings):
                found.append(settings["file"])
        else:
            for v in settings.values():
                found += stale_inputs(v, run_dir)
    return found


def check_current(settings, run_dir: str | Path, what: str, fix: str) -> None:
    """Refuse to use ``what`` (e.g. "the maps in RUN/maps") when a file it was made from has
    changed since (``stale_inputs``); ``fix`` is the command that makes it again."""
    stale = stale_inputs(settings, run_dir)
    if stale:
        raise ValueError(f"{what} were made from another {', '.join(sorted(set(stale)))} than the one in {run_dir} "
                         f"now (it was retrained or replaced): {fix}")
