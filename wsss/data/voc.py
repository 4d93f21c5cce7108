"""PASCAL VOC 2012 reader (plus the SBD ``train_aug`` split): images, masks, image-level labels.

Every stage reads its data through this module, on real VOC and on the embedded benchmark
alike. The on-disk layout is::

    ROOT/JPEGImages/NAME.jpg
    ROOT/SegmentationClass/NAME.png      palette PNG: 0 background, 1..K classes, 255 ignore
    ROOT/SegmentationClassAug/NAME.png   SBD masks, used for the names of train_aug.txt
    ROOT/ImageSets/Segmentation/SPLIT.txt   "NAME" or "NAME c1 c2 ..." per line
    ROOT/classes.txt                     optional foreground class names (wsss.classes)

The image-level labels l_m of METHOD.md sec. 1 are the foreground classes present in an
image. A split file may carry them ("NAME c1 c2 ...", indices 1..K); otherwise they are
derived from the masks (classes present, 0 and 255 excluded) and cached in
``ROOT/.wsss_cache/labels_SPLIT.npz``, which is rebuilt when the split file changes (its
mtime or size) or the mask folder's mtime does; after editing masks in place, delete
``ROOT/.wsss_cache``. A read-only root simply gets no cache.

Bad input raises :class:`DatasetError`, whose message names the file and the fix;
data/README.md explains each case.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors

from wsss import rundir as R
from wsss.classes import IGNORE_INDEX, load_class_names, voc_palette
from wsss.files import atomic_path, write_text
from wsss.progress import progress

log = logging.getLogger(__name__)

IMAGE_DIR = "JPEGImages"
MASK_DIR = "SegmentationClass"
AUG_MASK_DIR = "SegmentationClassAug"
AUG_SPLIT = "train_aug"
SPLIT_DIR = Path("ImageSets", "Segmentation")
CACHE_DIR = ".wsss_cache"
_HELP = "see data/README.md"


class DatasetError(Exception):
    """Missing or malformed dataset input. The message names the path and the fix."""


def _error(message: str) -> DatasetError:
    return DatasetError(f"{message} ({_HELP})")


# ---------------------------------------------------------------------------------------
# Paths and splits
# ---------------------------------------------------------------------------------------

def is_training_split(split: str) -> bool:
    """Splits whose images train the classifier (train, train_aug, train_single, ...):
    every image there needs at least one label."""
    return split.startswith("train")


def split_path(root: str | Path, split: str) -> Path:
    return Path(root) / SPLIT_DIR / f"{split}.txt"


def available_splits(root: str | Path) -> list[str]:
    """Names of the split files under ROOT/ImageSets/Segmentation, sorted."""
    folder = Path(root) / SPLIT_DIR
    return sorted(p.stem for p in folder.glob("*.txt")) if folder.is_dir() else []


def mask_dir(root: str | Path, split: str) -> Path:
    """SegmentationClassAug for the SBD ``train_aug`` split, SegmentationClass otherwise."""
    return Path(root) / (AUG_MASK_DIR if split == AUG_SPLIT else MASK_DIR)


def _check_root(root: str | Path) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise _error(f"dataset root {root} does not exist: pass the folder that holds "
                     f"JPEGImages/, SegmentationClass/ and ImageSets/Segmentation/, "
                     f"or generate the embedded benchmark there")
    return root


def class_names(root: str | Path) -> list[str]:
    """Foreground class names of the dataset (ROOT/classes.txt, else the 20 VOC classes)."""
    try:
        return load_class_names(root)
    except ValueError as err:  # an empty classes.txt
        raise _error(str(err)) from None


def _check_split_file(root: Path, split: str) -> Path:
    path = split_path(root, split)
    if not path.is_file():
        found = available_splits(root)
        listing = ", ".join(found) if found else f"none: {path.parent} holds no .txt files"
        raise _error(f"split file {path} does not exist; splits found: {listing}. "
                     f"Choose one of those, or write {path.name} with one image name per line")
    return path


def _split_tokens(line: str) -> list[str]:
    """Tokens of a split-file line. A DeepLab-style list line
    "/JPEGImages/NAME.jpg /SegmentationClassAug/NAME.png" reads as plain "NAME"."""
    tokens = line.split()
    if tokens[0].endswith(".jpg"):
        tokens = [Path(tokens[0]).stem] + [t for t in tokens[1:] if not t.endswith(".png")]
    return tokens


def parse_split_lines(lines: list[str], num_classes: int, path: str | Path = "<split>"
                      ) -> tuple[list[str], dict[str, np.ndarray] | None]:
    """Names, and multi-hot labels (K,) uint8 when any line carries class indices.

    Pure core of :func:`read_split`; ``path`` only names the file in error messages.
    A file is label-carrying when any of its lines has more than the name; a bare name
    in such a file then means "no label". Lines in DeepLab's list format (image and mask
    paths) are read as the bare name.
    """
    rows = [(i + 1, _split_tokens(line)) for i, line in enumerate(lines) if line.strip()]
    if not rows:
        raise _error(f"split file {path} is empty: list one image name per line, "
                     f"or delete it")
    names = [tokens[0] for _, tokens in rows]
    seen: set[str] = set()
    for (lineno, _), name in zip(rows, names):
        if name in seen:
            raise _error(f"image {name} is listed twice in {path} (again on line {lineno}): "
                         f"remove the duplicate line")
        seen.add(name)
    if all(len(tokens) == 1 for _, tokens in rows):
        return names, None
    labels = {}
    for lineno, tokens in rows:
        vec = np.zeros(num_classes, dtype=np.uint8)
        for tok in tokens[1:]:
            if not tok.isdigit() or not 1 <= int(tok) <= num_classes:
                raise _error(f"line {lineno} of {path} has label {tok!r}; labels must be class "
                             f"indices 1..{num_classes} (background 0 excluded), as in "
                             f"'NAME 3 15'. Fix the line, or add the class to classes.txt")
            vec[int(tok) - 1] = 1
        labels[tokens[0]] = vec
    return names, labels


def read_split(root: str | Path, split: str, num_classes: int | None = None
               ) -> tuple[list[str], dict[str, np.ndarray] | None]:
    """Image names of ``split``, and their (K,) uint8 labels when the split file carries them.

    ``num_classes`` defaults to the length of the dataset's class list.
    """
    root = _check_root(root)
    path = _check_split_file(root, split)
    k = len(class_names(root)) if num_classes is None else num_classes
    return parse_split_lines(path.read_text().splitlines(), k, path)


# ---------------------------------------------------------------------------------------
# Images and masks
# ---------------------------------------------------------------------------------------

def _read(path: str | Path, what: str, missing: str, unreadable: str, read, error=_error):
    """``read(PIL image)`` of the file ``path``; ``error(message)`` when it is missing
    (``missing`` says the fix) or cannot be read (``unreadable`` says the fix)."""
    if not Path(path).is_file():
        raise error(f"{what} {path} does not exist: {missing}")
    try:
        with Image.open(path) as im:
            return read(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise error(f"{what} {path} cannot be read ({err}): {unreadable}") from None


def load_image(path: str | Path) -> np.ndarray:
    """An RGB image as (H, W, 3) uint8."""
    return _read(path, "image", "add it, or remove its name from the split file",
                 "the file is corrupt or not an image; replace it, or remove its name from the split file",
                 lambda im: np.asarray(im.convert("RGB"), dtype=np.uint8).copy())


def load_saliency(path: str | Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """A saliency map NAME.png (greyscale or colour, 0-255) as (H, W) float32 in [0, 1]."""
    saliency = _read(path, "saliency map", "put one 0-255 PNG per image there (named like the image), or use "
                     "bg_mode='power' (no saliency needed)", "replace the file",
                     lambda im: np.asarray(im.convert("L"), dtype=np.float32) / 255.0, error=DatasetError)
    if size is not None and saliency.shape != tuple(size):
        raise DatasetError(f"saliency map {path} is {saliency.shape[1]}x{saliency.shape[0]} but its image is "
                           f"{size[1]}x{size[0]}: saliency maps must have the image's size")
    return saliency


def _mask_indices(im: Image.Image, path) -> np.ndarray:
    if im.mode not in ("P", "L"):
        raise _error(f"mask {path} is a {im.mode!r} image; masks must be palette ('P') or greyscale ('L') PNGs "
                     f"holding class indices, not colours: convert it (e.g. with wsss.data.voc.save_mask)")
    return np.asarray(im, dtype=np.uint8).copy()


def load_mask(path: str | Path, num_classes: int) -> np.ndarray:
    """A class-index mask as (H, W) uint8 with values in 0..K and 255 (checked)."""
    mask = _read(path, "mask", "add it, or give the split file's lines image-level labels ('NAME c1 c2 ...') "
                 "if masks are not available", "replace the file", lambda im: _mask_indices(im, path))
    check_mask_values(mask, num_classes, path)
    return mask


def check_mask_values(mask: np.ndarray, num_classes: int, path: str | Path = "<mask>") -> None:
    """Raise if ``mask`` holds a value outside 0..K and 255."""
    present = np.flatnonzero(np.bincount(mask.ravel(), minlength=256))
    bad = [int(v) for v in present if num_classes < v < IGNORE_INDEX or v > IGNORE_INDEX]
    if bad:
        raise _error(f"mask {path} holds label(s) {bad} outside 0..{num_classes} and "
                     f"{IGNORE_INDEX} ({num_classes} foreground classes): fix the mask, or "
                     f"list all classes in classes.txt in the dataset root")


def labels_from_mask(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """Image-level multi-hot label (K,) uint8: the foreground classes present in ``mask``."""
    counts = np.bincount(mask.ravel(), minlength=256)
    return (counts[1:num_classes + 1] > 0).astype(np.uint8)


def label_ids(label: np.ndarray) -> list[int]:
    """The class ids (1..K, as masks and maps files number them) of a multi-hot label (K,)."""
    return [int(c) + 1 for c in np.flatnonzero(label)]


def save_mask(path: str | Path, mask: np.ndarray) -> None:
    """Write a (H, W) class-index mask as a VOC palette PNG, atomically (tmp + os.replace)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"save_mask({path}): mask must be (H, W), got shape {mask.shape}")
    if mask.dtype != np.uint8:
        if mask.size and (mask.min() < 0 or mask.max() > 255):
            raise ValueError(f"save_mask({path}): values must lie in 0..255")
        mask = mask.astype(np.uint8)
    im = Image.fromarray(mask)
    im.putpalette(voc_palette().ravel().tolist())
    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG")


