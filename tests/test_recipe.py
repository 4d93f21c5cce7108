"""The `official` recipe (METHOD.md "Recipes"): each item of the authors' code that is not
an equation, as our code reproduces it. The loss weighting and the five-map aggregate are
checked against transcriptions of the reference in test_losses.py and test_make_maps.py."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from wsss import config as C
from wsss import lr_schedule
from wsss.classes import write_class_names
from wsss.data.pairs import PairDataset, partners_for_class, sample_partner
from wsss.data.transforms import source_view_transforms, train_transforms
from wsss.data.voc import VOCDataset, save_mask
from wsss.models import CoAttentionClassifier, build_backbone
from wsss.stages import pipeline


def test_the_official_recipe_sets_every_item_and_a_section_still_wins(tmp_path):
    cfg = C.from_dict(pipeline.PipelineConfig, {"recipe": "official", "classifier": {"flip": True, "lr": 0.02}})
    stages = pipeline.stage_configs(cfg, tmp_path, tmp_path)
    cl, maps = stages["classifier"], stages["maps"]
    assert (cl.heads, cl.augment, cl.hue, cl.self_views, cl.partner_self, cl.bias_lr_mult, cl.p_common) == (
        "reference", "squash", 0.1, "source", True, 2.0, 1.0)
    assert (cl.loss.self_pairs, cl.loss.w_basic, cl.loss.w_coatt, cl.loss.w_con, cl.loss.empty_contrastive,
            cl.loss.self_weighting) == (True, 0.5, 0.5, 1.0, "negative", "sum")
    assert cl.flip is True and cl.lr == 0.02                    # the pipeline's own keys override the recipe
    assert (maps.aggregate, maps.partners, maps.k, maps.scales) == ("reference", "replace", 3, (1.0,))
    ours = pipeline.stage_configs(C.from_dict(pipeline.PipelineConfig, {}), tmp_path, tmp_path)["classifier"]
    assert (ours.heads, ours.augment, ours.self_views, ours.loss.empty_contrastive, ours.loss.self_weighting) == (
        "ours", "crop", "batch", "skip", "mean")


def test_an_unknown_recipe_names_the_known_ones(tmp_path):
    cfg = C.from_dict(pipeline.PipelineConfig, {"recipe": "offical"})
    with pytest.raises(C.ConfigError, match=r"recipe 'offical'.*official"):
        pipeline.stage_configs(cfg, tmp_path, tmp_path)
    bad = tmp_path / "r.yaml"
    bad.write_text("classifer: {heads: reference}\n")
    with pytest.raises(C.ConfigError, match="unknown section"):
        pipeline.stage_configs(C.from_dict(pipeline.PipelineConfig, {"recipe": str(bad)}), tmp_path, tmp_path)


def test_reference_heads_biases_and_initialisation():
    torch.manual_seed(0)
    k = 20
    ref = CoAttentionClassifier(k, backbone="tiny", heads="reference")
    c = ref.backbone.out_channels
    assert ref.phi0.bias is not None and ref.phi.bias is None and ref.gate.bias is None
    assert torch.equal(ref.phi0.bias, torch.zeros(k))
    assert ref.phi0.weight.std().item() == pytest.approx(math.sqrt(2 / k), rel=0.1)
    bound = 1 / math.sqrt(c)
    w = ref.coatt.weight
    assert w.abs().max() <= bound and w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
    assert not torch.allclose(w, w.t())
    ours = CoAttentionClassifier(k, backbone="tiny")
    assert ours.phi0.bias is None and ours.gate.bias is not None
    assert torch.allclose(ours.coatt.weight, torch.eye(c) / math.sqrt(c))
    with pytest.raises(ValueError, match="heads"):
        CoAttentionClassifier(k, backbone="tiny", heads="theirs")


def test_vgg16_has_no_pool5_like_the_reference_cfg_d1():
    features = build_backbone("vgg16").features
    pools = [type(m).__name__ + str(getattr(m, "stride", "")) for m in features if isinstance(m, nn.MaxPool2d)]
    assert pools == ["MaxPool2d2", "MaxPool2d2", "MaxPool2d2", "MaxPool2d1"]   # pool1-3, pool4 at stride 1
    assert isinstance(features[30], nn.Identity)


def test_bias_lr_multiplier_gives_the_references_four_groups():
    model = CoAttentionClassifier(5, backbone="tiny", heads="reference")
    body, new = model.param_groups()
    biases = [p for n, p in model.named_parameters() if n.endswith(".bias")]
    groups = lr_schedule.param_groups(body, new, 1e-3, 5e-4, 10.0, 2.0, biases)
    assert {g["name"]: g["lr"] for g in groups} == pytest.approx(
        {"backbone": 1e-3, "backbone_bias": 2e-3, "new": 1e-2, "new_bias": 2e-2})
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters()) and len(ids) == len(set(ids))
    assert {id(p) for p in groups[3]["params"]} == {id(model.phi0.bias)}
    assert [g["name"] for g in lr_schedule.param_groups(body, new, 1e-3)] == ["backbone", "new"]


LABELS = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1]], dtype=np.uint8)  # class 2 only in image 3


def test_a_common_partner_may_be_the_image_itself_with_include_self():
    rng = np.random.default_rng(0)
    draws = np.array([sample_partner(LABELS, 0, 1.0, rng, include_self=True) for _ in range(4000)])
    assert set(draws) == {0, 1}                                 # class 0 is held by images 0 and 1
    assert (draws == 0).mean() == pytest.approx(0.5, abs=0.03)
    lonely = {sample_partner(LABELS, 3, 1.0, rng, include_self=True) for _ in range(50)}
    assert lonely == {3}                                        # its only class is its own
    assert 0 not in {sample_partner(LABELS, 0, 1.0, rng) for _ in range(200)}


def test_partners_with_replacement_include_the_image():
    rng = np.random.default_rng(0)
    assert partners_for_class(LABELS, 3, 2, 3, rng, replace=True) == [3, 3, 3]
    assert partners_for_class(LABELS, 3, 2, 3, rng) == []
    draws = [tuple(partners_for_class(LABELS, 1, 1, 3, rng, replace=True)) for _ in range(300)]
    assert {n for d in draws for n in d} == {1, 2} and any(len(set(d)) < 3 for d in draws)


def _dataset(root: Path, n=4, h=40, w=60) -> Path:
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    write_class_names(root, ["a", "b"])
    rng = np.random.default_rng(0)
    names = []
    for i in range(n):
        name = f"im{i}"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{name}.jpg")
        mask = np.zeros((h, w), np.uint8)
        mask[5:20, 5:30] = 1 + i % 2
        save_mask(root / "SegmentationClass" / f"{name}.png", mask)
        names.append(name)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(names) + "\n")
    return root


def test_squash_augmentation_and_views_from_the_stored_image(tmp_path):
    root = _dataset(tmp_path / "d")
    train_tf = train_transforms(crop=None, scale=None, flip=False, jitter=0.3, hue=0.1, squash=32)
    base = VOCDataset(root, "train", transforms=train_tf, with_mask=False)
    views = source_view_transforms(32)
    pairs = PairDataset(base, p_common=1.0, seed=0, include_self=True, view_transforms=views)
    item = pairs[1]
    assert item["m"]["image"].shape == (3, 32, 32)             # squashed, aspect ratio not kept
    got = item["m"]["views"]
    assert {k: tuple(v.shape) for k, v in got.items()} == {"flip": (3, 32, 32), "down": (3, 24, 24),
                                                            "up": (3, 64, 64)}
    source = base.source_image(1)
    for name, t in views.items():                               # no jitter: a function of the stored image
        assert torch.equal(got[name], t(source))
    flipped = views["flip"](source).flip(-1)
    unflipped = train_transforms(crop=None, scale=None, flip=False, jitter=0.0, squash=32)(source)
    assert torch.allclose(flipped, unflipped, atol=1e-6)
