"""Localization maps with cross-image context (wsss.stages.make_maps, METHOD.md sec. 2).

The core is checked against a slow reference written from METHOD.md on top of the
model's public ``cam`` / ``coatt_cam``; the stage on a hand-made VOC tree under tmp_path
with a randomly initialised tiny classifier saved in the classifier stage's format.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from wsss import config as C
from wsss import maps as wm
from wsss import rundir as R
from wsss.checkpoints import atomic_torch_save
from wsss.classes import write_class_names
from wsss.data.pairs import self_pair_views
from wsss.data.voc import save_mask
from wsss.models.classifier import CoAttentionClassifier
from wsss.stages import make_maps as mm
from wsss.stages.train_classifier import ClassifierConfig, build_model

K = 4


@pytest.fixture(scope="module")
def model():
    """A non-symmetric W_P (as after training), so that the order of a pair matters."""
    torch.manual_seed(0)
    net = CoAttentionClassifier(K, backbone="tiny").eval()
    with torch.no_grad():
        net.coatt.weight.add_(0.05 * torch.randn_like(net.coatt.weight))
    assert not torch.allclose(net.coatt.weight, net.coatt.weight.t())
    return net


@pytest.fixture(scope="module")
def symmetric_model():
    """W_P = I / sqrt(C) as initialised: (x, y) and (y, x) give the same maps."""
    torch.manual_seed(0)
    return CoAttentionClassifier(K, backbone="tiny").eval()


@pytest.fixture(scope="module")
def positive_model():
    """Non-negative class heads on the non-negative (post-ReLU) features: no map is all zero."""
    torch.manual_seed(0)
    net = CoAttentionClassifier(K, backbone="tiny").eval()
    with torch.no_grad():
        net.phi0.weight.abs_()
        net.phi.weight.abs_()
    return net


def _image(seed, h=40, w=36):
    return torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------- slow reference

def _norm(m):
    m = m.clamp_min(0)
    peak = m.amax(dim=(-2, -1), keepdim=True)
    return torch.where(peak > 0, m / torch.where(peak > 0, peak, 1), 0)


def _up(m, size):
    return F.interpolate(m[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]


@torch.no_grad()
def reference_maps(model, x, classes, partners, kinds, transforms=wm.SELF_TRANSFORMS):
    """METHOD.md sec. 2, one map at a time through model.cam / model.coatt_cam (single scale):
    each map ReLU'd and max-normalised, resized, averaged per kind, kinds averaged, renormalised."""
    size = x.shape[-2:]
    views = {"identity": x, **self_pair_views(x)}
    out = []
    for c in classes:
        per_kind = []
        if "cam" in kinds:
            per_kind.append(_up(_norm(model.cam(x)[0, c - 1]), size))
        if "coatt" in kinds and partners.get(c):
            maps = [_up(_norm(model.coatt_cam(x, p[None] if p.ndim == 3 else p)[0, c - 1]), size)
                    for p in partners[c]]
            per_kind.append(torch.stack(maps).mean(0))
        if "self" in kinds:
            maps = []
            for t in transforms:
                m = model.coatt_cam(x, views[t], side="n")[0, c - 1]  # the view's map in (x, view)
                m = m.flip(-1) if t == "flip" else m
                maps.append(_up(_norm(m), size))
            per_kind.append(torch.stack(maps).mean(0))
        out.append(_norm(torch.stack(per_kind).mean(0)))
    return torch.stack(out)


# ----------------------------------------------------------------------- pure core

def test_shared_backbone_pieces_equal_the_model_api(model):
    x, p = _image(1), _image(2, 32, 32)
    with torch.no_grad():
        f_x, f_p = model.features([x, p])
        assert torch.allclose(wm.coatt_map(model, f_x, f_p), model.coatt_cam(x, p), atol=1e-6)
        assert torch.allclose(model.phi0(f_x), model.cam(x), atol=1e-6)


