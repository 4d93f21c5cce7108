"""Loss terms against a hand-written reference from METHOD.md sec. 1."""

import math

import pytest
import torch

from wsss.config import from_dict
from wsss.losses import TERMS, LossConfig, loss_terms
from wsss.stages.train_classifier import ClassifierConfig

K = 4
PAIR_KEYS = ("s_m", "s_n", "s_co_m", "s_co_n", "s_con_m", "s_con_n")
# l_m, l_n per sample: shared {1}, {}, {0,2}; differences chosen to include empty sets.
L_M = [[1, 1, 0, 0], [1, 0, 0, 0], [1, 0, 1, 0]]
L_N = [[0, 1, 0, 1], [0, 0, 1, 0], [1, 0, 1, 0]]


def ref_ce(scores, target_set):
    """Soft-margin loss of one sample: mean over classes of -[y log σ(x) + (1-y) log(1-σ(x))]."""
    total = 0.0
    for c, x in enumerate(scores):
        p = 1 / (1 + math.exp(-x))
        total += -math.log(p) if c in target_set else -math.log(1 - p)
    return total / len(scores)


def ref_batch_ce(scores, sets, skip_empty=False):
    rows = [(s, t) for s, t in zip(scores.tolist(), sets) if not (skip_empty and not t)]
    return sum(ref_ce(s, t) for s, t in rows) / len(rows) if rows else 0.0


def as_sets(labels):
    return [{c for c, v in enumerate(row) if v} for row in labels]


def ref_pair(out, sm, sn):
    common = [a & b for a, b in zip(sm, sn)]
    return {
        "basic": ref_batch_ce(out["s_m"], sm) + ref_batch_ce(out["s_n"], sn),
        "coatt": ref_batch_ce(out["s_co_m"], common) + ref_batch_ce(out["s_co_n"], common),
        "contrastive": (ref_batch_ce(out["s_con_m"], [a - b for a, b in zip(sm, sn)], True)
                        + ref_batch_ce(out["s_con_n"], [b - a for a, b in zip(sm, sn)], True)),
    }


def fake_out(seed=0, b=3, views=("flip", "down", "up")):
    g = torch.Generator().manual_seed(seed)

    def pair():
        return {k: (2 * torch.randn(b, K, generator=g, dtype=torch.float64)).requires_grad_(True)
                for k in PAIR_KEYS}
    out = pair()
    out["self"] = {v: pair() for v in views}
    return out


def reference_terms(out, l_m, l_n):
    sm, sn = as_sets(l_m), as_sets(l_n)
    ref = ref_pair(out, sm, sn)
    selfs = [ref_pair(o, sm, sm) for o in out["self"].values()]
    ref["self_basic"] = sum(r["basic"] for r in selfs)
    ref["self_coatt"] = sum(r["coatt"] for r in selfs)
    assert all(r["contrastive"] == 0 for r in selfs)  # l_m \ l_m is empty
    return ref


def labels():
    return torch.tensor(L_M, dtype=torch.float32), torch.tensor(L_N, dtype=torch.float32)


def test_every_term_matches_reference():
    out, (l_m, l_n) = fake_out(), labels()
    got = loss_terms(out, l_m, l_n, LossConfig(self_weighting="sum"), epoch=5)
    ref = reference_terms(out, L_M, L_N)
    assert set(got) == set(TERMS) | {"total"}
    for name in TERMS:
        assert got[name].item() == pytest.approx(ref[name], rel=1e-10), name
    assert got["total"].item() == pytest.approx(sum(ref.values()), rel=1e-10)


def test_mean_self_weighting_halves_the_pair_and_averages_the_views():
    """total = 1/2 (basic + coatt) + contrastive + 1/2 mean over the V views of the self terms;
    the same as the reference's pair weights (1/2) with w_self = 1/V in the summed form."""
    out, (l_m, l_n) = fake_out(seed=7), labels()
    r = reference_terms(out, L_M, L_N)
    got = loss_terms(out, l_m, l_n, LossConfig(), epoch=5)["total"].item()
    want = 0.5 * (r["basic"] + r["coatt"]) + r["contrastive"] + 0.5 / 3 * (r["self_basic"] + r["self_coatt"])
    assert got == pytest.approx(want, rel=1e-10)
    summed = LossConfig(w_basic=0.5, w_coatt=0.5, w_self=1 / 3, self_weighting="sum")
    assert loss_terms(out, l_m, l_n, summed, epoch=5)["total"].item() == pytest.approx(want, rel=1e-10)
    no_self = LossConfig(self_pairs=False)
    plain = loss_terms(out, l_m, l_n, no_self, epoch=5)["total"].item()
    assert plain == pytest.approx(r["basic"] + r["coatt"] + r["contrastive"], rel=1e-10)  # unchanged without views


