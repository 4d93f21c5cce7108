"""The numbered notebooks: committed clean, parameter sets valid, and every one runs at smoke size.

The run executes notebooks/experiments/smoke.yaml (00..06, sharing one run directory;
04_ablation four times: two inference modes x two seeds) and then figures.yaml (07)
on those ablation runs, with papermill and the ``wsss`` kernel that ``make`` registers,
everything under tmp_path (WSSS_DATA and WSSS_RUNS point there, so nothing is written
into the repository). It takes about 2-3 minutes on two cores; each notebook is checked
by the files it must leave behind, not by its cells' outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
import yaml

from wsss.notebooks import has_outputs, load_grid, notebook_parameters, run_grid, validate_all
from wsss.paths import REPO_ROOT

NOTEBOOK_DIR = REPO_ROOT / "notebooks"
GRID_DIR = NOTEBOOK_DIR / "experiments"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
GRIDS = sorted(GRID_DIR.glob("*.yaml"))
SMOKE_EPOCHS = yaml.safe_load((REPO_ROOT / "configs" / "smoke.yaml").read_text())["classifier"]["epochs"]

# notebook stem -> files it writes, relative to the smoke run directory RUNS/smoke
# (07_figures: relative to its FIGURES_DIR)
SMOKE_FILES = {
    "00_quickstart": ["metrics.json", "summary.txt", "quickstart_qualitative.png", "classifier.pt", "segmenter.pt"],
    "01_data_and_pairs": ["data_examples.png", "pair_statistics.json", "pair_statistics.png", "example_pairs.png"],
    "02_train_classifier": ["metrics_classifier.json", "classifier_curves.png"],
    "03_attention": ["attention_pair.png", "attention.json"],
    "04_ablation": [f"INFERENCE={i}__SEED={s}/{f}" for i in ("single", "cross") for s in (0, 1)
                    for f in ("metrics.json", "ablation.json", "threshold_sweep.png")],
    "05_pseudo_masks": ["pseudo_steps.png", "pseudo_threshold_sweep.png", "pseudo_report.json",
                        "pseudo_failures.png", "pseudo_per_image_iou.csv"],
    "06_segmentation": ["segmenter_curves.png", "segmentation_predictions.png"],
    "07_figures": ["ablation_table.md", "ablation_table.csv", "ablation_maps_miou.png", "ablation_maps_miou.png.txt",
                   "ablation_pseudo_miou.png", "ablation_threshold_sweep.png", "ablation_threshold_sweep.png.txt",
                   "ablation_qualitative.png", "ablation_qualitative.png.txt"],
}


def repo_files(folders=("data", "runs", "figures", "notebooks")) -> set[Path]:
    """Files in the repository folders a notebook might write into by mistake."""
    return {p for folder in folders if (REPO_ROOT / folder).is_dir() for p in (REPO_ROOT / folder).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and ".ipynb_checkpoints" not in p.parts}


def test_all_eight_notebooks_are_there():
    assert [p.stem[:2] for p in NOTEBOOKS] == [f"{i:02d}" for i in range(8)]
    assert sorted(p.stem for p in NOTEBOOKS) == sorted(SMOKE_FILES)


def test_committed_notebooks_carry_no_outputs():
    assert NOTEBOOKS
    dirty = [p.name for p in NOTEBOOKS if has_outputs(p)]
    assert not dirty, f"run `python -m wsss.notebooks strip notebooks/*.ipynb` before committing {dirty}"


def test_notebooks_have_one_parameters_cell_of_upper_case_names():
    assert NOTEBOOKS
    for path in NOTEBOOKS:
        params = notebook_parameters(path)
        assert params, path
        assert all(name.isupper() for name in params), (path, list(params))
        cells = nbformat.read(str(path), as_version=4).cells
        tagged = [c for c in cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, f"{path}: exactly one cell tagged parameters"
        assert cells[0].cell_type == "markdown" and cells[0].source.startswith("# "), f"{path}: a title first"


def test_every_parameter_set_names_parameters_its_notebooks_define(tmp_path):
    assert {p.name for p in GRIDS} >= {"smoke.yaml", "demo.yaml", "voc_vgg16.yaml", "voc_resnet101.yaml",
                                       "ablation_demo.yaml", "figures.yaml"}
    for grid in GRIDS:
        specs = load_grid(grid, runs_root=tmp_path)
        assert specs, grid
        validate_all(specs)  # raises, naming the file and the parameter, on a name a notebook lacks
        assert all(s.notebook.parent == NOTEBOOK_DIR and s.notebook.is_file() for s in specs)


def test_smoke_sequence_covers_notebooks_00_to_06_and_the_ablation_grid_is_complete(tmp_path):
    stems = [s.notebook.stem for s in load_grid(GRID_DIR / "smoke.yaml", runs_root=tmp_path)]
    assert sorted(set(stems)) == [p.stem for p in NOTEBOOKS if p.stem != "07_figures"]
    grid = load_grid(GRID_DIR / "ablation_demo.yaml", runs_root=tmp_path)
    points = {(s.parameters["LOSSES"], s.parameters["INFERENCE"], s.parameters["SEED"]) for s in grid}
    assert points == {(l, i, s) for l in ("basic", "basic+coatt", "basic+coatt+con", "all")
                      for i in ("single", "cross") for s in (0, 1, 2)}
    assert all(s.parameters["DATA_SIZE"] == "shapes" for s in grid)  # the README's ablation figures
    # the classifiers are shared across INFERENCE without locks: no stage holds two runs of one classifier
    for stage in {s.stage for s in grid}:
        trains = [(s.parameters["LOSSES"], s.parameters["SEED"]) for s in grid if s.stage == stage]
        assert len(trains) == len(set(trains)) == 12
    assert [s.parameters["INFERENCE"] for s in grid if s.stage == 0] == ["single"] * 12


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_every_notebook_runs_at_smoke_size(tmp_path, monkeypatch):
    runs, figures = tmp_path / "runs", tmp_path / "figures"
    before = repo_files()
    monkeypatch.setenv("WSSS_DATA", str(tmp_path / "data"))  # the kernels inherit these
    monkeypatch.setenv("WSSS_RUNS", str(runs))
    results = run_grid(GRID_DIR / "smoke.yaml", root=runs)
    results += run_grid(GRID_DIR / "figures.yaml", root=runs,
                        overrides={"ABLATION_DIR": str(runs / "smoke"), "FIGURES_DIR": str(figures)})
    failed = [(r["run_id"], r["error"]) for r in results if r["status"] != "ok"]
    assert not failed, failed
    assert sorted({Path(r["notebook"]).stem for r in results}) == [p.stem for p in NOTEBOOKS]
    for r in results:
        assert has_outputs(r["output_path"])  # executed copies under RUNS, the inputs stay clean
    smoke = runs / "smoke"
    for stem, files in SMOKE_FILES.items():
        base = figures if stem == "07_figures" else smoke
        missing = [f for f in files if not (base / f).is_file()]
        assert not missing, f"{stem} did not write {missing}"
    metrics = json.loads((smoke / "metrics.json").read_text())
    assert {"maps", "pseudo", "segmenter"} <= set(metrics) and 0 <= metrics["segmenter"]["miou"] <= 1
    ablation = json.loads((smoke / "INFERENCE=cross__SEED=1" / "ablation.json").read_text())
    assert ablation == {"losses": "basic+coatt", "inference": "cross", "seed": 1, "data_size": "smoke",
                        "epochs": SMOKE_EPOCHS, "limit": 16}
    assert "| basic+coatt | cross |" in (figures / "ablation_table.md").read_text()
    assert "notebooks/07_figures.ipynb" in (figures / "ablation_qualitative.png.txt").read_text()
    assert repo_files() - before == set(), "a notebook wrote into the repository"
    assert all(not has_outputs(p) for p in NOTEBOOKS)
