"""Pair sampling, partner lists, self-pair views and pair statistics (METHOD.md sec 1 and 2)."""

import logging

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from wsss.data.pairs import (
    PairDataset,
    PartnerIndex,
    format_statistics,
    pair_statistics,
    partners_for_class,
    sample_partner,
    self_pair_views,
)
from wsss.viz import plot_statistics

LOGGER = "wsss.data.pairs"

# Hand-made labels (8 images, 8 classes) whose common-partner pairs are fully determined:
# 0<->1 share {0}; 2, 3, 4 share {1, 2} (4 also has 3); 5 alone has {4}; 6<->7 share {5, 6, 7}.
HAND = np.array([
    [1, 0, 0, 0, 0, 0, 0, 0],
    [1, 0, 0, 0, 0, 0, 0, 0],
    [0, 1, 1, 0, 0, 0, 0, 0],
    [0, 1, 1, 0, 0, 0, 0, 0],
    [0, 1, 1, 1, 0, 0, 0, 0],
    [0, 0, 0, 0, 1, 0, 0, 0],
    [0, 0, 0, 0, 0, 1, 1, 1],
    [0, 0, 0, 0, 0, 1, 1, 1],
], dtype=np.uint8)
HAND_NAMES = [f"c{c}" for c in range(8)]


class ToyBase:
    """A dataset with image-level labels and dict items, like VOCDataset."""

    def __init__(self, labels):
        self.labels = labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"index": i, "label": torch.as_tensor(self.labels[i], dtype=torch.float32)}


def random_labels(seed, n=30, k=6, p=0.25):
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, k)) < p).astype(np.uint8)
    labels[np.arange(n), rng.integers(k, size=n)] = 1  # every image has a label
    return labels


def shares(labels, m, n):
    return bool((labels[m] & labels[n]).any())


# --- sample_partner ---------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_common_partner_always_shares_a_label(seed):
    labels = random_labels(seed)
    index = PartnerIndex(labels)
    rng = np.random.default_rng(seed)
    for _ in range(40):
        for m in range(len(labels)):
            n = sample_partner(index, m, 1.0, rng)
            assert n != m and 0 <= n < len(labels)
            if index.shareable[m].any():
                assert shares(labels, m, n), (m, n)
    # every image that shares a class with m can be drawn, not just a few of them
    sharers = {m: {n for n in range(len(labels)) if n != m and shares(labels, m, n)} for m in range(len(labels))}
    m = max(sharers, key=lambda m: len(sharers[m]))
    assert {sample_partner(index, m, 1.0, rng) for _ in range(2000)} == sharers[m]


def test_uniform_partner_rate_matches_brute_force():
    labels = random_labels(5, n=20, k=5, p=0.2)
    n_img = len(labels)
    expected = np.mean([np.mean([shares(labels, m, n) for n in range(n_img) if n != m]) for m in range(n_img)])
    assert 0.1 < expected < 0.9  # a case where common and uniform differ
    index = PartnerIndex(labels)
    rng = np.random.default_rng(0)
    draws = 400
    rate = np.mean([shares(labels, m, sample_partner(index, m, 0.0, rng)) for m in range(n_img) for _ in range(draws)])
    assert abs(rate - expected) < 4 * np.sqrt(expected * (1 - expected) / (n_img * draws))
    # p_common = 0.5 mixes the two: half the draws are common (always sharing) when nobody is isolated
    assert index.num_isolated == 0
    rate = np.mean([shares(labels, m, sample_partner(index, m, 0.5, rng)) for m in range(n_img) for _ in range(draws)])
    mixed = 0.5 + 0.5 * expected
    assert abs(rate - mixed) < 4 * np.sqrt(mixed * (1 - mixed) / (n_img * draws))