# ---------------------------------------------------------------------------------------
# Image-level labels (from the split file, or derived from the masks and cached)
# ---------------------------------------------------------------------------------------

def _cache_key(split_file: Path, folders: Sequence[Path], num_classes: int) -> list[str]:
    """What a cached result about a split depends on: the split file's mtime and size, each
    folder that exists (and its mtime, which changes when files are added or replaced, as
    save_mask does), K."""
    st = split_file.stat()
    return [str(st.st_mtime_ns), str(st.st_size), *(f"{d}@{d.stat().st_mtime_ns}" for d in folders if d.is_dir()),
            str(num_classes)]


def _read_cache(path: Path, key: np.ndarray, names: list[str]) -> np.ndarray | None:
    with contextlib.suppress(OSError, KeyError, ValueError), np.load(path, allow_pickle=False) as z:
        if np.array_equal(z["key"], key) and z["names"].tolist() == names:
            return z["labels"].astype(np.uint8)
    return None


def _labels_from_masks(root: Path, split: str, names: list[str], num_classes: int) -> np.ndarray:
    masks = mask_dir(root, split)
    split_file = split_path(root, split)
    if not masks.is_dir():
        raise _error(f"{split_file} carries no labels, so they are derived from the masks in "
                     f"{masks}, which does not exist: add the masks, or write the labels into "
                     f"the split file ('NAME c1 c2 ...')")
    key = np.array(_cache_key(split_file, [masks], num_classes))
    cache = root / CACHE_DIR / f"labels_{split}.npz"
    labels = _read_cache(cache, key, names)
    if labels is not None:
        return labels
    log.info("deriving image-level labels of %d images (%s) from %s", len(names), split, masks)
    labels = np.zeros((len(names), num_classes), dtype=np.uint8)
    for i, name in enumerate(progress(names, desc=f"labels {split}", leave=False)):
        labels[i] = labels_from_mask(load_mask(masks / f"{name}.png", num_classes), num_classes)
    buf = io.BytesIO()
    np.savez(buf, key=key, names=np.array(names), labels=labels)
    try:  # best effort: a read-only root, or any other failure, just means no cache
        with atomic_path(cache) as tmp:
            tmp.write_bytes(buf.getvalue())
    except OSError as err:
        log.debug("label cache not written (%s): %s", cache, err)
    return labels