@pytest.mark.parametrize("kinds", [("cam",), ("coatt",), ("self",), ("cam", "coatt"), wm.KINDS])
def test_maps_match_the_slow_reference(model, kinds):
    x = _image(3)
    partners = {1: [_image(4)[0], _image(5, 48, 40)[0]], 3: [_image(6)[0]]}
    got = wm.localization_maps(model, x, [1, 3], partners, kinds)
    want = reference_maps(model, x, [1, 3], partners, kinds)
    assert got.shape == (2, 40, 36)
    assert torch.allclose(got, want, atol=1e-5)


def test_shapes_and_normalisation(model):
    x = _image(7)
    maps = wm.localization_maps(model, x, [2, 4, 1], {2: [_image(8)], 4: [_image(9)], 1: [_image(8)]},
                                scales=(1.0, 0.5, 1.5))
    assert maps.shape == (3, 40, 36) and maps.dtype == torch.float32
    assert torch.isfinite(maps).all() and maps.min() >= 0
    assert torch.allclose(maps.amax(dim=(1, 2)), torch.ones(3))
    assert wm.localization_maps(model, x, [2], {}, "cam", out_size=(50, 60)).shape == (1, 50, 60)


def test_all_zero_maps_stay_zero_and_finite():
    assert torch.equal(wm.normalise_maps(torch.zeros(2, 5, 5)), torch.zeros(2, 5, 5))
    neg = -torch.rand(1, 4, 4)
    assert torch.equal(wm.normalise_maps(neg), torch.zeros(1, 4, 4))
    torch.manual_seed(0)
    silent = CoAttentionClassifier(K, backbone="tiny").eval()
    torch.nn.init.zeros_(silent.phi0.weight)
    torch.nn.init.zeros_(silent.phi.weight)
    maps = wm.localization_maps(silent, _image(1), [1, 2], {1: [_image(2)]})
    assert torch.isfinite(maps).all() and torch.equal(maps, torch.zeros_like(maps))


def test_classes_absent_from_the_label_get_no_map(model):
    x = _image(1)
    assert wm.localization_maps(model, x, [], {}).shape == (0, 40, 36)
    one = wm.localization_maps(model, x, [3], {3: [_image(2)]})
    two = wm.localization_maps(model, x, [1, 3], {1: [_image(5)], 3: [_image(2)]})
    assert one.shape[0] == 1 and torch.allclose(one[0], two[1], atol=1e-6)  # rows follow `classes`
    with pytest.raises(ValueError, match="outside 1..4"):
        wm.localization_maps(model, x, [0], {})
    with pytest.raises(ValueError, match="outside 1..4"):
        wm.localization_maps(model, x, [K + 1], {})


def test_k_identical_partners_equal_one_partner(model):
    x, p = _image(1), _image(2)
    one = wm.localization_maps(model, x, [2], {2: [p]}, "coatt")
    three = wm.localization_maps(model, x, [2], {2: [p.clone(), p.clone(), p.clone()]}, "coatt")
    assert torch.allclose(one, three, atol=1e-6)


def test_image_as_its_own_partner_equals_the_identity_self_pair(symmetric_model):
    model, x = symmetric_model, _image(1)
    as_partner = wm.localization_maps(model, x, [1, 4], {1: [x.clone()], 4: [x.clone()]}, "coatt")
    identity = wm.localization_maps(model, x, [1, 4], {}, "self", self_transforms=("identity",))
    assert torch.allclose(as_partner, identity, atol=1e-6)


@torch.no_grad()
def test_self_pair_maps_are_the_views_map_in_the_training_pair(model):
    """Training pairs (I_m, T(I_m)) (models/classifier.py); inference must score T(I_m) on the
    n side of that pair. With a non-symmetric W_P the reversed pair (T(I_m), I_m) differs."""
    x = _image(11)
    for t, view in {"identity": x, **self_pair_views(x)}.items():
        got = wm.localization_maps(model, x, [2], {}, "self", self_transforms=(t,))
        n_side = model.coatt_cam(x, view, side="n")[0, 1]
        reversed_pair = model.coatt_cam(view, x)[0, 1]
        if t == "flip":
            n_side, reversed_pair = n_side.flip(-1), reversed_pair.flip(-1)
        assert torch.allclose(got[0], _norm(_up(_norm(n_side), x.shape[-2:])), atol=1e-5), t
        assert not torch.allclose(n_side, reversed_pair, atol=1e-4), t


