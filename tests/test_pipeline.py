"""The whole pipeline at smoke size (configs/smoke.yaml), through the same entry points a
user types: `python -m wsss --help`, `python -m wsss demo --config configs/smoke.yaml`.
Also: a second run of a finished pipeline does no work and changes nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from wsss import cli
from wsss.paths import REPO_ROOT
from wsss.stages import pipeline

SMOKE = REPO_ROOT / "configs" / "smoke.yaml"


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """`python -m wsss demo` on the smoke config, data and runs in a temporary folder."""
    tmp = tmp_path_factory.mktemp("pipeline")
    env = {**os.environ, "WSSS_DATA": str(tmp / "data"), "WSSS_RUNS": str(tmp / "runs")}
    proc = subprocess.run([sys.executable, "-m", "wsss", "demo", "--config", str(SMOKE), "--figures",
                           str(tmp / "figures")], env=env, capture_output=True, text=True, timeout=600,
                          cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return tmp, proc


def test_help_lists_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "wsss", "--help"], capture_output=True, text=True, check=True).stdout
    for name in ["demo", "make-benchmark", "stats", *cli.STAGES]:
        assert name in out, name
    # and each subcommand has its own help with its flags
    subparsers = cli.build_parser()._subparsers._group_actions[0].choices
    for name in cli.STAGES:
        assert "--run-dir" in subparsers[name].format_help(), name


def test_demo_cli_runs_the_whole_pipeline_and_prints_the_table(smoke_run):
    tmp, proc = smoke_run
    run_dir = tmp / "runs" / "smoke"
    assert (tmp / "data" / "synthetic-smoke" / "benchmark.json").is_file()
    for name in ["config.yaml", "classifier.pt", "metrics.json"]:
        assert (run_dir / name).is_file(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ["maps", "pseudo", "segmenter"]:
        assert 0.0 <= metrics[key]["miou"] <= 1.0, key
    # the classifier learnt something: the maps beat "everything is background"
    # (at smoke size the background class alone scores about 0.07 mIoU over 11 classes)
    assert metrics["maps"]["miou"] > 0.12, metrics["maps"]
    assert metrics["pseudo"]["miou"] > 0.12, metrics["pseudo"]
    for line in ["localization maps", "pseudo-masks (train)", "segmentation (val)", "seconds per stage"]:
        assert line in proc.stdout, line
    for fig in ["smoke_qualitative.png", "smoke_threshold_sweep.png"]:
        assert (tmp / "figures" / fig).stat().st_size > 10_000, fig


def test_a_finished_pipeline_runs_again_without_redoing_anything(smoke_run, monkeypatch):
    tmp, _ = smoke_run
    monkeypatch.setenv("WSSS_DATA", str(tmp / "data"))
    monkeypatch.setenv("WSSS_RUNS", str(tmp / "runs"))
    run_dir = tmp / "runs" / "smoke"
    stamps = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*.pt")}
    cfg = pipeline.C.load_yaml(pipeline.PipelineConfig, SMOKE)
    result = pipeline.run(cfg)
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*.pt")} == stamps
    assert result["seconds"]["classifier"] < 5 and result["seconds"]["segmenter"] < 5, result["seconds"]


def test_a_bad_section_is_reported_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setenv("WSSS_RUNS", str(tmp_path / "runs"))
    with pytest.raises(pipeline.C.ConfigError, match="section 'maps'.*'kk'"):
        pipeline.run({"data_root": str(tmp_path), "maps": {"kk": 3}})
    assert not (tmp_path / "runs").exists()
