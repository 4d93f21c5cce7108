"""Stage configs: dataclass <-> dict / YAML / argparse, one generic implementation.

Every pipeline stage has one typed config dataclass. This module turns
such a dataclass into command-line flags (``add_arguments`` / ``from_args``), reads it from
a dict or a YAML file with strict key checking (``from_dict`` / ``load_yaml``) and writes it
back (``to_dict`` / ``save_yaml``). Nested dataclasses (e.g. ``ClassifierConfig.loss``) are
supported: in dicts either as a nested mapping ``{"loss": {"w_con": 0.5}}`` or as a dotted
key ``{"loss.w_con": 0.5}`` (handy for flat papermill parameters); on the command line as
``--loss.w-con 0.5`` and ``--loss.contrastive / --no-loss.contrastive``.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from wsss.files import write_text

__all__ = ["ConfigError", "to_dict", "from_dict", "save_yaml", "load_yaml", "command_line", "add_arguments", "from_args"]


class ConfigError(ValueError):
    """A config value or key that does not fit the dataclass; the message lists what would."""


def setting(default=dataclasses.MISSING, help: str = "", *, allowed: str | None = None, factory=None):
    """A config field with everything about it in one place: its default (or ``factory``
    for a mutable one; neither: required), its flag help, and the values ``allowed`` for a
    number (">= 1", "> 0", "[0, 1]", "(0, 1]"; a sequence: each item), checked by
    ``from_dict`` for YAML, flags and papermill parameters alike before any work starts."""
    meta = {"help": help, "allowed": allowed}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# --------------------------------------------------------------------------- type helpers

def _strip_optional(tp) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); anything else -> (tp, False)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _sequence_item_type(tp):
    """``tuple[int, ...]`` / ``list[int]`` -> int; None when ``tp`` is not such a sequence."""
    origin = typing.get_origin(tp)
    if origin in (tuple, list):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return args[0] if args else str
    return None


#: Words that mean None for an optional field, in YAML, flags and papermill parameters alike.
NONE_WORDS = ("none", "null")


def _coerce(value, tp, where: str):
    """Check ``value`` against annotation ``tp`` and convert the harmless mismatches
    (YAML's "1e-3" string for a float, a list for a tuple, an int for a float, a Path for a str)."""
    inner, optional = _strip_optional(tp)
    if optional and isinstance(value, str) and value.lower() in NONE_WORDS:
        value = None  # YAML reads `none` as a string; flags and papermill parameters may pass "null"
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: None is not allowed (expected {getattr(inner, '__name__', inner)})")
    if typing.get_origin(inner) is Literal:
        choices = typing.get_args(inner)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}")
        return value
    item = _sequence_item_type(inner)
    if item is not None:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            value = [value]
        seq = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(seq) if typing.get_origin(inner) is tuple else seq
    if inner is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if inner in (int, float):
        what, accepted = ("an integer", (int, str)) if inner is int else ("a number", (int, float, str))
        if isinstance(value, bool) or not isinstance(value, accepted):
            raise ConfigError(f"{where}: expected {what}, got {value!r}")
        try:
            return inner(value)
        except ValueError:
            raise ConfigError(f"{where}: expected {what}, got {value!r}") from None
    if inner is str:
        if isinstance(value, (str, Path)):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


# --------------------------------------------------------------------------- dict / yaml

def to_dict(cfg) -> dict:
    """The config as plain YAML/JSON-ready Python (tuples become lists, paths strings)."""

    def plain(v):
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    return plain(cfg)


def merge(base: Mapping, top: Mapping, *, skip_none: bool = False) -> dict:
    """``top`` over ``base``, nested mappings merged key by key (copies; neither is changed).
    ``skip_none``: a None in ``top`` leaves the value alone (a parameter left at None)."""
    out = dict(base)
    for key, value in top.items():
        if value is None and skip_none:
            continue
        if isinstance(value, Mapping):
            below = out.get(key)
            out[key] = merge(below if isinstance(below, Mapping) else {}, value, skip_none=skip_none)
        else:
            out[key] = value
    return out


def nest_dotted(data: dict) -> dict:
    """{"loss.w_con": 1} -> {"loss": {"w_con": 1}} (merged with an existing nested mapping)."""
    out: dict = {}
    for key, value in data.items():
        if isinstance(key, str) and "." in key:
            head, rest = key.split(".", 1)
            sub = out.setdefault(head, {})
            if not isinstance(sub, dict):
                raise ConfigError(f"key {key!r} conflicts with a non-mapping value for {head!r}")
            sub.update(nest_dotted({rest: value}))
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key].update(value)
        else:
            out[key] = value
    return out