def test_uniform_partner_covers_every_other_image_evenly():
    labels = np.eye(5, dtype=np.uint8)
    rng = np.random.default_rng(0)
    counts = np.bincount([sample_partner(labels, 2, 0.0, rng) for _ in range(4000)], minlength=5)
    assert counts[2] == 0
    np.testing.assert_allclose(counts[[0, 1, 3, 4]] / 4000, 0.25, atol=0.03)


def test_fallback_for_a_unique_class_warns_once_and_counts(caplog):
    index = PartnerIndex(HAND)
    assert index.num_isolated == 1  # image 5 alone holds class 4
    rng = np.random.default_rng(0)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        partners = [sample_partner(index, 5, 1.0, rng) for _ in range(50)]
        sample_partner(index, 0, 1.0, rng)  # a normal draw does not count
    assert all(n != 5 and 0 <= n < len(HAND) for n in partners)
    assert index.num_fallbacks == 50
    warnings = [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "image 5" in warnings[0].getMessage()


def test_fallback_for_an_image_without_labels():
    labels = np.array([[0, 0], [1, 0], [1, 0]], dtype=np.uint8)
    index = PartnerIndex(labels)
    n = sample_partner(index, 0, 1.0, np.random.default_rng(0))
    assert n in (1, 2) and index.num_fallbacks == 1


def test_raw_arrays_reuse_one_index_for_warning_and_count(caplog):
    labels = HAND.copy()
    rng = np.random.default_rng(0)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for _ in range(5):
            sample_partner(labels, 5, 1.0, rng)
    assert len([r for r in caplog.records if r.name == LOGGER]) == 1


def test_sample_partner_rejects_bad_input():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="p_common"):
        sample_partner(HAND, 0, 1.5, rng)
    with pytest.raises(IndexError):
        sample_partner(HAND, 8, 1.0, rng)
    with pytest.raises(ValueError, match="at least 2 images"):
        sample_partner(np.ones((1, 3), np.uint8), 0, 1.0, rng)
    with pytest.raises(ValueError, match="0 and 1"):
        PartnerIndex(np.full((3, 2), 2))
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        PartnerIndex(np.ones(4))


# --- partners_for_class -----------------------------------------------------------------

def test_partners_for_class_hold_c_and_never_m():
    labels = random_labels(3, n=40, k=4, p=0.4)
    rng = np.random.default_rng(0)
    checked = 0
    for m in range(len(labels)):
        for c in np.flatnonzero(labels[m]):
            holders = {n for n in np.flatnonzero(labels[:, c]) if n != m}
            got = partners_for_class(labels, m, c, 3, rng)
            assert m not in got and all(labels[n, c] for n in got)
            if len(holders) >= 3:
                assert len(got) == 3 and len(set(got)) == 3
            checked += 1
    assert checked > 0


def test_partners_for_class_few_or_none():
    rng = np.random.default_rng(0)
    # class 0 is held by images 0 and 1 only: one candidate for m=0, repeated
    assert partners_for_class(HAND, 0, 0, 3, rng) == [1, 1, 1]
    # class 1 has two candidates for m=2: both used before any repeat
    got = partners_for_class(HAND, 2, 1, 3, rng)
    assert len(got) == 3 and set(got[:2]) == {3, 4} and got[2] in (3, 4)
    assert partners_for_class(HAND, 5, 4, 3, rng) == []  # class 4 only in image 5
    assert partners_for_class(HAND, 0, 1, 0, rng) == []
    # m need not hold c
    assert set(partners_for_class(HAND, 0, 5, 2, rng)) == {6, 7}
    with pytest.raises(ValueError):
        partners_for_class(HAND, 0, 8, 3, rng)


# --- PairDataset ------------------------------------------------------------------------

def loader_partners(ds, **kw):
    out = {}
    for batch in DataLoader(ds, batch_size=4, **kw):
        for i, n, ni in zip(batch["m"]["index"].tolist(), batch["partner"].tolist(), batch["n"]["index"].tolist()):
            assert n == ni
            out[i] = n
    return out


