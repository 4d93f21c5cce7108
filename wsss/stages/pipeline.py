"""The whole pipeline from one YAML file: classifier -> maps -> pseudo masks -> segmenter -> evaluation.

Each stage is still its own ``run(cfg)`` reading and writing the run directory; this module
builds their configs from one file and brings the run up to date, stage by stage in order:
a stage whose outputs are current is kept, an unfinished one resumes, and one whose outputs
were made with other settings or from inputs that have changed since (the stage's
``state(cfg)``) is recomputed, which makes everything after it stale in turn. One log line
per stage says which and why; ``dry_run`` prints that plan without running anything.

YAML layout (every section optional; keys are the fields of that stage's config)::

    run_dir: demo                   # absolute, or relative to the runs folder: runs/demo (wsss.paths.runs_dir)
    recipe: null                    # a recipe under configs/recipes/ (official) or a YAML path
    data_root: null                 # a VOC-layout dataset; null = the embedded benchmark below
    benchmark: demo                 # smoke | demo | full (shapes), art-smoke | art-demo | art-full: generated on first use
    scene: {}                       # its knobs: body_class, context_p, context_size, noise_rate (wsss.data.synth)
    seed: 0
    stages: [classifier, maps, pseudo, segmenter, evaluate]
    classifier: {backbone: tiny, epochs: 6}          # wsss.stages.train_classifier.ClassifierConfig
    maps: {k: 3}                                     # wsss.stages.make_maps.MapsConfig
    pseudo: {alpha: 4.0}                             # wsss.stages.pseudo_masks.PseudoConfig
    segmenter: {model: tiny}                         # wsss.stages.train_segmenter.SegmenterConfig
    evaluate: {crf: true}                            # wsss.stages.evaluate.EvalConfig

``data_root``, ``run_dir`` and ``seed`` are filled into every stage. A ``recipe`` is a YAML
file of stage sections (configs/recipes/official.yaml: the authors' code item by item);
its sections lie under the pipeline's own, key by key (nested mappings merged), so a
section's own keys win. The merged settings are saved as RUN/config.yaml.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Literal

from wsss import config as C
from wsss import rundir as R
from wsss.paths import REPO_ROOT, benchmark_root, runs_dir
from wsss.stages import evaluate, make_maps, pseudo_masks, train_classifier, train_segmenter

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Stage:
    """A pipeline stage: its module (``run(cfg)``, ``state(cfg)``), its config class, and its
    command line subcommand with that command's one-line help (wsss.cli)."""

    module: ModuleType
    config: type
    command: str
    help: str


#: the one registry of the stages, in the pipeline's order
STAGES = {
    "classifier": Stage(train_classifier, train_classifier.ClassifierConfig, "train-classifier",
                        "train the co-attention classifier on image pairs (METHOD.md sec 1)"),
    "maps": Stage(make_maps, make_maps.MapsConfig, "make-maps",
                  "localization maps with cross-image context (METHOD.md sec 2)"),
    "pseudo": Stage(pseudo_masks, pseudo_masks.PseudoConfig, "pseudo-masks",
                    "CRF-refined pseudo-masks from the maps (METHOD.md sec 3)"),
    "segmenter": Stage(train_segmenter, train_segmenter.SegmenterConfig, "train-segmenter",
                       "train the segmentation network on the pseudo-masks (METHOD.md sec 4)"),
    "evaluate": Stage(evaluate, evaluate.EvalConfig, "evaluate",
                      "mIoU of maps, pseudo-masks and segmentation into RUN/metrics.json"),
}
SEEDED = {"classifier", "maps", "segmenter"}
RECIPES_DIR = REPO_ROOT / "configs" / "recipes"


@dataclass
class PipelineConfig:
    run_dir: str = C.setting("demo", "run directory (relative paths go under runs/)")
    recipe: str | None = C.setting(
        None, "stage overrides from configs/recipes/NAME.yaml (official: the authors' code) or a YAML path")
    data_root: str | None = C.setting(None, "VOC-layout dataset; leave unset to use the embedded benchmark")
    benchmark: Literal["smoke", "demo", "full", "art-smoke", "art-demo", "art-full"] = C.setting(
        "demo", "size of the embedded benchmark used when --data-root is unset")
    scene: dict = C.setting(
        factory=dict, help="its knobs as a YAML mapping: body_class, context_p, context_size (realism), noise_rate "
                           "(the web split's label noise); wsss.data.synth")
    seed: int = C.setting(0, "seed for every stage", allowed=">= 0")
    stages: tuple[str, ...] = C.setting(tuple(STAGES), f"stages to run, in order, from {list(STAGES)}")
    classifier: dict = C.setting(
        factory=dict, help="overrides of the classifier stage config as a YAML mapping of its fields")
    maps: dict = C.setting(factory=dict, help="overrides of the maps stage config as a YAML mapping of its fields")
    pseudo: dict = C.setting(factory=dict, help="overrides of the pseudo stage config as a YAML mapping of its fields")
    segmenter: dict = C.setting(
        factory=dict, help="overrides of the segmenter stage config as a YAML mapping of its fields")
    evaluate: dict = C.setting(
        factory=dict, help="overrides of the evaluate stage config as a YAML mapping of its fields")
    dry_run: bool = C.setting(
        False, "print what each stage would do (kept, resumed, recomputed, run) and why, and run nothing")


def resolve_run_dir(run_dir: str | Path) -> Path:
    path = Path(run_dir).expanduser()
    return path if path.is_absolute() else runs_dir() / path


