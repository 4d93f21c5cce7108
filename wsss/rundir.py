"""The run directory's layout: the one place that names a file a stage writes there.

    RUN/
      classifier.pt  metrics_classifier.json  config_classifier.yaml  log.jsonl  checkpoint_last.pt
      maps/NAME.npz  maps/settings.json       config_maps.yaml        (one folder per maps setting)
      pseudo/NAME.png  pseudo/settings.json   config_pseudo.yaml
      segmenter.pt  metrics_segmenter.json  config_segmenter.yaml  segmenter_train/{log.jsonl,checkpoint_last.pt}
      metrics.json  config_evaluate.yaml  provenance.json  config.yaml (the pipeline's)  figures/

Stages, reports and figures join these names to a run directory; none spells one itself.
"""

from __future__ import annotations

import os
from pathlib import Path

CLASSIFIER = "classifier.pt"
CLASSIFIER_METRICS = "metrics_classifier.json"
CLASSIFIER_CONFIG = "config_classifier.yaml"
SEGMENTER = "segmenter.pt"
SEGMENTER_METRICS = "metrics_segmenter.json"
SEGMENTER_CONFIG = "config_segmenter.yaml"
SEGMENTER_STATE = "segmenter_train"  # the segmenter's checkpoint and log
SUMMARY = "metrics.json"  # evaluate's: every stage's numbers
EVALUATE_CONFIG = "config_evaluate.yaml"
MAPS = "maps"  # default folder of the localization maps
PSEUDO = "pseudo"  # default folder of the pseudo-masks
SETTINGS = "settings.json"  # inside a maps / pseudo-mask folder: what made its files
CHECKPOINT = "checkpoint_last.pt"  # a training stage's resumable state
LOG = "log.jsonl"  # a training stage's loss log
PROVENANCE = "provenance.json"
PIPELINE_CONFIG = "config.yaml"  # the pipeline command's whole config
ABLATION = "ablation.json"  # an ablation run's parameters (04_ablation)
#: training stage -> the weights it leaves, its metrics, its config
TRAINED = {"classifier": CLASSIFIER, "segmenter": SEGMENTER}
METRICS = {"classifier": CLASSIFIER_METRICS, "segmenter": SEGMENTER_METRICS}
CONFIGS = {"classifier": CLASSIFIER_CONFIG, "segmenter": SEGMENTER_CONFIG}


def folder_config(folder: str | Path) -> str:
    """The config file a maps / pseudo-mask folder's stage saves beside it: config_FOLDER.yaml."""
    return f"config_{Path(folder).name}.yaml"


#: training stage -> its resumable checkpoint; its weights: TRAINED
TRAINING_STATE = {"classifier": CHECKPOINT, "segmenter": f"{SEGMENTER_STATE}/{CHECKPOINT}"}
_COMMANDS = {"classifier": "train-classifier", "segmenter": "train-segmenter"}


def trained(run_dir_or_path: str | Path, stage: str) -> Path:
    """RUN/classifier.pt or RUN/segmenter.pt (``stage``) for a run directory, or the file itself;
    FileNotFoundError saying how to make it (resume an unfinished training, or train) when missing."""
    checkpoint, command = TRAINING_STATE[stage], _COMMANDS[stage]
    p = Path(run_dir_or_path)
    if p.is_dir():
        p = p / TRAINED[stage]
    if not p.is_file():
        state = p.parent / checkpoint
        hint = (f"training did not finish: rerun the same {command} command to resume from {state}" if state.is_file()
                else f"train the {stage} first (python -m wsss {command} --run-dir ...)")
        raise FileNotFoundError(f"{p} does not exist; {hint}")
    return p


def require_files(folder: Path, names: list[str], suffix: str, what: str, fix: str) -> None:
    """FileNotFoundError naming the first missing FOLDER/NAME+SUFFIX (and how many more) and ``fix``,
    the stage to run first, unless every image of ``names`` has its file."""
    listing = set(os.listdir(folder)) if folder.is_dir() else set()
    missing = [n for n in names if f"{n}{suffix}" not in listing]
    if missing:
        more = f" (and {len(missing) - 1} more of {len(names)})" if len(missing) > 1 else ""
        raise FileNotFoundError(f"{what} {folder / (missing[0] + suffix)}{more} does not exist: {fix}")
