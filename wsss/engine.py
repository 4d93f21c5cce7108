"""Training machinery shared by the classifier and segmentation stages (no framework).

Small named functions, read top to bottom:

* devices and numerics: ``seed_everything``, ``resolve_device``, ``autocast`` (bf16 on
  CUDA), ``to_device`` (optionally channels_last);
* distributed data parallel through torchrun: ``init_distributed`` / ``DistInfo``,
  ``is_main``, ``make_train_loader`` (DistributedSampler), ``all_reduce_mean``, ``wrap_ddp``;
* learning rate: ``param_groups`` (pretrained backbone lr, new layers ``new_lr_mult`` x lr),
  ``build_scheduler`` (poly or step decay, a LambdaLR stepped once per optimizer step);
* checkpoints: ``save_checkpoint`` / ``load_checkpoint`` (model, optimizer, scheduler,
  epoch, step, RNG states, config; written atomically);
* the loop: ``train_one_epoch`` and ``fit`` (resume from RUN/checkpoint_last.pt, the
  non-finite loss guard, one JSON line per epoch in RUN/log.jsonl).

Reproducibility contract (what makes an interrupted-then-resumed run end with the same
weights as an uninterrupted one): everything random in epoch ``e`` is derived from
``(seed, e)`` -- the sampler permutation (DistributedSampler, seed + epoch), the partner
draws of PairDataset (``set_epoch``), each item's augmentation (torch's RNG seeded from
(seed, e, index) around ``dataset[index]``, see ``SeededItems``) -- or from ``(seed, e,
rank)``: the DataLoader worker seeds and the global RNGs of the training process
(re-seeded at the start of each epoch, for model-side randomness such as dropout).
Per-item seeding also makes a DDP job see the same augmented global batch as a single
process with the same global batch size. A mid-epoch checkpoint (``ckpt_every``) stores
the RNG states after the last finished step; resuming skips the consumed batches in the
sampler (nothing is loaded twice) and restores those states.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import os
import random
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.distributed import DistributedSampler

from wsss import rundir as R
from wsss.config import MACHINERY_KEYS, config_differences
from wsss.files import atomic_path, remove_stale_tmp
from wsss.progress import progress

log = logging.getLogger(__name__)


# =========================================================================== devices, numerics

def derive_seed(*parts: int) -> int:
    """A 31-bit seed mixed from integers (e.g. seed, epoch, rank), stable across runs."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


def seed_everything(seed: int) -> None:
    """Seed python ``random``, numpy's global RNG and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)  # also seeds all CUDA devices


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` -> cuda:LOCAL_RANK when a GPU is visible, else cpu; ``cpu``; ``cuda[:i]``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"device={name!r} was asked for but torch sees no CUDA GPU "
                               f"(torch {torch.__version__}); use device='cpu' or 'auto'")
        return torch.device(name if ":" in name else f"cuda:{local_rank}")
    if name != "cpu":
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:index]', got {name!r}")
    return torch.device("cpu")


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA when ``enabled``; a no-op context on CPU (where bf16 is slow)."""
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def use_channels_last(device: torch.device, enabled: bool) -> bool:
    """channels_last pays off for convolutions on CUDA only."""
    return bool(enabled) and device.type == "cuda"


def to_device(batch, device: torch.device, channels_last: bool = False):
    """Move every tensor of a (nested dict/list) batch to ``device``; 4-D float tensors
    (images) optionally to channels_last. Strings and numbers pass through."""
    if isinstance(batch, torch.Tensor):
        t = batch.as_subclass(torch.Tensor).to(device, non_blocking=True)
        if channels_last and t.ndim == 4 and t.is_floating_point():
            t = t.contiguous(memory_format=torch.channels_last)
        return t
    if isinstance(batch, dict):
        return {k: to_device(v, device, channels_last) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device, channels_last) for v in batch)
    return batch


# =========================================================================== distributed

