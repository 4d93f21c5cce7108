"""The art benchmark (wsss.data.art through wsss.data.synth): VOC's 20 classes from the
committed sprites, VOC's layout and ignore band, honest labels, VOC-like statistics, and the
same bytes for the same seed."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsss.classes import VOC_CLASSES
from wsss.data import art, synth
from wsss.data.voc import VOCDataset

SEG = Path("ImageSets/Segmentation")


@pytest.fixture(scope="module")
def art_smoke(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("art") / "art-smoke"
    synth.generate(root, "art-smoke", seed=0)
    return root


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and ".wsss_cache" not in p.parts}  # the reader's cache


def test_voc_layout_with_voc_classes_and_honest_labels(art_smoke):
    assert not (art_smoke / "classes.txt").exists() and not (art_smoke / synth.PART_DIR).exists()
    train = VOCDataset(art_smoke, "train")
    assert tuple(train.class_names) == VOC_CLASSES and len(train) == 40
    metas = {m["name"]: m for m in map(json.loads, open(art_smoke / synth.OBJECTS_FILE))}
    for name in (art_smoke / SEG / "train.txt").read_text().split():
        mask = np.asarray(Image.open(art_smoke / "SegmentationClass" / f"{name}.png"))
        assert Image.open(art_smoke / "SegmentationClass" / f"{name}.png").mode == "P"
        present = sorted(int(c) for c in np.unique(mask) if c not in (0, 255))
        assert present == metas[name]["labels"] and present, name
        assert (mask == 255).any(), f"{name}: no ignore band on the object boundaries"
    singles = [line.split() for line in (art_smoke / SEG / "train_single.txt").read_text().splitlines()]
    assert all(len(line) == 2 for line in singles)


def test_same_seed_same_bytes(art_smoke, tmp_path):
    synth.ensure_benchmark(tmp_path / "again", "art-smoke", seed=0)  # as the pipeline makes it on a fresh machine
    assert _hashes(tmp_path / "again") == _hashes(art_smoke)
    synth.generate(tmp_path / "other", "art-smoke", seed=1)
    assert _hashes(tmp_path / "other") != _hashes(art_smoke)


def test_scene_statistics_are_voc_like():
    """Over 300 scenes at 96 px: a quarter of the pixels foreground (VOC: about 25-30 %),
    person the most frequent class, the first object's context mostly, a thin 255 band."""
    metas = [art.make_scene(np.random.default_rng([7, i]), 96)[2] for i in range(300)]
    assert 0.2 < np.mean([m["foreground"] for m in metas]) < 0.32
    assert 0.02 < np.mean([m["ignored"] for m in metas]) < 0.1
    counts = np.bincount([c for m in metas for c in m["labels"]], minlength=21)[1:]
    assert counts.argmax() == VOC_CLASSES.index("person")
    own = np.mean([m["context"] in art.CONTEXTS[m["objects"][0]["class"]] for m in metas])
    assert 0.75 < own < 0.95  # P_CONTEXT, plus the random background that happens to fit
    assert 1.5 < np.mean([len(m["objects"]) for m in metas]) < 2.2


def test_boundary_band_on_a_hand_made_mask():
    mask = np.zeros((7, 7), np.uint8)
    mask[2:5, 2:5] = 3
    expected = np.zeros((7, 7), bool)
    expected[1:6, 1:6] = True   # within a pixel of the object's edge, on either side
    expected[3, 3] = False      # the object's centre touches only its own label
    assert (art.boundary_band(mask, 1) == expected).all()
    assert not art.boundary_band(np.zeros((5, 5), np.uint8), 1).any()


def test_art_refuses_the_knobs_of_the_shapes_benchmarks():
    with pytest.raises(ValueError, match="knobs of the shapes benchmarks only"):
        synth.resolve_params("art-demo", num_classes=10)
    with pytest.raises(ValueError, match="knobs of the shapes benchmarks only"):
        synth.resolve_params("art-demo", body_class=0.5)
    assert synth.resolve_params("art-demo").num_classes == 20
    assert synth.resolve_params("demo").num_classes == 10


def test_every_placed_object_is_in_the_mask_with_its_visible_pixels():
    """Objects that find no place are left out without shifting the others' labels."""
    for i in range(120):
        _, mask, meta = art.make_scene(np.random.default_rng([3, i]), 64, num_objects=3)
        drawn = {VOC_CLASSES.index(o["class"]) + 1 for o in meta["objects"]}
        assert set(meta["labels"]) == drawn
        assert all(o["pixels"] >= art.MIN_VISIBLE * o["pixels_drawn"] or k == 0
                   for k, o in enumerate(meta["objects"]))


def test_every_benchmark_size_can_be_named_where_a_user_names_one():
    """The CLI's --size choices and the pipeline's `benchmark:` are written out (the CLI builds
    its parser without importing the generator); they must list exactly synth.SIZES."""
    import typing

    from wsss.cli import build_parser
    from wsss.stages.pipeline import PipelineConfig

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    size = next(a for a in sub.choices["make-benchmark"]._actions if a.dest == "size")
    assert sorted(size.choices) == sorted(synth.SIZES)
    literal = typing.get_type_hints(PipelineConfig)["benchmark"]
    assert sorted(typing.get_args(literal)) == sorted(synth.SIZES)