def test_pair_dataset_items():
    ds = PairDataset(ToyBase(HAND), p_common=1.0, seed=0)
    item = ds[2]
    assert item["m"]["index"] == 2 and item["n"]["index"] == item["partner"] in (3, 4)
    assert ds[-1]["m"]["index"] == 7 and ds[-1]["partner"] == 6
    assert len(ds) == 8


def test_pair_dataset_same_partners_with_any_workers_and_order():
    ds = PairDataset(ToyBase(random_labels(7, n=24)), p_common=0.7, seed=3)
    ds.set_epoch(2)
    single = loader_partners(ds, num_workers=0)
    multi = loader_partners(ds, num_workers=2)
    shuffled = loader_partners(ds, num_workers=0, shuffle=True, generator=torch.Generator().manual_seed(1))
    assert single == multi == shuffled and len(single) == 24
    assert single == {i: ds.partner_of(i) for i in range(24)}


def test_pair_dataset_with_distributed_sampler():
    ds = PairDataset(ToyBase(random_labels(8, n=21)), seed=1)
    full = {i: ds.partner_of(i) for i in range(len(ds))}
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=0)
        got = loader_partners(ds, sampler=sampler)
        assert got and all(full[i] == n for i, n in got.items())


def test_set_epoch_changes_partners_and_seed_matters():
    ds = PairDataset(ToyBase(random_labels(9, n=40, p=0.5)), seed=0)
    epoch0 = [ds.partner_of(i) for i in range(40)]
    ds.set_epoch(1)
    epoch1 = [ds.partner_of(i) for i in range(40)]
    ds.set_epoch(0)
    assert [ds.partner_of(i) for i in range(40)] == epoch0
    assert epoch0 != epoch1
    other = PairDataset(ds.base, seed=1)
    assert [other.partner_of(i) for i in range(40)] != epoch0


def test_pair_dataset_counts_fallbacks():
    ds = PairDataset(ToyBase(HAND), p_common=1.0)
    for i in range(len(ds)):
        ds[i]
    assert ds.num_fallbacks == 1
    assert PairDataset(ToyBase(HAND), p_common=0.0).num_fallbacks == 0


def test_pair_dataset_rejects_unlabelled_base():
    with pytest.raises(TypeError, match="labels"):
        PairDataset([1, 2, 3])


# --- self-pair views --------------------------------------------------------------------

def test_self_pair_views_shapes_and_flip():
    x = torch.arange(2 * 3 * 8 * 6, dtype=torch.float32).reshape(2, 3, 8, 6)
    views = self_pair_views(x)
    assert set(views) == {"flip", "down", "up"}
    assert torch.equal(views["flip"], x[..., torch.arange(5, -1, -1)])
    assert views["down"].shape == (2, 3, 6, 5)  # 0.75 * (8, 6) = (6, 4.5) -> rounded half up
    assert views["up"].shape == (2, 3, 16, 12)
    odd = self_pair_views(torch.zeros(1, 3, 7, 5))
    assert odd["down"].shape == (1, 3, 5, 4) and odd["up"].shape == (1, 3, 14, 10)


def test_self_pair_views_resize_is_bilinear_and_keeps_constants():
    x = torch.full((1, 3, 8, 8), 0.5)
    views = self_pair_views(x)
    for v in views.values():
        torch.testing.assert_close(v, torch.full_like(v, 0.5))
    ramp = torch.linspace(0, 1, 8).expand(1, 1, 8, 8).contiguous()
    up = self_pair_views(ramp)["up"][0, 0, 0]
    assert torch.all(up[1:] >= up[:-1]) and up.min() >= 0 and up.max() <= 1
    with pytest.raises(ValueError, match="B, C, H, W"):
        self_pair_views(torch.zeros(3, 8, 8))


# --- pair statistics --------------------------------------------------------------------

