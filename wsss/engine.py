"""The training loop shared by the classifier and segmentation stages (no framework):
``train_one_epoch`` and ``fit`` (resume from RUN/checkpoint_last.pt, the non-finite loss
guard, one JSON line per epoch in RUN/log.jsonl). What it is built from has its own module:
devices and processes (``wsss.distributed``), seeds and loaders (``wsss.loaders``, with the
reproducibility contract that makes a resumed run end with the weights of an uninterrupted
one), learning rates (``wsss.lr_schedule``) and checkpoints (``wsss.checkpoints``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from wsss import rundir
from wsss.checkpoints import load_checkpoint, save_checkpoint, set_rng_state
from wsss.distributed import DistInfo, all_reduce_flag, all_reduce_mean, autocast, is_main, to_device, unwrap
from wsss.loaders import derive_seed, make_train_loader, seed_everything, steps_per_epoch, total_steps
from wsss.progress import progress

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """A NaN/inf loss: training stopped before the update, the last good checkpoint kept.

    ``step`` and ``epoch`` count from 1 (the step that failed), ``terms`` names the
    non-finite loss terms, ``checkpoint`` is the kept checkpoint (None if none was written)."""

    def __init__(self, *, step: int, epoch: int, terms: list[str], values: dict[str, float], run_dir,
                 checkpoint: Path | None):
        self.step, self.epoch, self.terms, self.values = step, epoch, terms, values
        self.run_dir, self.checkpoint = run_dir, checkpoint
        kept = (f"the last good checkpoint is kept unchanged at {checkpoint}" if checkpoint is not None
                else "no checkpoint had been written yet")
        shown = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
        super().__init__(
            f"non-finite loss at step {step} (epoch {epoch}) in run {run_dir}: term(s) {terms} "
            f"are NaN/inf ({shown}). Training stopped before this update; {kept}. "
            f"Suggestions: lower the learning rate (lr), disable mixed precision (amp=False / --no-amp), "
            f"or switch the offending loss term off; rerunning the same run directory resumes from "
            f"the last good checkpoint (resume=False or a new run_dir starts over).")


def check_finite(terms: dict[str, torch.Tensor]) -> list[str]:
    """Names of the non-finite loss terms (one device sync for the common all-finite case);
    agreed across ranks, so that every rank stops at the same step."""
    tensors = [torch.as_tensor(v).detach().float().reshape(-1) for v in terms.values()]
    ok = bool(torch.isfinite(torch.cat(tensors)).all()) if tensors else True
    if all_reduce_flag(not ok):
        bad = [k for k, v in terms.items() if not bool(torch.isfinite(torch.as_tensor(v)).all())]
        return bad or ["(another rank)"]
    return []


@dataclass
class TrainState:
    """Progress of a run: ``epoch`` epochs completed plus ``batch_in_epoch`` batches of the next."""

    epoch: int = 0
    step: int = 0
    batch_in_epoch: int = 0
    sums: dict = field(default_factory=dict)  # running per-term sums of the current epoch
    count: int = 0
    history: list = field(default_factory=list)  # one record per finished epoch


StepFn = Callable[[nn.Module, dict, int], dict]


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, scheduler,
                    step_fn: StepFn, state: TrainState, *, device: torch.device, total_steps: int, epoch_len: int,
                    amp: bool = True, channels_last: bool = False, log_every: int = 20,
                    run_dir: Path | None = None, checkpoint_fn: Callable[[], Path | None] | None = None,
                    ckpt_every: int = 0, skip_rng: dict | None = None, desc: str = "train") -> None:
    """One pass over ``loader``: forward (``step_fn(model, batch, epoch)`` -> dict of loss
    terms with "total"), the non-finite guard, backward, optimizer and scheduler steps.

    Updates ``state`` in place (step, batch_in_epoch, per-term sums). Stops early when
    ``state.step`` reaches ``total_steps``. ``epoch_len`` is the number of batches of a
    whole epoch; on a mid-epoch resume ``loader`` starts at batch ``state.batch_in_epoch``
    (see ``make_train_loader(skip_batches=...)``) and ``skip_rng``, the RNG states saved
    with the checkpoint, is restored first.
    """
    model.train()
    bar = progress(total=epoch_len, desc=f"{desc} epoch {state.epoch + 1}", disable=not is_main(),
                   initial=state.batch_in_epoch, leave=False)
    if skip_rng is not None:
        set_rng_state(skip_rng)
    try:
        for batch in loader:
            if state.step >= total_steps:
                break
            batch = to_device(batch, device, channels_last)
            with autocast(device, amp):
                terms = step_fn(model, batch, state.epoch)
            if "total" not in terms:
                raise KeyError(f"step_fn must return a dict with a 'total' loss, got keys {sorted(terms)}")
            if bad := check_finite(terms):
                ckpt = Path(run_dir) / rundir.CHECKPOINT if run_dir is not None else None
                raise NonFiniteLossError(
                    step=state.step + 1, epoch=state.epoch + 1, terms=bad, run_dir=run_dir,
                    values={k: float(torch.as_tensor(v).detach().float().mean()) for k, v in terms.items()},
                    checkpoint=ckpt if ckpt is not None and ckpt.is_file() else None)
            optimizer.zero_grad(set_to_none=True)
            terms["total"].backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            state.step += 1
            state.batch_in_epoch += 1
            state.count += 1
            for k, v in terms.items():
                state.sums[k] = state.sums.get(k, 0.0) + torch.as_tensor(v).detach().float().mean()
            bar.update(1)
            if log_every and state.step % log_every == 0 and is_main():
                bar.set_postfix({k: f"{float(torch.as_tensor(v).detach()):.3f}" for k, v in terms.items()})
            if ckpt_every and checkpoint_fn is not None and state.step % ckpt_every == 0 \
                    and state.batch_in_epoch < epoch_len and state.step < total_steps:
                checkpoint_fn()
    finally:
        bar.close()


def append_log(run_dir: str | Path, record: dict) -> None:
    """Append one JSON line to RUN/log.jsonl (main rank only)."""
    if not is_main():
        return
    path = Path(run_dir) / rundir.LOG
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_log(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / rundir.LOG
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def fit(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, train_set: Dataset, step_fn: StepFn, *,
        run_dir: str | Path, cfg: dict | None, epochs: int, batch_size: int, seed: int, device: torch.device,
        dist: DistInfo | None = None, max_steps: int | None = None, amp: bool = True,
        channels_last: bool = False, workers: int = 0, evaluate: Callable[[nn.Module, int], dict] | None = None,
        log_every: int = 20, ckpt_every: int = 0, resume: bool = True, collate_fn=None,
        extra: dict | None = None, desc: str = "train",
        check_resumable: Callable[[dict | None], None] | None = None) -> list[dict]:
    """Train for ``epochs`` epochs (or until ``max_steps`` optimizer steps), resuming from
    RUN/checkpoint_last.pt when it exists and ``resume`` is True.

    ``model`` may be DDP-wrapped (see ``wrap_ddp``); ``evaluate(plain_model, epoch)`` runs
    after each epoch on every rank and returns scalars for the log. After each epoch the
    checkpoint is written, then one line goes to RUN/log.jsonl with the per-term mean
    losses (``loss/NAME``, averaged over ranks), the learning rates, the eval metrics and
    the seconds taken. Returns the list of epoch records (all epochs, resumed ones included).
    ``check_resumable(checkpoint's cfg)`` may refuse a checkpoint before it is loaded (the
    stage's rule: wsss.stages.training.check_resumable).
    """
    dist = dist or DistInfo()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    spe = steps_per_epoch(len(train_set), batch_size, dist.world_size)
    total = total_steps(epochs, spe, max_steps)
    state = TrainState()
    ckpt_path = run_dir / rundir.CHECKPOINT

    def save() -> Path:
        """RUN/checkpoint_last.pt from the current loop state."""
        now = dict(extra or {}, batch_in_epoch=state.batch_in_epoch, count=state.count, history=state.history,
                   sums={k: float(v) for k, v in state.sums.items()})
        return save_checkpoint(ckpt_path, model, optimizer, scheduler, state.epoch, state.step, cfg, now)

    skip_rng = None
    if ckpt_path.is_file() and resume:
        refuse = (lambda ck: check_resumable(ck.get("cfg"))) if check_resumable is not None else None
        ckpt = load_checkpoint(ckpt_path, model, optimizer, scheduler, map_location="cpu", restore_rng=False,
                               before_load=refuse)
        ex = ckpt.get("extra") or {}
        state.epoch, state.step = ckpt["epoch"], ckpt["step"]
        if state.epoch > epochs or state.step > total:
            raise ValueError(f"{ckpt_path} has {state.epoch} epoch(s) ({state.step} steps) done, more than asked "
                             f"now (epochs={epochs}, {total} steps): resuming would keep the longer training under "
                             f"the new label. Pass --no-resume (resume=False) to train again, or use another --run-dir")
        state.batch_in_epoch, state.count = int(ex.get("batch_in_epoch", 0)), int(ex.get("count", 0))
        state.sums, state.history = dict(ex.get("sums", {})), list(ex.get("history", []))
        if state.batch_in_epoch:
            rank = dist.rank if len(ckpt["rng"]) == dist.world_size else 0
            skip_rng = ckpt["rng"][rank]
        if is_main():
            log.info("resuming %s from %s: %d epoch(s) + %d batch(es) done, step %d", run_dir, ckpt_path,
                     state.epoch, state.batch_in_epoch, state.step)
    elif ckpt_path.is_file() and is_main():
        log.warning("resume=False: %s will be overwritten by this run", ckpt_path)
        if (run_dir / rundir.LOG).is_file():
            (run_dir / rundir.LOG).unlink()

    while state.epoch < epochs and state.step < total:
        epoch = state.epoch
        seed_everything(derive_seed(seed, epoch, dist.rank))
        loader = make_train_loader(train_set, batch_size, seed=seed, epoch=epoch, dist=dist, workers=workers,
                                   collate_fn=collate_fn, pin_memory=device.type == "cuda",
                                   skip_batches=state.batch_in_epoch)
        t0 = time.perf_counter()
        train_one_epoch(model, loader, optimizer, scheduler, step_fn, state, device=device, total_steps=total,
                        epoch_len=spe, amp=amp, channels_last=channels_last, log_every=log_every, run_dir=run_dir,
                        checkpoint_fn=save, ckpt_every=ckpt_every, skip_rng=skip_rng, desc=desc)
        skip_rng = None
        seconds = time.perf_counter() - t0
        finished = state.batch_in_epoch >= spe
        means = all_reduce_mean({k: float(v) / max(1, state.count) for k, v in state.sums.items()})
        record = {"epoch": epoch + 1 if finished else epoch + state.batch_in_epoch / spe,
                  "step": state.step,
                  **{f"loss/{k}": v for k, v in means.items()},
                  **{f"lr/{g.get('name', i)}": g["lr"] for i, g in enumerate(optimizer.param_groups)},
                  "seconds": seconds}
        if evaluate is not None:
            t1 = time.perf_counter()
            record.update(evaluate(unwrap(model), epoch))
            record["eval_seconds"] = time.perf_counter() - t1
        if finished:
            state.epoch, state.batch_in_epoch, state.sums, state.count = epoch + 1, 0, {}, 0
        state.history.append(record)
        save()
        append_log(run_dir, record)
        if is_main():
            log.info("%s epoch %s: %s", desc, record["epoch"],
                     ", ".join(f"{k}={v:.4g}" for k, v in record.items() if isinstance(v, float)))
    return state.history
