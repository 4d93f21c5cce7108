"""The steps both training stages share, so that each reads top to bottom as
"finished already? -> start -> data -> model -> schedule -> fit -> summary -> save":

    def _run(cfg, dist, t_start):
        if (done := training.finished(cfg, "classifier", dist)) is not None:
            return done
        device, channels_last = training.start(cfg, "classifier", dist)
        ...data (its train set; training.scale_range, training.val_dataset), model, optimizer...
        scheduler, spe, total = training.schedule(cfg, optimizer, len(train), dist)
        evaluate = training.evaluator(evaluate_map, cfg, val, device, channels_last, dist)
        history = engine.fit(..., evaluate=evaluate, ...)
        metrics = {...its own numbers..., **training.summary(history, t_start, "val/ap")}
        training.save(cfg, "classifier", dist, model, train.class_names, metrics, "val mAP ...")

and ``training.load_trained`` reads the weights back. The loop itself (resume, checkpoints,
DDP) is ``wsss.engine.fit``; where the files go is ``wsss.rundir``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from wsss import checkpoints, distributed, loaders, lr_schedule, provenance
from wsss import config as C
from wsss import rundir as R
from wsss.checkpoints import load_weights
from wsss.data.voc import VOCDataset
from wsss.files import write_json

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class TrainingSettings:
    """The settings both training stages share (each stage's config inherits them)."""

    epochs: int = C.setting(10, "training epochs", allowed=">= 1")
    max_steps: int | None = C.setting(
        None, "stop after this many optimizer steps in all (the lr schedule ends there)", allowed=">= 1")
    momentum: float = C.setting(0.9, "SGD momentum", allowed="[0, 1)")
    weight_decay: float = C.setting(5e-4, "SGD weight decay", allowed=">= 0")
    seed: int = C.setting(0, "seed of model init, data order and augmentation (and the classifier's pairs)",
                          allowed=">= 0")
    workers: int = C.setting(0, "DataLoader worker processes", allowed=">= 0")
    device: str = C.setting("auto", "auto | cpu | cuda[:i]")
    amp: bool = C.setting(True, "bf16 autocast on CUDA")
    channels_last: bool = C.setting(True, "channels_last memory format on CUDA")
    log_every: int = C.setting(20, "progress-bar loss update every N steps", allowed=">= 0")
    ckpt_every: int = C.setting(0, "also checkpoint every N steps (0: once per epoch)", allowed=">= 0")
    resume: bool = C.setting(True, "continue from the run's checkpoint_last.pt when present; keep finished weights "
                                   "trained with the same settings")


def run(cfg, body) -> dict:
    """``body(cfg, dist, t_start)`` inside the process group of a (possibly) distributed run."""
    t_start = time.perf_counter()
    dist = distributed.init_distributed(cfg.device)
    try:
        return body(cfg, dist, t_start)
    finally:
        distributed.cleanup_distributed(dist)


def compare_recorded(path: Path, cfg: dict, inputs=None, normalise=None,
                     ignore=C.MACHINERY_KEYS) -> tuple[dict | None, list[str]]:
    """(what ``path`` holds, what differs from it): the settings recorded in a weights file or
    checkpoint against ``cfg`` ("lr changed"; ``ignore``d keys left out) and its recorded
    inputs against ``inputs``. (None, []) when the file cannot be read, or its settings not
    brought to today's form by ``normalise`` (e.g. keys an older version did not record)."""
    try:
        old = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception:  # noqa: BLE001 - unreadable: made again
        return None, []
    old_cfg = old.get("cfg") or {}
    if normalise is not None:
        try:
            old_cfg = normalise(old_cfg)
        except ValueError:
            return None, []
    changes = [d.split(":")[0] + " changed" for d in C.config_differences(old_cfg, cfg, ignore)]
    # a weights file records its inputs at the top, a checkpoint under "extra"
    recorded_inputs = old["inputs"] if "inputs" in old else (old.get("extra") or {}).get("inputs")
    if recorded_inputs != inputs:
        changes.append("the pseudo-masks changed")
    return old, changes


def finished_metrics(path: str | Path, cfg: dict, inputs=None, normalise=None) -> dict | None:
    """The metrics stored in a stage's final weights file (classifier.pt, segmenter.pt) when
    it was trained with the same settings as ``cfg`` (``wsss.config.config_differences``) on the same
    ``inputs`` (what the stage saved under that key, e.g. its masks' settings), else None.

    A finished stage that runs again must leave its file untouched: later stages remember
    which file their outputs came from and refuse to mix with a rewritten one. ``normalise``
    maps the stored settings to the current form before comparing."""
    path = Path(path)
    if not path.is_file():
        return None
    old, changes = compare_recorded(path, cfg, inputs, normalise)
    return old.get("metrics") if old is not None and not changes else None


#: what a resumed run may change: the machinery (``wsss.config.MACHINERY_KEYS``) and how long it trains
RESUME_FREE_KEYS = C.MACHINERY_KEYS | {"epochs", "max_steps"}


def check_resumable(old: dict | None, new: dict | None, path: Path) -> None:
    """Refuse to resume from a checkpoint written with other settings (only the keys of
    ``RESUME_FREE_KEYS``, e.g. a longer ``epochs``, may change): the weights would be kept
    under the new settings' label."""
    if not old or not new:
        return
    changed = C.config_differences(old, new, ignore=RESUME_FREE_KEYS)
    if changed:
        raise ValueError(f"{path} was written with other settings ({', '.join(changed)}): pass --no-resume "
                         "(resume=False) to train again with the new ones (what was made from the old weights is "
                         "then refused until it is made again), or use another --run-dir")


def finished(cfg, stage: str, dist: distributed.DistInfo, inputs=None, normalise=None) -> dict | None:
    """The stored metrics when RUN's weights were trained with the same settings (and
    ``inputs``) and ``cfg.resume`` is on: then the stage keeps them and does nothing."""
    path = Path(cfg.run_dir) / R.TRAINED[stage]
    done = finished_metrics(path, C.to_dict(cfg), inputs, normalise) if cfg.resume else None
    if done is not None and dist.is_main:
        log.info("%s: %s is already trained with these settings%s; keeping it (pass resume=False to train again)",
                 stage, path, " on these inputs" if inputs is not None else "")
    return done


def state(cfg, stage: str, inputs=None, normalise=None) -> tuple[str, str]:
    """What running the training ``stage`` with ``cfg`` would do to RUN, and why: "keep" (its
    weights were trained with these settings on these ``inputs``), "resume" (from a checkpoint
    of these settings), "recompute" (what is there was made with other settings or inputs;
    ``resume=False`` trains again) or "run" (nothing there yet). Reads RUN only."""
    run_dir, new = Path(cfg.run_dir), C.to_dict(cfg)
    weights, checkpoint = run_dir / R.TRAINED[stage], run_dir / R.TRAINING_STATE[stage]
    if not cfg.resume and (weights.is_file() or checkpoint.is_file()):
        return "recompute", "resume is off"
    if finished_metrics(weights, new, inputs, normalise) is not None:
        return "keep", f"{weights.name} has these settings"
    if checkpoint.is_file():
        old, changes = compare_recorded(checkpoint, new, inputs, ignore=RESUME_FREE_KEYS)
        if old is None:
            return "recompute", f"{checkpoint.name} cannot be read"
        if old.get("epoch", 0) > cfg.epochs or (cfg.max_steps is not None and old.get("step", 0) > cfg.max_steps):
            changes.append(f"more done ({old.get('epoch')} epochs, {old.get('step')} steps) than asked")
        if changes:
            return "recompute", ", ".join(changes)
        return "resume", f"from {checkpoint.name} after {old.get('epoch', 0)} epoch(s)"
    if weights.is_file():
        old, changes = compare_recorded(weights, new, inputs, normalise)
        if old is None:
            return "recompute", f"{weights.name} cannot be read with this version"
        return "recompute", ", ".join(changes) or f"{weights.name} records no metrics"
    return "run", "nothing trained yet"


def start(cfg, stage: str, dist: distributed.DistInfo):
    """(device, channels_last); the main process creates RUN and records the config and provenance."""
    device = distributed.resolve_device(cfg.device, dist.local_rank)
    if dist.is_main:  # the config's write creates RUN (wsss.files.atomic_path makes the parent folders)
        C.save_yaml(cfg, Path(cfg.run_dir) / R.CONFIGS[stage])
        provenance.record(cfg.run_dir, stage, str(device))
    return device, distributed.use_channels_last(device, cfg.channels_last)


def schedule(cfg, optimizer, num_items: int, dist: distributed.DistInfo, **kwargs):
    """(scheduler, steps per epoch, total steps) of ``cfg.schedule`` over ``cfg.epochs`` (or ``cfg.max_steps``)."""
    spe = loaders.steps_per_epoch(num_items, cfg.batch_size, dist.world_size)
    total = loaders.total_steps(cfg.epochs, spe, cfg.max_steps)
    scheduler = lr_schedule.build_scheduler(optimizer, schedule=cfg.schedule, total_steps=total, steps_per_epoch=spe,
                                  step_epochs=cfg.step_epochs, **kwargs)
    return scheduler, spe, total


def evaluator(score, cfg, val, device, channels_last: bool, dist: distributed.DistInfo, collate_fn=None, **kwargs):
    """engine.fit's ``evaluate(model, epoch)``: ``score(model, loader, device, **kwargs)`` (a
    wsss.evaluation function) over the val set ``val``; None when there is none."""
    if val is None:
        return None
    loader = loaders.make_eval_loader(val, cfg.eval_batch_size, dist=dist, workers=cfg.workers, collate_fn=collate_fn)
    return lambda model, epoch: score(model, loader, device, amp=cfg.amp, channels_last=channels_last, **kwargs)


def summary(history: list[dict], t_start: float, per_class: str) -> dict:
    """What every training stage reports: epochs, steps, the last losses, time, and the
    history without its per-class list ``per_class`` (kept in the stage's own keys)."""
    last = history[-1] if history else {}
    finished_epochs = [r for r in history if float(r["epoch"]).is_integer()]
    return {
        "epochs": last.get("epoch", 0),
        "steps": last.get("step", 0),
        "train_loss": {k[len("loss/"):]: v for k, v in last.items() if k.startswith("loss/")},
        "seconds_per_epoch": float(np.mean([r["seconds"] for r in finished_epochs])) if finished_epochs else None,
        "seconds": time.perf_counter() - t_start,
        "history": [{k: v for k, v in r.items() if k != per_class} for r in history],
    }


def save(cfg, stage: str, dist: distributed.DistInfo, model, class_names: list[str], metrics: dict, headline: str,
         **record) -> None:
    """RUN's weights (the model, its config, the ``class_names`` it was trained on and their
    number, ``record``, the metrics) and metrics file, written by the main process; every
    process waits for them."""
    if dist.is_main:
        run_dir = Path(cfg.run_dir)
        weights = {"model": model.state_dict(), "cfg": C.to_dict(cfg), "class_names": list(class_names),
                   "num_classes": len(class_names), **record, "metrics": metrics}
        checkpoints.atomic_torch_save(weights, run_dir / R.TRAINED[stage])
        write_json(run_dir / R.METRICS[stage], metrics)
        log.info("%s done: %s, %s", stage, headline, run_dir / R.TRAINED[stage])
    distributed.barrier()


def scale_range(cfg) -> tuple[float, float] | None:
    """``cfg.scale`` as the (low, high) random rescale range; None when off (empty or 1.0 1.0)."""
    scale = tuple(cfg.scale) if cfg.scale else None
    if scale is not None and len(scale) != 2:
        raise ValueError(f"scale must be two numbers (low high), got {cfg.scale}")
    return None if scale == (1.0, 1.0) else scale


def val_dataset(cfg, transforms, train, with_mask: bool):
    """The checked ``cfg.val_split`` (None when it is off), with the classes of ``train``."""
    if not cfg.val_split:
        return None
    val = VOCDataset(cfg.data_root, cfg.val_split, transforms=transforms, with_mask=with_mask)
    val.check_files()
    if val.num_classes != train.num_classes:
        raise ValueError(f"{cfg.val_split} has {val.num_classes} classes but {train.split} has {train.num_classes}")
    return val


def load_trained(run_dir_or_path, stage: str, cls, build_model, device, arch: str, **changes):
    """The model of RUN's trained ``stage`` (``build_model(cfg, num_classes)`` with its weights;
    ``cfg`` is the stored ``cls`` config with ``changes``; its field ``arch`` names the
    architecture in a mismatch message), in eval mode on ``device``, with ``.class_names``
    and ``.train_config`` attached."""
    path = R.trained(run_dir_or_path, stage)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    cfg = dataclasses.replace(C.from_dict(cls, ckpt["cfg"]), **changes)
    model = build_model(cfg, int(ckpt["num_classes"]))
    load_weights(model, ckpt["model"], path, f"{stage} its config describes ({getattr(cfg, arch)})")
    device = distributed.resolve_device(device) if isinstance(device, str) else device
    model.to(device).eval()
    model.class_names = list(ckpt["class_names"])
    model.train_config = cfg
    return model