HAND_COOCCURRENCE = [
    [2, 0, 0, 0, 0, 0, 0, 0],
    [0, 3, 3, 1, 0, 0, 0, 0],
    [0, 3, 3, 1, 0, 0, 0, 0],
    [0, 1, 1, 1, 0, 0, 0, 0],
    [0, 0, 0, 0, 1, 0, 0, 0],
    [0, 0, 0, 0, 0, 2, 2, 2],
    [0, 0, 0, 0, 0, 2, 2, 2],
    [0, 0, 0, 0, 0, 2, 2, 2],
]


def test_pair_statistics_hand_made():
    stats = pair_statistics(HAND, HAND_NAMES, p_common=1.0)
    assert stats["num_images"] == 8 and stats["num_pairs"] == 8
    assert stats["label_frequency"] == [2, 3, 3, 1, 1, 2, 2, 2]
    assert stats["cooccurrence"] == HAND_COOCCURRENCE
    # 0,1 share 1; 2,3,4 share 2; 5 falls back and shares 0; 6,7 share 3
    assert stats["shared_hist"] == {"0": 1, "1": 2, "2": 3, "3+": 2}
    # l_m \ l_n is non-empty only for image 4 (class 3) and image 5 (class 4)
    assert stats["frac_diff_empty"] == pytest.approx(6 / 8)
    assert stats["num_fallbacks"] == 1
    two_epochs = pair_statistics(HAND, HAND_NAMES, p_common=1.0, num_pairs=16)
    assert two_epochs["shared_hist"] == {"0": 2, "1": 4, "2": 6, "3+": 4}
    assert two_epochs["num_fallbacks"] == 2


def test_pair_statistics_are_the_epoch0_pairs_of_pair_dataset():
    labels = random_labels(11, n=25)
    ds = PairDataset(ToyBase(labels), p_common=0.6, seed=4)
    partners = [ds.partner_of(i) for i in range(len(ds))]
    shared = [int((labels[m] & labels[n]).sum()) for m, n in enumerate(partners)]
    stats = pair_statistics(labels, [f"c{c}" for c in range(labels.shape[1])], p_common=0.6, seed=4)
    expected = {"0": shared.count(0), "1": shared.count(1), "2": shared.count(2), "3+": sum(s >= 3 for s in shared)}
    assert stats["shared_hist"] == expected


def test_pair_statistics_uniform_matches_exhaustive_expectation():
    n_img = len(HAND)
    hist = np.zeros(4)
    empty = 0.0
    for m in range(n_img):  # exact expectation: every partner n != m with weight 1 / (N - 1)
        for n in range(n_img):
            if n != m:
                hist[min(int((HAND[m] & HAND[n]).sum()), 3)] += 1 / (n_img - 1)
                empty += (not (HAND[m] & ~HAND[n]).any()) / (n_img - 1)
    num_pairs = n_img * 1000
    stats = pair_statistics(HAND, HAND_NAMES, p_common=0.0, num_pairs=num_pairs, seed=0)
    got = np.array(list(stats["shared_hist"].values())) / num_pairs
    np.testing.assert_allclose(got, hist / n_img, atol=0.02)
    assert stats["frac_diff_empty"] == pytest.approx(empty / n_img, abs=0.02)
    assert stats["num_fallbacks"] == 0


def test_format_and_plot_statistics():
    stats = pair_statistics(HAND, HAND_NAMES)
    text = format_statistics(stats, HAND_NAMES)
    assert "c7" in text and "8 images" in text and "3+" in text and "1 fallbacks" in text
    fig = plot_statistics(stats, HAND_NAMES)
    assert len(fig.axes) >= 3
    titles = " ".join(ax.get_title() for ax in fig.axes)
    assert "co-occurrence" in titles and "label frequency" in titles


def test_pair_statistics_rejects_mismatched_names():
    with pytest.raises(ValueError, match="class names"):
        pair_statistics(HAND, HAND_NAMES[:3])
