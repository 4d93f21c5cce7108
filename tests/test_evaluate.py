"""Evaluation of maps, pseudo masks and the segmenter (wsss.stages.evaluate) on hand-made
VOC-layout trees with hand-made predictions whose mIoU is worked out by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image
from torch import nn

from wsss import evaluation as evl
from wsss import viz
from wsss.classes import IGNORE_INDEX, write_class_names
from wsss.data.transforms import MEAN, STD
from wsss.data.voc import save_mask
from wsss.maps import save_maps
from wsss.stages import evaluate as ev

NAMES = ["a", "b", "c"]  # foreground classes 1..3

# image p: a 2x4 image, left half background, right half class 1
GT_P = np.array([[0, 0, 1, 1],
                 [0, 0, 1, 1]], np.uint8)
MAP_P = np.array([[0.1, 0.5, 0.875, 0.875],
                  [0.1, 0.5, 0.875, 0.25]], np.float32)  # values exact in float16
# image q: all class 2 and one ignored pixel
GT_Q = np.array([[2, 2, 2, 2],
                 [2, 2, 2, IGNORE_INDEX]], np.uint8)


def make_tree(root: Path, masks: dict[str, np.ndarray], split: str = "train", colours=None) -> Path:
    """JPEGImages (flat colours per class when ``colours`` is given), palette masks, split file."""
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    for name, mask in masks.items():
        rgb = np.zeros((*mask.shape, 3), np.uint8) if colours is None else colours[np.minimum(mask, 3)]
        Image.fromarray(rgb).save(root / "JPEGImages" / f"{name}.jpg", quality=100, subsampling=0)
        save_mask(root / "SegmentationClass" / f"{name}.png", mask)
    path = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{n}\n" for n in masks))
    write_class_names(root, NAMES)
    return root


@pytest.fixture()
def tree(tmp_path):
    return make_tree(tmp_path / "voc", {"p": GT_P, "q": GT_Q})


def write_maps(maps_dir: Path, entries: dict[str, tuple[list[np.ndarray], list[int]]]) -> Path:
    for name, (maps, classes) in entries.items():
        save_maps(maps_dir / f"{name}.npz", np.stack(maps) if maps else np.zeros((0, 2, 4)), classes)
    return maps_dir


# ----------------------------------------------------------------------- maps_to_labels

def test_maps_to_labels():
    maps = np.array([[[0.9, 0.2, 0.6]], [[0.3, 0.2, 0.6]]], np.float32)  # (2, 1, 3)
    assert evl.maps_to_labels(maps, [5, 7], 0.25).tolist() == [[5, 0, 5]]  # tie -> first map
    assert evl.maps_to_labels(maps, [5, 7], 0.2).tolist() == [[5, 5, 5]]   # below means strictly below
    assert evl.maps_to_labels(maps[::-1], [7, 5], 0.95).tolist() == [[0, 0, 0]]
    assert evl.maps_to_labels(np.zeros((0, 2, 2)), [], 0.5).tolist() == [[0, 0], [0, 0]]
    with pytest.raises(ValueError, match="classes"):
        evl.maps_to_labels(maps, [1], 0.5)


# ----------------------------------------------------------------------- maps

def test_perfect_maps_score_one(tree, tmp_path):
    maps_dir = write_maps(tmp_path / "maps", {"p": ([GT_P.astype(np.float32)], [1]),
                                              "q": ([np.ones((2, 4), np.float32)], [2])})
    res = evl.evaluate_maps(tree, "train", maps_dir)
    assert [p["miou"] for p in res["sweep"]] == [1.0] * len(evl.DEFAULT_THRESHOLDS)
    assert res["miou"] == 1.0 and res["pixel_acc"] == 1.0 and res["num_images"] == 2
    assert res["best_threshold"] == 0.05  # the first of equals
    assert res["iou"] == {"background": 1.0, "a": 1.0, "b": 1.0, "c": None}  # c never occurs


def test_hand_made_maps_have_their_known_miou(tree, tmp_path):
    maps_dir = write_maps(tmp_path / "maps", {"p": ([MAP_P], [1]), "q": ([np.ones((2, 4), np.float32)], [2])})
    res = evl.evaluate_maps(tree, "train", maps_dir, thresholds=[0.3, 0.6, 0.95])
    # t=0.3: p -> [[0,1,1,1],[0,1,1,0]]: bg 2/(4+3-2)=0.4, a 3/(4+5-3)=0.5, b 1 -> 1.9/3
    # t=0.6: p -> [[0,0,1,1],[0,0,1,0]]: bg 4/5=0.8, a 3/4=0.75, b 1 -> 2.55/3
    # t=0.95: p all background: bg 4/8=0.5, a 0; q's maps are 1 everywhere: b 1 -> 1.5/3
    mious = [p["miou"] for p in res["sweep"]]
    assert mious == pytest.approx([1.9 / 3, 2.55 / 3, 0.5])
    assert res["best_threshold"] == 0.6 and res["miou"] == pytest.approx(0.85)
    assert res["iou"]["background"] == pytest.approx(0.8) and res["iou"]["a"] == pytest.approx(0.75)
    assert res["pixel_acc"] == pytest.approx(14 / 15)


def test_sweep_picks_the_separating_threshold(tmp_path):
    gt = np.zeros((6, 6), np.uint8)
    gt[1:5, 2:5] = 3
    root = make_tree(tmp_path / "voc", {"x": gt}, split="val")
    m = np.where(gt == 3, 0.68, 0.42).astype(np.float32)  # object 0.68, background 0.42
    m[0, 0] = 1.0  # one background pixel of the map's own peak: wrong at every threshold
    res = evl.evaluate_maps(root, "val", write_maps(tmp_path / "maps", {"x": ([m], [3])}))
    best = [p["threshold"] for p in res["sweep"] if p["miou"] == res["miou"]]
    assert best == [0.45, 0.5, 0.55, 0.6, 0.65] and res["best_threshold"] == 0.45
    assert res["miou"] == pytest.approx((23 / 24 + 12 / 13) / 2)


def test_missing_or_mismatched_maps(tree, tmp_path):
    maps_dir = write_maps(tmp_path / "maps", {"p": ([MAP_P], [1])})
    with pytest.raises(FileNotFoundError, match="1 of 2 train images.*allow_missing"):
        evl.evaluate_maps(tree, "train", maps_dir)
    res = evl.evaluate_maps(tree, "train", maps_dir, thresholds=[0.6], allow_missing=True)
    assert res["num_images"] == 1 and res["num_missing"] == 1
    assert res["miou"] == pytest.approx((0.8 + 0.75) / 2)
    with pytest.raises(FileNotFoundError, match="no localization maps in .* found for any train image"):
        evl.evaluate_maps(tree, "train", tmp_path / "nothing", allow_missing=True)
    write_maps(maps_dir, {"q": ([np.ones((3, 4), np.float32)], [2])})
    with pytest.raises(ValueError, match="q.npz is 4x3 but the ground truth .*q.png is 4x2"):
        evl.evaluate_maps(tree, "train", maps_dir)


# ----------------------------------------------------------------------- pseudo masks

def test_pseudo_masks(tree, tmp_path):
    masks = tmp_path / "pseudo"
    save_mask(masks / "p.png", GT_P)
    save_mask(masks / "q.png", GT_Q)
    perfect = evl.evaluate_masks(tree, "train", masks)
    assert perfect["miou"] == 1.0 and perfect["miou_confident"] == 1.0
    assert perfect["coverage"] == pytest.approx(15 / 16)  # q's ignored pixel is 255 in the pseudo mask too

    pseudo_p = np.array([[0, 255, 1, 1],
                         [255, 0, 1, 2]], np.uint8)
    save_mask(masks / "p.png", pseudo_p)
    save_mask(masks / "q.png", np.full((2, 4), 255, np.uint8))
    res = evl.evaluate_masks(tree, "train", masks)
    # 255 counted as background: p -> [[0,0,1,1],[0,0,1,2]], q -> all 0 (7 counted pixels)
    # bg: tp 4, gt 4, pred 4 + 7 -> 4/11; a: 3/4; b: tp 0, gt 7, pred 1 -> 0
    assert res["miou"] == pytest.approx((4 / 11 + 3 / 4 + 0) / 3)
    assert res["iou"]["c"] is None
    # confident pixels only: p's 6 non-255 pixels: bg 2/2, a 3/4, b 0/1 (predicted, never true)
    assert res["miou_confident"] == pytest.approx((1 + 3 / 4 + 0) / 3)
    assert res["coverage"] == pytest.approx(6 / 16) and res["num_ignored_images"] == 1
    # foreground over the 15 pixels with ground truth: p labels 4 pixels a class, 3 rightly
    # (its 2 is on a 1); of the 11 object pixels (p's 4, q's 7) 3 get their class
    assert (res["fg_precision"], res["fg_recall"]) == (pytest.approx(3 / 4), pytest.approx(3 / 11))
    assert (res["fg_share"], res["gt_fg_share"]) == (pytest.approx(4 / 15), pytest.approx(11 / 15))
    assert perfect["fg_precision"] == perfect["fg_recall"] == 1.0


# ----------------------------------------------------------------------- segmenter

COLOURS = np.array([[0, 0, 0], [240, 30, 30], [30, 240, 30], [30, 30, 240]], np.uint8)


class ColourModel(nn.Module):
    """Classifies each pixel by its nearest class colour (normalised input -> logits)."""

    def __init__(self):
        super().__init__()
        centres = (torch.tensor(COLOURS, dtype=torch.float32) / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
        self.centres = nn.Parameter(centres, requires_grad=False)

    def forward(self, x):
        d = ((x[:, None] - self.centres[None, :, :, None, None]) ** 2).sum(2)
        return -10 * d


def seg_tree(tmp_path):
    gt1 = np.zeros((16, 20), np.uint8)
    gt1[2:10, 3:12] = 1
    gt1[10:15, 12:19] = 3
    gt2 = np.zeros((16, 20), np.uint8)
    gt2[4:12, 4:16] = 2
    return make_tree(tmp_path / "voc", {"s1": gt1, "s2": gt2}, split="val", colours=COLOURS)


def test_perfect_segmenter_scores_one_with_and_without_crf(tmp_path):
    root = seg_tree(tmp_path)
    res = evl.evaluate_segmenter(ColourModel(), root, "val", crf=True, scales=(1.0, 0.75), flip=True)
    assert res["miou"] == 1.0 and res["num_images"] == 2
    assert res["miou_crf"] > 0.97 and set(res["iou_crf"]) == {"background", *NAMES}
    assert "miou_crf" not in evl.evaluate_segmenter(ColourModel(), root, "val", limit=1)


def test_wrong_segmenter_has_its_known_miou(tmp_path):
    root = seg_tree(tmp_path)

    class Background(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, x):
            logits = torch.zeros(x.shape[0], 4, *x.shape[-2:])
            logits[:, 0] = 1
            return logits + self.w

    res = evl.evaluate_segmenter(Background(), root, "val")
    gt_bg = 2 * 16 * 20 - (8 * 9 + 5 * 7 + 8 * 12)
    assert res["miou"] == pytest.approx(gt_bg / (2 * 16 * 20) / 4)


# ----------------------------------------------------------------------- stage and figure

def test_run_merges_metrics_json(tree, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    write_maps(run_dir / "maps", {"p": ([MAP_P], [1]), "q": ([np.ones((2, 4), np.float32)], [2])})
    save_mask(run_dir / "pseudo" / "p.png", GT_P)
    save_mask(run_dir / "pseudo" / "q.png", GT_Q)
    (run_dir / "metrics.json").write_text(json.dumps({"classifier": {"val_map": 0.5}, "maps": "stale"}))

    out = ev.run(ev.EvalConfig(data_root=str(tree), run_dir=str(run_dir), thresholds=(0.3, 0.6)))
    assert sorted(out) == ["maps", "pseudo"]  # "auto": no segmenter.pt in the run
    saved = json.loads((run_dir / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert saved["classifier"] == {"val_map": 0.5}
    assert saved["maps"]["best_threshold"] == 0.6 and saved["maps"]["miou"] == pytest.approx(0.85)
    assert saved["pseudo"]["miou"] == 1.0 and (run_dir / "config_evaluate.yaml").is_file()

    with pytest.raises(FileNotFoundError, match="segmenter.pt is missing"):
        ev.run({"data_root": str(tree), "run_dir": str(run_dir), "parts": ["segmenter"]})
    seg_root = seg_tree(tmp_path / "seg")
    (run_dir / "segmenter.pt").touch()
    monkeypatch.setattr(ev, "load_segmenter", lambda run, device: ColourModel().to(device))
    res = ev.run({"data_root": str(seg_root), "run_dir": str(run_dir), "parts": ["segmenter"], "crf": False,
                  "device": "cpu"})
    assert res["segmenter"]["miou"] == 1.0
    assert set(json.loads((run_dir / "metrics.json").read_text())) == {"classifier", "maps", "pseudo", "segmenter"}
    with pytest.raises(ValueError, match="parts"):
        ev.run({"data_root": str(tree), "run_dir": str(run_dir), "parts": ["cams"]})
    with pytest.raises(FileNotFoundError, match="nothing to evaluate"):
        ev.run({"data_root": str(tree), "run_dir": str(tmp_path / "empty_run")})


def test_unchanged_parts_keep_their_numbers_and_a_changed_one_is_evaluated_again(tree, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    write_maps(run_dir / "maps", {"p": ([MAP_P], [1]), "q": ([np.ones((2, 4), np.float32)], [2])})
    save_mask(run_dir / "pseudo" / "p.png", GT_P)
    save_mask(run_dir / "pseudo" / "q.png", GT_Q)
    cfg = {"data_root": str(tree), "run_dir": str(run_dir), "thresholds": [0.3, 0.6]}
    first = ev.run(cfg)
    assert ev.state(cfg) == ("keep", "inputs and settings equal")
    calls = []
    monkeypatch.setattr(ev, "evaluate_masks", lambda *a, **k: calls.append("pseudo") or {"miou": 0.5})
    assert ev.run(cfg) == first and not calls
    assert ev.state({**cfg, "thresholds": [0.5]}) == ("recompute", "maps changed")
    save_mask(run_dir / "pseudo" / "p.png", GT_Q)  # same folder settings, another file: the count decides
    (run_dir / "pseudo" / "q.png").unlink()
    assert ev.state(cfg) == ("recompute", "pseudo changed")
    out = ev.run(cfg)
    assert calls == ["pseudo"] and out["pseudo"]["miou"] == 0.5 and out["maps"] == first["maps"]
    assert ev.run({**cfg, "overwrite": True})["pseudo"]["miou"] == 0.5 and calls == ["pseudo", "pseudo"]


def test_a_read_only_run_directory_is_evaluated_without_writing(tree, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    write_maps(run_dir / "maps", {"p": ([MAP_P], [1]), "q": ([np.ones((2, 4), np.float32)], [2])})
    before = sorted(p.name for p in run_dir.iterdir())
    monkeypatch.setattr(ev.os, "access", lambda path, mode: False)  # as a read-only mount answers
    out = ev.run({"data_root": str(tree), "run_dir": str(run_dir), "thresholds": [0.3, 0.6]})
    assert out["maps"]["miou"] == pytest.approx(0.85)
    assert sorted(p.name for p in run_dir.iterdir()) == before  # no metrics.json, config or provenance


def test_sweep_figure(tree, tmp_path):
    res = evl.evaluate_maps(tree, "train", write_maps(tmp_path / "maps", {
        "p": ([MAP_P], [1]), "q": ([np.ones((2, 4), np.float32)], [2])}))
    fig = viz.sweep_figure(res)
    assert isinstance(fig, Figure) and len(fig.axes[0].lines) == 2  # curve + best point
    fig = viz.sweep_figure({"single-image": res, "cross-image": res["sweep"]})
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["single-image", "cross-image"]
    assert math.isclose(fig.axes[0].lines[0].get_ydata().max(), res["miou"])
