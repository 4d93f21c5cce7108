"""Class names and the VOC colour palette: the one place they live.

A dataset root may carry its own class list in ``classes.txt`` (one foreground class
name per line, background excluded); the embedded benchmark writes one. Without it,
the 20 PASCAL VOC classes are used.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

CLASS_FILE = "classes.txt"
IGNORE_INDEX = 255

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)


def voc_palette() -> np.ndarray:
    """The PASCAL VOC colour map, (256, 3) uint8; index 255 is (224, 224, 192)."""
    pal = np.zeros((256, 3), dtype=np.uint8)
    for i in range(256):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


def load_class_names(root: str | Path | None = None) -> list[str]:
    """Foreground class names of the dataset at ``root`` (background excluded)."""
    if root is not None:
        path = Path(root) / CLASS_FILE
        if path.is_file():
            names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
            if not names:
                raise ValueError(f"{path} is empty: list one foreground class name per line, or delete it to use the 20 VOC classes")
            return names
    return list(VOC_CLASSES)


def write_class_names(root: str | Path, names: list[str]) -> None:
    Path(root, CLASS_FILE).write_text("\n".join(names) + "\n")
