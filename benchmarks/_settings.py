"""The ``NAME:key=value,...`` settings of the benchmark scripts' command lines."""

from __future__ import annotations

import re

import yaml


def parse_setting(text: str) -> tuple[str, dict]:
    """``NAME:key=value,...`` -> (NAME, {key: value}), each value read as YAML; keys are
    config fields, dotted for nested ones (``loss.w_self=0.5``). A value may hold commas
    (``split=[train,train_single]``): an item starts only where ``key=`` follows a comma."""
    name, _, body = text.partition(":")
    items = filter(None, re.split(r",(?=[\w.]+=)", body))
    return name, {k: yaml.safe_load(v) for k, _, v in (item.partition("=") for item in items)}
