"""Batch-execute notebooks with papermill: ablation grids, figure sequences, smoke runs.

Ablations are a grid of parameter sets executed by papermill: a grid file
names a notebook and the parameter sets to run it with; every run writes its executed
notebook and its files (``metrics.json``, figures) under ``runs/EXP/``, and a later
invocation skips the runs that already finished.

Grid file (YAML), single-notebook form::

    notebook: notebooks/04_ablation.ipynb      # see "Paths" below
    name: ablation_demo                        # EXP; default: the YAML file's stem
    parameters: {EPOCHS: 3, DATA_SIZE: demo}   # shared by every run
    grid: {LOSSES: [basic, basic+coatt, all], SEED: [0, 1, 2]}   # cartesian product (optional)
    runs:                                      # explicit parameter sets (optional)
      - {BACKBONE: tiny}
      - {BACKBONE: vgg16, EPOCHS: 20}

``grid`` and ``runs`` are both optional; given both, every run is crossed with every grid
point. A run's own values override the shared ``parameters``.

List form, for a sequence of notebooks (e.g. 00..07 at smoke size)::

    name: smoke
    parameters: {DATA_SIZE: smoke}        # given to every notebook that defines the name
    sequential: true                      # default; see below
    notebooks:
      - notebook: notebooks/00_data.ipynb
      - notebook: notebooks/01_train.ipynb
        parameters: {EPOCHS: 1}
        grid: {SEED: [0, 1]}              # each entry takes parameters/grid/runs/name as above

Paths: a relative ``notebook:`` is relative to the repository root, i.e. the first folder
holding ``pyproject.toml`` found walking up from the YAML file; with none, the YAML file's
own folder (never the working directory). Outputs go to RUNS/EXP/, where RUNS is
``--runs-root`` (``root=`` in Python), else ``$WSSS_RUNS``, else ROOT/runs.

Run ids and directories: a run's parameter id is built from the parameters that vary
(grid and ``runs`` keys), sorted by name and sanitised, e.g. ``LOSSES=basic+coatt__SEED=1``;
the same YAML always gives the same ids. Then, for each run:

- run id: the parameter id (single form with a grid/runs), else the notebook's stem;
  in the list form the stem, plus ``__`` and the parameter id when the entry varies.
- ``RUN_DIR`` (a string, absolute path) is injected as RUNS/EXP/PARAM_ID/, or RUNS/EXP/
  when nothing varies (so that the notebooks of a sequence share one run directory, as
  the stages do); only when the notebook's parameters cell defines ``RUN_DIR``.
  ``RUN_DIR`` is reserved: a grid file may not set it.
- executed notebook: RUNS/EXP/notebooks/RUN_ID.ipynb; success marker RUNS/EXP/notebooks/
  RUN_ID.done (JSON, written atomically after the notebook finished without error).

A run is finished, and skipped on re-runs, when its output notebook and its marker exist
and the marker records the same parameters; runs whose parameters changed are re-run
(overwriting their outputs); ``--force`` re-runs everything. Overrides (``-p NAME VALUE``)
change parameters but not ids, so use ``--runs-root`` to keep a smoke copy apart.

Validation happens before anything runs: every notebook needs a cell tagged
``parameters``, and every parameter a grid file names must be assigned in that cell
(papermill itself accepts unknown names silently). In the list form, the top-level
``parameters`` and the overrides go to each notebook that defines the name, and a name
that no notebook defines is an error.

Execution: ``papermill.execute_notebook`` with an explicit kernel (default ``wsss``, the
one ``make`` registers in .venv), the notebook's folder as working directory, ``--jobs N``
runs at once (each in its own process). A failing run is reported with its notebook, the
failing cell (0-based index in the input notebook, its first source line) and the error,
and the others carry on. With ``sequential: true`` (list form), entry k starts after entry
k-1 finished; after a failure the later entries are reported as ``not run``.

CLI::

    python -m wsss.notebooks run GRID.yaml [--jobs N] [--kernel K] [--force]
                                           [--runs-root DIR] [-p NAME VALUE ...]
    python -m wsss.notebooks check GRID.yaml [-p NAME VALUE ...]  # validate only
    python -m wsss.notebooks list GRID.yaml [--runs-root DIR]     # runs and their state
    python -m wsss.notebooks strip [--check] NOTEBOOK.ipynb ...   # clear outputs

``-p`` values are parsed as YAML (``-p EPOCHS 1 -p DATA_SIZE smoke -p FLIP false``).
``run`` exits 0 when every run finished or was skipped, 1 when any failed or was not run,
2 when the grid file is invalid.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import itertools
import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import nbformat
import yaml

from wsss.files import write_text

log = logging.getLogger("wsss.notebooks")  # not __name__: the CLI runs as __main__

DEFAULT_KERNEL = "wsss"
PARAMETERS_TAG = "parameters"
INJECTED_TAG = "injected-parameters"  # papermill's tag for the cell it adds
ERROR_TAG = "papermill-error-cell-tag"  # papermill's tag for its error banners
RUN_DIR_PARAM = "RUN_DIR"
SINGLE_KEYS = {"notebook", "name", "parameters", "grid", "runs"}
LIST_KEYS = {"name", "parameters", "notebooks", "sequential"}
ENTRY_KEYS = {"notebook", "name", "parameters", "grid", "runs"}
MAX_ID_LENGTH = 120


class GridError(ValueError):
    """A grid file or notebook that cannot be run; the message names the file and the fix."""


@dataclass
class RunSpec:
    """One execution of one notebook with one parameter set."""

    notebook: Path  # absolute path of the input notebook
    exp: str  # experiment name: outputs under RUNS/EXP/
    run_id: str  # unique within EXP, stable for a given grid file
    parameters: dict[str, Any]  # everything papermill injects (RUN_DIR included)
    output_path: Path  # RUNS/EXP/notebooks/RUN_ID.ipynb
    run_dir: Path | None  # RUNS/EXP[/PARAM_ID]/, None when the notebook takes no RUN_DIR
    stage: int = 0  # position in a sequential list form; stage k waits for stage k-1
    source: Path | None = None  # the grid file, for messages

    @property
    def done_path(self) -> Path:
        return self.output_path.with_suffix(".done")


# --------------------------------------------------------------------------- notebooks


def _read_notebook(path: Path) -> nbformat.NotebookNode:
    path = Path(path)
    if not path.is_file():
        raise GridError(f"notebook {path} not found")
    try:
        return nbformat.read(str(path), as_version=4)
    except Exception as exc:  # nbformat raises several JSON/schema error types
        raise GridError(f"notebook {path} cannot be read ({exc}); is it a valid .ipynb file?") from exc


def _tagged_index(cells: list, tag: str) -> int:
    for i, cell in enumerate(cells):
        if tag in cell.get("metadata", {}).get("tags", []):
            return i
    return -1


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def notebook_parameters(path: str | Path) -> dict[str, Any]:
    """The parameters a notebook declares: name -> default, as ``papermill.inspect_notebook``
    reads its cell tagged ``parameters`` (so the runner sees exactly the names papermill
    injects). Defaults that are Python literals come back as values, others as their source
    text. Raises GridError when the notebook has no such cell.
    """
    path = Path(path)
    nb = _read_notebook(path)
    if _tagged_index(nb.cells, PARAMETERS_TAG) < 0:
        raise GridError(
            f"notebook {path} has no cell tagged '{PARAMETERS_TAG}'; tag the cell of UPPER_CASE "
            "assignments (JupyterLab: property inspector > Cell tags) so papermill can inject values"
        )
    import papermill  # ~2 s to import: only where it is used, as in _execute

    return {name: _literal(p["default"]) for name, p in papermill.inspect_notebook(str(path)).items()}


# What a run leaves in a notebook besides outputs and execution counts (nbstripout clears those):
RUN_CELL_TAGS = [INJECTED_TAG, ERROR_TAG]  # cells papermill adds
RUN_METADATA = ["cell.metadata.execution", "cell.metadata.papermill", "metadata.papermill", "metadata.widgets"]


def _stripped(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """A copy without outputs, execution counts, papermill's cells or run metadata (nbstripout).
    Tagged cells are dropped here: nbstripout 0.9's ``drop_tagged_cells`` binds its tag test
    late and so only honours the last of several tags."""
    from nbstripout import strip_output  # ~1 s to import

    nb = nbformat.from_dict(nb)
    nb.cells = [c for c in nb.cells if not set(RUN_CELL_TAGS) & set(c.get("metadata", {}).get("tags", []))]
    return strip_output(nb, keep_output=False, keep_count=False, keep_id=True, extra_keys=RUN_METADATA)


def has_outputs(path: str | Path) -> bool:
    """True when a notebook carries anything of a run: outputs, execution counts, papermill traces."""
    nb = _read_notebook(Path(path))
    return _stripped(nb) != nb


def strip_outputs(path: str | Path) -> bool:
    """Remove what has_outputs looks for, in place (atomic write); True when the file changed."""
    path = Path(path)
    nb = _read_notebook(path)
    clean = _stripped(nb)
    if clean == nb:
        return False
    write_text(path, nbformat.writes(clean).rstrip("\n") + "\n")
    return True


# --------------------------------------------------------------------------- grid files


def _find_root(grid_path: Path) -> Path:
    """Repository root: the first folder with pyproject.toml above the grid file, else its folder."""
    for folder in [grid_path.parent, *grid_path.parent.parents]:
        if (folder / "pyproject.toml").is_file():
            return folder
    return grid_path.parent


def _format_value(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return ",".join(_format_value(v) for v in value)
    if isinstance(value, dict):
        return ",".join(f"{k}-{_format_value(v)}" for k, v in value.items())
    return str(value)


def make_run_id(varying: dict[str, Any]) -> str:
    """Stable file-name-safe id of a parameter set, e.g. ``LOSSES=basic+coatt__SEED=1``."""
    if not varying:
        return ""
    text = "__".join(f"{k}={_format_value(v)}" for k, v in sorted(varying.items()))
    safe = re.sub(r"[^A-Za-z0-9._+=,-]+", "-", text).strip("-.") or "run"
    if len(safe) > MAX_ID_LENGTH:  # keep it a valid file name, still distinct
        digest = hashlib.sha1(json.dumps(varying, sort_keys=True, default=str).encode()).hexdigest()[:10]
        safe = f"{safe[: MAX_ID_LENGTH - 11]}-{digest}"
    return safe


def _check_keys(mapping: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(mapping) - allowed)
    if unknown:
        raise GridError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def _mapping(value: Any, what: str, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise GridError(f"{where}: '{what}' must be a mapping NAME: VALUE, got {type(value).__name__}")
    return dict(value)


def _points(entry: dict, where: str) -> list[dict[str, Any]]:
    """The varying part of each run of an entry: runs x grid, in file order."""
    grid = _mapping(entry.get("grid"), "grid", where)
    for name, values in grid.items():
        if not isinstance(values, list) or not values:
            raise GridError(
                f"{where}: grid value for {name} must be a non-empty list, got {values!r}; "
                "put a fixed value under 'parameters'"
            )
    runs = entry.get("runs")
    if runs is not None and (not isinstance(runs, list) or not all(isinstance(r, dict) for r in runs)):
        raise GridError(f"{where}: 'runs' must be a list of mappings NAME: VALUE")
    run_points = [dict(r) for r in runs] if runs else [{}]
    grid_points = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]
    for run in run_points:
        both = sorted(set(run) & set(grid))
        if both:
            raise GridError(f"{where}: {both} set both in 'runs' and in 'grid'; keep one")
    return [{**run, **point} for run in run_points for point in grid_points]


def _exp_name(name: Any, default: str, where: str) -> str:
    name = default if name is None else str(name)
    if not re.fullmatch(r"[A-Za-z0-9._+=-]+", name) or name in {".", ".."}:
        raise GridError(f"{where}: name {name!r} must be a plain folder name (letters, digits, . _ + = -)")
    return name


def _resolve_notebook(value: Any, base: Path, where: str) -> Path:
    if not isinstance(value, str) or not value:
        raise GridError(f"{where}: 'notebook' must be a path to a .ipynb file")
    path = Path(value)
    return (path if path.is_absolute() else base / path).resolve()


def _entry_specs(
    entry: dict,
    *,
    where: str,
    base: Path,
    runs_root: Path,
    default_exp: str,
    shared: dict,
    overrides: dict,
    stage: int,
    list_form: bool,
    source: Path,
) -> list[RunSpec]:
    notebook = _resolve_notebook(entry.get("notebook"), base, where)
    declared = notebook_parameters(notebook) if notebook.is_file() else None
    if declared is None:
        raise GridError(f"{where}: notebook {notebook} not found (relative paths start at {base})")
    exp = _exp_name(entry.get("name"), default_exp, where)
    own = _mapping(entry.get("parameters"), "parameters", where)
    if list_form:  # top-level parameters and overrides go where they are defined
        shared = {k: v for k, v in shared.items() if k in declared}
        overrides = {k: v for k, v in overrides.items() if k in declared}
    specs = []
    for varying in _points(entry, where):
        params = {**shared, **own, **varying, **overrides}
        if RUN_DIR_PARAM in params:
            raise GridError(f"{where}: {RUN_DIR_PARAM} is set by the runner (RUNS/EXP/ID); remove it")
        param_id = make_run_id({k: params[k] for k in varying})
        stem = notebook.stem
        run_id = (f"{stem}__{param_id}" if param_id else stem) if list_form else (param_id or stem)
        run_dir = None
        if RUN_DIR_PARAM in declared:
            run_dir = runs_root / exp / param_id if param_id else runs_root / exp
            params[RUN_DIR_PARAM] = str(run_dir)
        output = runs_root / exp / "notebooks" / f"{run_id}.ipynb"
        specs.append(RunSpec(notebook, exp, run_id, params, output, run_dir, stage, source))
    return specs


def _dedupe(specs: list[RunSpec], source: Path) -> list[RunSpec]:
    """Drop exact repeats (an override can make two runs equal); refuse distinct runs sharing an id."""
    seen: dict[tuple[str, str], RunSpec] = {}
    kept = []
    for spec in specs:
        key = (spec.exp, spec.run_id)
        if key in seen:
            if seen[key].parameters == spec.parameters and seen[key].notebook == spec.notebook:
                continue
            raise GridError(
                f"{source}: two runs get the id {spec.exp}/{spec.run_id} "
                f"({seen[key].parameters} vs {spec.parameters}); give them distinct values or names"
            )
        seen[key] = spec
        kept.append(spec)
    if len(kept) < len(specs):
        log.info("%s: %d runs have the same parameters as others (overrides?); running %d", source,
                 len(specs) - len(kept), len(kept))
    return kept


def _default_runs_root(base: Path) -> Path:
    return Path(os.environ["WSSS_RUNS"]).resolve() if os.environ.get("WSSS_RUNS") else base / "runs"


def load_grid(
    path: str | Path, *, overrides: dict[str, Any] | None = None, runs_root: str | Path | None = None
) -> list[RunSpec]:
    """Read a grid file (format in the module docstring) into its runs, in execution order."""
    path = Path(path).resolve()
    if not path.is_file():
        raise GridError(f"grid file {path} not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise GridError(f"grid file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise GridError(f"grid file {path}: expected a mapping with 'notebook:' or 'notebooks:'")
    base = _find_root(path)
    root = Path(runs_root).resolve() if runs_root is not None else _default_runs_root(base)
    overrides = dict(overrides or {})
    common = dict(base=base, runs_root=root, overrides=overrides, source=path)

    if "notebooks" in data:
        _check_keys(data, LIST_KEYS, str(path))
        entries = data["notebooks"]
        if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
            raise GridError(f"{path}: 'notebooks' must be a non-empty list of mappings with a 'notebook' key")
        exp = _exp_name(data.get("name"), path.stem, str(path))
        shared = _mapping(data.get("parameters"), "parameters", str(path))
        sequential = bool(data.get("sequential", True))
        specs = []
        for i, entry in enumerate(entries):
            where = f"{path} (notebooks[{i}])"
            _check_keys(entry, ENTRY_KEYS, where)
            specs += _entry_specs(
                entry, where=where, default_exp=exp, shared=shared, stage=i if sequential else 0,
                list_form=True, **common,
            )
        declared = set().union(*(notebook_parameters(s.notebook) for s in specs))
        for what, names in (("parameters", shared), ("-p override", overrides)):
            unused = sorted(set(names) - declared)
            if unused:
                raise GridError(f"{path}: {what} {unused} defined by none of the notebooks; valid: {sorted(declared)}")
    elif "notebook" in data:
        _check_keys(data, SINGLE_KEYS, str(path))
        specs = _entry_specs(
            data, where=str(path), default_exp=path.stem, shared={}, stage=0, list_form=False, **common
        )
    else:
        raise GridError(f"grid file {path}: needs 'notebook: PATH' or 'notebooks: [...]' (see wsss/notebooks.py)")
    return _dedupe(specs, path)


def _type_mismatch(default: Any, value: Any) -> str | None:
    """What kind ``value`` should be when it clearly is not the kind of a literal ``default``
    (None, strings and expressions accept anything: a string default may be source text)."""
    if default is None or isinstance(default, str) or value is None:
        return None
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "true or false"
    if isinstance(default, int):
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if isinstance(default, float):
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
    if isinstance(default, (list, tuple)):
        return None if isinstance(value, (list, tuple)) else "a list"
    if isinstance(default, dict):
        return None if isinstance(value, dict) else "a mapping"
    return None


def validate(spec: RunSpec) -> None:
    """Refuse parameter names the notebook's ``parameters`` cell does not define, and values
    of another kind than a literal default (an integer for ``EPOCHS = 10``), before running."""
    declared = notebook_parameters(spec.notebook)
    unknown = sorted(set(spec.parameters) - set(declared))
    where = f" (grid file {spec.source})" if spec.source else ""
    if unknown:
        raise GridError(
            f"run {spec.exp}/{spec.run_id}{where}: notebook {spec.notebook} has no parameter(s) {unknown}; "
            f"its '{PARAMETERS_TAG}' cell defines: {sorted(declared)}. Fix the name or add it to that cell."
        )
    for name, value in spec.parameters.items():
        want = _type_mismatch(declared[name], value)
        if want:
            raise GridError(f"run {spec.exp}/{spec.run_id}{where}: parameter {name} = {value!r} should be {want} "
                            f"(its default in {spec.notebook} is {declared[name]!r})")


def validate_all(specs: list[RunSpec]) -> None:
    """Validate every run and raise one GridError listing every problem."""
    problems = []
    for spec in specs:
        try:
            validate(spec)
        except GridError as exc:
            problems.append(str(exc))
    if problems:
        raise GridError("\n".join(dict.fromkeys(problems)))


# --------------------------------------------------------------------------- running


def _same_parameters(a: dict, b: dict) -> bool:
    dump = lambda d: json.dumps(d, sort_keys=True, default=str)  # noqa: E731
    return dump(a) == dump(b)


def run_state(spec: RunSpec) -> str:
    """'finished', 'stale' (finished with other parameters), 'incomplete' (failed or interrupted), 'pending'."""
    if spec.output_path.is_file() and spec.done_path.is_file():
        try:
            marker = json.loads(spec.done_path.read_text())
        except (OSError, json.JSONDecodeError):
            return "incomplete"
        return "finished" if _same_parameters(marker.get("parameters", {}), spec.parameters) else "stale"
    return "incomplete" if spec.output_path.exists() else "pending"


def check_kernel(kernel: str) -> None:
    """Fail early, with the fix, when the Jupyter kernel does not exist."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    manager = KernelSpecManager()
    try:
        manager.get_kernel_spec(kernel)
    except NoSuchKernel:
        found = sorted(manager.find_kernel_specs())
        raise GridError(
            f"no Jupyter kernel named {kernel!r} (found: {found}); register it with "
            f"`{sys.executable} -m ipykernel install --sys-prefix --name {kernel}` (make does this for "
            f"'{DEFAULT_KERNEL}') or pass --kernel NAME"
        ) from None


