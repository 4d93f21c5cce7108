"""Run a function in several local processes, as torchrun would: the tests' DDP helper."""

from __future__ import annotations

import os
import socket

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now (for MASTER_PORT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _local_worker(rank: int, world_size: int, port: int, threads: int, fn, args) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if threads:
        torch.set_num_threads(threads)
    fn(*args)


def launch_local(fn, world_size: int, *args, threads: int = 1) -> None:
    """Run ``fn(*args)`` in ``world_size`` spawned processes on this machine, with the
    environment torchrun would set (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR=127.0.0.1, a
    free MASTER_PORT), so that ``wsss.distributed.init_distributed`` inside ``fn`` joins them (gloo
    on CPU). ``fn`` must be importable (a module-level function) and ``args`` picklable."""
    mp.spawn(_local_worker, args=(world_size, free_port(), threads, fn, args), nprocs=world_size, join=True)
