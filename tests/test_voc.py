"""wsss.data.voc on tiny VOC-layout trees written under tmp_path."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import tv_tensors

from wsss.classes import voc_palette, write_class_names
from wsss.data import voc
from wsss.data.transforms import train_transforms
from wsss.data.voc import DatasetError, VOCDataset, image_labels, load_image, load_mask, read_split, save_mask

SIZE = 32


def block_mask(*classes: int, ignore: bool = False) -> np.ndarray:
    """A SIZExSIZE mask: background with one horizontal band per class (and an ignore band)."""
    m = np.zeros((SIZE, SIZE), dtype=np.uint8)
    for i, c in enumerate(classes):
        m[4 + 6 * i: 8 + 6 * i, 2:30] = c
    if ignore:
        m[28:31, :] = 255
    return m


def write_image(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path, format="JPEG")


def write_split(root: Path, split: str, lines: list[str]) -> Path:
    path = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


def make_voc(root: Path, masks: dict[str, np.ndarray], splits: dict[str, list[str]],
             aug_masks: dict[str, np.ndarray] | None = None) -> Path:
    """Images for every name in ``masks``/``aug_masks``, palette masks, greyscale SBD masks."""
    for i, name in enumerate(sorted(set(masks) | set(aug_masks or {}))):
        write_image(root / "JPEGImages" / f"{name}.jpg", seed=i)
    for name, m in masks.items():
        save_mask(root / "SegmentationClass" / f"{name}.png", m)
    for name, m in (aug_masks or {}).items():  # SBD's SegmentationClassAug holds 'L' PNGs
        (root / "SegmentationClassAug").mkdir(parents=True, exist_ok=True)
        Image.fromarray(m).save(root / "SegmentationClassAug" / f"{name}.png")
    for split, lines in splits.items():
        write_split(root, split, lines)
    return root


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    masks = {"a": block_mask(1), "b": block_mask(2, 15, ignore=True), "c": block_mask(20, 1),
             "d": block_mask(7)}
    return make_voc(tmp_path / "VOC", masks, {"train": ["a", "b", "c"], "val": ["d"]})


def assert_names_path(err: pytest.ExceptionInfo, path: Path) -> None:
    msg = str(err.value)
    assert str(path) in msg, msg
    assert "data/README.md" in msg, msg


# --- labels ------------------------------------------------------------------------------

def test_labels_are_derived_from_masks(tree: Path):
    labels = image_labels(tree, "train", 20)
    assert labels.dtype == np.uint8 and labels.shape == (3, 20)
    assert [list(np.flatnonzero(row) + 1) for row in labels] == [[1], [2, 15], [1, 20]]
    names, file_labels = read_split(tree, "train")
    assert names == ["a", "b", "c"] and file_labels is None


def test_item_fields_types_and_shapes(tree: Path):
    ds = VOCDataset(tree, "train")
    assert len(ds) == 3 and ds.num_classes == 20 and ds.class_names[0] == "aeroplane"
    assert ds.labels.shape == (3, 20) and ds.mask_path("b") == tree / "SegmentationClass" / "b.png"
    item = ds[1]
    assert item["name"] == "b" and item["index"] == 1
    assert isinstance(item["image"], tv_tensors.Image)
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, SIZE, SIZE)
    assert isinstance(item["mask"], tv_tensors.Mask)
    assert item["mask"].dtype == torch.int64 and item["mask"].shape == (SIZE, SIZE)
    assert torch.equal(item["mask"], torch.from_numpy(block_mask(2, 15, ignore=True)).long())
    assert item["label"].dtype == torch.float32 and item["label"].shape == (20,)
    assert item["label"].nonzero().flatten().tolist() == [1, 14]
    assert np.array_equal(item["image"].permute(1, 2, 0).numpy(), load_image(ds.image_path("b")))
    assert "mask" not in VOCDataset(tree, "train", with_mask=False)[0]


def test_transforms_and_default_collate(tree: Path):
    ds = VOCDataset(tree, "train", transforms=train_transforms(crop=24))
    for workers in (0, 1):
        batch = next(iter(DataLoader(ds, batch_size=3, num_workers=workers)))
        assert batch["name"] == ["a", "b", "c"] and batch["index"].tolist() == [0, 1, 2]
        assert batch["image"].shape == (3, 3, 24, 24) and batch["image"].dtype == torch.float32
        assert batch["mask"].shape == (3, 24, 24) and batch["mask"].dtype == torch.int64
        assert batch["label"].shape == (3, 20)


def test_val_split_may_hold_background_only_images(tmp_path: Path):
    root = make_voc(tmp_path, {"a": block_mask(3), "z": block_mask()}, {"val": ["a", "z"]})
    assert image_labels(root, "val", 20).sum(1).tolist() == [1, 0]


# --- cache -------------------------------------------------------------------------------

def test_label_cache_is_used_then_invalidated(tree: Path, monkeypatch):
    first = image_labels(tree, "train", 20)
    cache = tree / ".wsss_cache" / "labels_train.npz"
    assert cache.is_file()

    calls = []
    real_load_mask = voc.load_mask
    monkeypatch.setattr(voc, "load_mask", lambda *a: calls.append(a) or real_load_mask(*a))
    assert np.array_equal(image_labels(tree, "train", 20), first)
    assert calls == []  # served from the cache

    split = tree / "ImageSets" / "Segmentation" / "train.txt"
    st = split.stat()
    os.utime(split, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same content, new mtime
    assert np.array_equal(image_labels(tree, "train", 20), first)
    assert len(calls) == 3

    write_split(tree, "train", ["a", "c"])  # new content: recomputed for the new names
    calls.clear()
    assert np.array_equal(image_labels(tree, "train", 20), first[[0, 2]])
    assert len(calls) == 2
    calls.clear()
    image_labels(tree, "train", 20)
    assert calls == []

    masks = tree / "SegmentationClass"  # a mask replaced (save_mask renames into the folder)
    save_mask(masks / "a.png", block_mask(9))
    st = masks.stat()
    os.utime(masks, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # beat coarse fs clocks
    assert np.flatnonzero(image_labels(tree, "train", 20)[0]).tolist() == [8]
    assert len(calls) == 2


def test_cache_is_per_split(tree: Path):
    image_labels(tree, "train", 20)
    image_labels(tree, "val", 20)
    assert sorted(p.name for p in (tree / ".wsss_cache").iterdir()) == ["labels_train.npz",
                                                                       "labels_val.npz"]


def test_unwritable_cache_falls_back_silently(tree: Path):
    (tree / ".wsss_cache").write_text("not a folder")  # mkdir fails even when run as root
    assert image_labels(tree, "train", 20).sum() == 5
    assert len(VOCDataset(tree, "train")) == 3


def test_permission_denied_on_cache_write_is_silent(tree: Path, monkeypatch):
    def denied(self, data):
        raise PermissionError(13, "Permission denied", str(self))
    monkeypatch.setattr(Path, "write_bytes", denied)
    assert image_labels(tree, "train", 20).sum() == 5
    assert not (tree / ".wsss_cache" / "labels_train.npz").exists()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores file modes")
def test_read_only_root_falls_back_silently(tree: Path):
    tree.chmod(0o555)
    try:
        assert image_labels(tree, "train", 20).sum() == 5
        assert not (tree / ".wsss_cache").exists()
    finally:
        tree.chmod(0o755)


def test_corrupt_cache_is_rebuilt(tree: Path):
    image_labels(tree, "train", 20)
    (tree / ".wsss_cache" / "labels_train.npz").write_bytes(b"garbage")
    assert image_labels(tree, "train", 20).sum() == 5


# --- label-carrying split files, SBD, classes.txt -----------------------------------------

def test_label_carrying_split_needs_no_masks(tmp_path: Path):
    root = tmp_path / "web"
    for i, name in enumerate(["x", "y"]):
        write_image(root / "JPEGImages" / f"{name}.jpg", seed=i)
    write_split(root, "train_web", ["x 1 3", "y 20"])
    names, labels = read_split(root, "train_web")
    assert names == ["x", "y"] and labels["x"].dtype == np.uint8
    assert np.flatnonzero(labels["x"]).tolist() == [0, 2]
    ds = VOCDataset(root, "train_web", with_mask=False)
    assert np.flatnonzero(ds.labels[1]).tolist() == [19]
    assert ds[0]["label"].nonzero().flatten().tolist() == [0, 2]
    assert not (root / ".wsss_cache").exists()


def test_split_file_labels_win_over_masks(tree: Path):
    write_split(tree, "train_single", ["a 4", "b 2"])  # masks say {1} and {2, 15}
    ds = VOCDataset(tree, "train_single")
    assert [np.flatnonzero(r).tolist() for r in ds.labels] == [[3], [1]]


def test_sbd_train_aug_reads_segmentation_class_aug(tmp_path: Path):
    root = make_voc(tmp_path, {"a": block_mask(1), "v": block_mask(2)},
                    {"train": ["a"], "val": ["v"], "train_aug": ["a", "s"]},
                    aug_masks={"a": block_mask(5), "s": block_mask(6, 255)})
    aug = VOCDataset(root, "train_aug")
    assert aug.mask_path("a") == root / "SegmentationClassAug" / "a.png"
    assert [np.flatnonzero(r).tolist() for r in aug.labels] == [[4], [5]]
    assert torch.equal(aug[0]["mask"], torch.from_numpy(block_mask(5)).long())
    train = VOCDataset(root, "train")
    assert train.mask_path("a") == root / "SegmentationClass" / "a.png"
    assert np.flatnonzero(train.labels[0]).tolist() == [0]


def test_deeplab_style_list_lines_read_as_names(tmp_path: Path):
    root = make_voc(tmp_path, {}, {"train_aug": ["/JPEGImages/a.jpg /SegmentationClassAug/a.png",
                                                 "/JPEGImages/s.jpg /SegmentationClassAug/s.png"]},
                    aug_masks={"a": block_mask(5), "s": block_mask(6)})
    ds = VOCDataset(root, "train_aug")
    assert ds.names == ["a", "s"] and [np.flatnonzero(r).tolist() for r in ds.labels] == [[4], [5]]


def test_custom_classes_txt(tmp_path: Path):
    root = make_voc(tmp_path, {"a": block_mask(3), "b": block_mask(1, 2)}, {"train": ["a", "b"]})
    write_class_names(root, ["circle", "square", "star"])
    ds = VOCDataset(root, "train")
    assert ds.class_names == ["circle", "square", "star"] and ds.num_classes == 3
    assert ds.labels.tolist() == [[0, 0, 1], [1, 1, 0]]
    assert ds[0]["label"].shape == (3,)
    save_mask(root / "SegmentationClass" / "b.png", block_mask(4))  # 4 > K = 3
    write_split(root, "val", ["b"])
    with pytest.raises(DatasetError, match="outside 0..3") as err:
        VOCDataset(root, "val")
    assert_names_path(err, root / "SegmentationClass" / "b.png")


def test_save_mask_writes_a_voc_palette_png_atomically(tmp_path: Path):
    path = tmp_path / "out" / "m.png"
    mask = block_mask(1, 14, ignore=True)
    save_mask(path, mask)
    with Image.open(path) as im:
        assert im.mode == "P"
        assert np.array_equal(np.array(im.getpalette()[:768], dtype=np.uint8).reshape(256, 3),
                              voc_palette())
    assert np.array_equal(load_mask(path, 20), mask)
    save_mask(path, block_mask(2).astype(np.int64))  # overwrite, other int dtype
    assert np.array_equal(load_mask(path, 20), block_mask(2))
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.png"]  # no temp file left
    with pytest.raises(ValueError):
        save_mask(path, np.zeros((2, 2, 3), dtype=np.uint8))


# --- bad input: each error names the path and the fix ------------------------------------

def test_missing_root(tmp_path: Path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match="does not exist") as err:
        VOCDataset(missing)
    assert_names_path(err, missing)


def test_missing_split_lists_the_splits_that_exist(tree: Path):
    with pytest.raises(DatasetError, match="splits found: train, val") as err:
        VOCDataset(tree, "trainval")
    assert_names_path(err, tree / "ImageSets" / "Segmentation" / "trainval.txt")


def test_missing_split_folder(tmp_path: Path):
    with pytest.raises(DatasetError, match="holds no .txt files") as err:
        read_split(tmp_path, "train")
    assert_names_path(err, tmp_path / "ImageSets" / "Segmentation" / "train.txt")


def test_empty_split_file(tree: Path):
    path = write_split(tree, "train", ["", "  "])
    with pytest.raises(DatasetError, match="is empty") as err:
        VOCDataset(tree, "train")
    assert_names_path(err, path)


def test_listed_image_that_does_not_exist(tree: Path):
    split = write_split(tree, "train", ["a", "ghost", "b"])
    with pytest.raises(DatasetError, match="listed in") as err:
        VOCDataset(tree, "train")
    assert_names_path(err, tree / "JPEGImages" / "ghost.jpg")
    assert str(split) in str(err.value)
    with pytest.raises(DatasetError) as err:
        load_image(tree / "JPEGImages" / "ghost.jpg")
    assert_names_path(err, tree / "JPEGImages" / "ghost.jpg")


def test_listed_mask_that_does_not_exist(tree: Path):
    (tree / "SegmentationClass" / "b.png").unlink()
    with pytest.raises(DatasetError, match="mask") as err:
        VOCDataset(tree, "train")
    assert_names_path(err, tree / "SegmentationClass" / "b.png")


def test_corrupt_image(tree: Path):
    path = tree / "JPEGImages" / "b.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    ds = VOCDataset(tree, "train")  # labels come from the masks; the image is read on access
    with pytest.raises(DatasetError, match="cannot be read") as err:
        ds[1]
    assert_names_path(err, path)


def test_truncated_image(tree: Path):
    path = tree / "JPEGImages" / "a.jpg"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DatasetError, match="cannot be read") as err:
        load_image(path)
    assert_names_path(err, path)


def test_mask_with_labels_out_of_range(tree: Path):
    path = tree / "SegmentationClass" / "c.png"
    save_mask(path, block_mask(21, 254))
    with pytest.raises(DatasetError, match=r"\[21, 254\] outside 0..20 and 255") as err:
        VOCDataset(tree, "train")
    assert_names_path(err, path)


def test_colour_mask_is_rejected(tree: Path):
    path = tree / "SegmentationClass" / "a.png"
    Image.fromarray(voc_palette()[block_mask(1)]).save(path)
    with pytest.raises(DatasetError, match="'RGB'") as err:
        load_mask(path, 20)
    assert_names_path(err, path)


def test_mask_image_size_mismatch(tree: Path):
    path = tree / "SegmentationClass" / "a.png"
    save_mask(path, np.ones((16, 16), dtype=np.uint8))
    ds = VOCDataset(tree, "train")
    with pytest.raises(DatasetError, match="must match") as err:
        ds[0]
    assert_names_path(err, path)


def test_check_files_finds_a_corrupt_image_or_a_mask_of_another_size_before_any_work(tree: Path, monkeypatch):
    ds = VOCDataset(tree, "train")
    ds.check_files()  # all good: recorded, so the next check reads nothing
    reads = []
    monkeypatch.setattr(voc, "load_image", lambda path: reads.append(path))
    VOCDataset(tree, "train").check_files()
    assert reads == []
    monkeypatch.undo()
    mask = tree / "SegmentationClass" / "c.png"
    save_mask(mask, np.ones((16, 16), dtype=np.uint8))  # the folder changes: checked again
    with pytest.raises(DatasetError, match="is 16x16 but image .* is 32x32: they must match") as err:
        VOCDataset(tree, "train").check_files()
    assert_names_path(err, mask)
    save_mask(mask, block_mask(20, 1))
    image = tree / "JPEGImages" / "d.jpg"
    image.write_bytes(image.read_bytes()[:200])           # a truncated val image
    val = VOCDataset(tree, "val")
    with pytest.raises(DatasetError, match="cannot be read") as err:
        val.check_files()
    assert_names_path(err, image)


def test_training_image_without_label_from_mask(tree: Path):
    save_mask(tree / "SegmentationClass" / "b.png", block_mask(ignore=True))  # bg + 255 only
    with pytest.raises(DatasetError, match="image b of training split .* has no label") as err:
        VOCDataset(tree, "train")
    assert_names_path(err, tree / "ImageSets" / "Segmentation" / "train.txt")
    assert str(tree / "SegmentationClass" / "b.png") in str(err.value)
    assert "remove it from the split" in str(err.value)


def test_training_image_without_label_in_label_file(tree: Path):
    path = write_split(tree, "train_web", ["a 1", "b", "c 20"])
    with pytest.raises(DatasetError, match="image b of training split") as err:
        VOCDataset(tree, "train_web", with_mask=False)
    assert_names_path(err, path)


def test_label_index_out_of_range_in_split_file(tree: Path):
    path = write_split(tree, "train_web", ["a 1", "b 0"])
    with pytest.raises(DatasetError, match="line 2 .* label '0'") as err:
        read_split(tree, "train_web")
    assert_names_path(err, path)
    write_split(tree, "train_web", ["a 1", "b cat"])
    with pytest.raises(DatasetError, match="'cat'"):
        read_split(tree, "train_web")


def test_duplicate_name_in_split_file(tree: Path):
    path = write_split(tree, "train", ["a", "b", "a"])
    with pytest.raises(DatasetError, match="listed twice") as err:
        read_split(tree, "train")
    assert_names_path(err, path)


def test_missing_mask_folder_for_derived_labels(tree: Path):
    path = write_split(tree, "train_aug", ["a"])  # no SegmentationClassAug/
    with pytest.raises(DatasetError, match="SegmentationClassAug") as err:
        image_labels(tree, "train_aug", 20)
    assert_names_path(err, path)


def test_empty_classes_txt(tree: Path):
    (tree / "classes.txt").write_text("\n")
    with pytest.raises(DatasetError) as err:
        VOCDataset(tree, "train")
    assert_names_path(err, tree / "classes.txt")


def test_splits_combine_into_one_dataset(tmp_path):
    """Settings 2 and 3 (METHOD.md sec. 5): train plus the single-label split, concatenated."""
    from wsss.data.synth import generate

    root = tmp_path / "bench"
    generate(root, size="smoke", seed=0)
    train = VOCDataset(root, "train", with_mask=False)
    single = VOCDataset(root, "train_single", with_mask=False)
    both = VOCDataset(root, ["train", "train_single"], with_mask=True)
    assert both.names == train.names + single.names and both.split == "train+train_single"
    assert np.array_equal(both.labels, np.concatenate([train.labels, single.labels]))
    assert (single.labels.sum(1) == 1).all()
    item = both[len(train)]
    assert item["name"] == single.names[0] and torch.equal(item["label"], torch.from_numpy(
        single.labels[0].astype(np.float32)))
    with pytest.raises(DatasetError, match="listed in both"):
        VOCDataset(root, ["train", "train"], with_mask=False)


def test_classifier_split_accepts_one_name_or_a_list():
    from wsss import config as C
    from wsss.stages.train_classifier import ClassifierConfig

    assert C.from_dict(ClassifierConfig, {"data_root": "d", "run_dir": "r", "split": "train"}).split == ("train",)
    cfg = C.from_dict(ClassifierConfig, {"data_root": "d", "run_dir": "r", "split": ["train", "train_web"]})
    assert cfg.split == ("train", "train_web")
