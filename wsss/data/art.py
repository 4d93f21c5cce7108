"""Scenes of the art benchmark: PASCAL VOC's 20 classes drawn from open emoji artwork.

The shapes benchmark (wsss.data.synth) makes CAM failure modes measurable, but its objects
mean nothing to an ImageNet network. Here the objects are the committed sprites of
``wsss/data/sprites`` (OpenMoji and Noto Color Emoji, wsss.data.render_sprites), placed on
procedural backgrounds with statistics like VOC's:

* **Classes.** 1-3 objects; the first drawn by VOC 2012's per-class image frequency
  (``VOC_IMAGES``: person the most common), a second (with probability ``P_PARTNER``)
  from the first's co-occurring classes (``COOCCURRING``: person with horse, bicycle, ...;
  chair with dining table, sofa, ...), otherwise by frequency again; sometimes a second
  instance of a class (``P_SECOND_INSTANCE``).
* **Context.** A background by context (sky, grass, water, road, rails, indoor); with
  probability ``P_CONTEXT`` the first object's own (``CONTEXTS``: a boat on water, a plane
  in the sky: the context bias of real data), otherwise any.
* **Appearance.** Each object: a random sprite of its class, scaled so that its longest side
  is a random fraction of the image (``OBJECT_SIZE``), standing on the ground below the
  horizon (aeroplanes and birds anywhere), mostly inside the image, flipped with probability 1/2, colour-jittered; later objects occlude earlier
  ones but every object keeps ``MIN_VISIBLE`` of its pixels, so the image labels stay true.
* **Masks.** From the sprites' alpha (above 1/2), with VOC's ignore band (255) on every
  object boundary, ``BOUNDARY`` of the image side wide on each side (at least a pixel; VOC's
  5-pixel band at 500 px is 1 % wide in all).

VERSION changes when any constant here or a sprite does. Every draw comes from the generator passed in; wsss.data.synth seeds one per image and
writes the files (splits, palette, records), as for the shapes benchmark.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from wsss.classes import VOC_CLASSES

SPRITES = Path(__file__).parent / "sprites"
VERSION = 1

#: Images per class in PASCAL VOC 2012 trainval (the devkit's Main statistics, 11,540 images).
VOC_IMAGES = {
    "aeroplane": 670, "bicycle": 552, "bird": 765, "boat": 508, "bottle": 706, "bus": 421, "car": 1161,
    "cat": 1080, "chair": 1119, "cow": 303, "diningtable": 538, "dog": 1286, "horse": 482, "motorbike": 526,
    "person": 4087, "pottedplant": 527, "sheep": 325, "sofa": 507, "train": 544, "tvmonitor": 575,
}

#: Classes that appear with a class in VOC scenes (a partner is drawn uniformly from its list).
COOCCURRING = {
    "person": ("horse", "bicycle", "motorbike", "boat", "car", "dog", "chair", "sofa", "bottle", "diningtable"),
    "chair": ("diningtable", "sofa", "tvmonitor", "pottedplant", "person"),
    "diningtable": ("chair", "bottle", "person", "pottedplant"),
    "bottle": ("diningtable", "person", "chair"),
    "sofa": ("person", "chair", "tvmonitor", "cat", "dog", "pottedplant"),
    "tvmonitor": ("chair", "sofa", "person"),
    "pottedplant": ("chair", "sofa", "diningtable"),
    "horse": ("person",), "bicycle": ("person", "car"), "motorbike": ("person", "car"),
    "dog": ("person", "cat", "sofa"), "cat": ("sofa", "dog", "chair"),
    "car": ("person", "bus", "motorbike", "bicycle"), "bus": ("car", "person"),
    "cow": ("sheep", "person", "horse"), "sheep": ("cow", "person"),
    "boat": ("person",), "aeroplane": ("person",), "bird": ("person",), "train": ("person",),
}

#: The backgrounds a class is usually seen on.
CONTEXTS = {
    "aeroplane": ("sky",), "bird": ("sky", "grass", "water"), "boat": ("water",), "bus": ("road",),
    "car": ("road",), "bicycle": ("road", "grass"), "motorbike": ("road",), "train": ("rails",),
    "cow": ("grass",), "horse": ("grass",), "sheep": ("grass",), "cat": ("indoor", "grass"),
    "dog": ("grass", "indoor"), "person": ("indoor", "grass", "road"), "bottle": ("indoor",),
    "chair": ("indoor",), "diningtable": ("indoor",), "pottedplant": ("indoor",), "sofa": ("indoor",),
    "tvmonitor": ("indoor",),
}
BACKGROUNDS = ("sky", "grass", "water", "road", "rails", "indoor")
FLYING = ("aeroplane", "bird")  # placed anywhere; every other class stands on the ground (or floor)

OBJECTS_P = (0.45, 0.35, 0.2)   # probability of 1, 2, 3 objects
P_PARTNER = 0.6                 # a further object is a co-occurring class of the first
P_SECOND_INSTANCE = 0.15        # ... or another instance of the first class
P_CONTEXT = 0.8                 # the background is the first object's context
OBJECT_SIZE = (0.5, 1.0)       # longest side of the first object, fraction of the image side
PARTNER_SCALE = (0.5, 1.0)      # a further object's size relative to the first's
MIN_VISIBLE = 0.5               # fraction of an object that must stay visible (and inside the image)
PLACE_TRIES = 20
BOUNDARY = 0.005                # half-width of the 255 band on object boundaries, fraction of the side
JITTER = 0.15                   # per-object brightness, contrast and saturation factors in 1 +- JITTER
NOISE_SIGMA = 0.02              # pixel noise


@lru_cache(maxsize=None)
def sprite_files(cls: str) -> tuple[Path, ...]:
    return tuple(sorted((SPRITES / cls).glob("*.png")))


@lru_cache(maxsize=None)
def _sprite_image(path: Path) -> Image.Image:
    """The sprite file decoded once per process (126 files of at most 128 x 128 px)."""
    image = Image.open(path).convert("RGBA")
    image.load()
    return image


def _sprite(path: Path, height: int, width: int, flip: bool) -> np.ndarray:
    """The sprite resized to (height, width), RGBA float in [0, 1], flipped when asked."""
    image = _sprite_image(path).resize((width, height), Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.float32) / 255
    return array[:, ::-1] if flip else array


def sample_classes(rng: np.random.Generator, num_objects: int) -> list[str]:
    """The first class by VOC's image frequency; each further one a co-occurring class of the
    first (P_PARTNER), another instance of it (P_SECOND_INSTANCE), or by frequency again."""
    freq = np.array([VOC_IMAGES[c] for c in VOC_CLASSES], float)
    by_frequency = lambda: VOC_CLASSES[int(rng.choice(len(VOC_CLASSES), p=freq / freq.sum()))]  # noqa: E731
    classes = [by_frequency()]
    for _ in range(num_objects - 1):
        u = rng.random()
        if u < P_PARTNER:
            partners = COOCCURRING[classes[0]]
            classes.append(partners[int(rng.integers(len(partners)))])
        elif u < P_PARTNER + P_SECOND_INSTANCE:
            classes.append(classes[0])
        else:
            classes.append(by_frequency())
    return classes


# ----------------------------------------------------------------------------- backgrounds

def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a random (cells x cells) grid upsampled bicubically."""
    grid = (rng.random((cells, cells)) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(grid).resize((size, size), Image.Resampling.BICUBIC), np.float32) / 255


