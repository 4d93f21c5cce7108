"""Stage 5: evaluation of maps, pseudo masks and the segmenter (METHOD.md sections 2-4).

``run(cfg)`` evaluates the parts found in (or asked of) a run directory with
``wsss.evaluation`` (how each is scored: its docstring) and merges the results into
RUN/metrics.json under the keys "maps", "pseudo" and "segmenter".
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from wsss import config as C
from wsss import distributed, provenance
from wsss import rundir as R
from wsss.crf import CRF_REFERENCE_SIZE, CRFParams
from wsss.evaluation import DEFAULT_THRESHOLDS, evaluate_maps, evaluate_masks, evaluate_segmenter
from wsss.files import check_current, fingerprint, write_json
from wsss.stages import train_segmenter

log = logging.getLogger(__name__)

PARTS = ("maps", "pseudo", "segmenter")


def load_segmenter(run_dir, device):
    """The trained segmenter of a run (the segmenter stage's loader; a name tests can replace)."""
    return train_segmenter.load_segmenter(run_dir, device)


@dataclass
class EvalConfig:
    """Settings of the evaluation stage.

    ``parts``: any of "maps", "pseudo", "segmenter"; "auto" evaluates those whose inputs
    exist in the run directory (naming a part whose input is missing is an error).
    ``maps_dir`` / ``pseudo_dir``: folders inside ``run_dir`` (or absolute paths).
    ``thresholds``: background thresholds swept for the maps. ``crf``, ``crf_params``,
    ``crf_scale`` (spatial widths x max(H, W) / 500 per image), ``scales``, ``flip``: how
    the segmenter is tested (reference: scales 0.5-1.5, flips and a CRF). ``allow_missing``:
    evaluate only the images that have maps / pseudo masks. ``limit``: only the first N
    images of the segmenter's split. A part whose inputs and settings are those recorded
    in RUN/metrics.json keeps its numbers unless ``overwrite``.
    """

    data_root: str = C.setting(help="dataset root in VOC layout")
    run_dir: str = C.setting(help="run directory (maps/, pseudo/, segmenter.pt; metrics.json is written here)")
    parts: tuple[str, ...] = C.setting(("auto",), "what to evaluate: maps pseudo segmenter, or auto (whatever exists)")
    maps_split: str = C.setting("train", "split of the localization maps")
    maps_dir: str = C.setting(R.MAPS, "maps folder inside the run directory")
    pseudo_split: str = C.setting("train", "split of the pseudo masks")
    pseudo_dir: str = C.setting(R.PSEUDO, "pseudo-mask folder inside the run directory")
    seg_split: str = C.setting("val", "split the segmenter is tested on")
    thresholds: tuple[float, ...] = C.setting(
        DEFAULT_THRESHOLDS, "background thresholds swept for the maps", allowed="[0, 1]")
    crf: bool = C.setting(True, "also report the segmenter's mIoU after a dense CRF")
    crf_params: CRFParams = C.setting(factory=CRFParams)
    crf_scale: bool = C.setting(
        True, f"scale the CRF spatial widths by max(H, W) / {CRF_REFERENCE_SIZE} per image (as pseudo masks do)")
    scales: tuple[float, ...] = C.setting((1.0,), "test scales of the segmenter", allowed="> 0")
    flip: bool = C.setting(False, "average the segmenter over horizontal flips")
    device: str = C.setting("auto", "auto | cpu | cuda[:i]")
    amp: bool = C.setting(True, "bf16 autocast on CUDA for the segmenter")
    allow_missing: bool = C.setting(False, "evaluate only the images that have maps / pseudo masks")
    limit: int | None = C.setting(None, "only the first N images of the segmenter's split", allowed=">= 0")
    overwrite: bool = C.setting(False, "evaluate again the parts whose inputs and settings are unchanged")


def _inputs(cfg: EvalConfig) -> dict[str, Path]:
    run_dir = Path(cfg.run_dir)
    return {"maps": run_dir / cfg.maps_dir, "pseudo": run_dir / cfg.pseudo_dir, "segmenter": run_dir / R.SEGMENTER}


def _recorded(part: str, path: Path) -> dict | None:
    """What the output ``part`` at ``path`` records about its inputs (None if nothing)."""
    if part == "segmenter":
        try:
            # mmap: only the small "inputs" entry is read, not the weights load_segmenter reads next
            return torch.load(path, map_location="cpu", weights_only=False, mmap=True).get("inputs")
        except Exception:  # noqa: BLE001 - unreadable: load_segmenter says so, with the fix
            return None
    settings = path / R.SETTINGS
    return json.loads(settings.read_text()) if settings.is_file() else None


#: the settings each part's numbers depend on
PART_SETTINGS = {"maps": ("maps_split", "maps_dir", "thresholds", "allow_missing"),
                 "pseudo": ("pseudo_split", "pseudo_dir", "allow_missing"),
                 "segmenter": ("seg_split", "crf", "crf_params", "crf_scale", "scales", "flip", "limit")}


def made_from(cfg: EvalConfig, part: str, path: Path) -> dict:
    """What a part's numbers are made from: its settings and its input (the segmenter's file,
    or the maps / masks folder's settings and file count), recorded beside the numbers."""
    if part == "segmenter":
        source = fingerprint(path.parent, path.name)
    else:
        files = path.glob("*.npz" if part == "maps" else "*.png")
        source = {"settings": _recorded(part, path), "files": sum(1 for _ in files)}
    return {"settings": {k: C.to_dict(getattr(cfg, k)) for k in PART_SETTINGS[part]}, "input": source}


def state(cfg: EvalConfig | dict) -> tuple[str, str]:
    """What ``run(cfg)`` would do ("keep", "recompute" or "run") and why; reads RUN only."""
    cfg = C.from_dict(EvalConfig, cfg) if isinstance(cfg, dict) else cfg
    try:
        parts = choose_parts(cfg)
    except FileNotFoundError:
        return "run", "nothing to evaluate yet"
    stored, inputs = _read_metrics(Path(cfg.run_dir) / R.SUMMARY), _inputs(cfg)
    new = [p for p in parts if _made_from(stored, p) is None]
    changed = [p for p in parts if p not in new and _made_from(stored, p) != _json(made_from(cfg, p, inputs[p]))]
    if changed:
        return "recompute", ", ".join(changed) + " changed"
    return ("run", "not evaluated yet: " + ", ".join(new)) if new else ("keep", "inputs and settings equal")


def _made_from(metrics: dict, part: str) -> dict | None:
    """What the numbers of ``part`` in a metrics.json were made from (None: not recorded)."""
    entry = metrics.get(part)
    return entry.get("made_from") if isinstance(entry, dict) else None


def _json(obj):
    """``obj`` as it reads back from metrics.json (tuples as lists)."""
    return json.loads(json.dumps(obj))


def _has_input(part: str, path: Path) -> bool:
    if part == "segmenter":
        return path.is_file()
    return path.is_dir() and any(path.glob("*.npz" if part == "maps" else "*.png"))


def choose_parts(cfg: EvalConfig) -> list[str]:
    """The parts to evaluate: those asked for, or with "auto" those whose inputs exist."""
    asked = list(dict.fromkeys(cfg.parts))
    unknown = sorted(set(asked) - set(PARTS) - {"auto"})
    if unknown or not asked:
        raise ValueError(f"parts={list(cfg.parts)}: choose from {list(PARTS)} or 'auto'")
    inputs = _inputs(cfg)
    if "auto" in asked:
        found = [p for p in PARTS if _has_input(p, inputs[p])]
        if not found:
            looked = ", ".join(str(p) for p in inputs.values())
            raise FileNotFoundError(f"nothing to evaluate in {cfg.run_dir}: none of {looked} exists; run the maps, "
                                    f"pseudo-mask or segmenter stage first")
        return found
    for part in asked:
        if not _has_input(part, inputs[part]):
            raise FileNotFoundError(f"parts includes {part!r} but {inputs[part]} is missing or empty: run that "
                                    f"stage first, or leave {part!r} out")
    return asked


def _read_metrics(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}): delete or fix it, then re-run") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object: delete it, then re-run")
    return data


