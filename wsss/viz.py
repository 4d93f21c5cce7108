"""Every figure of the package, and the one saver (``save_figure``: PNG plus a caption file).

The qualitative grid of the paper's figures (rows are images; columns are the image, its
ground truth, the single-image CAM, the run's saved maps (METHOD.md sec. 2), the
pseudo-mask (sec. 3) and the segmenter's prediction (sec. 4); missing stages leave their
column out), maps side by side, and the plots of numbers: ablation bars, threshold sweeps,
loss curves, pair statistics, pseudo-mask steps. The benchmark's own illustration stays in
``wsss.data.synth.draw_examples`` (the data layer draws it without importing upwards), and
the attention explorer's interactive figure in ``wsss.explorer``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np
import torch
import yaml
from matplotlib.figure import Figure

from wsss import rundir as R
from wsss.classes import voc_palette
from wsss.data.transforms import denormalize, eval_transforms
from wsss.data.voc import VOCDataset, label_ids, load_mask
from wsss.maps import load_maps, localization_maps, maps_path


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
        m = yaml.safe_load(maps_cfg.read_text()) or {}
        combine = m.get("combine")
        maps_title += f" ({'+'.join(combine) if isinstance(combine, list) else combine}, k={m.get('k')})"
    rows = []
    for name in names:
        source = base.source_image(index[name])
        x = transform(source).as_subclass(torch.Tensor)
        classes = label_ids(base.labels[index[name]])
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
        labels = label_ids(base.labels[index[name]])
        axes[r, 0].set_ylabel(", ".join(class_names[i - 1] for i in labels) if class_names else name, fontsize=8)
    return fig


# ----------------------------------------------------------------------------- plots of numbers

def plot_statistics(stats: dict, class_names=None):
    """A matplotlib Figure: co-occurrence heat map, shared-label histogram, label frequency."""
    import seaborn as sns

    names = list(class_names if class_names is not None else stats["class_names"])
    k = len(names)
    fig = Figure(figsize=(6 + 0.35 * k + 8, 4 + 0.25 * k), layout="constrained")
    ax_co, ax_hist, ax_freq = fig.subplots(1, 3, width_ratios=[2, 1, 1.5])
    sns.heatmap(np.asarray(stats["cooccurrence"]), mask=np.eye(k, dtype=bool), ax=ax_co, xticklabels=names,
                yticklabels=names, cmap="viridis", square=True, cbar_kws={"label": "images with both classes"})
    ax_co.set_title("class co-occurrence (diagonal: see label frequency)")
    hist = stats["shared_hist"]
    ax_hist.bar(list(hist), list(hist.values()), color="tab:blue")
    ax_hist.set(xlabel="labels shared by a pair", ylabel="pairs",
                title=f"{stats['num_pairs']} pairs, p_common={stats['p_common']:g}")
    ax_freq.barh(names, stats["label_frequency"], color="tab:green")
    ax_freq.invert_yaxis()
    ax_freq.set(xlabel="images", title="label frequency")
    return fig


def _curves(sweep) -> dict[str, tuple[list[float], list[float]]]:
    """label -> (thresholds, mIoUs) from a result, a list of sweep points, or a mapping of them."""
    def points(s):
        s = s["sweep"] if isinstance(s, Mapping) and "sweep" in s else s
        pts = [(float(p["threshold"]), p["miou"]) for p in s]
        return [t for t, _ in pts], [float("nan") if m is None else float(m) for _, m in pts]

    if isinstance(sweep, Mapping) and "sweep" not in sweep:
        return {str(label): points(s) for label, s in sweep.items()}
    return {"": points(sweep)}


def sweep_figure(sweep, title: str = "localization maps: mIoU vs background threshold"):
    """A matplotlib Figure of mIoU against the background threshold, best point marked.

    ``sweep``: a result of :func:`evaluate_maps` (or its "sweep" list), or a mapping
    label -> such results to compare several curves (e.g. single-image vs cross-image).
    """
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for label, (ts, mious) in _curves(sweep).items():
        values = np.asarray(mious, dtype=float)
        line, = ax.plot(ts, values, marker="o", markersize=3, label=label or None)
        if np.isfinite(values).any():
            best = int(np.nanargmax(values))
            ax.plot(ts[best], values[best], marker="*", markersize=12, color=line.get_color())
            right = ts[best] > (min(ts) + max(ts)) / 2  # keep the label inside the axes
            ax.annotate(f"{values[best]:.3f} @ {ts[best]:.2f}", (ts[best], values[best]), textcoords="offset points",
                        xytext=(-6 if right else 6, 6), ha="right" if right else "left", fontsize=8,
                        color=line.get_color())
    ax.set(xlabel="background threshold", ylabel="mIoU", title=title)
    ax.grid(alpha=0.3)
    if any(ax.get_legend_handles_labels()[1]):
        ax.legend()
    return fig


def ablation_figure(df, metric: str = "pseudo_miou", title: str | None = None, x: str = "losses",
                    hue: str = "inference", xlabel: str = "loss terms", size=(7, 4)):
    """Bars of a metric (percent) per ``x`` (default: loss setting), one colour per ``hue``
    (default: inference mode), error bars = standard deviation over seeds, dots = the single runs."""
    import seaborn as sns

    data = df.assign(value=100 * df[metric])
    fig = Figure(figsize=size, layout="constrained")
    ax = fig.subplots()
    sns.barplot(data=data, x=x, y="value", hue=hue, errorbar="sd", ax=ax, alpha=0.8, capsize=0.1)
    state = np.random.get_state()  # seaborn jitters the dots with numpy's global RNG: the same
    np.random.seed(0)  # figure from the same rows, without touching the caller's stream
    try:
        sns.stripplot(data=data, x=x, y="value", hue=hue, dodge=True, ax=ax, size=3, legend=False,
                      palette=dict.fromkeys(data[hue].unique(), "k"))
    finally:
        np.random.set_state(state)
    ax.set(xlabel=xlabel, ylabel=f"{metric.replace('_', ' ')} (%)",
           title=title or f"{metric.replace('_', ' ')}: mean ± std over seeds")
    return fig


def loss_curves_figure(df, title: str = "training"):
    """Loss terms against epochs (terms that stay 0, i.e. switched off, are left out) and,
    when logged, the validation metrics (val/*) on a second panel."""
    losses = [c for c in df.columns if c.startswith("loss/") and df[c].abs().sum() > 0]
    vals = [c for c in df.columns if c.startswith("val/")]
    fig = Figure(figsize=(10 if vals else 6, 3.8), layout="constrained")
    axes = fig.subplots(1, 2 if vals else 1, squeeze=False)[0]
    for column in losses:
        axes[0].plot(df["epoch"], df[column], marker="o", label=column[len("loss/"):])
    axes[0].set(xlabel="epoch", ylabel="mean loss", title=f"{title}: loss terms")
    axes[0].legend(fontsize=8)
    for column in vals:
        axes[1].plot(df["epoch"], df[column], marker="o", label=column)
    if vals:
        axes[1].set(xlabel="epoch", title=f"{title}: validation")
        axes[1].legend(fontsize=8)
    return fig


def pairs_figure(dataset, pairs: Sequence[Mapping], class_names: Sequence[str]):
    """One row per pair: I_m and I_n with their labels, l_m ∩ l_n (the co-attention target)
    and l_m \\ l_n (the contrastive target) in the titles."""
    names = lambda ids: ", ".join(class_names[c - 1] for c in ids) or "∅"  # noqa: E731
    fig = Figure(figsize=(6.4, 3.1 * len(pairs)), layout="constrained")
    axes = fig.subplots(len(pairs), 2, squeeze=False)
    for row, p in zip(axes, pairs):
        for ax, key, label in ((row[0], "m", "I_m"), (row[1], "n", "I_n")):
            ax.imshow(denormalize(dataset[p[key]]["image"]))
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title(f"{label}: {names(p['l_' + key])}", fontsize=9)
        row[0].set_xlabel(f"l_m ∩ l_n: {names(p['common'])}", fontsize=9)
        row[1].set_xlabel(f"l_m \\ l_n: {names(p['m_only'])}   l_n \\ l_m: {names(p['n_only'])}", fontsize=9)
    return fig


def pseudo_steps_figure(steps: Sequence[Mapping], class_names: Sequence[str] | None = None):
    """Rows of image / ground truth / largest class map / background score / mask without
    CRF / mask with CRF (per-image mIoU in the titles)."""
    titles = ["image", "ground truth", "max class map", "background score", "mask, no CRF", "mask + CRF"]
    fig = Figure(figsize=(2.1 * len(titles), 2.2 * len(steps) + 0.3), layout="constrained")
    axes = fig.subplots(len(steps), len(titles), squeeze=False)
    for row, s in zip(axes, steps):
        panels = [s["image"], colorize(s["gt"]), overlay(s["image"], s["peak"]), s["background"],
                  colorize(s["mask"]), colorize(s["mask_crf"])]
        for ax, panel in zip(row, panels):
            ax.imshow(panel, cmap="gray" if panel.ndim == 2 else None, vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
        label = ", ".join(class_names[c - 1] for c in s["classes"]) if class_names else s["name"]
        row[0].set_ylabel(label, fontsize=8)
        row[4].set_xlabel(f"mIoU {s['miou']:.2f}", fontsize=8)
        row[5].set_xlabel(f"mIoU {s['miou_crf']:.2f}", fontsize=8)
    for ax, title in zip(axes[0], titles):
        ax.set_title(title, fontsize=9)
    return fig


def save_figure(fig: Figure, path, caption: str | None = None, source: str | None = None,
                parameters: Mapping | None = None) -> Path:
    """Save ``fig`` as PATH (PNG); with a caption, also PATH.txt naming what drew it (every
    figure in figures/ names the notebook or command behind it, and the parameters it ran with)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    if caption is not None:
        params = ", ".join(f"{k}={v!r}" for k, v in (parameters or {}).items())
        source = f"{source} with {params}" if params else source
        path.with_suffix(path.suffix + ".txt").write_text(f"{path.name}: {caption}\nDrawn by {source}.\n")
    return path
