"""Localisation diagnostics on hand-made attention matrices, maps and heads."""

import math

import numpy as np
import pytest
import torch

from wsss import diagnostics as D
from wsss.models import CoAttentionClassifier


def test_attention_mass_by_hand():
    # I_m: 4 positions, 0-1 object; I_n: 3 positions, 2 object.
    a = torch.tensor([[0.0, 0.2, 0.8],
                      [0.5, 0.0, 0.5],
                      [0.9, 0.1, 0.0],
                      [0.3, 0.3, 0.4]])
    got = D.attention_mass(a, torch.tensor([1, 1, 0, 0]), torch.tensor([0, 0, 1]))
    assert got["obj->obj"] == pytest.approx((0.8 + 0.5) / 2)
    assert got["obj->bg"] == pytest.approx(1 - (0.8 + 0.5) / 2)
    assert got["bg->obj"] == pytest.approx((0.0 + 0.4) / 2)
    assert got["bg->bg"] == pytest.approx(1 - 0.2)
    assert got["obj_area_n"] == pytest.approx(1 / 3)
    assert math.isnan(D.attention_mass(a, torch.zeros(4), torch.tensor([0, 0, 1]))["obj->obj"])


def test_uniform_attention_sends_the_objects_area_share():
    obj_n = torch.zeros(10, dtype=torch.bool)
    obj_n[:3] = True
    got = D.attention_mass(torch.full((6, 10), 0.1), torch.tensor([1, 1, 0, 0, 0, 0]), obj_n)
    assert got["obj->obj"] == pytest.approx(0.3) and got["bg->obj"] == pytest.approx(0.3)


def test_map_mass_shares_by_hand():
    obj = torch.zeros(6, 6, dtype=torch.bool)
    obj[2:4, 2:4] = True                       # 4 cells; band of 1 cell: the 12 around them
    ctx = torch.zeros(6, 6, dtype=torch.bool)
    ctx[5, :] = True                           # bottom row: context (outside the band)
    cam = torch.zeros(6, 6)
    cam[2, 2] = 4.0                            # object
    cam[1, 1] = 2.0                            # band (diagonal neighbour)
    cam[5, 0] = 1.0                            # context
    cam[0, 5] = 1.0                            # rest
    cam[0, 0] = -5.0                           # negative: rectified away
    got = D.map_mass_shares(cam, obj, ctx, band=1)
    assert got == pytest.approx({"object": 0.5, "band": 0.25, "context": 0.125, "rest": 0.125})
    assert sum(D.map_mass_shares(torch.rand(6, 6), obj, ctx, band=2).values()) == pytest.approx(1.0)
    assert all(math.isnan(v) for v in D.map_mass_shares(-torch.ones(6, 6), obj).values())


def test_dilate_and_cell_fraction():
    region = torch.zeros(5, 5, dtype=torch.bool)
    region[2, 2] = True
    assert int(D.dilate(region, 1).sum()) == 9 and int(D.dilate(region, 2).sum()) == 25
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[:4, :2] = True
    frac = D.cell_fraction(mask, (2, 2))
    assert torch.allclose(frac, torch.tensor([[0.5, 0.0], [0.0, 0.0]]))


def test_head_responses_by_hand():
    head = torch.nn.Conv2d(2, 1, 1, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[[[1.0]], [[0.0]]]]))
    feats = torch.zeros(1, 2, 5, 5)
    feats[0, 0, 2, 2] = 3.0                    # object cell
    feats[0, 0, 1, 2] = 1.0                    # one band cell of 8
    feats[0, 0, 0, 0] = 2.0                    # one background cell of 16
    obj = torch.zeros(5, 5, dtype=torch.bool)
    obj[2, 2] = True
    got = D.head_responses(head, feats, 0, obj)
    assert got == pytest.approx({"object": 3.0, "band": 1 / 8, "background": 2 / 16})


def test_pair_diagnostics_and_collect_run_on_a_model():
    torch.manual_seed(0)
    model = CoAttentionClassifier(3, backbone="tiny").eval()
    x_m, x_n = torch.randn(1, 3, 48, 48), torch.randn(1, 3, 40, 48)
    mask_m = torch.zeros(48, 48, dtype=torch.long)
    mask_m[8:32, 8:32] = 2
    mask_n = torch.zeros(40, 48, dtype=torch.long)
    mask_n[0:16, 16:40] = 2
    part = torch.zeros(48, 48, dtype=torch.long)
    part[40:, :] = D.CONTEXT_PART
    got = D.pair_diagnostics(model, x_m, x_n, mask_m, mask_n, 2, part)
    assert got["att/obj->obj"] + got["att/obj->bg"] == pytest.approx(1.0, abs=1e-5)
    assert sum(got[f"cam/{k}"] for k in ("object", "band", "context", "rest")) == pytest.approx(1.0, abs=1e-5)
    labels = np.array([[0, 1, 0], [0, 1, 1], [1, 0, 0], [1, 0, 1]])
    pairs = D.shared_class_pairs(labels, 10, seed=0)
    assert len(pairs) == 4 and all(labels[m, c - 1] and labels[n, c - 1] and m != n for m, n, c in pairs)
    assert "| att/obj->obj |" in D.summary_table(got)


def test_maps_part_coverage_reads_saved_maps(tmp_path):
    from PIL import Image

    from wsss.data.synth import PART_DIR
    from wsss.maps import maps_path, save_maps

    (tmp_path / "SegmentationClass").mkdir()
    (tmp_path / PART_DIR).mkdir()
    mask = np.zeros((4, 6), np.uint8)
    mask[:, :4] = 2                                   # class 2: head column 0, body columns 1-3
    part = np.where(mask == 2, 1, 3).astype(np.uint8)
    part[:, 0] = 2
    Image.fromarray(mask).save(tmp_path / "SegmentationClass" / "a.png")
    Image.fromarray(part).save(tmp_path / PART_DIR / "a.png")
    maps = np.zeros((1, 4, 6), np.float32)
    maps[0, :, :2] = 1.0                              # head and a third of the body on
    maps[0, :, 5] = 0.8                               # and one context column
    save_maps(maps_path(tmp_path / "maps", "a"), maps, [2])
    got = D.maps_part_coverage(tmp_path, tmp_path / "maps", ["a"], thresholds=(0.5, 0.9))
    assert got["part_recall"] == [1.0, 1.0]
    assert got["body_recall"] == [round(4 / 12, 4), round(4 / 12, 4)]
    assert got["context_share"] == [round(4 / 12, 4), 0.0]
    assert got["object_share"] == [round(8 / 12, 4), 1.0]