def _np_normalise(a):
    a = np.maximum(a, 0)
    return a / (a.max() + 1e-8)


@torch.no_grad()
def _reference_five_maps(model, x, partners, c):
    """Classifier/scripts/test.py written out for one class column c: five raw maps on x's
    feature grid, then its aggregate rule (first map always, the others if sigmoid(mean) >
    0.1, each ReLU'd and max-normalised, the sum divided by the number of maps)."""
    views = self_pair_views(x)
    grid = model.features([x])[0].shape[-2:]

    def bicubic(m):
        return F.interpolate(m, size=grid, mode="bicubic", align_corners=False)

    raw = [model.coatt_cam(x, views["flip"])[0, c],
           model.coatt_cam(x, views["flip"], side="n")[0, c].flip(-1),
           bicubic(model.coatt_cam(x, views["down"], side="n"))[0, c],
           bicubic(model.coatt_cam(x, views["up"], side="n"))[0, c],
           torch.stack([model.coatt_cam(x, p)[0, c] for p in partners]).mean(0)]
    raw = [m.numpy().astype(np.float64) for m in raw]
    att = _np_normalise(raw[0].copy())
    for m in raw[1:]:
        if 1 / (1 + np.exp(-m.mean())) > 0.1:
            att = att + _np_normalise(m.copy())
    return att / len(raw)


def test_reference_aggregate_matches_a_transcription_of_the_reference(model):
    x = _image(12, 32, 32)
    partners = {1: [_image(13, 32, 32), _image(14, 32, 32), _image(13, 32, 32)], 3: [_image(15, 32, 32)]}
    got = wm.localization_maps(model, x, [1, 3], partners, aggregate="reference", out_size=(32, 32))
    for row, c in enumerate([1, 3]):
        att = torch.from_numpy(_reference_five_maps(model, x, partners[c], c - 1)).float()
        want = F.interpolate(att[None, None], size=(32, 32), mode="bicubic", align_corners=False)[0, 0]
        want = want.clamp_min(0)
        want = (want - want.min()) / (want.max() - want.min())
        assert torch.allclose(got[row], want, atol=1e-5)


def test_reference_aggregate_gates_maps_by_their_mean():
    first = torch.rand(2, 4, 4)
    weak = torch.full((2, 4, 4), -5.0)          # sigmoid(-5) < 0.1: left out
    weak[1] = torch.rand(4, 4)                  # row 1 passes the gate
    got = wm.reference_aggregate([first, weak])
    assert torch.allclose(got[0], wm.normalise_maps(first)[0] / 2)
    assert torch.allclose(got[1], (wm.normalise_maps(first)[1] + wm.normalise_maps(weak)[1]) / 2)


def test_combine_selects_the_kinds(positive_model):
    model = positive_model
    x, p = _image(1), {1: [_image(2)]}
    cam = wm.localization_maps(model, x, [1], p, "cam")
    coatt = wm.localization_maps(model, x, [1], p, "coatt")
    both = wm.localization_maps(model, x, [1], p, ("coatt", "cam"))
    with torch.no_grad():
        plain = _norm(_up(_norm(model.cam(x)[0, 0]), x.shape[-2:]))
    assert torch.allclose(cam[0], plain, atol=1e-6)   # "cam" is plain single-image CAM
    assert not torch.allclose(cam, coatt, atol=1e-3)
    assert not torch.allclose(both, cam, atol=1e-3) and not torch.allclose(both, coatt, atol=1e-3)
    assert torch.allclose(both, reference_maps(model, x, [1], p, ("cam", "coatt")), atol=1e-5)
    assert torch.equal(wm.localization_maps(model, x, [1], p, "cam+coatt"), both)


def test_class_without_partner_falls_back(model):
    x = _image(1)
    no_partner_coatt = wm.localization_maps(model, x, [2], {}, "coatt")
    assert torch.allclose(no_partner_coatt, wm.localization_maps(model, x, [2], {}, "self"), atol=1e-6)
    cam_coatt = wm.localization_maps(model, x, [2], {2: []}, ("cam", "coatt"))
    assert torch.allclose(cam_coatt, wm.localization_maps(model, x, [2], {}, "cam"), atol=1e-6)


