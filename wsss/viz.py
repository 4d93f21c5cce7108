"""Figures drawn from a run directory: the qualitative grid of the paper's figures.

Rows are images; columns are the image, its ground truth, the single-image CAM, the
cross-image co-attention map (k partners, METHOD.md sec. 2), the pseudo-mask (sec. 3) and
the segmenter's prediction (sec. 4). Missing stages leave their column out.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure

from wsss import rundir as R
from wsss.classes import voc_palette
from wsss.data.transforms import denormalize, eval_transforms
from wsss.data.voc import VOCDataset, load_mask


def colorize(mask: np.ndarray) -> np.ndarray:
    """A label mask (H, W) as VOC palette colours (H, W, 3) uint8."""
    return voc_palette()[np.asarray(mask, dtype=np.uint8)]


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """A [0, 1] heat map (H, W) blended over an RGB image (H, W, 3) uint8."""
    colours = matplotlib.colormaps[cmap](np.clip(heat, 0, 1))[..., :3]
    return ((1 - alpha) * image / 255.0 + alpha * colours).clip(0, 1)


def qualitative_rows(run_dir, data_root, names=None, n: int = 6, split: str = "train",
                     device: str = "cpu") -> list[dict]:
    """The arrays behind ``qualitative_grid`` (one dict per image), for notebooks that plot their own way.

    Read from the run's files where it has them: its localization maps (RUN/maps, made with
    the run's own settings: combine, k, partners, seed; training images only) and its
    pseudo-masks; the single-image CAM and the segmentation are computed from the run's
    classifier and segmenter (they take no settings). ``row["maps_title"]`` says how the
    maps were made (from RUN/config_maps.yaml)."""
    from wsss.models.segmenter import predict
    from wsss.stages.make_maps import load_maps, localization_maps, maps_path
    from wsss.stages.train_classifier import load_classifier
    from wsss.stages.train_segmenter import load_segmenter

    run_dir = Path(run_dir)
    base = VOCDataset(data_root, split, with_mask=False)
    index = {name: i for i, name in enumerate(base.names)}
    names = list(names) if names is not None else base.names[:n]
    missing = [x for x in names if x not in index]
    if missing:
        raise KeyError(f"{missing} are not in split {split!r} of {data_root}")
    transform = eval_transforms()
    classifier = load_classifier(run_dir, device) if (run_dir / R.CLASSIFIER).is_file() else None
    segmenter = load_segmenter(run_dir, device) if (run_dir / R.SEGMENTER).is_file() else None
    maps_cfg = run_dir / R.folder_config(R.MAPS)
    maps_title = "the run's maps"
    if maps_cfg.is_file():
        import yaml

        m = yaml.safe_load(maps_cfg.read_text()) or {}
        combine = m.get("combine")
        maps_title += f" ({'+'.join(combine) if isinstance(combine, list) else combine}, k={m.get('k')})"
    rows = []
    for name in names:
        source = base.source_image(index[name])
        x = transform(source).as_subclass(torch.Tensor)
        classes = [int(c) + 1 for c in np.flatnonzero(base.labels[index[name]])]
        row = {"name": name, "classes": classes, "image": denormalize(x), "maps_title": maps_title,
               "gt": load_mask(base.mask_path(name), base.num_classes)}
        if classifier is not None and classes:
            maps = localization_maps(classifier, x[None].to(device), classes, combine="cam")
            row["cam"] = maps.max(0).values.cpu().numpy()
        saved = maps_path(run_dir / R.MAPS, name)
        if saved.is_file():
            maps, _ = load_maps(saved)
            row["maps"] = maps.max(0) if len(maps) else np.zeros(maps.shape[1:], np.float32)
        pseudo = run_dir / R.PSEUDO / f"{name}.png"
        if pseudo.is_file():
            row["pseudo"] = load_mask(pseudo, base.num_classes)
        if segmenter is not None:
            probs = predict(segmenter, x[None].to(device))
            row["pred"] = probs[0].argmax(0).cpu().numpy().astype(np.uint8)
        rows.append(row)
    return rows


COLUMNS = {"image": "image", "gt": "ground truth", "cam": "CAM (single image)",
           "maps": "the run's maps", "pseudo": "pseudo-mask", "pred": "segmentation"}


def qualitative_grid(rows: list[dict], class_names=None) -> Figure:
    """Image / GT / CAM / the run's maps / pseudo-mask / prediction, one row per image."""
    cols = [c for c in COLUMNS if any(c in r for r in rows)]
    fig = Figure(figsize=(2.1 * len(cols), 2.1 * len(rows) + 0.4), layout="constrained")
    axes = fig.subplots(len(rows), len(cols), squeeze=False)
    for r, row in enumerate(rows):
        for c, col in enumerate(cols):
            ax = axes[r, c]
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(row.get("maps_title", COLUMNS[col]) if col == "maps" else COLUMNS[col], fontsize=9)
            if col not in row:
                ax.axis("off")
                continue
            if col == "image":
                ax.imshow(row["image"])
                label = ", ".join(class_names[i - 1] for i in row["classes"]) if class_names else row["name"]
                ax.set_ylabel(label, fontsize=8)
            elif col in ("cam", "maps"):
                ax.imshow(overlay(row["image"], row[col]))
            else:
                ax.imshow(colorize(row[col]))
    return fig


def maps_grid(data_root, columns: dict, names, split: str = "train", class_names=None) -> Figure:
    """Saved localization maps side by side, read from their folders (no model is run):
    one row per image name, columns image, ground truth, then one per ``columns`` entry
    (title -> maps folder of ``wsss.stages.make_maps``), each the maximum over the image's
    class maps over the image."""
    from wsss.stages.make_maps import load_maps, maps_path

    base = VOCDataset(data_root, split, with_mask=False)
    index = {name: i for i, name in enumerate(base.names)}
    fig = Figure(figsize=(2.0 * (2 + len(columns)), 2.0 * len(names) + 0.4), layout="constrained")
    axes = fig.subplots(len(names), 2 + len(columns), squeeze=False)
    for r, name in enumerate(names):
        image = base.source_image(index[name]).permute(1, 2, 0).numpy()
        panels = [("image", image), ("ground truth", colorize(load_mask(base.mask_path(name), base.num_classes)))]
        for title, folder in columns.items():
            maps, _ = load_maps(maps_path(folder, name))
            heat = maps.max(0) if len(maps) else np.zeros(image.shape[:2])
            panels.append((title, overlay(image, heat)))
        for c, (title, panel) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(panel)
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=8)
        labels = [int(i) + 1 for i in np.flatnonzero(base.labels[index[name]])]
        axes[r, 0].set_ylabel(", ".join(class_names[i - 1] for i in labels) if class_names else name, fontsize=8)
    return fig


def save_figure(fig: Figure, path, caption: str | None = None, source: str | None = None) -> Path:
    """Save ``fig`` as PATH (PNG); with a caption, also PATH.txt naming what drew it
    (every figure in figures/ names the notebook or command behind it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    if caption is not None:
        path.with_suffix(path.suffix + ".txt").write_text(f"{path.name}: {caption}\nDrawn by {source}.\n")
    return path
