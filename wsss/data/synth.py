"""The embedded benchmark: seeded synthetic multi-label scenes in PASCAL VOC layout.

Two kinds of scenes, chosen by the size name (``SIZES``): the shapes described below
("smoke", "demo", "full"), and VOC's 20 classes drawn from emoji artwork ("art-smoke",
"art-demo", "art-full"; the scenes in wsss.data.art, written by this module's writer with
the same splits, palette and records, without part maps or classes.txt).

Real VOC cannot be shipped, so every demo and test runs on scenes drawn here, written in
exactly the layout of PASCAL VOC 2012 (see data/README.md) so that the real-data code path
is the one exercised. The scenes are built to show, on purpose, the failure modes that
METHOD.md sec. 1-2 targets (data/README.md):

* **Small discriminative part.** An object is a large *body* (45-75 % of the image side,
  i.e. 5-9 cells of a stride-8 map) with a small *head* at one end (about 4-12 % of the
  object's area). Body shape, colour and texture are drawn from a few shared choices.
  With probability ``body_class`` the body's texture and colours are those of its class
  *pair* (2i, 2i+1 share them, as cats and dogs share fur), otherwise drawn independently
  of the class: so the body says which pair the object may belong to, and only the head
  says which of the two it is. A plain CAM classifier can succeed by looking at the head
  alone. ``body_class: 0`` (generator version 2) makes bodies say nothing about the class;
  the calibration of the defaults is in docs/localisation.md.
* **Shared parts.** Classes come in pairs (2i, 2i+1, 0-based) whose heads share a colour
  and differ only by pattern (solid vs. striped).
* **Co-occurrence.** Every class has its own *context* texture (like water for boats),
  drawn as a band under the object with probability ``context_p`` when the class is
  present and rarely otherwise; ``context_size`` scales the band's extent. Context is
  background in the mask (0) and 3 in the diagnostic part map. Class ``c`` and
  ``c + K//2`` also appear together often.
* **Clutter, occlusion, scale.** Random small distractor shapes (background), later
  objects overlapping earlier ones (every object keeps most of its body and head
  visible, so image labels stay honest), random object size and orientation.

Written files (ROOT = the dataset root)::

    JPEGImages/NAME.jpg                       quality 95
    SegmentationClass/NAME.png                palette PNG, 0 bg, 1..K classes (exact, no 255)
    SegmentationPart/NAME.png                 0 none, 1 body, 2 discriminative part, 3 context
    ImageSets/Segmentation/train.txt, val.txt plain names
    ImageSets/Segmentation/train_single.txt   "NAME c"          one object each (setting 2)
    ImageSets/Segmentation/train_web.txt      "NAME c1 c2 ..."  labels noised (setting 3)
    classes.txt                               made-up foreground class names
    benchmark.json                            generator parameters, seed and summary stats
    benchmark_objects.jsonl                   one line per image: its objects and contexts

Generation is deterministic: each image draws from its own generator seeded by
``(seed, split, index)``, so the same parameters give the same bytes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from wsss.classes import VOC_CLASSES, voc_palette, write_class_names
from wsss.data import art
from wsss.data.art import VERSION as ART_VERSION

log = logging.getLogger(__name__)

GENERATOR_VERSION = 3
PARAMS_FILE = "benchmark.json"
OBJECTS_FILE = "benchmark_objects.jsonl"
PART_DIR = "SegmentationPart"
PART_NAMES = {0: "none", 1: "object body", 2: "discriminative part", 3: "context"}

#: name -> the scenes' kind (shapes: this module's; art: VOC's classes drawn from emoji artwork,
#: wsss.data.art) and the default image size and image counts per split
SIZES = {
    "smoke": dict(kind="shapes", image_size=64, num_train=40, num_val=16, num_single=16, num_web=16),
    "demo": dict(kind="shapes", image_size=96, num_train=1000, num_val=200, num_single=200, num_web=200),
    "full": dict(kind="shapes", image_size=128, num_train=5000, num_val=1000, num_single=1000, num_web=1000),
    "art-smoke": dict(kind="art", image_size=64, num_train=40, num_val=16, num_single=16, num_web=16),
    "art-demo": dict(kind="art", image_size=160, num_train=800, num_val=200, num_single=200, num_web=200),
    "art-full": dict(kind="art", image_size=320, num_train=5000, num_val=1000, num_single=1000, num_web=1000),
}

CLASS_NAMES = (
    "blick", "dorp", "fenn", "glim", "krat", "lomo", "mizz", "nurb", "plov", "quen",
    "rusk", "sabe", "tove", "vrim", "wolt", "yarn", "zeck", "brul", "chib", "duss",
)

# Scene constants. They are not arguments so that the recorded parameters stay short;
# GENERATOR_VERSION changes when any of them does. The realism knobs (body-class
# correlation, context probability and size) are SynthParams fields instead.
BODY_LENGTH = (0.45, 0.75)     # body length, fraction of the image side
BODY_ASPECT = (0.30, 0.50)     # body width / length
BODY_SHAPES = (2.0, 4.0, 1.4)  # superellipse exponents: ellipse, rounded box, lens
BODY_TEXTURES = ("stripes", "spots", "mottled", "checker", "shaded")
HEAD_FRACTION = (0.04, 0.09)   # target head area / object area
HEAD_MIN_RADIUS = 0.035        # fraction of the image side
HEAD_AT = 0.92                 # head centre along the body axis, fraction of the half-length
OBJECTS_P = (0.4, 0.4, 0.2)    # probability of 1, 2, 3 objects
P_PAIR = 0.5                   # second object is the co-occurrence partner of the first
P_CONTEXT = 0.8                # context band drawn under a present class (version 2; default of context_p)
P_STRAY_CONTEXT = 0.1          # per image: one context band of an absent class
MIN_VISIBLE = 0.6              # occlusion: fraction of an object that must stay visible
MIN_HEAD_VISIBLE = 0.75        # occlusion: fraction of a head that must stay visible
PLACE_TRIES = 12
CLUTTER = (2, 7)               # number of distractor shapes, [lo, hi)
NOISE_SIGMA = 0.025            # pixel noise
JPEG_QUALITY = 95

SCENE_KNOBS = ("body_class", "context_p", "context_size")  # SynthParams' realism knobs
DATA_KNOBS = (*SCENE_KNOBS, "noise_rate")  # what a pipeline config's ``scene:`` may set
SPLIT_CODES = {"train": 0, "val": 1, "single": 2, "web": 3}
SPLIT_FILES = {"train": "train.txt", "val": "val.txt", "single": "train_single.txt", "web": "train_web.txt"}


@dataclass(frozen=True)
class SynthParams:
    """Everything that determines the generated bytes (recorded in benchmark.json)."""

    size: str = "demo"
    kind: str = "shapes"
    seed: int = 0
    num_classes: int = 10
    image_size: int = 96
    num_train: int = 1000
    num_val: int = 200
    num_single: int = 200
    num_web: int = 200
    noise_rate: float = 0.3
    body_class: float = 0.0        # P(an object's body has its class pair's texture and colours)
    context_p: float = P_CONTEXT   # P(a present class draws its context band)
    context_size: float = 1.0      # scale of the context band's extent (1: version 2's bands)
    version: int = GENERATOR_VERSION

    def counts(self) -> dict[str, int]:
        return {"train": self.num_train, "val": self.num_val, "single": self.num_single, "web": self.num_web}


def resolve_params(size="demo", seed=0, num_classes=None, image_size=None, num_train=None, num_val=None,
                   noise_rate=0.3, num_single=None, num_web=None, body_class=None, context_p=None,
                   context_size=None) -> SynthParams:
    """Fill the size defaults in and validate; raises ValueError naming the bad argument.
    ``num_classes``: 10 by default for shapes; art has VOC's 20."""
    if size not in SIZES:
        raise ValueError(f"unknown benchmark size {size!r}: choose one of {sorted(SIZES)}")
    kind = SIZES[size]["kind"]
    given = dict(image_size=image_size, num_train=num_train, num_val=num_val, num_single=num_single, num_web=num_web)
    knobs = dict(zip(SCENE_KNOBS, (body_class, context_p, context_size)))
    if kind == "art":
        if num_classes not in (None, len(VOC_CLASSES)) or body_class is not None or context_size is not None:
            raise ValueError(f"benchmark {size!r} draws VOC's 20 classes from artwork: num_classes, body_class and "
                             f"context_size are knobs of the shapes benchmarks only")
        num_classes = len(VOC_CLASSES)
    p = SynthParams(size=size, kind=kind, seed=int(seed), num_classes=int(num_classes or 10),
                    version=ART_VERSION if kind == "art" else GENERATOR_VERSION,
                    **{k: SIZES[size][k] if v is None else int(v) for k, v in given.items()},
                    noise_rate=float(noise_rate), **{k: float(v) for k, v in knobs.items() if v is not None})
    if p.num_classes < 2:
        raise ValueError(f"num_classes={p.num_classes}: the benchmark needs at least 2 classes")
    if p.num_classes > 254:
        raise ValueError(f"num_classes={p.num_classes}: palette masks hold at most 254 classes")
    if p.image_size < 32:
        raise ValueError(f"image_size={p.image_size}: use at least 32 px (objects get too small to have parts)")
    if p.num_train < 1 or p.num_val < 1 or p.num_single < 0 or p.num_web < 0:
        raise ValueError(f"image counts must be >= 1 for train/val and >= 0 for single/web, got {p.counts()}")
    for key in ("noise_rate", "body_class", "context_p"):
        if not 0.0 <= getattr(p, key) <= 1.0:
            raise ValueError(f"{key}={getattr(p, key)}: must lie in [0, 1]")
    if not 0.0 < p.context_size <= 3.0:
        raise ValueError(f"context_size={p.context_size}: must lie in (0, 3]")
    return p


