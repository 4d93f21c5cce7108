"""The ``NAME:key=value,...`` settings of the benchmark scripts' command lines, and their rows files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml


def parse_setting(text: str) -> tuple[str, dict]:
    """``NAME:key=value,...`` -> (NAME, {key: value}), each value read as YAML; keys are
    config fields, dotted for nested ones (``loss.w_self=0.5``). A value may hold commas
    (``split=[train,train_single]``): an item starts only where ``key=`` follows a comma."""
    name, _, body = text.partition(":")
    items = filter(None, re.split(r",(?=[\w.]+=)", body))
    return name, {k: yaml.safe_load(v) for k, _, v in (item.partition("=") for item in items)}


def rows_done(path: Path) -> set[tuple]:
    """(setting, variant, seed) of every row already in the JSON-lines file ``path``."""
    return {(r["setting"], r["variant"], r["seed"]) for r in map(json.loads, path.open())} if path.is_file() else set()


def append_row(path: Path, row: dict) -> None:
    """One JSON line more in ``path`` (a row there is never recomputed)."""
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