@pytest.mark.parametrize("switch", ["basic", "coatt", "contrastive", "self_pairs"])
def test_switching_off_removes_term_from_total(switch):
    out, (l_m, l_n) = fake_out(seed=1), labels()
    cfg = LossConfig(**{switch: False}, w_basic=0.5, w_coatt=2.0, w_con=3.0, w_self=0.25, self_weighting="sum")
    got = loss_terms(out, l_m, l_n, cfg, epoch=2)
    r = reference_terms(out, L_M, L_N)
    on = {"basic": cfg.basic, "coatt": cfg.coatt, "contrastive": cfg.contrastive}
    expect = (on["basic"] * 0.5 * r["basic"] + on["coatt"] * 2.0 * r["coatt"]
              + on["contrastive"] * 3.0 * r["contrastive"])
    if cfg.self_pairs:
        expect += 0.25 * (on["basic"] * 0.5 * r["self_basic"] + on["coatt"] * 2.0 * r["self_coatt"])
    assert got["total"].item() == pytest.approx(expect, rel=1e-10)
    off = {"self_pairs": ("self_basic", "self_coatt")}.get(switch, (switch,))
    for name in off:
        assert got[name].item() == 0.0


def test_contrastive_warmup():
    out, (l_m, l_n) = fake_out(seed=2), labels()
    cfg = LossConfig(con_warmup_epochs=2)
    r = reference_terms(out, L_M, L_N)
    before = loss_terms(out, l_m, l_n, cfg, epoch=1)
    after = loss_terms(out, l_m, l_n, cfg, epoch=2)
    assert before["contrastive"].item() == 0.0
    assert after["contrastive"].item() == pytest.approx(r["contrastive"], rel=1e-10)
    assert (after["total"] - before["total"]).item() == pytest.approx(r["contrastive"], rel=1e-10)
    # during warm-up the contrastive scores still get a (zero) gradient: DDP-friendly
    before["total"].backward()
    assert out["s_con_m"].grad is not None and out["s_con_m"].grad.abs().sum() == 0


def test_empty_difference_samples_are_skipped_and_get_no_gradient():
    out, (l_m, l_n) = fake_out(seed=3), labels()
    loss_terms(out, l_m, l_n, LossConfig(basic=False, coatt=False, self_pairs=False),
               epoch=9)["total"].backward()
    # sample 2 has l_m == l_n: both differences empty, no contrastive gradient
    assert out["s_con_m"].grad[2].abs().sum() == 0 and out["s_con_n"].grad[2].abs().sum() == 0
    # sample 1: l_m \ l_n = {0} non-empty, l_n \ l_m = {2} non-empty
    assert out["s_con_m"].grad[1].abs().sum() > 0 and out["s_con_n"].grad[1].abs().sum() > 0
    # sample 0: l_n \ l_m = {3} non-empty
    assert out["s_con_n"].grad[0].abs().sum() > 0


def test_all_empty_contrastive_is_zero_and_keeps_graph():
    out = fake_out(seed=4)
    l = torch.tensor(L_M, dtype=torch.float32)
    got = loss_terms(out, l, l, LossConfig(basic=False, coatt=False, self_pairs=False), epoch=9)
    assert got["contrastive"].item() == 0.0 and got["total"].requires_grad
    got["total"].backward()
    assert out["s_con_m"].grad.abs().sum() == 0