def _check_nonempty_labels(root: Path, split: str, names: list[str], labels: np.ndarray,
                           from_file: bool) -> None:
    empty = [names[i] for i in np.flatnonzero(labels.sum(1) == 0)]
    if not empty or not is_training_split(split):
        return
    path = split_path(root, split)
    more = f" (and {len(empty) - 1} more)" if len(empty) > 1 else ""
    where = ("its line lists no class" if from_file else
             f"its mask {mask_dir(root, split) / (empty[0] + '.png')} holds no foreground class")
    raise _error(f"image {empty[0]}{more} of training split {path} has no label ({where}): "
                 f"remove it from the split, or give it a label ('NAME c1 c2 ...')")


def image_labels(root: str | Path, split: str, num_classes: int | None = None) -> np.ndarray:
    """Image-level labels of ``split``, (N, K) uint8 in split-file order.

    From the split file when it carries them, else derived from the masks (cached).
    In a training split every image must have at least one label.
    """
    root = _check_root(root)
    k = len(class_names(root)) if num_classes is None else num_classes
    names, file_labels = read_split(root, split, k)
    if file_labels is not None:
        labels = np.stack([file_labels[n] for n in names])
    else:
        labels = _labels_from_masks(root, split, names, k)
    _check_nonempty_labels(root, split, names, labels, from_file=file_labels is not None)
    return labels


