"""Fixtures shared by the test modules that train on a tiny generated benchmark."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: these models are tiny, and on a busy 2-core machine several
    spinning OpenMP threads per process slow each step down tenfold."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """A 4-class shapes benchmark of 32 px: 8 training and 8 val images."""
    from wsss.data.synth import ensure_benchmark

    return ensure_benchmark(tmp_path_factory.mktemp("bench") / "tiny", size="smoke", image_size=32, num_train=8,
                            num_val=8, num_single=0, num_web=0, num_classes=4)