def write_metrics(run_dir, results: dict) -> dict:
    """Merge ``results`` (top-level keys replaced) into RUN/metrics.json, atomically."""
    path = Path(run_dir) / R.SUMMARY
    merged = {**_read_metrics(path), **results}
    write_json(path, merged)
    return merged


def run(cfg: EvalConfig | dict) -> dict:
    """Evaluate the chosen parts, merge them into RUN/metrics.json, and return the results
    of this call ({part: metrics}); the settings go to RUN/config_evaluate.yaml."""
    cfg = C.from_dict(EvalConfig, cfg) if isinstance(cfg, dict) else cfg
    parts = choose_parts(cfg)
    inputs = _inputs(cfg)
    run_dir = Path(cfg.run_dir)
    writable = os.access(run_dir, os.W_OK)
    if writable:
        C.save_yaml(cfg, run_dir / R.EVALUATE_CONFIG)
        provenance.record(run_dir, "evaluate")
    else:
        log.warning("%s is read-only: the metrics are computed and returned but not saved to %s", run_dir,
                    R.SUMMARY)
    results: dict = {}
    stored, kept = _read_metrics(run_dir / R.SUMMARY), []
    for part in parts:
        check_current(_recorded(part, inputs[part]), run_dir, f"the {part} in {inputs[part]}",
                      "bring the run up to date first (python -m wsss pipeline with the run's config recomputes "
                      "the stages from the changed one on)")
        source = _json(made_from(cfg, part, inputs[part]))
        if not cfg.overwrite and _made_from(stored, part) == source:
            log.info("%s: evaluated already from these inputs with these settings; kept (--overwrite evaluates "
                     "again)", part)
            results[part] = stored[part]
            kept.append(part)
            continue
        t0 = time.perf_counter()
        if part == "maps":
            res = evaluate_maps(cfg.data_root, cfg.maps_split, inputs["maps"], cfg.thresholds,
                                allow_missing=cfg.allow_missing)
        elif part == "pseudo":
            res = evaluate_masks(cfg.data_root, cfg.pseudo_split, inputs["pseudo"], allow_missing=cfg.allow_missing)
        else:
            model = load_segmenter(run_dir, distributed.resolve_device(cfg.device))
            res = evaluate_segmenter(model, cfg.data_root, cfg.seg_split, crf=cfg.crf, scales=cfg.scales,
                                     flip=cfg.flip, crf_params=cfg.crf_params, crf_scale=cfg.crf_scale,
                                     limit=cfg.limit, amp=cfg.amp)
        res["seconds"] = round(time.perf_counter() - t0, 3)
        res["made_from"] = source
        results[part] = res
        crf_note = f", with CRF {res['miou_crf']:.4f}" if res.get("miou_crf") is not None else ""
        log.info("%s: mIoU %s%s%s", part, f"{res['miou']:.4f}" if res["miou"] is not None else "n/a",
                 f" at threshold {res['best_threshold']}" if part == "maps" else "", crf_note)
    if writable and any(p not in kept for p in results):
        write_metrics(run_dir, results)
    return results


# =========================================================================== command line