def _execute(spec: RunSpec, kernel: str) -> None:
    import papermill

    papermill.execute_notebook(
        str(spec.notebook),
        str(spec.output_path),
        parameters=spec.parameters,
        kernel_name=kernel,
        language="python",
        cwd=str(spec.notebook.parent),
        progress_bar=False,
        log_output=False,
    )


def _input_cell_index(spec: RunSpec, output_index: int, source: str) -> int | None:
    """Map papermill's cell index (counted with its injected-parameters cell) to the input notebook's."""
    try:
        cells = _read_notebook(spec.notebook).cells
    except GridError:
        return None
    injected = bool(spec.parameters) and _tagged_index(cells, INJECTED_TAG) < 0
    index = output_index - (1 if injected and output_index > _tagged_index(cells, PARAMETERS_TAG) else 0)
    if 0 <= index < len(cells) and cells[index].source == source:
        return index
    matches = [i for i, c in enumerate(cells) if c.source == source]
    return matches[0] if matches else None


def _error_info(spec: RunSpec, exc: BaseException) -> dict[str, Any]:
    from papermill.exceptions import PapermillExecutionError

    if isinstance(exc, PapermillExecutionError):
        source = exc.source or ""
        first = next((line for line in source.splitlines() if line.strip()), "")
        return {
            "cell_index": _input_cell_index(spec, exc.cell_index, source),
            "exec_count": exc.exec_count,
            "source_line": first.strip(),
            "ename": exc.ename,
            "evalue": exc.evalue,
        }
    return {"cell_index": None, "exec_count": None, "source_line": "", "ename": type(exc).__name__,
            "evalue": str(exc)}