def valid_keys(cls) -> list[str]:
    """Every key ``from_dict(cls, ...)`` accepts, nested fields dotted."""
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        inner, _ = _strip_optional(hints[f.name])
        keys += [f"{f.name}.{k}" for k in valid_keys(inner)] if _is_dataclass_type(inner) else [f.name]
    return keys


def _in_range(value: float, spec: str) -> bool:
    if spec[0] in "<>":
        op = spec[:2] if spec[1] == "=" else spec[0]
        bound = float(spec[len(op):])
        return {">=": value >= bound, ">": value > bound, "<=": value <= bound, "<": value < bound}[op]
    lo, hi = (float(x) for x in spec[1:-1].split(","))
    return (lo <= value if spec[0] == "[" else lo < value) and (value <= hi if spec[-1] == "]" else value < hi)


def check_range(cls_name: str, name: str, value, spec: str | None, flag: str) -> None:
    """Raise a ConfigError naming the field, its ``flag``, the value and the allowed range ``spec``."""
    if spec is None or value is None or isinstance(value, (str, bool)):
        return
    items = value if isinstance(value, (list, tuple)) else [value]
    bad = [v for v in items if isinstance(v, (int, float)) and not _in_range(float(v), spec)]
    if bad:
        rule = f"lie in {spec}" if spec[0] in "[(" else f"be {spec}"
        raise ConfigError(f"{cls_name}.{name} ({flag}) = {value!r}: must {rule}"
                          + (f"; {bad[0]!r} is not" if isinstance(value, (list, tuple)) else ""))