def test_parse_combine():
    assert wm.parse_combine("all") == wm.KINDS
    assert wm.parse_combine("self,cam") == ("cam", "self")
    assert wm.parse_combine(("all",)) == wm.KINDS == wm.parse_combine("all")  # YAML `combine: all` is a 1-tuple
    assert wm.parse_combine(["coatt"]) == ("coatt",)
    assert wm.parse_combine(("cam+coatt",)) == ("cam", "coatt")  # YAML / a grid's `combine=cam+coatt`
    for bad in ("", "camm", ["cam", "grad"]):
        with pytest.raises(ValueError, match="combine"):
            wm.parse_combine(bad)
    with pytest.raises(ValueError, match="self_transforms"):
        wm.localization_maps(None, _image(1), [1], {}, "self", self_transforms=("rotate",))


def test_save_and_load_maps(tmp_path):
    maps = np.random.default_rng(0).random((2, 5, 6)).astype(np.float32)
    wm.save_maps(tmp_path / "a.npz", maps, [3, 1])
    got, classes = wm.load_maps(tmp_path / "a.npz")
    assert got.dtype == np.float32 and np.allclose(got, maps, atol=1e-3)
    assert classes.tolist() == [3, 1]
    with np.load(tmp_path / "a.npz") as z:
        assert z["maps"].dtype == np.float16 and z["classes"].dtype == np.int16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz"]  # no temporary file left
    with pytest.raises(FileNotFoundError, match="maps stage"):
        wm.load_maps(tmp_path / "b.npz")
    with pytest.raises(ValueError, match="classes"):
        wm.save_maps(tmp_path / "c.npz", maps, [1])


# ----------------------------------------------------------------------- the stage

H, W = 24, 32
#: name -> classes drawn as bands; class 3 is held by one image only (no partner)
IMAGES = {"a": (1,), "b": (1, 2), "c": (2,), "d": (1, 3), "e": (2, 1)}
FAST = ("identity", "flip")  # the stage tests skip the rescaled self-pairs (the core tests cover them)