# ----------------------------------------------------------------------------- appearance

def class_names(num_classes: int) -> list[str]:
    """Short made-up foreground class names (``class21`` ... beyond the list)."""
    return [CLASS_NAMES[i] if i < len(CLASS_NAMES) else f"class{i + 1}" for i in range(num_classes)]


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    """One HSV colour (h in turns) as float32 RGB in [0, 1]."""
    i = int(h * 6.0) % 6
    f = h * 6.0 - math.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.array(rgb, dtype=np.float32)


def head_style(c: int, num_classes: int) -> tuple[np.ndarray, int]:
    """Head colour and pattern (0 solid, 1 striped) of 0-based class ``c``.

    Classes 2i and 2i+1 share the colour and differ by the pattern (shared parts).
    """
    num_colours = (num_classes + 1) // 2
    return _hsv((c // 2) / num_colours, 0.95, 1.0), c % 2


def context_style(c: int, num_classes: int) -> tuple[np.ndarray, int]:
    """Context texture colour (muted, its own hue) and pattern (0 waves, 1 hatch, 2 speckle)."""
    return _hsv((c + 0.5) / num_classes, 0.55, 0.6), c % 3


def cooccurrence_partner(c: int, num_classes: int) -> int:
    """The class that ``c`` often appears with: ``c + K//2`` modulo K."""
    return (c + num_classes // 2) % num_classes


BODY_COLOURS = np.array([
    (0.55, 0.52, 0.50), (0.45, 0.38, 0.30), (0.60, 0.55, 0.42), (0.40, 0.42, 0.45),
    (0.50, 0.45, 0.38), (0.35, 0.33, 0.32), (0.58, 0.50, 0.45), (0.45, 0.47, 0.40),
], dtype=np.float32)
BACKGROUND_COLOURS = np.array([
    (0.78, 0.76, 0.72), (0.70, 0.72, 0.70), (0.80, 0.78, 0.70), (0.66, 0.66, 0.68), (0.74, 0.70, 0.66),
], dtype=np.float32)


def _superellipse_area(a: float, b: float, p: float) -> float:
    return 4.0 * a * b * math.gamma(1 + 1 / p) ** 2 / math.gamma(1 + 2 / p)


# ----------------------------------------------------------------------------- scene layout

@dataclass
class ObjectSpec:
    """One object: class, shared body look, pose. Pixels come from :func:`object_masks`."""

    cls: int                 # 0-based class
    shape: int               # index into BODY_SHAPES
    texture: int             # index into BODY_TEXTURES
    colours: tuple[int, int]  # indices into BODY_COLOURS
    period: float            # texture period in px
    cx: float
    cy: float
    angle: float
    a: float                 # body half-length
    b: float                 # body half-width
    head_r: float
    phase: float = 0.0


@dataclass
class SceneSpec:
    objects: list[ObjectSpec] = field(default_factory=list)
    contexts: list[dict] = field(default_factory=list)  # {"cls", "stray", "box": (x0, x1, y0, y1), "phase"}


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return xx, yy


def object_masks(o: ObjectSpec, xx, yy) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(body, head, u, v): boolean masks of the body (head excluded) and head, and the pixel
    coordinates in the object's frame: u along the body axis (head at +u), v across."""
    dx, dy = xx - o.cx, yy - o.cy
    cs, sn = math.cos(o.angle), math.sin(o.angle)
    u, v = dx * cs + dy * sn, -dx * sn + dy * cs
    p = BODY_SHAPES[o.shape]
    body = (np.abs(u / o.a) ** p + np.abs(v / o.b) ** p) <= 1.0
    head = (u - HEAD_AT * o.a) ** 2 + v ** 2 <= o.head_r ** 2
    return body & ~head, head, u, v


def body_look(c: int) -> tuple[int, tuple[int, int]]:
    """Texture and colour pair of the bodies of 0-based class ``c`` when they follow the class.

    Classes 2i and 2i+1 share them (the body tells the pair, the head tells the class).
    """
    pair = c // 2
    first = pair % len(BODY_COLOURS)
    return pair % len(BODY_TEXTURES), (first, (first + 1 + pair // len(BODY_COLOURS)) % len(BODY_COLOURS))


def _sample_object(rng: np.random.Generator, cls: int, size: int, scale: float = 1.0,
                   body_class: float = 0.0) -> ObjectSpec | None:
    """Draw an object of class ``cls`` whose head lies inside the image (None if it cannot).

    With probability ``body_class`` its texture and colours are :func:`body_look` of the
    class (the draw is skipped when it is 0, so version 2's scenes stay reachable).
    """
    length = rng.uniform(*BODY_LENGTH) * size * scale
    a = length / 2
    b = a * rng.uniform(*BODY_ASPECT)
    shape = int(rng.integers(len(BODY_SHAPES)))
    frac = rng.uniform(*HEAD_FRACTION)
    area = _superellipse_area(a, b, BODY_SHAPES[shape])
    head_r = max(math.sqrt(frac * area / (math.pi * (1 - frac / 2))), HEAD_MIN_RADIUS * size)
    angle = rng.uniform(0, 2 * math.pi)
    cs, sn = math.cos(angle), math.sin(angle)
    # conservative half-extents of the body, and the head centre offset
    hx, hy = abs(a * cs) + abs(b * sn), abs(a * sn) + abs(b * cs)
    ox, oy = HEAD_AT * a * cs, HEAD_AT * a * sn
    slack = 0.08 * size  # the body may be cut by the border a little; the head never
    lo_x = max(-slack + hx, 1 + head_r - ox)
    hi_x = min(size - 1 + slack - hx, size - 2 - head_r - ox)
    lo_y = max(-slack + hy, 1 + head_r - oy)
    hi_y = min(size - 1 + slack - hy, size - 2 - head_r - oy)
    if lo_x > hi_x or lo_y > hi_y:
        return None
    colours = tuple(int(i) for i in rng.choice(len(BODY_COLOURS), size=2, replace=False))
    o = ObjectSpec(cls=cls, shape=shape, texture=int(rng.integers(len(BODY_TEXTURES))), colours=colours,
                   period=float(rng.uniform(0.05, 0.09) * size), cx=float(rng.uniform(lo_x, hi_x)),
                   cy=float(rng.uniform(lo_y, hi_y)), angle=float(angle), a=float(a), b=float(b),
                   head_r=float(head_r), phase=float(rng.uniform(0, 2 * math.pi)))
    if body_class > 0 and rng.random() < body_class:
        o.texture, o.colours = body_look(cls)
    return o


def _sample_classes(rng: np.random.Generator, num_classes: int, num_objects: int) -> list[int]:
    """Distinct classes; the second is the first's co-occurrence partner with prob. P_PAIR."""
    first = int(rng.integers(num_classes))
    classes = [first]
    while len(classes) < min(num_objects, num_classes):
        partner = cooccurrence_partner(first, num_classes)
        if len(classes) == 1 and partner not in classes and rng.random() < P_PAIR:
            classes.append(partner)
            continue
        rest = [c for c in range(num_classes) if c not in classes]
        classes.append(int(rng.choice(rest)))
    return classes


def _place_objects(rng, classes: list[int], size: int, xx, yy, body_class: float = 0.0) -> list[ObjectSpec]:
    """Place objects in order (later on top), keeping every object honestly visible.

    A new object is rejected (and redrawn, up to PLACE_TRIES times) if it would leave an
    earlier object with under MIN_VISIBLE of its pixels or MIN_HEAD_VISIBLE of its head.
    """
    placed: list[ObjectSpec] = []
    masks: list[tuple[np.ndarray, np.ndarray]] = []  # (object, head) full masks of the placed ones
    for cls in classes:
        for _ in range(PLACE_TRIES):
            o = _sample_object(rng, cls, size, scale=rng.uniform(0.8, 1.0) if placed else 1.0,
                               body_class=body_class)
            if o is None:
                continue
            body, head, _, _ = object_masks(o, xx, yy)
            obj = body | head
            if head.sum() < 4 or obj.sum() < 0.01 * size * size:
                continue
            # walk down from the top: ``cover`` is everything drawn above object j
            cover = obj.copy()
            for prev_obj, prev_head in reversed(masks):
                if ((prev_obj & ~cover).sum() < MIN_VISIBLE * prev_obj.sum()
                        or (prev_head & ~cover).sum() < MIN_HEAD_VISIBLE * prev_head.sum()):
                    break  # o hides too much of an earlier object: try again
                cover |= prev_obj
            else:  # every earlier object stays visible: keep o, go on to the next class
                placed.append(o)
                masks.append((obj, head))
                break
    return placed


def _context_box(rng, box: tuple[float, float, float, float], size: int,
                 scale: float = 1.0) -> tuple[float, float, float, float]:
    """The band under an object box (x0, x1, y0, y1): from its lower half to below it.

    ``scale`` (``context_size``) scales how far the band reaches up into the object, below
    it and to the sides; 1 gives version 2's bands.
    """
    x0, x1, y0, y1 = box
    w, h = x1 - x0, y1 - y0
    side = scale * (0.1 * w + 2)
    return (x0 - side, x1 + side, y1 - scale * (1 - rng.uniform(0.5, 0.65)) * h,
            y1 + scale * (0.15 * h + 0.05 * size))


def _context_band(rng, o: ObjectSpec, size: int, scale: float, xx, yy) -> dict:
    body, head, _, _ = object_masks(o, xx, yy)
    ys, xs = np.nonzero(body | head)
    box = (float(xs.min()), float(xs.max()), float(ys.min()), float(ys.max()))
    return {"cls": o.cls, "stray": False, "box": _context_box(rng, box, size, scale),
            "phase": float(rng.uniform(0, 2 * math.pi))}


def sample_scene(rng: np.random.Generator, num_classes: int, size: int, num_objects: int | None = None,
                 stray: bool = True, body_class: float = 0.0, context_p: float = P_CONTEXT,
                 context_size: float = 1.0) -> SceneSpec:
    """Layout of one scene: classes, object poses, context bands. No pixels are drawn here."""
    xx, yy = _grid(size)
    if num_objects is None:
        num_objects = int(rng.choice(len(OBJECTS_P), p=OBJECTS_P)) + 1
    classes = _sample_classes(rng, num_classes, num_objects)
    scene = SceneSpec(objects=_place_objects(rng, classes, size, xx, yy, body_class))
    present = {o.cls for o in scene.objects}
    for o in scene.objects:
        if rng.random() < context_p:
            scene.contexts.append(_context_band(rng, o, size, context_size, xx, yy))
    absent = [c for c in range(num_classes) if c not in present]
    if stray and absent and rng.random() < P_STRAY_CONTEXT:
        w, h = rng.uniform(0.25, 0.5, size=2) * size
        x0, y0 = rng.uniform(0, size - w), rng.uniform(0, size - h)
        scene.contexts.append({"cls": int(rng.choice(absent)), "stray": True,
                               "box": _context_box(rng, (x0, x0 + w, y0, y0 + h), size, context_size),
                               "phase": float(rng.uniform(0, 2 * math.pi))})
    return scene


# ----------------------------------------------------------------------------- rendering

def _background(rng, size: int, xx, yy) -> np.ndarray:
    base = BACKGROUND_COLOURS[rng.integers(len(BACKGROUND_COLOURS))]
    freq = rng.uniform(0.5, 2.0, size=2) * 2 * math.pi / size
    wave = np.sin(freq[0] * xx + rng.uniform(0, 6.3)) * np.cos(freq[1] * yy + rng.uniform(0, 6.3))
    grad = (rng.uniform(-1, 1) * xx + rng.uniform(-1, 1) * yy) / size
    shade = 0.06 * wave + 0.06 * grad
    return np.clip(base[None, None, :] + shade[..., None], 0, 1).astype(np.float32)


def _context_region(ctx: dict, size: int, xx, yy) -> np.ndarray:
    x0, x1, y0, y1 = ctx["box"]
    top = y0 + 0.03 * size * np.sin(2 * math.pi * xx / (0.25 * size) + ctx["phase"])
    return (xx >= x0) & (xx <= x1) & (yy >= top) & (yy <= y1)


def _context_texture(cls: int, num_classes: int, phase: float, size: int, xx, yy) -> np.ndarray:
    colour, pattern = context_style(cls, num_classes)
    p = 0.08 * size
    if pattern == 0:    # waves
        t = np.sin(2 * math.pi * (yy + 0.04 * size * np.sin(2 * math.pi * xx / (0.3 * size) + phase)) / p)
    elif pattern == 1:  # diagonal hatch
        t = np.sign(np.sin(2 * math.pi * (xx + yy) / p + phase))
    else:               # speckle
        t = np.sin(2 * math.pi * xx / (0.5 * p) + phase) * np.sin(2 * math.pi * yy / (0.5 * p) + 2 * phase)
        t = np.where(t > 0.5, 1.0, -0.3)
    return np.clip(colour[None, None, :] * (1 + 0.25 * t[..., None]), 0, 1)


def _body_texture(o: ObjectSpec, u, v) -> np.ndarray:
    c1, c2 = BODY_COLOURS[o.colours[0]], BODY_COLOURS[o.colours[1]]
    p, kind = o.period, BODY_TEXTURES[o.texture]
    if kind == "stripes":
        t = (np.sin(2 * math.pi * v / p + o.phase) > 0).astype(np.float32)
    elif kind == "spots":
        du, dv = np.mod(u + o.phase, p) - p / 2, np.mod(v, p) - p / 2
        t = (du ** 2 + dv ** 2 < (0.3 * p) ** 2).astype(np.float32)
    elif kind == "mottled":
        t = 0.5 + 0.25 * (np.sin(2 * math.pi * u / (1.7 * p) + o.phase) + np.sin(2 * math.pi * v / (1.3 * p) - o.phase))
    elif kind == "checker":
        t = ((np.floor(u / p) + np.floor(v / p)) % 2).astype(np.float32)
    else:  # shaded
        t = np.clip(0.5 + 0.5 * v / o.b, 0, 1)
    return c1[None, None, :] * (1 - t[..., None]) + c2[None, None, :] * t[..., None]


def _head_texture(o: ObjectSpec, num_classes: int, u, v) -> np.ndarray:
    colour, pattern = head_style(o.cls, num_classes)
    if pattern == 0:
        t = np.ones_like(u)
    else:  # stripes across the body axis
        period = max(3.0, 0.9 * o.head_r)
        t = np.where(np.sin(2 * math.pi * (u - HEAD_AT * o.a) / period) > 0, 1.0, 0.22)
    shade = 1 - 0.15 * np.clip(((u - HEAD_AT * o.a) ** 2 + v ** 2) / o.head_r ** 2, 0, 1)
    return colour[None, None, :] * (t * shade)[..., None]


def _draw_clutter(rng, img: np.ndarray, part: np.ndarray, size: int, xx, yy) -> int:
    """Small distractor shapes in random muted colours (background in every map)."""
    n = int(rng.integers(*CLUTTER))
    for _ in range(n):
        r = rng.uniform(0.025, 0.07) * size
        cx, cy = rng.uniform(0, size, size=2)
        kind = rng.integers(3)
        if kind == 0:
            m = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
        elif kind == 1:
            m = (np.abs(xx - cx) <= r) & (np.abs(yy - cy) <= r)
        else:  # triangle
            m = (yy - cy <= r) & (yy - cy >= -r + 2 * np.abs(xx - cx))
        img[m] = _hsv(rng.random(), rng.uniform(0.1, 0.6), rng.uniform(0.3, 0.9))
        part[m] = 0
    return n


def render_scene(rng: np.random.Generator, scene: SceneSpec, num_classes: int, size: int,
                 clutter: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Pixels of a scene: (image uint8 HxWx3, mask uint8 0..K, part uint8 0..3, metadata).

    Draw order: background, context bands, clutter, objects (each on top of the earlier
    ones). The mask labels every visible object pixel, head and body, with its class.
    """
    xx, yy = _grid(size)
    img = _background(rng, size, xx, yy)
    mask = np.zeros((size, size), np.uint8)
    part = np.zeros((size, size), np.uint8)
    ctx_regions = []
    for ctx in scene.contexts:
        region = _context_region(ctx, size, xx, yy)
        tex = _context_texture(ctx["cls"], num_classes, ctx["phase"], size, xx, yy)
        img[region] = tex[region]
        part[region] = 3
        ctx_regions.append(region)
    n_clutter = _draw_clutter(rng, img, part, size, xx, yy) if clutter else 0
    owner = np.full((size, size), -1, np.int16)
    head_map = np.zeros((size, size), bool)
    for k, o in enumerate(scene.objects):
        body, head, u, v = object_masks(o, xx, yy)
        img[body] = _body_texture(o, u, v)[body]
        img[head] = _head_texture(o, num_classes, u, v)[head]
        obj = body | head
        mask[obj] = o.cls + 1
        part[body] = 1
        part[head] = 2
        owner[obj] = k
        head_map[obj] = head[obj]
    noise = rng.normal(0, NOISE_SIGMA, size=img.shape).astype(np.float32)
    image = (np.clip(img + noise, 0, 1) * 255 + 0.5).astype(np.uint8)
    objects = []
    for k, o in enumerate(scene.objects):
        vis = owner == k
        n_vis, n_head = int(vis.sum()), int((vis & head_map).sum())
        objects.append({"class": o.cls + 1, "shape": o.shape, "texture": o.texture, "colours": list(o.colours),
                        "length": round(2 * o.a, 2), "angle": round(o.angle, 3), "pixels": n_vis,
                        "head_pixels": n_head, "head_fraction": round(n_head / max(n_vis, 1), 4)})
    contexts = [{"class": c["cls"] + 1, "stray": c["stray"], "pixels": int((r & (part == 3)).sum())}
                for c, r in zip(scene.contexts, ctx_regions)]
    labels = sorted(int(c) for c in np.unique(mask) if c != 0)
    meta = {"labels": labels, "objects": objects, "contexts": contexts, "clutter": n_clutter}
    return image, mask, part, meta


# ----------------------------------------------------------------------------- label noise

def corrupt_labels(rng: np.random.Generator, labels: list[int], num_classes: int, noise_rate: float) -> list[int]:
    """With probability ``noise_rate``, drop, add or swap one class (1-based labels).

    The operation is drawn uniformly among those possible (drop needs two labels, add and
    swap need an absent class); the result always differs from the input and is non-empty.
    """
    labels = sorted(labels)
    if rng.random() >= noise_rate:
        return labels
    absent = [c for c in range(1, num_classes + 1) if c not in labels]
    ops = (["drop"] if len(labels) > 1 else []) + (["add", "swap"] if absent else [])
    if not ops:
        return labels
    op = ops[int(rng.integers(len(ops)))]
    if op == "drop":  # labels is already a sorted copy of the input
        labels.pop(int(rng.integers(len(labels))))
    elif op == "add":
        labels.append(int(rng.choice(absent)))
    else:
        labels[int(rng.integers(len(labels)))] = int(rng.choice(absent))
    return sorted(labels)


# ----------------------------------------------------------------------------- writing

def part_palette() -> np.ndarray:
    """(256, 3) palette of SegmentationPart PNGs: none black, body grey, part red, context blue."""
    pal = np.zeros((256, 3), np.uint8)
    pal[1], pal[2], pal[3] = (150, 150, 150), (230, 40, 40), (60, 120, 230)
    return pal


def _write_png(path: Path, array: np.ndarray, palette: list[int]) -> None:
    im = Image.fromarray(array)  # mode "L"; putpalette makes it a palette ("P") image
    im.putpalette(palette)
    im.save(path)


def _single_scene(rng: np.random.Generator, p: SynthParams) -> SceneSpec:
    """Setting 2: one object of a uniformly drawn class, its context with prob. ``context_p``."""
    size = p.image_size
    cls = int(rng.integers(p.num_classes))
    for attempt in range(PLACE_TRIES):
        o = _sample_object(rng, cls, size, scale=0.95 ** attempt, body_class=p.body_class)
        if o is not None:
            break
    else:  # pragma: no cover - objects shrink until they fit
        raise RuntimeError(f"could not place an object in a {size}px image")
    xx, yy = _grid(size)
    scene = SceneSpec(objects=[o])
    if rng.random() < p.context_p:
        scene.contexts.append(_context_band(rng, o, size, p.context_size, xx, yy))
    return scene


def make_image(p: SynthParams, split: str, index: int) -> tuple[str, np.ndarray, np.ndarray, np.ndarray | None, dict]:
    """One image of a split: (name, image, mask, part map (None for art), metadata), from its own
    seeded generator."""
    rng = np.random.default_rng([p.seed, SPLIT_CODES[split], index])
    name = f"{split}_{index:05d}"
    if p.kind == "art":
        image, mask, meta = art.make_scene(rng, p.image_size, 1 if split == "single" else None, p.context_p)
        part = None  # art scenes have no part map
    else:
        scene = _single_scene(rng, p) if split == "single" else sample_scene(
            rng, p.num_classes, p.image_size, body_class=p.body_class, context_p=p.context_p,
            context_size=p.context_size)
        image, mask, part, meta = render_scene(rng, scene, p.num_classes, p.image_size)
    meta = {"name": name, "split": split, **meta}
    if split == "web":
        meta["noisy_labels"] = corrupt_labels(rng, meta["labels"], p.num_classes, p.noise_rate)
    return name, image, mask, part, meta


def _split_line(meta: dict) -> str:
    if meta["split"] == "single":
        return f"{meta['name']} {meta['labels'][0]}"
    if meta["split"] == "web":
        return " ".join([meta["name"], *map(str, meta["noisy_labels"])])
    return meta["name"]


def _write_dataset(out: Path, p: SynthParams) -> list[dict]:
    """Draw and write every image of every split into ``out``; returns the metadata."""
    from wsss.progress import progress

    folders = ["JPEGImages", "SegmentationClass", "ImageSets/Segmentation"] + ([PART_DIR] if p.kind == "shapes" else [])
    for sub in folders:
        (out / sub).mkdir(parents=True, exist_ok=True)
    if p.kind == "shapes":  # art has VOC's classes, the reader's default
        write_class_names(out, class_names(p.num_classes))
    voc_pal = voc_palette().reshape(-1).tolist()
    part_pal = part_palette().reshape(-1).tolist()
    jobs = [(split, i) for split, n in p.counts().items() for i in range(n)]
    metas = []
    for split, i in progress(jobs, desc=f"benchmark ({p.size})", disable=p.size == "smoke", leave=False):
        name, image, mask, part, meta = make_image(p, split, i)
        Image.fromarray(image).save(out / "JPEGImages" / f"{name}.jpg", quality=JPEG_QUALITY, subsampling=0)
        _write_png(out / "SegmentationClass" / f"{name}.png", mask, voc_pal)
        if part is not None:
            _write_png(out / PART_DIR / f"{name}.png", part, part_pal)
        metas.append(meta)
    for split, fname in SPLIT_FILES.items():
        lines = [_split_line(m) for m in metas if m["split"] == split]
        (out / "ImageSets" / "Segmentation" / fname).write_text("".join(line + "\n" for line in lines))
    with open(out / OBJECTS_FILE, "w") as f:
        f.writelines(json.dumps(m, sort_keys=True) + "\n" for m in metas)
    return metas


def summarize(metas: list[dict], p: SynthParams) -> dict:
    """Deterministic summary of a generated benchmark (``summarize_shapes``, ``summarize_art``)."""
    return (summarize_art if p.kind == "art" else summarize_shapes)(metas, p)


def summarize_art(metas: list[dict], p: SynthParams) -> dict:
    """Of the art benchmark's train split: objects per image, the foreground and ignored shares of
    pixels, how often the background is the first object's context, the class frequency."""
    train = [m for m in metas if m["split"] == "train"]
    web = [m for m in metas if m["split"] == "web"]
    freq = np.zeros(p.num_classes, int)
    for m in train:
        freq[np.asarray(m["labels"]) - 1] += 1
    return {
        "counts": p.counts(),
        "mean_objects": round(float(np.mean([len(m["objects"]) for m in train])), 4),
        "mean_classes": round(float(np.mean([len(m["labels"]) for m in train])), 4),
        "foreground": round(float(np.mean([m["foreground"] for m in train])), 4),
        "ignored": round(float(np.mean([m["ignored"] for m in train])), 4),
        "own_context": round(float(np.mean([m["context"] in art.CONTEXTS[m["objects"][0]["class"]]
                                            for m in train])), 4),
        "web_noise_rate": round(float(np.mean([m["noisy_labels"] != m["labels"] for m in web])), 4) if web else None,
        "class_frequency": freq.tolist(),
    }


def summarize_shapes(metas: list[dict], p: SynthParams) -> dict:
    """Deterministic summary of a generated benchmark (its failure modes, measured).

    ``context_rate`` is P(context of c visible | c present), ``stray_context_rate`` is
    P(context of c visible | c absent), both over the train split; ``head_fraction`` is the
    mean share of an object's visible pixels that belong to its discriminative part.
    """
    min_ctx = 0.01 * p.image_size ** 2
    train = [m for m in metas if m["split"] == "train"]
    objects = [o for m in train for o in m["objects"]]
    with_ctx = absent_total = stray_hits = ctx_px = 0
    freq = np.zeros(p.num_classes, int)
    for m in train:
        present = set(m["labels"])
        seen = {c["class"] for c in m["contexts"] if c["pixels"] >= min_ctx}
        with_ctx += len(present & seen)
        stray_hits += len(seen - present)
        absent_total += p.num_classes - len(present)
        ctx_px += sum(c["pixels"] for c in m["contexts"] if not c["stray"])
        freq[np.asarray(m["labels"]) - 1] += 1
    obj_px = sum(o["pixels"] for o in objects)
    web = [m for m in metas if m["split"] == "web"]
    return {
        "counts": p.counts(),
        "mean_objects": round(float(np.mean([len(m["objects"]) for m in train])), 4),
        "head_fraction": round(float(np.mean([o["head_fraction"] for o in objects])), 4),
        "head_fraction_max": round(float(np.max([o["head_fraction"] for o in objects])), 4),
        "object_length_fraction": round(float(np.mean([o["length"] for o in objects])) / p.image_size, 4),
        "context_rate": round(with_ctx / max(len(objects), 1), 4),
        "stray_context_rate": round(stray_hits / max(absent_total, 1), 4),
        "context_to_object_pixels": round(ctx_px / max(obj_px, 1), 4),
        "web_noise_rate": round(float(np.mean([m["noisy_labels"] != m["labels"] for m in web])), 4) if web else None,
        "class_frequency": freq.tolist(),
    }


def _read_record(root: Path) -> dict | None:
    try:
        return json.loads((root / PARAMS_FILE).read_text())
    except (OSError, ValueError):
        return None


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def _swap_in(tmp: Path, root: Path) -> None:
    """Move the finished ``tmp`` to ``root``, replacing an old benchmark there."""
    os.chmod(tmp, 0o755)
    if root.exists():
        old = root.with_name(f".{root.name}.old-{os.getpid()}")
        os.rename(root, old)
        os.rename(tmp, root)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, root)


def generate(root, size="demo", seed=0, num_classes=None, image_size=None, num_train=None, num_val=None,
             noise_rate=0.3, overwrite=False, *, num_single=None, num_web=None, body_class=None, context_p=None,
             context_size=None) -> dict:
    """Generate the embedded benchmark into ``root`` (VOC layout); returns its summary stats.

    ``size`` (a key of SIZES: "smoke", "demo", "full", "art-smoke", ...) sets the kind of scenes
    and the image size and counts that are not given.
    The dataset is written into a temporary folder beside ``root`` and renamed at the end,
    so an interrupted run never leaves a half dataset. An existing ``root`` is replaced
    only with ``overwrite=True`` and only if it is a generated benchmark (has benchmark.json).
    """
    p = resolve_params(size, seed, num_classes, image_size, num_train, num_val, noise_rate, num_single, num_web,
                       body_class, context_p, context_size)
    root = Path(root)
    if root.exists() and not _is_empty_dir(root):
        if not overwrite:
            raise FileExistsError(f"{root} already exists: pass overwrite=True, call ensure_benchmark(), "
                                  f"or choose another folder")
        if _read_record(root) is None:
            raise FileExistsError(f"{root} is not a generated benchmark (no readable {PARAMS_FILE}); refusing to "
                                  f"replace it. Delete it yourself or choose another folder")
    t0 = time.perf_counter()
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        metas = _write_dataset(tmp, p)
        stats = summarize(metas, p)
        names = list(VOC_CLASSES) if p.kind == "art" else class_names(p.num_classes)
        record = {"generator": "wsss.data.synth", "params": asdict(p), "class_names": names,
                  "part_labels": PART_NAMES, "stats": stats}
        (tmp / PARAMS_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        _swap_in(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    stats = {**stats, "seconds": round(time.perf_counter() - t0, 2)}
    log.info("benchmark %s (seed %d) written to %s in %.1f s: %s", p.size, p.seed, root, stats["seconds"],
             {k: stats.get(k) for k in ("counts", "mean_objects", "head_fraction", "context_rate", "foreground")})
    return stats


def ensure_benchmark(root, size="demo", seed=0, **kw) -> Path:
    """Return ``root``, generating the benchmark first if it is missing or differs.

    Keyword arguments are those of :func:`generate` (num_classes, image_size, num_train,
    num_val, noise_rate, num_single, num_web, body_class, context_p, context_size). Nothing is
    regenerated when ROOT/benchmark.json records the same parameters and generator version.
    """
    p = resolve_params(size, seed, **kw)
    root = Path(root)
    record = _read_record(root)
    complete = (root / "ImageSets" / "Segmentation" / SPLIT_FILES["train"]).is_file()
    if record is not None and record.get("params") == asdict(p) and complete:
        log.info("benchmark %s (seed %d) already at %s", p.size, p.seed, root)
        return root
    generate(root, size, seed, overwrite=True, **kw)
    return root


# ----------------------------------------------------------------------------- measuring

THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def part_coverage_counts(maps: np.ndarray, mask: np.ndarray, part: np.ndarray,
                         thresholds=THRESHOLDS) -> np.ndarray:
    """Pixel counts that measure the failure modes of one image's localization maps.

    ``maps`` (K, H, W): class maps normalised to [0, 1] (METHOD.md sec. 2), at the mask's
    size; only the classes present in ``mask`` (1..K) are scored. Returns (T, 6) counts per
    threshold t: discriminative-part pixels of class c with map_c > t, all such pixels, the
    same two for body pixels, context pixels (part 3) under map_c > t, and all pixels with
    map_c > t (each summed over the present classes). Sum over images, then call
    :func:`part_coverage`.
    """
    thresholds = np.asarray(thresholds, np.float32)
    out = np.zeros((len(thresholds), 6), np.int64)
    for c in np.unique(mask):
        if c == 0 or c > maps.shape[0]:
            continue
        on = maps[c - 1][None] > thresholds[:, None, None]  # (T, H, W)
        obj = mask == c
        head, body, ctx = obj & (part == 2), obj & (part == 1), part == 3
        out[:, 0] += (on & head).sum((1, 2))
        out[:, 1] += head.sum()
        out[:, 2] += (on & body).sum((1, 2))
        out[:, 3] += body.sum()
        out[:, 4] += (on & ctx).sum((1, 2))
        out[:, 5] += on.sum((1, 2))
    return out


def part_coverage(counts: np.ndarray, thresholds=THRESHOLDS) -> dict[str, list[float]]:
    """Per threshold: recall of the discriminative part, recall of the body, and the
    shares of the above-threshold map that lie on the class's object (its precision) and
    on co-occurring context.

    The calibration target for a plain CAM classifier: at its best threshold, part recall
    above 0.8, body recall below 0.5, and a visible share on context.
    """
    c = np.asarray(counts, np.float64)
    ratio = lambda a, b: np.round(a / np.maximum(c[:, b], 1), 4).tolist()  # noqa: E731
    return {"threshold": [float(t) for t in thresholds], "part_recall": ratio(c[:, 0], 1),
            "body_recall": ratio(c[:, 2], 3), "object_share": ratio(c[:, 0] + c[:, 2], 5),
            "context_share": ratio(c[:, 4], 5)}


# ----------------------------------------------------------------------------- figure

def draw_examples(root, path, n: int = 8, split: str = "train") -> Path:
    """Draw a grid of ``n`` images of ``split``: image, mask and (shapes only) part map, with legends.

    Saved as a PNG at ``path`` (figures/benchmark_failure_modes.png in the repository).
    Uses matplotlib's Agg canvas directly, so it changes no global backend.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    root, path = Path(root), Path(path)
    record = _read_record(root)
    if record is None:
        raise FileNotFoundError(f"{root / PARAMS_FILE} not found: generate the benchmark first (ensure_benchmark)")
    names_cls = record["class_names"]
    with open(root / OBJECTS_FILE) as f:
        metas = {m["name"]: m for m in map(json.loads, f) if m["split"] == split}
    names = list(metas)[:n]
    if not names:
        raise ValueError(f"no images in split {split!r} of {root}")
    voc_pal, part_pal = voc_palette(), part_palette()
    shapes = record["params"].get("kind", "shapes") == "shapes"
    rows = 3 if shapes else 2
    fig = Figure(figsize=(1.7 * len(names) + 1.9, 2.0 * rows - 0.1), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, len(names), squeeze=False)
    used = set()
    for j, name in enumerate(names):
        img = np.asarray(Image.open(root / "JPEGImages" / f"{name}.jpg").convert("RGB"))
        mask = np.asarray(Image.open(root / "SegmentationClass" / f"{name}.png"))
        used.update(int(c) for c in np.unique(mask) if c not in (0, 255))
        m = metas[name]
        axes[0, j].imshow(img, interpolation="nearest")
        axes[0, j].set_title(", ".join(names_cls[c - 1] for c in m["labels"]), fontsize=8)
        axes[1, j].imshow(voc_pal[mask], interpolation="nearest")
        if shapes:
            part = np.asarray(Image.open(root / PART_DIR / f"{name}.png"))
            ctx = sorted({names_cls[c["class"] - 1] + ("*" if c["stray"] else "") for c in m["contexts"]})
            axes[2, j].imshow(part_pal[part], interpolation="nearest")
            axes[2, j].set_xlabel("context: " + (", ".join(ctx) if ctx else "-"), fontsize=7)
        else:
            axes[1, j].set_xlabel(f"background: {m['context']}", fontsize=7)
        for ax in axes[:, j]:
            ax.set(xticks=[], yticks=[])
    for ax, label in zip(axes[:, 0], ("image", "mask", "part map")[:rows]):
        ax.set_ylabel(label, fontsize=9)
    cls_handles = [Patch(color=voc_pal[c] / 255, label=f"{c} {names_cls[c - 1]}") for c in sorted(used)]
    if not shapes:  # art masks have VOC's ignore band
        cls_handles.append(Patch(color=voc_pal[255] / 255, label="255 ignored"))
    fig.legend(handles=cls_handles, loc="upper left", bbox_to_anchor=(0.905, 0.64 if shapes else 0.9), fontsize=7,
               title="mask", title_fontsize=8, frameon=False)
    if shapes:
        part_handles = [Patch(color=part_pal[k] / 255, label=PART_NAMES[k], ec="k", lw=0.3) for k in (0, 1, 2, 3)]
        fig.legend(handles=part_handles, loc="upper left", bbox_to_anchor=(0.905, 0.32), fontsize=7,
                   title="part map", title_fontsize=8, frameon=False)
        body = record["params"].get("body_class", 0.0)
        what = "the class shows only in the small head" if not body else \
            f"the small head shows the class, the body its pair ({body:.0%} of bodies)"
        title = f"{what}; context bands (* = stray) co-occur with classes"
    else:
        title = "VOC's classes from OpenMoji and Noto Color Emoji art on backgrounds by context"
    fig.suptitle(f"Embedded benchmark ({record['params']['size']}, seed {record['params']['seed']}): {title}",
                 fontsize=9)
    fig.subplots_adjust(left=0.03, right=0.9, top=0.9, bottom=0.04, wspace=0.05, hspace=0.12)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def main(argv=None) -> None:
    """``python -m wsss.data.synth ROOT [--size demo] [--seed 0] [--figure PNG]``."""
    import argparse

    ap = argparse.ArgumentParser(description="Generate the embedded benchmark (VOC layout) and draw examples.")
    ap.add_argument("root", type=Path)
    ap.add_argument("--size", default="demo", choices=sorted(SIZES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--figure", type=Path, default=None, help="also draw example images into this PNG")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root = ensure_benchmark(args.root, args.size, args.seed)
    if args.figure is not None:
        draw_examples(root, args.figure)


if __name__ == "__main__":
    main()