def _result(spec: RunSpec, status: str, seconds: float = 0.0, error: dict | None = None) -> dict[str, Any]:
    return {
        "exp": spec.exp,
        "run_id": spec.run_id,
        "notebook": str(spec.notebook),
        "status": status,  # ok | skipped | failed | not run
        "seconds": round(seconds, 2),
        "output_path": str(spec.output_path),
        "run_dir": str(spec.run_dir) if spec.run_dir else None,
        "parameters": spec.parameters,
        "error": error,
    }


def run_one(spec: RunSpec, kernel: str = DEFAULT_KERNEL, force: bool = False) -> dict[str, Any]:
    """Execute one run unless finished; returns a result dict (status ok/skipped/failed, error details)."""
    state = run_state(spec)
    if state == "finished" and not force:
        return _result(spec, "skipped")
    if state == "stale":
        log.warning("%s/%s: parameters changed since it finished; re-running", spec.exp, spec.run_id)
    spec.done_path.unlink(missing_ok=True)
    spec.output_path.parent.mkdir(parents=True, exist_ok=True)
    if spec.run_dir is not None:
        spec.run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        _execute(spec, kernel)
    except Exception as exc:  # a cell error, a dead kernel, ...: report it, let the other runs go on
        return _result(spec, "failed", time.perf_counter() - start, _error_info(spec, exc))
    seconds = time.perf_counter() - start
    marker = {
        "notebook": str(spec.notebook),
        "parameters": spec.parameters,
        "kernel": kernel,
        "seconds": round(seconds, 2),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_text(spec.done_path, json.dumps(marker, indent=2, default=str) + "\n")
    return _result(spec, "ok", seconds)


def _describe_failure(result: dict[str, Any]) -> str:
    err = result["error"] or {}
    cell = err.get("cell_index")
    where = "outside the notebook's cells" if cell is None else f"at cell #{cell} (0-based; In [{err.get('exec_count')}])"
    lines = [
        f"{result['exp']}/{result['run_id']} failed in {result['notebook']}",
        f"  {where}" + (f": {err['source_line']}" if err.get("source_line") else ""),
        f"  {err.get('ename')}: {err.get('evalue')}",
    ]
    if Path(result["output_path"]).exists():
        lines.append(f"  executed notebook: {result['output_path']}")
    return "\n".join(lines)


def _pool_context():
    """Worker processes forked from a server that imported papermill once (~3 s saved per run).

    Without fork-server (Windows), spawn. Either way the calling script's main module is
    imported again in the workers: scripts calling run_grid(jobs>1) need the usual
    ``if __name__ == "__main__":`` guard (the CLI, pytest and Jupyter are fine).
    """
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    preload = ["papermill", "nbclient"]
    main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if getattr(main_spec, "name", None) != "wsss.notebooks":  # under `python -m wsss.notebooks` the
        preload.append("wsss.notebooks")  # workers run this file as their main module instead
    context.set_forkserver_preload(preload)
    return context


def _run_stage(specs: list[RunSpec], jobs: int, kernel: str, force: bool, on_result) -> None:
    """Run one stage: in this process when jobs <= 1, else a pool of fresh worker processes."""
    if jobs <= 1 or len(specs) <= 1:
        for spec in specs:
            on_result(spec, run_one(spec, kernel, force))
        return
    from concurrent.futures import ProcessPoolExecutor, as_completed

    pool_kw = {"mp_context": _pool_context()}
    if sys.version_info >= (3, 11):
        pool_kw["max_tasks_per_child"] = 1  # each run in a fresh process
    pool = ProcessPoolExecutor(max_workers=min(jobs, len(specs)), **pool_kw)
    try:
        futures = {pool.submit(run_one, spec, kernel, force): spec for spec in specs}
        for future in as_completed(futures):
            spec = futures[future]
            try:
                result = future.result()
            except Exception as exc:  # the worker process itself died
                result = _result(spec, "failed", error=_error_info(spec, exc))
            on_result(spec, result)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()


def _not_run(spec: RunSpec) -> dict[str, Any]:
    error = {"cell_index": None, "exec_count": None, "source_line": "", "ename": "NotRun",
             "evalue": "an earlier notebook of the sequence failed"}
    return _result(spec, "not run", error=error)


def run_specs(
    specs: list[RunSpec], jobs: int = 1, kernel: str = DEFAULT_KERNEL, force: bool = False
) -> list[dict[str, Any]]:
    """Run validated specs stage by stage (``jobs`` at once); results in spec order."""
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from wsss.progress import progress

    results: dict[int, dict[str, Any]] = {}
    index = {id(s): i for i, s in enumerate(specs)}
    failed = 0

    def on_result(spec: RunSpec, result: dict[str, Any]) -> None:
        nonlocal failed
        results[index[id(spec)]] = result
        if result["status"] == "failed":
            failed += 1
            log.error(_describe_failure(result))
        elif result["status"] == "ok":
            log.info("%s/%s finished in %.1f s", spec.exp, spec.run_id, result["seconds"])
        bar.set_postfix(failed=failed)
        bar.update()

    # log lines go above the progress bar instead of through it; no bar when stderr is a log (wsss.progress)
    with logging_redirect_tqdm(tqdm_class=tqdm), progress(total=len(specs), desc="notebooks", unit="run") as bar:
        for stage in sorted({s.stage for s in specs}):
            todo = [s for s in specs if s.stage == stage]
            if failed:  # a sequence stops at the first failing stage
                for spec in todo:
                    on_result(spec, _not_run(spec))
                continue
            pending = []
            for spec in todo:
                if not force and run_state(spec) == "finished":
                    on_result(spec, _result(spec, "skipped"))
                else:
                    pending.append(spec)
            _run_stage(pending, jobs, kernel, force, on_result)
    return [results[i] for i in sorted(results)]


def run_grid(
    path: str | Path,
    jobs: int = 1,
    kernel: str = DEFAULT_KERNEL,
    force: bool = False,
    root: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Load, validate and run a grid file; ``root`` is the runs root (default ROOT/runs or $WSSS_RUNS).

    Raises GridError before anything runs when the file, a notebook or a parameter name is wrong.
    """
    specs = load_grid(path, overrides=overrides, runs_root=root)
    validate_all(specs)
    check_kernel(kernel)
    return run_specs(specs, jobs=jobs, kernel=kernel, force=force)


# --------------------------------------------------------------------------- reporting + CLI


def format_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def summary(results: list[dict[str, Any]]) -> str:
    """A table of every run (status, id, time, output or error), then the details of each failure."""
    rows = []
    for r in results:
        err = r["error"]
        what = f"{err['ename']}: {err['evalue']}" if err else r["output_path"]
        rows.append([r["status"], f"{r['exp']}/{r['run_id']}", f"{r['seconds']:.1f}s", what[:100]])
    counts = {s: sum(r["status"] == s for r in results) for s in ("ok", "skipped", "failed", "not run")}
    text = [format_table(rows, ["status", "run", "time", "output / error"]),
            ", ".join(f"{n} {s}" for s, n in counts.items() if n) or "no runs"]
    text += [_describe_failure(r) for r in results if r["status"] == "failed"]
    return "\n".join(text)


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m wsss.notebooks", description="Run notebooks with papermill over a grid of parameters."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def grid_args(p, runs_root=True, overrides=True):
        p.add_argument("grid", type=Path, help="grid YAML file (format: wsss/notebooks.py docstring)")
        if runs_root:
            p.add_argument("--runs-root", type=Path, default=None, help="outputs under DIR/EXP (default: ROOT/runs)")
        if overrides:
            p.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                           help="override a parameter in every run (VALUE parsed as YAML); repeatable")

    run = sub.add_parser("run", help="execute every run of a grid file (finished runs are skipped)")
    grid_args(run)
    run.add_argument("--jobs", "-j", type=int, default=1, help="runs at once, each in its own process")
    run.add_argument("--kernel", default=DEFAULT_KERNEL, help=f"Jupyter kernel name (default {DEFAULT_KERNEL})")
    run.add_argument("--force", action="store_true", help="re-run finished runs too")
    grid_args(sub.add_parser("check", help="validate a grid file and its notebooks' parameters; run nothing"))
    grid_args(sub.add_parser("list", help="list the runs of a grid file and their state"))
    strip = sub.add_parser("strip", help="clear outputs of notebooks in place (commit notebooks without outputs)")
    strip.add_argument("notebooks", type=Path, nargs="+")
    strip.add_argument("--check", action="store_true", help="change nothing; exit 1 if any notebook has outputs")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("papermill").setLevel(logging.WARNING)
    try:
        if args.command == "strip":
            dirty = [p for p in args.notebooks if has_outputs(p)]
            for path in dirty:
                if args.check:
                    print(f"{path}: has outputs; run `python -m wsss.notebooks strip {path}`")
                else:
                    strip_outputs(path)
                    print(f"{path}: outputs cleared")
            return 1 if args.check and dirty else 0
        overrides = {name: _parse_value(value) for name, value in args.parameter}
        specs = load_grid(args.grid, overrides=overrides, runs_root=args.runs_root)
        validate_all(specs)
        if args.command in ("check", "list"):
            rows = [[run_state(s), s.stage, f"{s.exp}/{s.run_id}", Path(s.notebook).name,
                     json.dumps({k: v for k, v in s.parameters.items() if k != RUN_DIR_PARAM}, default=str)]
                    for s in specs]
            print(format_table(rows, ["state", "stage", "run", "notebook", "parameters"]))
            print(f"{args.grid}: {len(specs)} run(s) valid")
            return 0
        check_kernel(args.kernel)
        results = run_specs(specs, jobs=args.jobs, kernel=args.kernel, force=args.force)
    except GridError as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted; finished runs keep their .done markers, run the same command to go on")
        return 130
    print(summary(results))
    return 0 if all(r["status"] in ("ok", "skipped") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
