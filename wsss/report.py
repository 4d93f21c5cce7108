"""What the numbered notebooks call: configs, re-runnable pipeline calls, tables and figures.

A notebook holds its parameters cell, narrative, short calls into
``wsss`` and plots; anything longer than a few lines lives here, where tests reach it
(tests/test_report.py). Results leave a notebook as files in its run directory.

- Pipeline configs: :func:`load_pipeline` reads configs/SIZE.yaml (or any pipeline YAML)
  and applies a notebook's overrides; :func:`ablation_pipeline_config` maps the ablation
  notebook's LOSSES / INFERENCE strings to stage settings (METHOD.md sec. 1-2).
- Re-runnable runs: :func:`run_pipeline` runs the stages a notebook needs but leaves a
  trained classifier / segmenter of the run directory alone when it was trained with the
  same settings (and refuses, naming the differences, when it was not), so the notebooks
  of a sequence build on one run directory; :func:`run_ablation` also trains each
  classifier once for the inference modes that share it.
- Reading runs: the training log (:func:`loss_log`), the ablation grid
  (:func:`collect_ablation`, :func:`ablation_table`), per-image IoU of masks
  (:func:`per_image_iou`), the pseudo-mask rules one step at a time (:func:`pseudo_mask_steps`).
- Figures: loss curves, example pairs, pseudo-mask steps, ablation bars; every saved
  figure gets a caption file naming the notebook and parameters that drew it
  (``wsss.viz.save_figure``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import yaml

from wsss import config as C
from wsss import rundir as R
from wsss.config import MACHINERY_KEYS, config_differences  # noqa: F401  (part of report's API)
from wsss.files import write_json  # noqa: F401  (notebooks call report.write_json)
from wsss.losses import SWITCHES
from wsss.paths import REPO_ROOT, runs_dir

log = logging.getLogger(__name__)

CONFIG_DIR = REPO_ROOT / "configs"
#: files of a classifier run copied when one classifier serves several ablation runs
CLASSIFIER_RUN_FILES = (R.CLASSIFIER, R.CLASSIFIER_METRICS, R.CLASSIFIER_CONFIG, R.LOG)

#: the ablation's loss settings (METHOD.md sec. 1): LossConfig switches per LOSSES string
LOSSES = {
    "basic": dict(basic=True, coatt=False, contrastive=False, self_pairs=False),
    "basic+coatt": dict(basic=True, coatt=True, contrastive=False, self_pairs=False),
    "basic+coatt+con": dict(basic=True, coatt=True, contrastive=True, self_pairs=False),
    "all": dict(basic=True, coatt=True, contrastive=True, self_pairs=True),
}
#: the ablation's inference modes (METHOD.md sec. 2): the kinds of map averaged by the maps stage
INFERENCE = {"single": ("cam",), "cross": ("cam", "coatt", "self")}
#: metrics.json entries gathered by collect_ablation: column -> (part, key)
ABLATION_METRICS = {"maps_miou": ("maps", "miou"), "maps_threshold": ("maps", "best_threshold"),
                    "pseudo_miou": ("pseudo", "miou"), "pseudo_miou_confident": ("pseudo", "miou_confident"),
                    "pseudo_coverage": ("pseudo", "coverage")}


# =========================================================================== configs

def notebook_logging(level: int = logging.INFO) -> None:
    """Log to stdout, one plain line per message: in a notebook a stage's INFO lines then
    read as output, not as the red blocks of stderr."""
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stdout, force=True)


def pipeline_config_path(data_size: str = "demo", config: str | Path | None = None) -> Path:
    """The pipeline YAML of a notebook: ``config`` when given (a relative path is relative to
    the repository root), else configs/DATA_SIZE.yaml."""
    path = resolve_path(config or None, CONFIG_DIR / f"{data_size}.yaml", REPO_ROOT)
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise FileNotFoundError(f"pipeline config {path} does not exist: set DATA_SIZE to one of [{known}] "
                                f"or CONFIG to a pipeline YAML file (see wsss/stages/pipeline.py)")
    return path


def merge_sections(base: Mapping, overrides: Mapping) -> dict:
    """``base`` with ``overrides`` merged in, nested mappings merged key by key; an override
    of None leaves the value alone (a notebook parameter left at None means "the config's")."""
    return C.merge(base, overrides, skip_none=True)


def load_pipeline(data_size: str = "demo", config: str | Path | None = None, run_dir: str | Path | None = None, *,
                  seed: int | None = None, epochs: int | None = None, stages: Sequence[str] | None = None,
                  overrides: Mapping[str, Mapping] | None = None):
    """A PipelineConfig from configs/DATA_SIZE.yaml (or ``config``) with a notebook's overrides.

    ``run_dir`` None keeps the config's run directory (runs/demo for configs/demo.yaml: the
    run ``make demo`` writes, so a notebook opened afterwards looks at it); a relative path
    goes under the runs folder. ``epochs`` sets the classifier's epochs, ``stages`` the
    stages to run, ``overrides`` stage sections, e.g. {"classifier": {"loss": {"coatt":
    False}}, "segmenter": {"epochs": 3}} (merged, see :func:`merge_sections`). The result's
    run_dir is absolute.
    """
    from wsss.stages import pipeline

    cfg = C.load_yaml(pipeline.PipelineConfig, pipeline_config_path(data_size, config))
    cfg.run_dir = str(pipeline.resolve_run_dir(run_dir if run_dir is not None else cfg.run_dir))
    if seed is not None:
        cfg.seed = int(seed)
    overrides = merge_sections(overrides or {}, {"classifier": {"epochs": epochs}})
    unknown = sorted(set(overrides) - set(pipeline.STAGES))
    if unknown:
        raise ValueError(f"overrides for unknown stage section(s) {unknown}; sections: {list(pipeline.STAGES)}")
    for section, values in overrides.items():
        setattr(cfg, section, merge_sections(getattr(cfg, section) or {}, values))
    if stages is not None:
        cfg.stages = tuple(stages)
    return cfg


def loss_switches(basic: bool | None = None, coatt: bool | None = None, contrastive: bool | None = None,
                  self_pairs: bool | None = None) -> dict:
    """The ``loss`` overrides of a classifier config from the notebooks' USE_* switches; a
    switch left at None keeps the configured value (it is left out)."""
    given = dict(basic=basic, coatt=coatt, contrastive=contrastive, self_pairs=self_pairs)
    return {name: bool(on) for name, on in given.items() if on is not None}


def effective_switches(cfg) -> dict:
    """The loss switches the classifier of pipeline ``cfg`` trains with (its section over the
    ClassifierConfig defaults)."""
    from wsss.stages import pipeline

    one = dataclasses.replace(cfg, stages=("classifier",))
    loss = C.to_dict(pipeline.stage_configs(one, Path("."), Path("."))["classifier"].loss)
    return {name: loss[name] for name in SWITCHES}


def switches_run_dir(data_size: str, switches: Mapping[str, bool]) -> str:
    """Default run directory of a classifier trained with these loss switches: the pipeline's
    own (e.g. "demo") when they change nothing, else named after what they change, e.g.
    "demo-no-coatt-self_pairs" (co-attention off, self-pairs on)."""
    from wsss.stages.pipeline import PipelineConfig

    default = effective_switches(load_pipeline(data_size, run_dir="."))
    wanted = effective_switches(load_pipeline(data_size, run_dir=".", overrides={"classifier": {"loss": switches}}))
    name = C.load_yaml(PipelineConfig, pipeline_config_path(data_size)).run_dir
    return name + "".join(f"-{'' if wanted[k] else 'no-'}{k}" for k in SWITCHES if wanted[k] != default[k])


# =========================================================================== running

def trained_config(path: str | Path) -> dict:
    """The settings a checkpoint (classifier.pt / segmenter.pt) was trained with."""
    import torch

    return dict(torch.load(path, map_location="cpu", weights_only=True)["cfg"])


def finished_training(stage_cfgs: Mapping, run_dir: str | Path) -> list[str]:
    """The training stages of ``stage_cfgs`` whose model is already in ``run_dir`` with the
    same settings; raises ValueError naming the differences when it was trained otherwise."""
    done = []
    for stage, file in R.TRAINED.items():
        path = Path(run_dir) / file
        if stage not in stage_cfgs or not path.is_file():
            continue
        diff = config_differences(trained_config(path), C.to_dict(stage_cfgs[stage]))
        if diff:
            raise ValueError(f"{path} was trained with other settings ({'; '.join(diff)}): set RUN_DIR to another "
                             f"run directory, or delete {path.name} and what was made from it to retrain")
        done.append(stage)
    return done


def run_pipeline(cfg) -> dict:
    """``wsss.stages.pipeline.run(cfg)`` for a notebook. It first refuses (ValueError naming
    the differences) when the run directory holds a classifier or segmenter trained with
    other settings, so a notebook re-run with new parameters never mixes results. A training
    stage already finished with the same settings keeps its weights (the stage skips itself).
    Returns the pipeline's result plus ``run_dir``, ``data_root`` and ``skipped`` (the
    training stages that were already finished)."""
    from wsss.stages import pipeline

    data_root = pipeline.prepare_data(cfg)
    run_dir = pipeline.resolve_run_dir(cfg.run_dir)
    skipped = finished_training(pipeline.stage_configs(cfg, data_root, run_dir), run_dir)
    result = pipeline.run(cfg)
    return {**result, "run_dir": str(run_dir), "data_root": str(data_root), "skipped": skipped}


# =========================================================================== ablation

def ablation_run_id(losses: str, inference: str, seed: int) -> str:
    return f"{losses}__{inference}__seed{seed}"


def ablation_pipeline_config(losses: str = "all", inference: str = "cross", size: str = "demo", seed: int = 0,
                             run_dir: str | Path | None = None, *, epochs: int | None = None,
                             limit: int | None = None, config: str | Path | None = None):
    """The pipeline of one ablation run (notebooks/04_ablation.ipynb): classifier -> maps ->
    pseudo-masks -> evaluation of maps and pseudo-masks, no segmenter.

    ``losses``: a key of :data:`LOSSES` (which loss terms train the classifier);
    ``inference``: a key of :data:`INFERENCE` ("single": plain CAM, "cross": CAM +
    co-attention with k partners + self-pairs). Everything else comes from
    configs/SIZE.yaml (or ``config``). ``limit``: maps, pseudo-masks and their evaluation
    on the first ``limit`` training images only. ``run_dir`` None: runs/ablation/ID.
    """
    if losses not in LOSSES:
        raise ValueError(f"LOSSES={losses!r}: choose one of {list(LOSSES)}")
    if inference not in INFERENCE:
        raise ValueError(f"INFERENCE={inference!r}: choose one of {list(INFERENCE)}")
    if run_dir is None:
        run_dir = runs_dir() / "ablation" / ablation_run_id(losses, inference, seed)
    limit = None if limit is None else int(limit)
    return load_pipeline(size, config, run_dir, seed=seed, epochs=epochs,
                         stages=("classifier", "maps", "pseudo", "evaluate"),
                         overrides={"classifier": {"loss": LOSSES[losses]},
                                    "maps": {"combine": list(INFERENCE[inference]), "limit": limit},
                                    "pseudo": {"limit": limit},
                                    "evaluate": {"parts": ["maps", "pseudo"], "allow_missing": limit is not None}})


def classifier_key(cfg) -> str:
    """A name for the classifier an ablation run trains: equal exactly when the training
    settings (everything but machinery, data and run folders) are."""
    from wsss.stages import pipeline

    stage = pipeline.stage_configs(dataclasses.replace(cfg, stages=("classifier",)), Path("."), Path("."))
    settings = {k: v for k, v in C.to_dict(stage["classifier"]).items() if k not in MACHINERY_KEYS}
    settings["data"] = cfg.data_root or f"benchmark:{cfg.benchmark}"
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"classifier-{digest}"


def run_ablation(cfg, share_dir: str | Path | None = None) -> dict:
    """Run an ablation pipeline (:func:`ablation_pipeline_config`). With ``share_dir`` the
    classifier is trained once per set of training settings in SHARE_DIR/KEY
    (:func:`classifier_key`) and copied into the run directory, so runs that differ only in
    inference reuse it (the same weights they would train themselves: training is seeded).
    SHARE_DIR/KEY is an ordinary run directory (finished training is kept, interrupted training
    resumes); two runs that share one must not run at once: notebooks/experiments/ablation_demo.yaml
    trains each classifier in its first stage (INFERENCE single) and reuses it in the second."""
    run_dir = Path(cfg.run_dir)
    if share_dir is not None and "classifier" in cfg.stages and not (run_dir / R.TRAINED["classifier"]).is_file():
        shared = Path(share_dir) / classifier_key(cfg)
        run_pipeline(dataclasses.replace(cfg, run_dir=str(shared), stages=("classifier",)))
        run_dir.mkdir(parents=True, exist_ok=True)
        for name in CLASSIFIER_RUN_FILES:
            if (shared / name).is_file():
                shutil.copy2(shared / name, run_dir / name)  # the maps record its content hash
        log.info("classifier of %s taken from %s", run_dir, shared)
    return run_pipeline(cfg)


def write_ablation_record(run_dir: str | Path, **params) -> Path:
    """RUN/ablation.json: the parameters of an ablation run (written last: it marks the run finished)."""
    return write_json(Path(run_dir) / R.ABLATION, params)


def _ordered(df, column: str, order: Sequence[str]):
    import pandas as pd

    values = list(order) + sorted(set(df[column].dropna()) - set(order))
    df[column] = pd.Categorical(df[column], categories=values, ordered=True)


def collect_ablation(root: str | Path):
    """One row per finished ablation run under ``root`` (ROOT/*/ablation.json with a
    metrics.json beside it): its parameters (losses, inference, seed, ...), ``run`` (the
    folder) and the metrics of :data:`ABLATION_METRICS`. Sorted by losses, inference, seed."""
    import pandas as pd

    root = Path(root)
    rows = []
    for record in sorted(root.glob(f"*/{R.ABLATION}")):
        metrics_path = record.parent / R.SUMMARY
        if not metrics_path.is_file():
            log.warning("%s has no metrics.json (run unfinished?); left out", record.parent)
            continue
        metrics = json.loads(metrics_path.read_text())
        row = {**json.loads(record.read_text()), "run": record.parent.name}
        for column, (part, key) in ABLATION_METRICS.items():
            row[column] = (metrics.get(part) or {}).get(key)
        rows.append(row)
    if not rows:
        raise FileNotFoundError(f"no finished ablation runs (*/{R.ABLATION} + metrics.json) under {root}: run the "
                                f"grid first (python -m wsss.notebooks run notebooks/experiments/ablation_demo.yaml)")
    df = pd.DataFrame(rows)
    for column in ABLATION_METRICS:
        df[column] = pd.to_numeric(df[column], errors="coerce")
    _ordered(df, "losses", list(LOSSES))
    _ordered(df, "inference", list(INFERENCE))
    return df.sort_values(["losses", "inference", "seed"]).reset_index(drop=True)


def ablation_table(df, metrics: Sequence[str] = ("maps_miou", "pseudo_miou")):
    """Mean, standard deviation (over seeds, ddof=1: NaN for a single seed) and number of
    runs of each metric per (losses, inference); columns METRIC_mean, METRIC_std, runs."""
    grouped = df.groupby(["losses", "inference"], observed=True)
    table = grouped[list(metrics)].agg(["mean", "std"])
    table.columns = [f"{metric}_{stat}" for metric, stat in table.columns]
    table["runs"] = grouped.size()
    return table.reset_index()


def table_markdown(table, metrics: Sequence[str] = ("maps_miou", "pseudo_miou"), scale: float = 100.0) -> str:
    """The ablation table as markdown, each cell "mean ± std" (x ``scale``: percent)."""
    def cell(mean, std):
        if mean is None or not math.isfinite(mean):
            return "n/a"
        return f"{scale * mean:.1f}" + (f" ± {scale * std:.1f}" if std is not None and math.isfinite(std) else "")

    header = ["losses", "inference", *(m.replace("_", " ") for m in metrics), "runs"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, r in table.iterrows():
        cells = [str(r["losses"]), str(r["inference"]),
                 *(cell(float(r[f"{m}_mean"]), float(r[f"{m}_std"])) for m in metrics), str(int(r["runs"]))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def mean_sweep(sweeps: Sequence[Sequence[Mapping]]) -> list[dict]:
    """The pointwise mean of several threshold sweeps (lists of {"threshold", "miou"}) over
    the thresholds they share."""
    if not sweeps:
        raise ValueError("mean_sweep needs at least one sweep")
    tables = [{round(float(p["threshold"]), 6): p["miou"] for p in s} for s in sweeps]
    shared = sorted(set.intersection(*(set(t) for t in tables)))
    out = []
    for t in shared:
        values = [tab[t] for tab in tables if tab[t] is not None]
        out.append({"threshold": t, "miou": float(np.mean(values)) if values else None})
    return out


def sweeps_by(df, root: str | Path, by: str = "inference", **where) -> dict[str, dict]:
    """label -> {"sweep": mean sweep over the runs of df with that ``by`` value}, runs
    restricted by ``where`` (e.g. losses="all"): the mapping form of
    ``wsss.viz.sweep_figure``."""
    rows = df
    for key, value in where.items():
        rows = rows[rows[key] == value]
    out = {}
    for label, group in rows.groupby(by, observed=True):
        sweeps = [json.loads((Path(root) / run / R.SUMMARY).read_text())["maps"]["sweep"] for run in group["run"]]
        out[str(label)] = {"sweep": mean_sweep(sweeps)}
    return out


def pick_run(df, losses: str | None = None, inference: str | None = "cross") -> str:
    """The folder of one ablation run: the first with these ``losses`` (None: the last loss
    setting present, i.e. the most terms) and ``inference`` (if present, else any)."""
    losses = losses if losses is not None else str(df["losses"].dropna().max())
    rows = df[df["losses"] == losses]
    if rows.empty:
        raise ValueError(f"no ablation run with losses={losses!r}; present: {sorted(map(str, set(df['losses'])))}")
    preferred = rows[rows["inference"] == inference]
    return str((preferred if not preferred.empty else rows).iloc[0]["run"])


def run_data_root(run_dir: str | Path) -> str:
    """The dataset a run was made from (the data_root its stage configs record)."""
    for name in (R.folder_config(R.MAPS), R.CLASSIFIER_CONFIG, R.folder_config(R.PSEUDO), R.EVALUATE_CONFIG):
        path = Path(run_dir) / name
        if path.is_file():
            return str((yaml.safe_load(path.read_text()) or {})["data_root"])
    raise FileNotFoundError(f"{run_dir} holds no stage config ({R.folder_config(R.MAPS)}, ...): is it a run directory?")


def resolve_path(path: str | Path | None, default: str | Path, base: str | Path) -> Path:
    """``path`` (``default`` when None); a relative one is taken under ``base`` (never the
    working directory, which for a notebook is notebooks/)."""
    path = Path(path if path is not None else default).expanduser()
    return path if path.is_absolute() else Path(base) / path


# =========================================================================== training curves

def loss_log(path: str | Path):
    """RUN/log.jsonl (one line per epoch, wsss.engine.fit) as a DataFrame; ``path`` is the file
    or the folder holding it (the classifier's run directory, RUN/segmenter_train)."""
    import pandas as pd

    path = Path(path)
    path = path / R.LOG if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: train first (it is written after every epoch)")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return pd.DataFrame([{k: v for k, v in r.items() if not isinstance(v, (list, dict))} for r in records])


# =========================================================================== pairs (notebook 01)

def example_pairs(labels: np.ndarray, n: int = 4, p_common: float = 1.0, seed: int = 0) -> list[dict]:
    """``n`` pairs drawn as ``PairDataset(p_common, seed)`` draws them in epoch 0, with the
    label sets of METHOD.md sec. 1: ids (1..K) of l_m, l_n, l_m ∩ l_n, l_m \\ l_n, l_n \\ l_m."""
    from wsss.data.pairs import pair_rng, sample_partner
    from wsss.data.voc import label_ids as ids

    labels = np.asarray(labels) > 0
    out = []
    for m in range(min(n, len(labels))):
        j = sample_partner(labels.astype(np.uint8), m, p_common, pair_rng(seed, 0, m))
        lm, ln = labels[m], labels[j]
        out.append({"m": m, "n": int(j), "l_m": ids(lm), "l_n": ids(ln), "common": ids(lm & ln),
                    "m_only": ids(lm & ~ln), "n_only": ids(ln & ~lm)})
    return out


# =========================================================================== masks (notebook 05)

def image_miou(pred: np.ndarray, gt: np.ndarray, num_classes: int) -> float:
    """mIoU of one image over the K + 1 classes present in its truth or prediction; a
    prediction's 255 ("not sure") counts as background, as in wsss.evaluation."""
    import torch

    from wsss.classes import IGNORE_INDEX
    from wsss.metrics import ConfusionMatrix

    pred = np.where(np.asarray(pred) == IGNORE_INDEX, 0, pred)
    cm = ConfusionMatrix(num_classes + 1)
    cm.update(torch.from_numpy(pred.astype(np.int64)), torch.from_numpy(np.asarray(gt).astype(np.int64)))
    return float(cm.compute()["miou"])


def per_image_iou(data_root: str | Path, split: str, masks_dir: str | Path, names: Sequence[str] | None = None):
    """Per-image mIoU of the masks MASKS_DIR/NAME.png against the ground truth, lowest first
    (DataFrame: name, miou, fg_fraction). Images without a mask are left out."""
    import pandas as pd

    from wsss.data.voc import VOCDataset, load_mask

    base = VOCDataset(data_root, split, with_mask=False)
    rows = []
    for name in names if names is not None else base.names:
        path = Path(masks_dir) / f"{name}.png"
        if not path.is_file():
            continue
        pred = load_mask(path, base.num_classes)
        gt = load_mask(base.mask_path(name), base.num_classes)
        rows.append({"name": name, "miou": image_miou(pred, gt, base.num_classes),
                     "fg_fraction": float(np.mean((pred > 0) & (pred != 255)))})
    if not rows:
        raise FileNotFoundError(f"no masks of split {split} in {masks_dir}: run the pseudo-mask stage first")
    return pd.DataFrame(rows).sort_values("miou", kind="stable").reset_index(drop=True)


def _run_pseudo_config(run_dir: str | Path):
    """The run's pseudo-mask stage settings (RUN/config_pseudo.yaml), None without one."""
    from wsss.stages.pseudo_masks import PseudoConfig

    path = Path(run_dir) / R.folder_config(R.PSEUDO)
    return C.load_yaml(PseudoConfig, path) if path.is_file() else None


def run_mask_params(run_dir: str | Path, **overrides):
    """The pseudo-mask rules a run used (RUN/config_pseudo.yaml; defaults without one), with
    ``overrides`` (e.g. alpha=8) applied: a wsss.pseudo.PseudoMaskParams."""
    from wsss.pseudo import PseudoMaskParams

    cfg = _run_pseudo_config(run_dir)
    params = cfg.mask_params() if cfg is not None else PseudoMaskParams()
    return dataclasses.replace(params, **{k: v for k, v in overrides.items() if v is not None})


def pseudo_mask_steps(run_dir: str | Path, data_root: str | Path, name: str, params=None, split: str = "train",
                      crf_scale: bool | None = None) -> dict:
    """METHOD.md sec. 3 one step at a time for image ``name``: its localization maps
    (RUN/maps), the background score, the mask without and with the dense CRF
    (``wsss.pseudo.scores_to_mask``), and the per-image mIoU of both against the truth.
    ``params`` and ``crf_scale`` default to the run's own (:func:`run_mask_params`)."""
    from wsss.data.voc import VOCDataset, load_image, load_mask
    from wsss.maps import load_maps, maps_path
    from wsss.pseudo import background_score, crf_params_for, scores_to_mask

    params = params if params is not None else run_mask_params(run_dir)
    if crf_scale is None:
        cfg = _run_pseudo_config(run_dir)
        crf_scale = cfg.crf_scale if cfg is not None else True
    base = VOCDataset(data_root, split, with_mask=False)
    image = load_image(base.image_path(name))
    gt = load_mask(base.mask_path(name), base.num_classes)
    maps, classes = load_maps(maps_path(Path(run_dir) / "maps", name))
    params = crf_params_for(params, image.shape[:2], crf_scale)
    plain = scores_to_mask(image, maps, classes, dataclasses.replace(params, use_crf=False))
    crf = scores_to_mask(image, maps, classes, dataclasses.replace(params, use_crf=True))
    k = base.num_classes
    return {"name": name, "image": image, "gt": gt, "maps": maps, "classes": [int(c) for c in classes],
            "peak": maps.max(0) if len(maps) else np.zeros(gt.shape, np.float32),
            "background": background_score(maps, params), "mask": plain, "mask_crf": crf,
            "miou": image_miou(plain, gt, k), "miou_crf": image_miou(crf, gt, k)}