@dataclass
class DistInfo:
    """Where this process sits in a (possibly one-process) job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # True when init_distributed created the process group

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun job described by RANK / WORLD_SIZE / LOCAL_RANK (and MASTER_ADDR /
    MASTER_PORT); a single process when WORLD_SIZE is unset or 1.

    Backend: nccl when the job runs on CUDA, gloo otherwise. A process group that already
    exists (created by the caller) is reused and left for the caller to destroy.
    """
    if tdist.is_available() and tdist.is_initialized():
        rank, world = tdist.get_rank(), tdist.get_world_size()
        return DistInfo(rank, world, int(os.environ.get("LOCAL_RANK", rank)), owns_group=False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    on_cuda = device != "cpu" and torch.cuda.is_available()
    if on_cuda:
        torch.cuda.set_device(local_rank)
    tdist.init_process_group(backend="nccl" if on_cuda else "gloo", rank=rank, world_size=world)
    log.info("distributed: rank %d of %d (backend %s)", rank, world, tdist.get_backend())
    return DistInfo(rank, world, local_rank, owns_group=True)


def cleanup_distributed(dist: DistInfo) -> None:
    if dist.owns_group and tdist.is_initialized():
        tdist.destroy_process_group()


def is_main() -> bool:
    """True on rank 0 (and in a single-process run): the rank that logs and writes files."""
    return not (tdist.is_available() and tdist.is_initialized()) or tdist.get_rank() == 0


def barrier() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()


def all_reduce_mean(values: dict[str, float] | float | torch.Tensor):
    """Mean over ranks of logged scalars (a float, a tensor or a dict of them); identity
    in a single process. Returns Python floats."""
    if isinstance(values, dict):
        keys = sorted(values)
        return dict(zip(keys, _mean_over_ranks([float(values[k]) for k in keys])))
    return _mean_over_ranks([float(values)])[0]


def _mean_over_ranks(floats: list[float]) -> list[float]:
    """``floats`` averaged over the ranks in float64 (no collective for an empty list)."""
    t = torch.tensor(floats, dtype=torch.float64)
    if floats and tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1:
        t = t.to(torch.device("cuda", torch.cuda.current_device()) if tdist.get_backend() == "nccl" else "cpu")
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        t = (t / tdist.get_world_size()).cpu()
    return t.tolist()


def all_reduce_flag(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on any rank (so all ranks stop together): the
    mean over ranks of the 0/1 flags is positive."""
    return all_reduce_mean(float(flag)) > 0


def all_gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...]; [obj] in a single process."""
    if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1:
        return [obj]
    out = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def wrap_ddp(model: nn.Module, device: torch.device, dist: DistInfo, find_unused_parameters: bool = True) -> nn.Module:
    """DistributedDataParallel around ``model`` in a multi-process job; ``model`` itself otherwise.

    ``find_unused_parameters`` defaults to True because loss switches (and the contrastive
    warm-up) leave some heads without gradient in some steps.
    """
    if not dist.enabled:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused_parameters)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP (or ``model`` itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# =========================================================================== data loading

def steps_per_epoch(num_items: int, batch_size: int, world_size: int = 1) -> int:
    """Optimizer steps in one epoch: each rank gets floor(N / world) items (the sampler
    drops the tail so all ranks see equal batches) and drops its last partial batch."""
    return (num_items // world_size) // batch_size


class SeededItems(Dataset):
    """``dataset[i]`` drawn with torch's CPU RNG seeded from (seed, epoch, i), inside a
    forked RNG so the caller's stream is untouched.

    Random augmentations (torchvision v2 draws from torch's RNG) then depend on the item
    and the epoch only -- not on the number of workers, the rank, the world size, or
    which batches came before -- so a DDP run sees the same augmented global batch as a
    single process, and a resumed epoch can skip batches without replaying them.
    """

    def __init__(self, dataset: Dataset, seed: int, epoch: int):
        self.dataset, self.seed, self.epoch = dataset, int(seed), int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, self.epoch, int(i), 2))
            return self.dataset[i]


def total_steps(epochs: int, steps_per_epoch: int, max_steps: int | None = None) -> int:
    """Optimizer steps of a whole run: ``epochs`` epochs, capped at ``max_steps`` when given."""
    total = epochs * steps_per_epoch
    return total if max_steps is None else min(total, int(max_steps))


def make_train_loader(dataset: Dataset, batch_size: int, *, seed: int, epoch: int, dist: DistInfo | None = None,
                      workers: int = 0, collate_fn=None, pin_memory: bool = False, skip_batches: int = 0) -> DataLoader:
    """The loader of one training epoch, a function of (seed, epoch, rank) only.

    A DistributedSampler (also in a single process, with one replica) shuffles with
    ``seed + epoch`` and gives each rank an equal share (drop_last); every item is drawn
    under an RNG seeded from (seed, epoch, index) (``SeededItems``); the DataLoader's
    generator, seeded from (seed, epoch, rank), fixes the worker seeds. PairDataset-like
    datasets get ``set_epoch(epoch)``. ``skip_batches`` leaves out the first batches of the
    epoch (they were trained on before an interruption).
    """
    dist = dist or DistInfo()
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    sampler = DistributedSampler(dataset, num_replicas=dist.world_size, rank=dist.rank, shuffle=True,
                                 seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    if len(sampler) < batch_size:
        raise ValueError(f"the training set has {len(dataset)} items, fewer than one batch "
                         f"({batch_size} per process x {dist.world_size} processes); lower batch_size")
    if skip_batches:  # the indices of this epoch after those of the batches already trained on
        sampler = list(sampler)[skip_batches * batch_size:]
    gen = torch.Generator().manual_seed(derive_seed(seed, epoch, dist.rank, 1))
    return DataLoader(SeededItems(dataset, seed, epoch), batch_size=batch_size, sampler=sampler,
                      num_workers=workers, drop_last=True, generator=gen, collate_fn=collate_fn,
                      pin_memory=pin_memory, persistent_workers=False)


def make_eval_loader(dataset: Dataset, batch_size: int, *, dist: DistInfo | None = None, workers: int = 0,
                     collate_fn=None) -> DataLoader:
    """In-order loader over this rank's shard (items rank, rank + world, ...): no padding, no
    duplicates, so gathered predictions cover the split exactly once."""
    dist = dist or DistInfo()
    shard = Subset(dataset, range(dist.rank, len(dataset), dist.world_size)) if dist.enabled else dataset
    gen = torch.Generator().manual_seed(0)
    return DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=workers, generator=gen,
                      collate_fn=collate_fn)


# =========================================================================== learning rate

def param_groups(backbone_params: Iterable[nn.Parameter], new_params: Iterable[nn.Parameter], lr: float,
                 weight_decay: float = 0.0, new_lr_mult: float = 10.0, bias_lr_mult: float = 1.0,
                 biases: Iterable[nn.Parameter] = ()) -> list[dict]:
    """SGD groups (METHOD.md sec 1, reference training): pretrained backbone at ``lr``, new
    layers at ``new_lr_mult * lr``; weight decay on all. With ``bias_lr_mult != 1`` the
    parameters listed in ``biases`` get their own group per part at ``bias_lr_mult`` times
    its lr (the reference: 2x, i.e. 1, 2, 10, 20 x lr, Classifier/scripts/train.py:66-70).
    Frozen parameters are left out."""
    groups = []
    bias_ids = {id(p) for p in biases}
    for name, params, mult in (("backbone", backbone_params, 1.0), ("new", new_params, new_lr_mult)):
        params = [p for p in params if p.requires_grad]
        if bias_lr_mult != 1.0:
            weights = [p for p in params if id(p) not in bias_ids]
            biases_here = [p for p in params if id(p) in bias_ids]
            parts = [(name, weights, mult), (f"{name}_bias", biases_here, mult * bias_lr_mult)]
        else:
            parts = [(name, params, mult)]
        groups += [{"name": n, "params": ps, "lr": lr * m, "weight_decay": weight_decay} for n, ps, m in parts]
    return [g for g in groups if g["params"]]


def lr_factor(step: int, *, schedule: str, total_steps: int, steps_per_epoch: int,
              step_epochs: Sequence[int] = (), gamma: float = 0.1, power: float = 0.9) -> float:
    """Multiplier of the base learning rate after ``step`` optimizer steps.

    poly: (1 - step / total_steps) ** power; step: gamma ** (number of milestones in
    ``step_epochs`` already reached, counted in whole epochs); constant: 1.
    """
    if schedule == "poly":
        return max(0.0, 1.0 - step / max(1, total_steps)) ** power
    if schedule == "step":
        epoch = step // max(1, steps_per_epoch)
        return gamma ** sum(epoch >= int(e) for e in step_epochs)
    if schedule == "constant":
        return 1.0
    raise ValueError(f"schedule must be 'poly', 'step' or 'constant', got {schedule!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, *, schedule: str, total_steps: int, steps_per_epoch: int,
                    step_epochs: Sequence[int] = (), gamma: float = 0.1, power: float = 0.9
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR to be stepped after every optimizer step (see ``lr_factor``)."""
    lr_factor(0, schedule=schedule, total_steps=total_steps, steps_per_epoch=steps_per_epoch)  # validates
    # A partial, not a lambda: picklable, and LambdaLR does not store its arguments in the
    # state dict, so a resumed run follows the schedule of its (possibly longer) config.
    fn = functools.partial(lr_factor, schedule=schedule, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                           step_epochs=tuple(step_epochs), gamma=gamma, power=power)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


# =========================================================================== checkpoints

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
    try:
        old = torch.load(path, map_location="cpu", weights_only=False)
    except Exception:  # unreadable: train again and rewrite it
        return None

    old_cfg = old.get("cfg") or {}
    if normalise is not None:  # e.g. fill keys that an older version did not record
        try:
            old_cfg = normalise(old_cfg)
        except ValueError:
            return None
    same = not config_differences(old_cfg, cfg) and old.get("inputs") == inputs
    return old.get("metrics") if same else None


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
        from wsss.models.backbones import load_weights

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


# =========================================================================== the loop

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
                ckpt = Path(run_dir) / R.CHECKPOINT if run_dir is not None else None
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
    path = Path(run_dir) / R.LOG
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_log(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / R.LOG
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def fit(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, train_set: Dataset, step_fn: StepFn, *,
        run_dir: str | Path, cfg: dict | None, epochs: int, batch_size: int, seed: int, device: torch.device,
        dist: DistInfo | None = None, max_steps: int | None = None, amp: bool = True,
        channels_last: bool = False, workers: int = 0, evaluate: Callable[[nn.Module, int], dict] | None = None,
        log_every: int = 20, ckpt_every: int = 0, resume: bool = True, collate_fn=None,
        extra: dict | None = None, desc: str = "train") -> list[dict]:
    """Train for ``epochs`` epochs (or until ``max_steps`` optimizer steps), resuming from
    RUN/checkpoint_last.pt when it exists and ``resume`` is True.

    ``model`` may be DDP-wrapped (see ``wrap_ddp``); ``evaluate(plain_model, epoch)`` runs
    after each epoch on every rank and returns scalars for the log. After each epoch the
    checkpoint is written, then one line goes to RUN/log.jsonl with the per-term mean
    losses (``loss/NAME``, averaged over ranks), the learning rates, the eval metrics and
    the seconds taken. Returns the list of epoch records (all epochs, resumed ones included).
    """
    dist = dist or DistInfo()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    spe = steps_per_epoch(len(train_set), batch_size, dist.world_size)
    total = total_steps(epochs, spe, max_steps)
    state = TrainState()
    ckpt_path = run_dir / R.CHECKPOINT

    def save() -> Path:
        """RUN/checkpoint_last.pt from the current loop state."""
        now = dict(extra or {}, batch_in_epoch=state.batch_in_epoch, count=state.count, history=state.history,
                   sums={k: float(v) for k, v in state.sums.items()})
        return save_checkpoint(ckpt_path, model, optimizer, scheduler, state.epoch, state.step, cfg, now)

    skip_rng = None
    if ckpt_path.is_file() and resume:
        ckpt = load_checkpoint(ckpt_path, model, optimizer, scheduler, map_location="cpu", restore_rng=False,
                               before_load=lambda ck: _check_resumable(ck.get("cfg"), cfg, ckpt_path))
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
        if (run_dir / R.LOG).is_file():
            (run_dir / R.LOG).unlink()

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


#: what a resumed run may change: the machinery (``wsss.config.MACHINERY_KEYS``) and how long it trains
RESUME_FREE_KEYS = MACHINERY_KEYS | {"epochs", "max_steps"}


def _check_resumable(old: dict | None, new: dict | None, path: Path) -> None:
    """Refuse to resume from a checkpoint written with other settings (only the keys of
    ``RESUME_FREE_KEYS``, e.g. a longer ``epochs``, may change): the weights would be kept
    under the new settings' label."""
    if not old or not new:
        return
    changed = config_differences(old, new, ignore=RESUME_FREE_KEYS)
    if changed:
        raise ValueError(f"{path} was written with other settings ({', '.join(changed)}): pass --no-resume "
                         "(resume=False) to train again with the new ones (what was made from the old weights is "
                         "then refused until it is made again), or use another --run-dir")