def _voc_tree(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for i, (name, classes) in enumerate(IMAGES.items()):
        mask = np.zeros((H, W), np.uint8)
        for j, c in enumerate(classes):
            mask[3 + 8 * j: 9 + 8 * j, 4:28] = c
        (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
        rgb = (rng.random((H, W, 3)) * 60 + mask[..., None] * 50).astype(np.uint8)
        Image.fromarray(rgb).save(root / "JPEGImages" / f"{name}.jpg", quality=95)
        save_mask(root / "SegmentationClass" / f"{name}.png", mask)
    split = root / "ImageSets" / "Segmentation" / "train.txt"
    split.parent.mkdir(parents=True, exist_ok=True)
    split.write_text("".join(f"{n}\n" for n in IMAGES))
    write_class_names(root, ["red", "green", "blue", "grey"])
    return root


def _save_classifier(run_dir: Path, data_root: Path) -> Path:
    """A randomly initialised tiny classifier in the format of the classifier stage."""
    cfg = ClassifierConfig(data_root=str(data_root), run_dir=str(run_dir))
    torch.manual_seed(0)
    net = build_model(cfg, K)
    path = run_dir / R.CLASSIFIER
    atomic_torch_save({"model": net.state_dict(), "cfg": C.to_dict(cfg), "num_classes": K, "metrics": {},
                       "class_names": ["red", "green", "blue", "grey"]}, path)
    return path


@pytest.fixture()
def stage(tmp_path):
    root = _voc_tree(tmp_path / "voc")
    run_dir = tmp_path / "run"
    _save_classifier(run_dir, root)
    return root, run_dir


def test_run_writes_maps_then_skips_them(stage, caplog):
    root, run_dir = stage
    cfg = mm.MapsConfig(data_root=str(root), run_dir=str(run_dir), k=2, device="cpu", self_transforms=FAST)
    with caplog.at_level("WARNING", logger="wsss.stages.make_maps"):
        res = mm.run(cfg)
    assert res["num_images"] == 5 and res["num_skipped"] == 0 and res["images_per_s"] > 0
    assert res["num_no_partner"] == 1  # class 3 of image d
    assert sum("no other train image contains" in r.message for r in caplog.records) == 1
    for name, classes in IMAGES.items():
        maps, ids = wm.load_maps(run_dir / "maps" / f"{name}.npz")
        assert sorted(ids.tolist()) == sorted(classes) and maps.shape == (len(classes), H, W)
        assert maps.min() >= 0 and np.allclose(maps.max(axis=(1, 2)), 1, atol=1e-3)
    assert json.loads((run_dir / "maps" / R.SETTINGS).read_text())["k"] == 2
    assert C.load_yaml(mm.MapsConfig, run_dir / "config_maps.yaml") == cfg

    stamps = {p.name: p.stat().st_mtime_ns for p in (run_dir / "maps").glob("*.npz")}
    again = mm.run(cfg)
    assert again["num_images"] == 0 and again["num_skipped"] == 5
    assert {p.name: p.stat().st_mtime_ns for p in (run_dir / "maps").glob("*.npz")} == stamps

    with pytest.raises(ValueError, match="other settings.*combine.*overwrite=True"):
        mm.run(mm.MapsConfig(data_root=str(root), run_dir=str(run_dir), k=2, combine=("cam",), device="cpu",
                             self_transforms=FAST))
    redo = mm.run({"data_root": str(root), "run_dir": str(run_dir), "k": 2, "combine": "cam", "device": "cpu",
                   "overwrite": True, "limit": 2, "image_size": 16})
    assert redo["num_images"] == 2
    assert wm.load_maps(run_dir / "maps" / "a.npz")[0].shape == (1, H, W)  # native size whatever the input size


def test_command_line_flags():
    parser = C.command_line(argparse.ArgumentParser(), mm.MapsConfig)
    args = parser.parse_args(["--data-root", "D", "--run-dir", "R", "--combine", "cam", "self",
                              "--scales", "1.0", "0.5", "--image-size", "none", "--no-amp"])
    cfg = C.from_args(mm.MapsConfig, args, parser=parser)
    assert (cfg.combine, cfg.scales, cfg.image_size, cfg.amp) == (("cam", "self"), (1.0, 0.5), None, False)


def test_run_is_deterministic_and_resumes_a_partial_run(stage, tmp_path):
    root, run_dir = stage
    kw = dict(data_root=str(root), k=2, device="cpu", self_transforms=FAST)
    mm.run(mm.MapsConfig(run_dir=str(run_dir), **kw))
    other = tmp_path / "run2"
    _save_classifier(other, root)
    part = mm.run(mm.MapsConfig(run_dir=str(other), limit=2, **kw))
    rest = mm.run(mm.MapsConfig(run_dir=str(other), workers=1, **kw))
    assert (part["num_images"], rest["num_images"], rest["num_skipped"]) == (2, 3, 2)
    for name in IMAGES:
        a, _ = wm.load_maps(run_dir / "maps" / f"{name}.npz")
        b, _ = wm.load_maps(other / "maps" / f"{name}.npz")
        assert np.array_equal(a, b)


def test_run_without_classifier_says_what_to_do(tmp_path):
    root = _voc_tree(tmp_path / "voc")
    with pytest.raises(FileNotFoundError, match="train the classifier first"):
        mm.run(mm.MapsConfig(data_root=str(root), run_dir=str(tmp_path / "empty")))


def test_maps_grid_draws_saved_maps_of_two_folders(stage):
    from wsss import viz

    root, run_dir = stage
    for name, combine in (("maps_cam", "cam"), ("maps_ref", "coatt")):
        mm.run({"data_root": str(root), "run_dir": str(run_dir), "combine": combine, "maps_dir": name, "k": 1,
                "self_transforms": list(FAST)})
    names = list(IMAGES)[:2]
    fig = viz.maps_grid(root, {"CAM": run_dir / "maps_cam", "co-attention": run_dir / "maps_ref"}, names,
                        class_names=["red", "green", "blue", "grey"])
    assert len(fig.axes) == 2 * 4 and fig.axes[2].get_title() == "CAM" and fig.axes[3].get_title() == "co-attention"
    with pytest.raises(FileNotFoundError, match="run the maps stage"):
        viz.maps_grid(root, {"missing": run_dir / "nothing"}, names)
