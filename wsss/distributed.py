"""Devices and the processes of a torchrun job: ``resolve_device``, ``autocast`` (bf16 on
CUDA), ``to_device`` (optionally channels_last), ``init_distributed`` / ``DistInfo``,
``is_main``, ``barrier``, ``all_reduce_mean``, ``all_gather_objects``, ``wrap_ddp``."""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist
from torch import nn

log = logging.getLogger(__name__)


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