def from_dict(cls, data: dict | None, *, base=None, prefix: str = ""):
    """Build ``cls`` from a mapping, rejecting unknown keys with a message listing the valid ones.

    Missing keys take the dataclass default, or the value from ``base`` (an instance of
    ``cls``) when given. Values are type-checked against the annotations (see ``_coerce``)
    and their fields' allowed ranges; ``prefix`` is a nested config's place in its parent
    ("loss."), for the flag a message names.
    """
    data = nest_dotted(dict(data or {}))
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in data if k not in fields)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} for {cls.__name__}; valid keys: {', '.join(valid_keys(cls))}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, f in fields.items():
        inner, _ = _strip_optional(hints[name])
        base_value = getattr(base, name) if base is not None else None
        if _is_dataclass_type(inner):
            sub = data.get(name)
            if sub is not None and not isinstance(sub, dict) and not dataclasses.is_dataclass(sub):
                raise ConfigError(f"{cls.__name__}.{name}: expected a mapping of {inner.__name__} fields, got {sub!r}")
            if dataclasses.is_dataclass(sub):
                sub = to_dict(sub)
            if base_value is None and f.default_factory is not dataclasses.MISSING:
                base_value = f.default_factory()  # a nested default may differ from the inner class's own
            try:
                kwargs[name] = from_dict(inner, sub or {}, base=base_value, prefix=f"{prefix}{name}.")
            except ConfigError as e:
                raise ConfigError(f"in {cls.__name__}.{name}: {e}") from None
        elif name in data:
            kwargs[name] = _coerce(data[name], hints[name], f"{cls.__name__}.{name}")
            check_range(cls.__name__, name, kwargs[name], f.metadata.get("allowed"), _flag(prefix + name))
        elif base is not None:
            kwargs[name] = base_value
    missing = [n for n, f in fields.items()
               if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{cls.__name__} needs a value for {missing}")
    return cls(**kwargs)


def save_yaml(cfg, path: str | Path) -> Path:
    """Write the config as YAML (atomically: a crash never leaves half a file)."""
    return write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def read_yaml_mapping(path: str | Path, what: str = "settings") -> dict:
    """The mapping at the top of a YAML file; a missing file, malformed YAML or another
    top-level type is a ConfigError naming the file (and the line)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(err, 'problem', None) or err}); fix the file") \
            from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of {what} at the top level")
    return data


def load_yaml(cls, path: str | Path, *, base=None):
    """Read a config of type ``cls`` from a YAML file (unknown keys are an error)."""
    data = read_yaml_mapping(path, f"{cls.__name__} fields")
    try:
        return from_dict(cls, data, base=base)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


# --------------------------------------------------------------------------- argparse

def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_optional(tp):
    def parse(text: str):
        return None if text.lower() in NONE_WORDS else tp(text)

    parse.__name__ = getattr(tp, "__name__", "value")
    return parse


def add_arguments(parser: argparse.ArgumentParser, cls, *, prefix: str = "", defaults=None) -> None:
    """Add one typed flag per field of ``cls`` (``--field-name``; nested: ``--loss.field-name``).

    Flags default to "not given" (argparse.SUPPRESS) so that ``from_args`` can layer them
    over a ``--config`` YAML file and the dataclass defaults. Booleans get
    ``--x / --no-x`` (BooleanOptionalAction), sequences take several values, Literal
    fields become choices, ``X | None`` fields also accept the word ``none``. The help is
    the field's own (``setting``).
    """
    hints = typing.get_type_hints(cls)
    # a stage's own fields first, then the keyword-only ones it inherits (training.TrainingSettings)
    for f in sorted(dataclasses.fields(cls), key=lambda f: f.kw_only is True):
        tp, optional = _strip_optional(hints[f.name])
        dest = prefix + f.name
        if defaults is not None:
            default = getattr(defaults, f.name)
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None if f.default is dataclasses.MISSING else f.default
        if _is_dataclass_type(tp):
            add_arguments(parser, tp, prefix=dest + ".", defaults=default)
            continue
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        text = f.metadata.get("help", "")
        text = f"{text} (required unless in --config)" if required else f"{text} (default: {default})"
        kw: dict = dict(dest=dest, default=argparse.SUPPRESS, help=text.strip())
        item = _sequence_item_type(tp)
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) is Literal:
            choices = typing.get_args(tp)
            kw.update(choices=choices, type=type(choices[0]))
        elif item is not None:
            kw.update(nargs="+", type=item)
        elif tp in (int, float, str):
            kw["type"] = _parse_optional(tp) if optional else tp
        elif tp is dict:
            kw.update(type=yaml.safe_load, metavar="YAML")  # e.g. --classifier '{epochs: 2}'
        else:
            kw["type"] = str
        parser.add_argument(_flag(dest), **kw)


def command_line(parser: argparse.ArgumentParser, cls) -> argparse.ArgumentParser:
    """A stage's command line: ``--config YAML`` plus one typed flag per field of ``cls``
    (``--loss.w-con``, ``--no-amp``, ...) with the fields' own help; read it back with
    ``from_args(cls, args)``."""
    parser.add_argument("--config", default=None, metavar="YAML",
                        help="read settings from a YAML file first; flags given on the command line override it")
    add_arguments(parser, cls)
    return parser


def from_args(cls, args: argparse.Namespace, *, parser: argparse.ArgumentParser | None = None):
    """Build ``cls`` from dataclass defaults, then ``args.config`` (YAML) when given, then the
    flags actually present on the command line. A missing required field is reported through
    ``parser.error`` when a parser is given (a usage message and exit code 2)."""
    given = {k: v for k, v in vars(args).items() if k in set(valid_keys(cls))}
    try:
        config_path = getattr(args, "config", None)
        merged = nest_dotted(read_yaml_mapping(config_path, f"{cls.__name__} fields")) if config_path else {}
        for k, v in nest_dotted(given).items():  # flags over the YAML
            if isinstance(v, dict) and isinstance(merged.get(k), dict):
                merged[k] = {**merged[k], **v}  # flags of a nested section (--loss.w-con) over its YAML keys
            else:
                merged[k] = v
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in merged
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ConfigError(f"the following arguments are required: {', '.join(_flag(m) for m in missing)} "
                              f"(on the command line or in the --config YAML file)")
        return from_dict(cls, merged)
    except ConfigError as e:
        if parser is not None:
            parser.error(str(e))
        raise


#: Settings that change how a run executes, not what it computes: left out when deciding
#: whether a finished stage was trained "with the same settings".
MACHINERY_KEYS = frozenset({"data_root", "run_dir", "workers", "device", "log_every", "ckpt_every", "resume",
                            "amp", "channels_last", "eval_batch_size"})


def config_differences(old: Mapping, new: Mapping, ignore=MACHINERY_KEYS, prefix: str = "") -> list[str]:
    """"key: old -> new" for every setting that differs (nested dicts dotted). ``ignore``d keys
    and keys only one side records (a field added to or removed from a config class since the
    checkpoint was written) are left out."""
    out = []
    for key in sorted(set(old) & set(new)):
        if key in ignore:
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += config_differences(a, b, ignore, f"{prefix}{key}.")
        elif to_dict(a) != to_dict(b):  # tuples equal lists (YAML gives lists, dataclasses tuples)
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out