def _vertical(size: int, top, bottom) -> np.ndarray:
    t = np.linspace(0, 1, size, dtype=np.float32)[:, None, None]
    return np.broadcast_to((1 - t) * np.asarray(top, np.float32) + t * np.asarray(bottom, np.float32),
                           (size, size, 3)).copy()


def background(rng: np.random.Generator, kind: str, size: int) -> tuple[np.ndarray, int]:
    """(a procedural background (size, size, 3) float in [0, 1], the row where its ground
    starts): sky (no ground: the last row), grass, water, road, rails or indoor (the floor),
    with a random horizon and colours."""
    horizon = int(size * rng.uniform(0.25, 0.5))
    sky_top = np.array([0.30, 0.55, 0.90]) * rng.uniform(0.85, 1.1)
    sky = _vertical(size, sky_top, [0.75, 0.85, 0.97])
    clouds = np.clip(_smooth_noise(rng, size, 6) * 2 - 1.1, 0, 1)[..., None]
    sky = sky * (1 - clouds) + clouds
    rows = np.arange(size, dtype=np.float32)[:, None]
    if kind == "sky":
        return np.clip(sky, 0, 1), size
    if kind == "indoor":
        wall = np.array([rng.uniform(0.6, 0.95), rng.uniform(0.55, 0.9), rng.uniform(0.45, 0.85)], np.float32)
        image = np.broadcast_to(wall, (size, size, 3)).copy() * (0.9 + 0.1 * _smooth_noise(rng, size, 4))[..., None]
        floor = np.array([0.55, 0.38, 0.22], np.float32) * rng.uniform(0.7, 1.2)
        boards = 0.9 + 0.1 * np.sin(np.arange(size, dtype=np.float32)[None, :] * 2 * np.pi / (size / 8))
        image[horizon:] = (floor * boards[..., None] * np.ones((size, 1, 1), np.float32))[horizon:]
        return np.clip(image, 0, 1), horizon
    ground = {
        "grass": np.array([0.25, 0.55, 0.20]) * rng.uniform(0.8, 1.2),
        "water": np.array([0.15, 0.40, 0.65]) * rng.uniform(0.8, 1.2),
        "road": np.array([0.42, 0.42, 0.44]) * rng.uniform(0.8, 1.2),
        "rails": np.array([0.48, 0.40, 0.32]) * rng.uniform(0.8, 1.2),
    }[kind].astype(np.float32)
    texture = 0.8 + 0.4 * _smooth_noise(rng, size, 24)
    if kind == "water":
        texture = texture * (0.92 + 0.08 * np.sin(rows * 2 * np.pi / max(3.0, size / 20)))
    image = sky.copy()
    image[horizon:] = (ground * texture[..., None])[horizon:]
    if kind == "road":  # a dashed lane marking
        lane = slice(int(size * 0.72), int(size * 0.74) + 1)
        dashes = (np.arange(size) // max(1, size // 10)) % 2 == 0
        image[lane, dashes] = 0.9
    if kind == "rails":  # sleepers and two rails
        sleepers = (np.arange(size) // max(2, size // 16)) % 3 == 0
        for y0 in (int(size * 0.70), int(size * 0.80)):
            image[y0 - 1:y0 + 2, sleepers] = (0.35, 0.25, 0.15)
        for y0 in (int(size * 0.68), int(size * 0.82)):
            image[y0:y0 + max(1, size // 80)] = (0.6, 0.6, 0.62)
    return np.clip(image, 0, 1), horizon


# ----------------------------------------------------------------------------- objects

def _jitter(rng: np.random.Generator, rgb: np.ndarray) -> np.ndarray:
    """Brightness, contrast and saturation factors in 1 +- JITTER."""
    b, c, s = rng.uniform(1 - JITTER, 1 + JITTER, 3)
    grey = rgb.mean(axis=-1, keepdims=True)
    rgb = grey + s * (rgb - grey)
    rgb = rgb.mean() + c * (rgb - rgb.mean())
    return np.clip(b * rgb, 0, 1)


def boundary_band(mask: np.ndarray, radius: int) -> np.ndarray:
    """Pixels within ``radius`` (square neighbourhood) of a pixel of another label: VOC's
    ignore band on object boundaries (background meets background nowhere)."""
    band = np.zeros(mask.shape, bool)
    h, w = mask.shape
    padded = np.pad(mask, radius, mode="edge")
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            shifted = padded[radius + dy:radius + dy + h, radius + dx:radius + dx + w]
            band |= shifted != mask
    return band


def _top_left(rng: np.random.Generator, cls: str, h: int, w: int, size: int, ground: int) -> tuple[int, int]:
    """Where an (h, w) sprite goes: at most a quarter of it outside the image; unless it
    flies, its bottom edge on the ground (below row ``ground``)."""
    if cls in FLYING:
        y0 = int(rng.integers(-h // 4, size - 3 * h // 4 + 1))
    else:
        y0 = int(rng.integers(min(max(ground + size // 20, 3 * h // 4), size), size + h // 4 + 1)) - h
    return y0, int(rng.integers(-w // 4, size - 3 * w // 4 + 1))


def make_scene(rng: np.random.Generator, size: int, num_objects: int | None = None,
               context_p: float = P_CONTEXT) -> tuple[np.ndarray, np.ndarray, dict]:
    """(image uint8 (size, size, 3), mask uint8 with 0 background, 1-20 VOC classes and 255 on
    object boundaries, metadata) of one scene of ``num_objects`` objects (None: 1-3 drawn by
    OBJECTS_P); ``context_p``: P(the background is the first object's context)."""
    classes = sample_classes(rng, num_objects or int(rng.choice(len(OBJECTS_P), p=OBJECTS_P)) + 1)
    own = CONTEXTS[classes[0]]
    context = own[int(rng.integers(len(own)))] if rng.random() < context_p else \
        BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    image, ground = background(rng, context, size)
    owner = np.full((size, size), -1, np.int16)
    placed, first_side = [], rng.uniform(*OBJECT_SIZE)
    for cls in classes:
        k = len(placed)  # the object's index in ``owner``
        side = first_side if k == 0 else first_side * rng.uniform(*PARTNER_SCALE)
        files = sprite_files(cls)
        path = files[int(rng.integers(len(files)))]
        flip = bool(rng.random() < 0.5)
        w0, h0 = _sprite_image(path).size
        for attempt in range(PLACE_TRIES):
            scale = side * (0.95 ** attempt) * size / max(w0, h0)
            h, w = max(2, round(h0 * scale)), max(2, round(w0 * scale))
            sprite = _sprite(path, h, w, flip)
            alpha = sprite[..., 3]
            y0, x0 = _top_left(rng, cls, h, w, size, ground)
            ys, xs = slice(max(0, y0), min(size, y0 + h)), slice(max(0, x0), min(size, x0 + w))
            crop = (slice(ys.start - y0, ys.stop - y0), slice(xs.start - x0, xs.stop - x0))
            solid = alpha[crop] > 0.5
            new_owner = owner.copy()
            new_owner[ys, xs][solid] = k
            drawn = [p["pixels_drawn"] for p in placed] + [int((alpha > 0.5).sum())]
            if k == 0 or all((new_owner == j).sum() >= MIN_VISIBLE * n for j, n in enumerate(drawn)):
                break  # the first object, alone, always has a place
        else:
            continue  # this object finds no place that keeps every object visible enough: left out
        a = alpha[crop][..., None]
        image[ys, xs] = a * _jitter(rng, sprite[crop][..., :3]) + (1 - a) * image[ys, xs]
        owner = new_owner
        placed.append({"class": cls, "sprite": path.name, "flip": flip, "side": round(side, 3),
                       "pixels_drawn": int((alpha > 0.5).sum())})
    mask = np.zeros((size, size), np.uint8)
    for k, p in enumerate(placed):
        mask[owner == k] = VOC_CLASSES.index(p["class"]) + 1
    band = boundary_band(mask, max(1, round(BOUNDARY * size)))
    labels = sorted(int(c) for c in np.unique(mask) if c != 0)
    mask[band] = 255
    noise = rng.normal(0, NOISE_SIGMA, size=image.shape).astype(np.float32)
    pixels = (np.clip(image + noise, 0, 1) * 255 + 0.5).astype(np.uint8)
    for k, p in enumerate(placed):
        p["pixels"] = int((owner == k).sum())
    meta = {"labels": labels, "objects": placed, "context": context,
            "foreground": round(float((owner >= 0).mean()), 4), "ignored": round(float(band.mean()), 4)}
    return pixels, mask, meta
