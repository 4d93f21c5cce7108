"""Checkpoints of a training run: ``save_checkpoint`` / ``load_checkpoint`` (model, optimizer,
scheduler, epoch, step, the RNG states of every rank, the config; written atomically
through ``atomic_torch_save``)."""

from __future__ import annotations

import errno
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist
from torch import nn

from wsss.distributed import all_gather_objects, barrier, is_main, unwrap
from wsss.files import atomic_path, remove_stale_tmp

log = logging.getLogger(__name__)


class WeightsError(RuntimeError):
    """Weights that do not fit the model they are loaded into (the CLI prints one line)."""


def load_weights(module: nn.Module, state: dict, source, what: str) -> None:
    """``module.load_state_dict(state)``, strictly; weights that do not fit raise one short
    RuntimeError naming ``source`` and counting the keys (not torch's line per tensor)."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        example = (f"{shapes[0]} is {tuple(state[shapes[0]].shape)} there, {tuple(own[shapes[0]].shape)} here"
                   if shapes else f"{(missing or unexpected)[0]!r} is {'missing' if missing else 'unexpected'}")
        raise WeightsError(f"weights in {source} do not fit the {what}: {len(shapes)} tensor(s) of another shape, "
                           f"{len(missing)} missing, {len(unexpected)} unexpected (e.g. {example}); they are "
                           f"from another architecture: pass weights of this one")
    module.load_state_dict(state)


def rng_state() -> dict:
    """The RNG states of this process, as tensors and plain Python (loadable with weights_only)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def save_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    scheduler, epoch: int, step: int, cfg: dict | None, extra: dict | None = None) -> Path:
    """Write a resumable checkpoint atomically (tmp file + os.replace; a crash mid-write
    leaves the previous checkpoint intact).

    Holds the model state (unwrapped from DDP), optimizer and scheduler states, ``epoch``
    (epochs completed), ``step`` (optimizer steps taken), the RNG states of every rank, the
    config as a dict and ``extra`` (plain Python / tensors only). A collective in a
    multi-process job: every rank calls it, rank 0 writes.
    """
    rngs = all_gather_objects(rng_state())
    if is_main():
        atomic_torch_save({
            "model": unwrap(model).state_dict(),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "epoch": int(epoch),
            "step": int(step),
            "rng": rngs,
            "cfg": cfg,
            "extra": extra or {},
            "torch_version": str(torch.__version__),
        }, path)
    barrier()
    return Path(path)


def atomic_torch_save(obj, path: str | Path) -> None:
    """torch.save through ``wsss.files.atomic_path`` (flushed to disk before the rename);
    temporary files that an interrupted earlier write (SIGKILL) left beside ``path`` are
    removed first."""
    path = Path(path)
    remove_stale_tmp(path.parent, path.name)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        try:
            torch.save(obj, f)
        except RuntimeError as err:  # torch's zip writer reports a failed write as "enforce fail ..."
            if "PytorchStreamWriter" not in str(err) and "inline_container" not in str(err):
                raise
            free = shutil.disk_usage(path.parent).free
            raise OSError(errno.ENOSPC if free < 64 << 20 else errno.EIO,
                          f"torch could not write the file ({free >> 20} MiB free)", str(path)) from None
        f.flush()
        os.fsync(f.fileno())


def load_checkpoint(path: str | Path, model: nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None,
                    scheduler=None, *, map_location: str | torch.device = "cpu", restore_rng: bool = True,
                    before_load=None) -> dict:
    """Restore what ``save_checkpoint`` wrote into the given objects; returns the checkpoint
    dict (``epoch``, ``step``, ``cfg``, ``extra``, ...). RNG states are restored for this
    rank (rank 0's when the world size changed). ``before_load(ckpt)`` runs first (it may
    refuse the checkpoint before anything is loaded)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the path and the fix
        raise RuntimeError(f"could not read checkpoint {path} ({type(e).__name__}: {e}); "
                           f"it may be truncated or from another program: delete it to start over") from e
    if before_load is not None:
        before_load(ckpt)
    if model is not None:
        load_weights(unwrap(model), ckpt["model"], path, "model of this run")
    if optimizer is not None and ckpt.get("optimizer") is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
    if scheduler is not None and ckpt.get("scheduler") is not None:
        scheduler.load_state_dict(ckpt["scheduler"])
    if restore_rng and ckpt.get("rng"):
        rank = tdist.get_rank() if tdist.is_available() and tdist.is_initialized() else 0
        rngs = ckpt["rng"]
        if len(rngs) != (tdist.get_world_size() if tdist.is_available() and tdist.is_initialized() else 1):
            log.warning("%s was written by %d process(es); restoring rank 0's RNG state", path, len(rngs))
            rank = 0
        set_rng_state(rngs[rank])
    return ckpt
