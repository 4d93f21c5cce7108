"""Seeds and the data loaders of training and evaluation.

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

import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.distributed import DistributedSampler

from wsss.distributed import DistInfo


def derive_seed(*parts: int) -> int:
    """A 31-bit seed mixed from integers (e.g. seed, epoch, rank), stable across runs."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


def seed_everything(seed: int) -> None:
    """Seed python ``random``, numpy's global RNG and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)  # also seeds all CUDA devices


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
