"""wsss.notebooks: grid files -> papermill runs (tiny notebooks written into tmp_path).

The tests marked by ``kernel`` in their name start the ``wsss`` Jupyter kernel (about a
second per run); the others never execute a notebook.
"""

import json
from pathlib import Path

import nbformat
import pytest
import yaml
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from wsss import notebooks
from wsss.notebooks import GridError, load_grid, main, notebook_parameters, run_grid, run_state

PARAMS = "RUN_DIR = None\nVALUE = 1\nSEED = 0\nFAIL = False"
BODY = [
    "import json, os, pathlib",  # cell 1
    "if FAIL:\n    raise ValueError(f'boom {SEED}')",  # cell 2
    "pathlib.Path(RUN_DIR).mkdir(parents=True, exist_ok=True)\n"
    "json.dump({'value': VALUE, 'seed': SEED, 'cwd': os.getcwd()}, open(pathlib.Path(RUN_DIR) / 'metrics.json', 'w'))",
]


def write_notebook(path: Path, params: str | None = PARAMS, body=BODY) -> Path:
    nb = new_notebook()
    nb.metadata["kernelspec"] = {"name": "wsss", "display_name": "wsss", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    cells = []
    if params is not None:
        cell = new_code_cell(params)
        cell.metadata["tags"] = ["parameters"]
        cells.append(cell)
    else:
        cells.append(new_markdown_cell("no parameters here"))
    nb.cells = cells + [new_code_cell(src) for src in body]
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(path))
    return path