def load_recipe(recipe: str | None) -> dict:
    """{stage: overrides} of a recipe: a name under configs/recipes/ or a YAML file's path."""
    if not recipe:
        return {}
    path = Path(recipe).expanduser()
    if not path.suffix:
        path = RECIPES_DIR / f"{recipe}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
        raise C.ConfigError(f"recipe {recipe!r}: no file {path}; choose one of {known} or give a YAML path")
    data = C.read_yaml_mapping(path, "stage sections")
    if unknown := sorted(set(data) - set(STAGES)):
        raise C.ConfigError(f"recipe {path}: unknown section(s) {unknown}; sections are {list(STAGES)}")
    return data


def stage_configs(cfg: PipelineConfig, data_root: Path, run_dir: Path) -> dict:
    """Each chosen stage's config object, built from the recipe's section, its own section
    on top, plus the shared fields."""
    if unknown := [s for s in cfg.stages if s not in STAGES]:
        raise C.ConfigError(f"unknown stage(s) {unknown}; choose from {list(STAGES)}")
    recipe = load_recipe(cfg.recipe)
    out = {}
    for name in cfg.stages:
        cls = STAGES[name].config
        section = C.merge(recipe.get(name) or {}, getattr(cfg, name) or {})
        shared = {"data_root": str(data_root), "run_dir": str(run_dir)}
        if name in SEEDED:
            shared["seed"] = cfg.seed
        if clash := sorted(set(section) & set(shared)):
            raise C.ConfigError(f"section {name!r} sets {clash}: set them once at the top level of the pipeline config")
        try:
            out[name] = C.from_dict(cls, {**section, **shared})
        except C.ConfigError as err:
            raise C.ConfigError(f"section {name!r}: {err}") from None
    return out


def prepare_data(cfg: PipelineConfig) -> Path:
    if cfg.data_root:
        return Path(cfg.data_root).expanduser()
    from wsss.data.synth import DATA_KNOBS, ensure_benchmark

    if unknown := sorted(set(cfg.scene) - set(DATA_KNOBS)):
        raise C.ConfigError(f"scene: unknown knob(s) {unknown}; choose from {list(DATA_KNOBS)}")
    try:
        return Path(ensure_benchmark(benchmark_root(cfg.benchmark, 0, cfg.scene), size=cfg.benchmark, seed=0,
                                     **cfg.scene))
    except ValueError as err:
        raise C.ConfigError(f"scene: {err}") from None


#: the settings that make a stage recompute its outputs (evaluate needs none: it evaluates
#: again exactly the parts whose inputs changed)
RECOMPUTE = {"classifier": {"resume": False}, "maps": {"overwrite": True}, "pseudo": {"overwrite": True},
             "segmenter": {"resume": False}}


def plan(configs: dict) -> list[tuple[str, str, str]]:
    """(stage, action, why) for each stage, as the run directory stands now: a stage after
    one that will run, resume or recompute is recomputed too (its inputs will change)."""
    out, changed = [], None
    for name, stage_cfg in configs.items():
        action, why = STAGES[name].module.state(stage_cfg)
        if changed is not None and action in ("keep", "resume"):
            action, why = "recompute", f"after {changed}"
        if action != "keep" and changed is None:
            changed = name
        out.append((name, action, why))
    return out


def run(cfg: PipelineConfig | dict) -> dict:
    """Bring the chosen stages up to date in order (see the module's docstring); returns
    {stage: its metrics} and RUN/metrics.json's summary, or with ``dry_run`` {"plan": [...]}."""
    cfg = C.from_dict(PipelineConfig, cfg) if isinstance(cfg, dict) else cfg
    run_dir = resolve_run_dir(cfg.run_dir)
    data_root = prepare_data(cfg)
    configs = stage_configs(cfg, data_root, run_dir)  # check every section before spending time
    if cfg.dry_run:
        steps = plan(configs)
        for name, action, why in steps:
            log.info("%s: would %s (%s)", name, action, why)
        return {"plan": [{"stage": n, "action": a, "why": w} for n, a, w in steps], "run_dir": str(run_dir)}
    C.save_yaml(cfg, run_dir / R.PIPELINE_CONFIG)  # its atomic write creates RUN
    results, seconds = {}, {}
    for name, stage_cfg in configs.items():
        module = STAGES[name].module
        action, why = module.state(stage_cfg)  # now, after the stages before it have run
        log.info("%s: %s (%s)", name, action, why)
        t0 = time.perf_counter()
        if action == "recompute":
            stage_cfg = dataclasses.replace(stage_cfg, **RECOMPUTE.get(name, {}))
        results[name] = module.run(stage_cfg)
        seconds[name] = round(time.perf_counter() - t0, 1)
    return {**results, "seconds": seconds, "run_dir": str(run_dir), "data_root": str(data_root)}


def summary_table(run_dir: str | Path) -> str:
    """The headline numbers of a run (from RUN/metrics.json) as a small text table."""
    path = Path(run_dir) / R.SUMMARY
    metrics = json.loads(path.read_text()) if path.is_file() else {}

    def fmt(v):
        return "  n/a" if v is None else f"{100 * v:5.1f}"

    rows = []
    if "maps" in metrics:
        m = metrics["maps"]
        rows.append(("localization maps (train, best bg threshold %s)" % m.get("best_threshold"), m.get("miou")))
    if "pseudo" in metrics:
        rows.append(("pseudo-masks (train)", metrics["pseudo"].get("miou")))
    if "segmenter" in metrics:
        rows.append(("segmentation (val)", metrics["segmenter"].get("miou")))
        if metrics["segmenter"].get("miou_crf") is not None:
            rows.append(("segmentation (val) + CRF", metrics["segmenter"]["miou_crf"]))
    width = max([len(r[0]) for r in rows] + [10])
    return "\n".join([f"{'':{width}}  mIoU (%)", *(f"{name:{width}}  {fmt(v)}" for name, v in rows)])