# ---------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------

def _check_files_exist(folder: Path, names: list[str], suffix: str, kind: str,
                       split_file: Path) -> None:
    listing = set(os.listdir(folder)) if folder.is_dir() else set()
    missing = [n for n in names if f"{n}{suffix}" not in listing]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise _error(f"{kind} {folder / (missing[0] + suffix)}{more} listed in {split_file} "
                     f"does not exist: add it to {folder}, or remove its name from the split")


class VOCDataset(Dataset):
    """One split of a VOC-layout dataset, or several concatenated (METHOD.md sec. 5: train
    plus the single-label or web images), e.g. ``split=("train", "train_single")``.

    ``dataset[i]`` is a dict: ``name`` (str), ``index`` (int), ``image``
    (tv_tensors.Image (3, H, W), uint8 before ``transforms``), ``mask``
    (tv_tensors.Mask (H, W) int64, 255 = ignore; only when ``with_mask``) and ``label``
    (float32 (K,), the multi-hot l_m of METHOD.md sec. 1). ``transforms`` is called as
    ``transforms(image, mask)`` (or ``transforms(image)``) so that geometry is joint.
    An image listed in two of the splits is an error (it would count twice).
    """

    def __init__(self, root: str | Path, split: str | Sequence[str] = "train", transforms=None,
                 with_mask: bool = True):
        self.root = _check_root(root)
        splits = [split] if isinstance(split, str) else list(split)
        if not splits:
            raise _error("no split given: name at least one, e.g. 'train'")
        self.split = "+".join(splits)
        self.splits = splits
        self.transforms = transforms
        self.with_mask = with_mask
        self.class_names = class_names(self.root)
        self.num_classes = len(self.class_names)
        self.names, labels, self._split_of = [], [], {}
        for part in splits:
            names, _ = read_split(self.root, part, self.num_classes)
            split_file = split_path(self.root, part)
            _check_files_exist(self.root / IMAGE_DIR, names, ".jpg", "image", split_file)
            if with_mask:
                _check_files_exist(mask_dir(self.root, part), names, ".png", "mask", split_file)
            twice = [n for n in names if n in self._split_of]
            if twice:
                raise _error(f"image {twice[0]} is listed in both {split_path(self.root, self._split_of[twice[0]])} "
                             f"and {split_file}: combine splits that share no image")
            self._split_of.update((n, part) for n in names)
            self.names += names
            labels.append(image_labels(self.root, part, self.num_classes))
        self.labels = np.concatenate(labels) if len(labels) > 1 else labels[0]

    def check_files(self) -> None:
        """Decode every image and read every existing mask's size once, so that a corrupt
        file or a mask of another size than its image is found before any work, not in the
        middle of an epoch or four stages later. A split that passed is recorded in
        ROOT/.wsss_cache/checked_SPLIT.json and not read again until its split file or its
        image or mask folder changes (a read-only root is checked every time)."""
        for part in self.splits:
            names = [n for n in self.names if self._split_of[n] == part]
            masks, images, split_file = mask_dir(self.root, part), self.root / IMAGE_DIR, split_path(self.root, part)
            key = [*_cache_key(split_file, [masks, images], self.num_classes), str(len(names))]
            cache = self.root / CACHE_DIR / f"checked_{part}.json"
            with contextlib.suppress(OSError, ValueError):
                if json.loads(cache.read_text()) == key:
                    continue
            have_mask = set(os.listdir(masks)) if masks.is_dir() else set()
            for name in progress(names, desc=f"checking {part}", leave=False):
                h, w = load_image(images / f"{name}.jpg").shape[:2]
                if f"{name}.png" in have_mask:
                    mpath = masks / f"{name}.png"
                    size = _read(mpath, "mask", f"add it, or remove {name} from {split_file}",
                                 f"replace it, or remove {name} from {split_file}", lambda im: im.size)
                    if size != (w, h):
                        raise _error(f"mask {mpath} is {size[0]}x{size[1]} but image {images / (name + '.jpg')} "
                                     f"is {w}x{h}: they must match; fix the mask, or remove {name} from {split_file}")
            with contextlib.suppress(OSError):
                write_text(cache, json.dumps(key))

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return (f"VOCDataset(root={str(self.root)!r}, split={self.split!r}, "
                f"images={len(self)}, classes={self.num_classes})")

    def image_path(self, name: str) -> Path:
        return self.root / IMAGE_DIR / f"{name}.jpg"

    def mask_path(self, name: str) -> Path:
        """SegmentationClassAug when the image's split is train_aug, else SegmentationClass."""
        return mask_dir(self.root, self._split_of.get(name, self.splits[0])) / f"{name}.png"

    def source_image(self, index: int) -> tv_tensors.Image:
        """Image ``index`` as stored (uint8 (3, H, W)), before ``transforms``."""
        return tv_tensors.Image(torch.from_numpy(load_image(self.image_path(self.names[index]))).permute(2, 0, 1))

    def __getitem__(self, index: int) -> dict:
        name = self.names[index]
        image = self.source_image(index)
        item = {"name": name, "index": index, "label": torch.from_numpy(self.labels[index].astype(np.float32))}
        if self.with_mask:
            mpath = self.mask_path(name)
            mask = load_mask(mpath, self.num_classes)
            if mask.shape != tuple(image.shape[-2:]):
                raise _error(f"mask {mpath} is {mask.shape[1]}x{mask.shape[0]} but image {self.image_path(name)} "
                             f"is {image.shape[-1]}x{image.shape[-2]}: they must match")
            mask = tv_tensors.Mask(torch.from_numpy(mask).long())
            if self.transforms is not None:
                image, mask = self.transforms(image, mask)
            item["mask"] = mask
        elif self.transforms is not None:
            image = self.transforms(image)
        item["image"] = image
        return item


class PseudoMaskDataset(VOCDataset):
    """The images of a VOC split with their masks taken from ``masks_dir/NAME.png``
    (e.g. RUN/pseudo) instead of the dataset's ground truth. Items as VOCDataset's."""

    def __init__(self, root: str | Path, split: str, masks_dir: str | Path, transforms=None):
        super().__init__(root, split, transforms=transforms, with_mask=False)
        self.masks_dir = Path(masks_dir)
        self.with_mask = True  # VOCDataset.__getitem__ then reads self.mask_path(name)
        R.require_files(self.masks_dir, self.names, ".png", "training mask",
                        f"run the pseudo-mask stage for split {split} first (python -m wsss pseudo-masks ..., "
                        "or wsss.stages.pseudo_masks.run), or point masks_dir at a folder of NAME.png masks")

    def mask_path(self, name: str) -> Path:
        return self.masks_dir / f"{name}.png"