def write_grid(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def metrics(result) -> dict:
    return json.loads((Path(result["run_dir"]) / "metrics.json").read_text())


@pytest.fixture
def nb(tmp_path):
    return write_notebook(tmp_path / "nbs" / "toy.ipynb")


# ----------------------------------------------------------------- executing (kernel)


def test_kernel_grid_runs_writes_outputs_and_markers_then_rerun_skips(tmp_path, nb):
    grid = write_grid(tmp_path / "g.yaml", {"notebook": "nbs/toy.ipynb", "name": "exp",
                                            "parameters": {"VALUE": 5}, "grid": {"SEED": [0, 1]}})
    runs = tmp_path / "runs"
    results = run_grid(grid, root=runs)
    assert [r["status"] for r in results] == ["ok", "ok"]
    assert [r["run_id"] for r in results] == ["SEED=0", "SEED=1"]
    for seed, r in enumerate(results):
        assert Path(r["output_path"]) == runs / "exp" / "notebooks" / f"SEED={seed}.ipynb"
        assert Path(r["output_path"]).is_file() and Path(r["output_path"]).with_suffix(".done").is_file()
        assert Path(r["run_dir"]) == runs / "exp" / f"SEED={seed}"
        assert metrics(r) == {"value": 5, "seed": seed, "cwd": str(nb.parent)}  # cwd = notebook's folder
        assert notebooks.has_outputs(r["output_path"])
    copy = tmp_path / "copy.ipynb"  # stripping an executed notebook gives back the input notebook
    copy.write_text(Path(results[0]["output_path"]).read_text())
    assert notebooks.strip_outputs(copy) and not notebooks.has_outputs(copy)
    cells = lambda path: [(c.cell_type, c.source, c.outputs if "outputs" in c else None)  # noqa: E731
                          for c in nbformat.read(str(path), as_version=4).cells]
    assert cells(copy) == cells(nb)
    again = run_grid(grid, root=runs)
    assert [r["status"] for r in again] == ["skipped", "skipped"]


def test_kernel_failing_cell_reported_while_the_other_run_succeeds(tmp_path, nb):
    grid = write_grid(tmp_path / "g.yaml", {"notebook": "nbs/toy.ipynb", "grid": {"FAIL": [False, True]},
                                            "parameters": {"SEED": 3}})
    results = run_grid(grid, root=tmp_path / "runs")
    assert [(r["run_id"], r["status"]) for r in results] == [("FAIL=false", "ok"), ("FAIL=true", "failed")]
    ok, bad = results
    assert metrics(ok)["seed"] == 3 and Path(ok["output_path"]).with_suffix(".done").is_file()
    err = bad["error"]
    assert err["exec_count"] == 4 and err["source_line"] == "if FAIL:"  # In [4]: parameters, injected, import, FAIL
    assert err["ename"] == "ValueError" and err["evalue"] == "boom 3"
    assert Path(bad["output_path"]).is_file() and not Path(bad["output_path"]).with_suffix(".done").exists()
    text = notebooks.summary(results)
    assert "at In [4]: if FAIL:" in text and "ValueError: boom 3" in text and str(nb) in text


def test_kernel_cli_overrides_apply_and_failures_exit_nonzero(tmp_path, nb, capsys):
    grid = write_grid(tmp_path / "one.yaml", {"notebook": "nbs/toy.ipynb"})
    runs = tmp_path / "runs"
    assert main(["run", str(grid), "--runs-root", str(runs), "-p", "VALUE", "7", "-p", "SEED", "2"]) == 0
    out = json.loads((runs / "one" / "metrics.json").read_text())  # no grid: RUN_DIR = RUNS/EXP
    assert out["value"] == 7 and out["seed"] == 2
    assert (runs / "one" / "notebooks" / "toy.done").is_file()
    # a changed parameter makes the finished run stale: it runs again, and this time fails
    assert main(["run", str(grid), "--runs-root", str(runs), "-p", "FAIL", "true"]) == 1
    assert "failed" in capsys.readouterr().out
    assert not (runs / "one" / "notebooks" / "toy.done").exists()


# ----------------------------------------------------------------- validation (no kernel)


def test_unknown_parameter_rejected_before_execution_with_valid_names(tmp_path, nb, monkeypatch):
    monkeypatch.setattr(notebooks, "_execute", lambda *a: pytest.fail("executed despite a bad name"))
    grid = write_grid(tmp_path / "g.yaml", {"notebook": "nbs/toy.ipynb", "grid": {"SEEDS": [0, 1]}})
    with pytest.raises(GridError) as info:
        run_grid(grid, root=tmp_path / "runs")
    message = str(info.value)
    assert "SEEDS" in message and "['FAIL', 'RUN_DIR', 'SEED', 'VALUE']" in message and str(nb) in message
    assert not (tmp_path / "runs").exists()
    good = write_grid(tmp_path / "ok.yaml", {"notebook": "nbs/toy.ipynb"})
    assert main(["check", str(good), "-p", "EPOCHS", "1"]) == 2  # overrides are checked too
    assert main(["check", str(good), "-p", "SEED", "1"]) == 0


def test_values_of_the_wrong_kind_are_rejected_by_check(tmp_path, nb, caplog):
    good = write_grid(tmp_path / "ok.yaml", {"notebook": "nbs/toy.ipynb"})
    assert main(["check", str(good), "-p", "SEED", "abc"]) == 2
    assert "parameter SEED = 'abc' should be an integer (its default in" in caplog.text
    assert main(["check", str(good), "-p", "FAIL", "1"]) == 2         # FAIL = False: true or false
    assert main(["check", str(good), "-p", "SEED", "true"]) == 2      # a bool is not an integer here
    assert main(["check", str(good), "-p", "VALUE", "7"]) == 0
    bad = write_grid(tmp_path / "bad.yaml", {"notebook": "nbs/toy.ipynb", "grid": {"VALUE": [1, "two"]}})
    assert main(["check", str(bad)]) == 2


def test_notebook_without_parameters_cell_rejected(tmp_path):
    write_notebook(tmp_path / "bare.ipynb", params=None)
    with pytest.raises(GridError, match="no cell tagged 'parameters'"):
        load_grid(write_grid(tmp_path / "g.yaml", {"notebook": "bare.ipynb"}))


def test_notebook_parameters_reads_literals_expressions_and_skips_magics(tmp_path):
    # papermill's own reading (inspect_notebook): one name per line; a tuple assignment is no parameter
    path = write_notebook(tmp_path / "p.ipynb", params="%matplotlib inline\nA = 3\nB: str = 'x'  # help\n"
                                                       "C = str(1)\nD, E = 1, 2\nimport os")
    assert notebook_parameters(path) == {"A": 3, "B": "x", "C": "str(1)"}


def test_run_ids_stable_distinct_and_sanitised(tmp_path, nb, monkeypatch):
    monkeypatch.delenv("WSSS_RUNS", raising=False)
    grid = {"notebook": "nbs/toy.ipynb", "name": "abl",
            "grid": {"VALUE": ["basic", "basic+coatt", "a b/c"], "SEED": [0, 1]}}
    specs = load_grid(write_grid(tmp_path / "g.yaml", grid))
    ids = [s.run_id for s in specs]
    assert len(set(ids)) == 6  # names sorted: SEED before VALUE
    assert "SEED=1__VALUE=basic+coatt" in ids and "SEED=0__VALUE=a-b-c" in ids
    assert all("/" not in i and " " not in i for i in ids)
    flipped = {**grid, "grid": dict(reversed(list(grid["grid"].items())))}
    assert sorted(s.run_id for s in load_grid(write_grid(tmp_path / "h.yaml", flipped))) == sorted(ids)
    assert [s.run_id for s in load_grid(tmp_path / "g.yaml")] == ids  # same file, same ids
    spec = specs[0]
    assert spec.run_dir == tmp_path / "runs" / "abl" / spec.run_id  # no pyproject.toml: root = YAML's folder
    assert spec.parameters["RUN_DIR"] == str(spec.run_dir)
    assert spec.output_path == tmp_path / "runs" / "abl" / "notebooks" / f"{spec.run_id}.ipynb"
    # a notebook without RUN_DIR gets none injected
    write_notebook(tmp_path / "nbs" / "plain.ipynb", params="SEED = 0")
    (plain,) = load_grid(write_grid(tmp_path / "p.yaml", {"notebook": "nbs/plain.ipynb", "runs": [{"SEED": 4}]}))
    assert plain.run_dir is None and plain.parameters == {"SEED": 4} and plain.run_id == "SEED=4"


def test_notebook_paths_are_relative_to_the_repository_root(tmp_path):
    (tmp_path / "pyproject.toml").write_text("")
    write_notebook(tmp_path / "notebooks" / "toy.ipynb")
    grid = write_grid(tmp_path / "notebooks" / "experiments" / "g.yaml", {"notebook": "notebooks/toy.ipynb"})
    (spec,) = load_grid(grid, runs_root=tmp_path / "elsewhere")
    assert spec.notebook == tmp_path / "notebooks" / "toy.ipynb"
    assert spec.run_dir == tmp_path / "elsewhere" / "g"


def test_list_form_shares_parameters_and_stops_a_sequence_after_a_failure(tmp_path, nb, monkeypatch, capsys):
    write_notebook(tmp_path / "nbs" / "plain.ipynb", params="SEED = 0")
    write_notebook(tmp_path / "nbs" / "last.ipynb", params="RUN_DIR = None")
    grid = write_grid(tmp_path / "seq.yaml", {
        "name": "smoke", "parameters": {"VALUE": 2},
        "notebooks": [{"notebook": "nbs/toy.ipynb", "grid": {"SEED": [0, 1]}},
                      {"notebook": "nbs/plain.ipynb"}, {"notebook": "nbs/last.ipynb"}]})
    specs = load_grid(grid, runs_root=tmp_path / "runs")
    assert [(s.run_id, s.stage) for s in specs] == [("toy__SEED=0", 0), ("toy__SEED=1", 0), ("plain", 1), ("last", 2)]
    assert specs[0].parameters["VALUE"] == 2 and specs[2].parameters == {}  # VALUE only where defined
    assert specs[3].run_dir == tmp_path / "runs" / "smoke"  # a sequence shares RUNS/EXP

    def fake_execute(spec, kernel):
        if spec.run_id == "plain":
            raise RuntimeError("kernel died")
        spec.output_path.write_text("{}")

    monkeypatch.setattr(notebooks, "_execute", fake_execute)
    results = run_grid(grid, root=tmp_path / "runs")
    assert [r["status"] for r in results] == ["ok", "ok", "failed", "not run"]
    assert results[2]["error"]["ename"] == "RuntimeError"
    assert [r["status"] for r in run_grid(grid, root=tmp_path / "runs")][:2] == ["skipped", "skipped"]
    assert run_state(load_grid(grid, runs_root=tmp_path / "runs", overrides={"VALUE": 3})[0]) == "stale"
    capsys.readouterr()
    assert main(["check", str(grid), "--runs-root", str(tmp_path / "runs")]) == 0
    states = [line.split()[0] for line in capsys.readouterr().out.splitlines()[2:6]]
    assert states == ["finished", "finished", "pending", "pending"]  # the fake failure wrote no notebook
    with pytest.raises(GridError, match="defined by none of the notebooks"):
        load_grid(grid, overrides={"EPOCHS": 1})


def test_strip_outputs_clears_outputs_and_has_outputs_agrees(tmp_path):
    path = write_notebook(tmp_path / "dirty.ipynb")
    nb = nbformat.read(str(path), as_version=4)
    nb.cells[1].outputs = [new_output("stream", name="stdout", text="hi\n")]
    nb.cells[1].execution_count = 4
    nbformat.write(nb, str(path))
    assert notebooks.has_outputs(path)
    assert notebooks.strip_outputs(path) is True
    assert not notebooks.has_outputs(path) and notebooks.strip_outputs(path) is False
    clean = nbformat.read(str(path), as_version=4)
    assert [c.source for c in clean.cells] == [c.source for c in nb.cells]  # code kept
    assert main(["strip", "--check", str(path)]) == 0
