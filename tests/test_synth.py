"""The embedded benchmark (wsss.data.synth): VOC layout, honest labels, determinism, and
the failure modes it is built to show (data/README.md)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsss.classes import load_class_names, voc_palette
from wsss.data import synth

SEG = Path("ImageSets/Segmentation")


def _metas(root: Path) -> list[dict]:
    with open(root / synth.OBJECTS_FILE) as f:
        return [json.loads(line) for line in f]


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _split_lines(root: Path, fname: str) -> list[list[str]]:
    return [line.split() for line in (root / SEG / fname).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench") / "smoke"
    synth.generate(root, "smoke", seed=0)
    return root


@pytest.fixture(scope="module")
def stats_root(tmp_path_factory) -> tuple[Path, dict]:
    """More images (small ones) for the statistical checks."""
    root = tmp_path_factory.mktemp("bench") / "stats"
    stats = synth.generate(root, "smoke", seed=1, image_size=48, num_train=400, num_val=4, num_single=4,
                           num_web=300, body_class=0.0)
    return root, stats


def test_voc_layout(smoke):
    p = synth.SIZES["smoke"]
    names = {k: [ln[0] for ln in _split_lines(smoke, f)] for k, f in synth.SPLIT_FILES.items()}
    assert [len(names[k]) for k in ("train", "val", "single", "web")] == [
        p["num_train"], p["num_val"], p["num_single"], p["num_web"]]
    assert all(len(ln) == 1 for ln in _split_lines(smoke, "train.txt") + _split_lines(smoke, "val.txt"))
    assert all(len(ln) == 2 for ln in _split_lines(smoke, "train_single.txt"))
    all_names = [n for v in names.values() for n in v]
    assert len(set(all_names)) == len(all_names)
    assert load_class_names(smoke) == synth.class_names(10)
    for name in all_names:
        img = Image.open(smoke / "JPEGImages" / f"{name}.jpg")
        mask = Image.open(smoke / "SegmentationClass" / f"{name}.png")
        part = Image.open(smoke / synth.PART_DIR / f"{name}.png")
        assert img.format == "JPEG" and img.mode == "RGB" and img.size == (64, 64)
        assert mask.mode == "P" and part.mode == "P" and mask.size == part.size == (64, 64)
        assert np.array_equal(np.asarray(mask.getpalette(), np.uint8).reshape(-1, 3), voc_palette()[:256])
    record = json.loads((smoke / synth.PARAMS_FILE).read_text())
    assert record["params"] == dataclasses.asdict(synth.resolve_params("smoke", 0))


def test_labels_match_masks(smoke):
    metas = {m["name"]: m for m in _metas(smoke)}
    single = {ln[0]: [int(ln[1])] for ln in _split_lines(smoke, "train_single.txt")}
    checked = 0
    for name, m in metas.items():
        mask = np.asarray(Image.open(smoke / "SegmentationClass" / f"{name}.png"))
        part = np.asarray(Image.open(smoke / synth.PART_DIR / f"{name}.png"))
        present = sorted(int(c) for c in np.unique(mask) if c)
        assert present == m["labels"] and present, name
        assert mask.max() <= 10
        if name in single:
            assert single[name] == present
        # exact masks: object pixels are body or part, never context; context is background
        assert np.array_equal(mask > 0, np.isin(part, (1, 2))), name
        assert (mask[part == 3] == 0).all()
        for c in present:  # every labelled object shows its discriminative part
            assert ((mask == c) & (part == 2)).sum() >= 4, (name, c)
        checked += 1
    assert checked == sum(synth.SIZES["smoke"][k] for k in ("num_train", "num_val", "num_single", "num_web"))


def test_deterministic_bytes(smoke, tmp_path):
    again = tmp_path / "again"
    synth.generate(again, "smoke", seed=0)
    assert _hashes(again) == _hashes(smoke)
    other = tmp_path / "other"
    synth.generate(other, "smoke", seed=1)
    assert _hashes(other) != _hashes(smoke)


def test_discriminative_part_is_small(smoke):
    fractions = []
    for name in [ln[0] for ln in _split_lines(smoke, "train.txt")]:
        mask = np.asarray(Image.open(smoke / "SegmentationClass" / f"{name}.png"))
        part = np.asarray(Image.open(smoke / synth.PART_DIR / f"{name}.png"))
        for c in np.unique(mask[mask > 0]):  # one instance per class in an image
            obj = mask == c
            fractions.append(((part == 2) & obj).sum() / obj.sum())
    fractions = np.array(fractions)
    assert len(fractions) >= 40
    assert 0.04 < fractions.mean() < 0.12
    assert np.percentile(fractions, 90) < 0.15 and fractions.max() < 0.25


def test_objects_are_large(stats_root):
    _, stats = stats_root
    # bodies span ~45-75% of the side: several cells of a stride-8 map
    assert 0.5 < stats["object_length_fraction"] < 0.65
    assert 1.5 < stats["mean_objects"] < 2.1


def test_context_cooccurs_with_its_class(smoke, stats_root):
    part_maps = [np.asarray(Image.open(p)) for p in sorted((smoke / synth.PART_DIR).glob("train_*.png"))]
    assert np.mean([(p == 3).any() for p in part_maps]) > 0.6
    root, stats = stats_root
    assert stats["context_rate"] > 0.7
    assert stats["stray_context_rate"] < 0.05
    # recount from the per-image records
    min_px = 0.01 * 48 ** 2
    hits = total = 0
    for m in _metas(root):
        if m["split"] != "train":
            continue
        seen = {c["class"] for c in m["contexts"] if c["pixels"] >= min_px}
        hits += len(set(m["labels"]) & seen)
        total += len(m["labels"])
    assert abs(hits / total - stats["context_rate"]) < 1e-3


def test_class_pairs_cooccur(stats_root):
    root, _ = stats_root
    labels = np.zeros((400, 10), bool)
    for m in _metas(root):
        if m["split"] == "train":
            labels[int(m["name"].split("_")[1]), np.asarray(m["labels"]) - 1] = True
    co = labels.T.astype(int) @ labels.astype(int)
    partner = [synth.cooccurrence_partner(c, 10) for c in range(10)]
    partner_rate = np.mean([co[c, partner[c]] / co[c, c] for c in range(10)])
    other_rate = np.mean([co[c, d] / co[c, c] for c in range(10) for d in range(10) if d not in (c, partner[c])])
    assert partner_rate > 2.5 * other_rate


def test_body_class_knob_gives_bodies_their_class_pairs_look():
    rng = np.random.default_rng(0)
    looks = {c: synth.body_look(c) for c in range(10)}
    assert all(looks[2 * i] == looks[2 * i + 1] for i in range(5))         # pairs share a body ...
    assert len(set(looks.values())) == 5                                   # ... and pairs differ
    assert all(t < len(synth.BODY_TEXTURES) and a != b and max(a, b) < len(synth.BODY_COLOURS)
               for t, (a, b) in looks.values())
    for q in (0.0, 0.5, 1.0):
        drawn = [synth._sample_object(rng, c, 96, body_class=q) for c in range(10) for _ in range(60)]
        own = np.mean([(o.texture, o.colours) == looks[o.cls] for o in drawn if o is not None])
        # the class's own look, plus the chance that a random draw hits it (1/5 * 1/56)
        assert abs(own - (q + (1 - q) / 280)) < 0.08, (q, own)
    with pytest.raises(ValueError, match="body_class"):
        synth.resolve_params("smoke", body_class=1.5)


def test_context_knobs():
    box = (20.0, 60.0, 30.0, 50.0)
    one = synth._context_box(np.random.default_rng(3), box, 96)
    f = np.random.default_rng(3).uniform(0.5, 0.65)
    assert one == pytest.approx((20 - 6, 60 + 6, 30 + f * 20, 50 + 3 + 4.8))     # version 2's band
    two = synth._context_box(np.random.default_rng(3), box, 96, scale=2.0)
    assert two[0] < one[0] and two[1] > one[1] and two[2] < one[2] and two[3] > one[3]
    rng = np.random.default_rng(0)
    scenes = [synth.sample_scene(rng, 10, 64, context_p=0.0) for _ in range(30)]
    assert not any(c for s in scenes for c in s.contexts if not c["stray"])
    scenes = [synth.sample_scene(rng, 10, 64, context_p=1.0, stray=False) for _ in range(30)]
    assert all(len(s.contexts) == len(s.objects) for s in scenes)
    with pytest.raises(ValueError, match="context_size"):
        synth.resolve_params("smoke", context_size=0)


def test_bodies_are_class_independent(stats_root):
    # body_class 0, by construction: the same random stream gives the same body whatever the class
    a = synth._sample_object(np.random.default_rng(5), 0, 96)
    b = synth._sample_object(np.random.default_rng(5), 7, 96)
    assert dataclasses.replace(a, cls=7) == b
    # and in the data: per-class body texture/shape frequencies follow the overall ones
    root, _ = stats_root
    objs = [o for m in _metas(root) if m["split"] == "train" for o in m["objects"]]
    for key, n in (("texture", len(synth.BODY_TEXTURES)), ("shape", len(synth.BODY_SHAPES))):
        overall = np.bincount([o[key] for o in objs], minlength=n) / len(objs)
        for c in range(1, 11):
            mine = [o[key] for o in objs if o["class"] == c]
            assert len(mine) >= 40
            assert np.abs(np.bincount(mine, minlength=n) / len(mine) - overall).max() < 0.2, (key, c)


def test_paired_classes_share_head_colour():
    for c in range(0, 10, 2):
        (col_a, pat_a), (col_b, pat_b) = synth.head_style(c, 10), synth.head_style(c + 1, 10)
        assert np.array_equal(col_a, col_b) and pat_a != pat_b
    colours = {tuple(synth.head_style(c, 10)[0]) for c in range(10)}
    assert len(colours) == 5


def test_corrupt_labels_rate():
    rng = np.random.default_rng(0)
    changed = 0
    for _ in range(4000):
        labels = sorted(rng.choice(np.arange(1, 11), size=int(rng.integers(1, 4)), replace=False).tolist())
        out = synth.corrupt_labels(rng, labels, 10, 0.3)
        assert out and all(1 <= c <= 10 for c in out) and len(set(out)) == len(out)
        changed += out != labels
    assert abs(changed / 4000 - 0.3) < 0.03
    assert synth.corrupt_labels(rng, [3], 10, 0.0) == [3]


def test_web_split_is_noisy(stats_root):
    root, stats = stats_root
    true = {m["name"]: m["labels"] for m in _metas(root) if m["split"] == "web"}
    lines = _split_lines(root, "train_web.txt")
    assert len(lines) == len(true) == 300
    differ = np.mean([sorted(map(int, ln[1:])) != true[ln[0]] for ln in lines])
    assert abs(differ - 0.3) < 0.08
    assert abs(differ - stats["web_noise_rate"]) < 1e-3


def test_ensure_benchmark_regenerates_only_on_change(tmp_path, monkeypatch):
    root = tmp_path / "b"
    calls = []
    real = synth.generate
    monkeypatch.setattr(synth, "generate", lambda *a, **k: calls.append(k) or real(*a, **k))
    kw = dict(num_train=6, num_val=2, num_single=2, num_web=2, image_size=40)
    assert synth.ensure_benchmark(root, "smoke", seed=0, **kw) == root
    assert len(calls) == 1
    synth.ensure_benchmark(root, "smoke", seed=0, **kw)
    assert len(calls) == 1
    synth.ensure_benchmark(root, "smoke", seed=0, **{**kw, "num_train": 7})
    assert len(calls) == 2 and len(_split_lines(root, "train.txt")) == 7
    synth.ensure_benchmark(root, "smoke", seed=3, **{**kw, "num_train": 7})
    assert len(calls) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # no temporary folders left behind


def test_generate_refuses_foreign_folders(tmp_path):
    foreign = tmp_path / "VOC2012"
    (foreign / "JPEGImages").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="not a generated benchmark"):
        synth.generate(foreign, "smoke", overwrite=True)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        synth.generate(foreign, "smoke")
    with pytest.raises(ValueError, match="unknown benchmark size"):
        synth.generate(tmp_path / "x", "huge")


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    real = synth.make_image
    count = []

    def failing(p, split, i):
        count.append(i)
        if len(count) > 5:
            raise KeyboardInterrupt
        return real(p, split, i)

    monkeypatch.setattr(synth, "make_image", failing)
    with pytest.raises(KeyboardInterrupt):
        synth.generate(tmp_path / "b", "smoke")
    assert list(tmp_path.iterdir()) == []


def test_draw_examples(smoke, tmp_path):
    out = synth.draw_examples(smoke, tmp_path / "fig.png", n=4)
    img = Image.open(out)
    assert img.format == "PNG" and img.size[0] > img.size[1] > 100


def test_part_coverage_on_a_hand_made_image():
    mask = np.zeros((4, 6), np.uint8)
    part = np.zeros((4, 6), np.uint8)
    mask[:, :4] = 2                      # class 2 covers columns 0-3
    part[:, :4] = 1
    part[:, 0] = 2                       # its head: column 0 (4 px), body: columns 1-3 (12 px)
    part[:, 4:] = 3                      # context: columns 4-5 (8 px)
    maps = np.zeros((3, 4, 6), np.float32)
    maps[1, :, 0] = 1.0                  # head fully on
    maps[1, :, 1] = 0.5                  # a third of the body half on
    maps[1, :, 4] = 0.5                  # half the context half on
    maps[0] = 1.0                        # absent class: ignored
    counts = synth.part_coverage_counts(maps, mask, part, thresholds=(0.25, 0.75))
    scores = synth.part_coverage(counts, thresholds=(0.25, 0.75))
    assert scores["part_recall"] == [1.0, 1.0]
    assert scores["body_recall"] == [round(4 / 12, 4), 0.0]
    assert scores["context_share"] == [round(4 / 12, 4), 0.0]
    assert scores["object_share"] == [round(8 / 12, 4), 1.0]
