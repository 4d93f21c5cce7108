"""Atomic file writes: write a temporary file next to the target, then rename it into place,
so an interrupted run never leaves a half-written file behind."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np


def write_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


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


def check_settings(out_dir: Path, name: str, settings: dict, overwrite: bool, what: str, option: str,
                   explain: dict[str, str] | None = None) -> None:
    """Refuse to mix outputs made with other settings in one folder: ``out_dir/name`` records
    the settings of what is already there; unless overwriting, they must equal ``settings``.
    ``what`` names the outputs ("maps"), ``option`` the other way out ("maps_dir"), and
    ``explain`` says what a changed key means ({"classifier": "the classifier (... rewritten)"})."""
    path = Path(out_dir) / name
    if overwrite or not path.is_file():
        return
    old = json.loads(path.read_text())
    if old != settings:
        changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        names = ", ".join((explain or {}).get(k, k) for k in changed)
        raise ValueError(f"{out_dir} holds {what} made with other settings than these ({names} differ from "
                         f"{path}); pass overwrite=True to recompute them, or choose another {option}")