def test_config_validation_and_missing_self():
    with pytest.raises(ValueError, match="at least one"):
        LossConfig(basic=False, coatt=False, contrastive=False)
    with pytest.raises(ValueError, match=r"LossConfig.w_con \(--loss.w-con\) = -1.0: must be >= 0"):
        from_dict(ClassifierConfig, {"data_root": "d", "run_dir": "r", "loss": {"w_con": -1.0}})
    out, (l_m, l_n) = fake_out(), labels()
    del out["self"]
    with pytest.raises(ValueError, match="self_pairs"):
        loss_terms(out, l_m, l_n, LossConfig(), epoch=0)


# ----------------------------------------------------------------------- the reference's loss

def _soft_margin_over(rows):
    """One multilabel_soft_margin_loss over concatenated (scores, target set) rows, written
    out: the mean over rows of the per-row mean over classes."""
    return sum(ref_ce(s, t) for s, t in rows) / len(rows)


def reference_code_loss(out, l_m, l_n, epoch):
    """The authors' training loss (Classifier/scripts/train.py:238-282), transcribed from its
    behaviour: each basic / co-attention / self-pair term is ONE soft-margin loss over the 2B
    concatenated samples of the pair; each contrastive side is a loss over its B samples
    with empty targets kept as all-negative, added from epoch 2 on and only when some sample
    of the batch has a non-empty target on that side."""
    sm, sn = as_sets(l_m), as_sets(l_n)
    common = [a & b for a, b in zip(sm, sn)]
    rows = lambda scores, sets: list(zip(scores.tolist(), sets))  # noqa: E731
    total = _soft_margin_over(rows(out["s_m"], sm) + rows(out["s_n"], sn))
    total += _soft_margin_over(rows(out["s_co_m"], common) + rows(out["s_co_n"], common))
    for view in out["self"].values():
        total += _soft_margin_over(rows(view["s_m"], sm) + rows(view["s_n"], sm))
        total += _soft_margin_over(rows(view["s_co_m"], sm) + rows(view["s_co_n"], sm))
    if epoch >= 2:
        diff_m, diff_n = [a - b for a, b in zip(sm, sn)], [b - a for a, b in zip(sm, sn)]
        if any(diff_m):
            total += _soft_margin_over(rows(out["s_con_m"], diff_m))
        if any(diff_n):
            total += _soft_margin_over(rows(out["s_con_n"], diff_n))
    return total


OFFICIAL = LossConfig(w_basic=0.5, w_coatt=0.5, empty_contrastive="negative", self_weighting="sum")


@pytest.mark.parametrize("epoch", [0, 1, 2, 5])
@pytest.mark.parametrize("case", ["some_empty", "all_empty", "none_empty", "one_side_empty"])
def test_official_weights_reproduce_the_reference_loss(epoch, case):
    l_m, l_n = {
        "some_empty": (L_M, L_N),                                          # sample 2: both sides empty
        "all_empty": ([[1, 0, 0, 0]] * 3, [[1, 0, 0, 0]] * 3),             # l_m = l_n everywhere
        "none_empty": ([[1, 0, 0, 0], [0, 1, 0, 0], [1, 1, 0, 0]], [[0, 0, 1, 0], [0, 0, 0, 1], [0, 0, 1, 1]]),
        "one_side_empty": ([[1, 1, 0, 0]] * 3, [[1, 0, 0, 0]] * 3),        # l_n \ l_m empty for all
    }[case]
    out = fake_out(seed=epoch + 10)
    got = loss_terms(out, torch.tensor(l_m), torch.tensor(l_n), OFFICIAL, epoch=epoch)["total"]
    assert float(got.detach()) == pytest.approx(reference_code_loss(out, l_m, l_n, epoch), rel=1e-10)


def test_empty_targets_negative_keeps_the_sample_and_skip_drops_it():
    out = fake_out(seed=3)
    l_m, l_n = torch.tensor(L_M), torch.tensor(L_N)   # sample 2 has l_m \ l_n = {}
    neg = loss_terms(out, l_m, l_n, LossConfig(empty_contrastive="negative"), epoch=5)["contrastive"]
    skip = loss_terms(out, l_m, l_n, LossConfig(empty_contrastive="skip"), epoch=5)["contrastive"]
    neg.backward()
    assert out["s_con_m"].grad[2].abs().sum() > 0            # "nothing else is here" is a signal
    out["s_con_m"].grad = None
    skip.backward()
    assert torch.equal(out["s_con_m"].grad[2], torch.zeros(K, dtype=torch.float64))
