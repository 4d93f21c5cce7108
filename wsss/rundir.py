"""The run directory's layout: the one place that names a file a stage writes there.

    RUN/
      classifier.pt  metrics_classifier.json  config_classifier.yaml  log.jsonl  checkpoint_last.pt
      maps/NAME.npz  maps/settings.json       config_maps.yaml        (one folder per maps setting)
      pseudo/NAME.png  pseudo/settings.json   config_pseudo.yaml
      segmenter.pt  metrics_segmenter.json  config_segmenter.yaml  segmenter_train/{log.jsonl,checkpoint_last.pt}
      metrics.json  config_evaluate.yaml  provenance.json  figures/

Stages, reports and figures join these names to a run directory; none spells one itself.
"""

from __future__ import annotations

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
ABLATION = "ablation.json"  # an ablation run's parameters (04_ablation)
#: training stage -> the weights it leaves
TRAINED = {"classifier": CLASSIFIER, "segmenter": SEGMENTER}


def folder_config(folder: str | Path) -> str:
    """The config file a maps / pseudo-mask folder's stage saves beside it: config_FOLDER.yaml."""
    return f"config_{Path(folder).name}.yaml"
