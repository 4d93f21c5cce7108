"""Batch-execute notebooks with papermill over a grid of parameters: ablations, figure sequences, smoke runs.

A grid file (YAML) names a notebook, or a sequence of notebooks, and the parameter sets to run
it with; every run writes its executed notebook and its files under ``runs/EXP/``, and a later
invocation skips the runs that finished with the same parameters. The file format, run ids,
run directories and the commands are in notebooks/experiments/README.md::

    python -m wsss.notebooks run GRID.yaml [--kernel K] [--force] [--runs-root DIR] [-p NAME VALUE ...]
    python -m wsss.notebooks check GRID.yaml      # validate only; the runs and their state
    python -m wsss.notebooks strip [--check] NOTEBOOK.ipynb ...

papermill reads the parameters (``inspect_notebook``) and executes; nbstripout strips.
What this module adds: the grid expansion, the check of every name and value before
anything runs, and the finished-run markers (papermill 2.7 records an interrupted run with every
cell completed, so its record cannot tell one from a finished run). Runs go one at a time:
each training already uses every CPU core or its GPU.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import os
import re
import sys
import time
from ast import literal_eval
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import nbformat
import yaml

from wsss.files import write_text

log = logging.getLogger("wsss.notebooks")  # not __name__: the CLI runs as __main__

DEFAULT_KERNEL = "wsss"
RUN_DIR = "RUN_DIR"  # injected by the runner when the notebook's parameters cell defines it
ENTRY_KEYS = {"notebook", "name", "parameters", "grid", "runs"}
LIST_KEYS = {"name", "parameters", "notebooks", "sequential"}
MAX_ID_LENGTH = 120
# what a run leaves in a notebook besides outputs and execution counts (nbstripout clears those)
RUN_CELL_TAGS = {"injected-parameters", "papermill-error-cell-tag"}  # the cells papermill adds
RUN_METADATA = ["cell.metadata.execution", "cell.metadata.papermill", "metadata.papermill", "metadata.widgets"]


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
    if not Path(path).is_file():
        raise GridError(f"notebook {path} not found")
    try:
        return nbformat.read(str(path), as_version=4)
    except Exception as exc:  # nbformat raises several JSON/schema error types
        raise GridError(f"notebook {path} cannot be read ({exc}); is it a valid .ipynb file?") from exc


def _parsed(text: str, parse, errors) -> Any:
    """``parse(text)``, or the text itself when that raises one of ``errors``."""
    try:
        return parse(text)
    except errors:
        return text


def notebook_parameters(path: str | Path) -> dict[str, Any]:
    """name -> default of the notebook's cell tagged ``parameters``, as papermill.inspect_notebook
    reads it (literal defaults as values, others as source text); GridError without such a cell."""
    nb = _read_notebook(Path(path))
    if not any("parameters" in c.get("metadata", {}).get("tags", []) for c in nb.cells):
        raise GridError(f"notebook {path} has no cell tagged 'parameters'; tag the cell of UPPER_CASE "
                        "assignments (JupyterLab: property inspector > Cell tags) so papermill can inject values")
    import papermill  # ~2 s to import: only where it is used

    not_literal = (ValueError, SyntaxError, TypeError, MemoryError, RecursionError)  # what literal_eval raises
    return {name: _parsed(p["default"], literal_eval, not_literal)
            for name, p in papermill.inspect_notebook(str(path)).items()}


def _stripped(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """A copy without outputs, execution counts, papermill's cells or run metadata (nbstripout).
    Tagged cells are dropped here: nbstripout 0.9's ``drop_tagged_cells`` binds its tag test
    late and so only honours the last of several tags."""
    from nbstripout import strip_output  # ~1 s to import

    nb = nbformat.from_dict(nb)
    nb.cells = [c for c in nb.cells if not RUN_CELL_TAGS & set(c.get("metadata", {}).get("tags", []))]
    return strip_output(nb, keep_output=False, keep_count=False, keep_id=True, extra_keys=RUN_METADATA)


def has_outputs(path: str | Path) -> bool:
    """True when a notebook carries anything of a run: outputs, execution counts, papermill traces."""
    nb = _read_notebook(Path(path))
    return _stripped(nb) != nb


def strip_outputs(path: str | Path) -> bool:
    """Remove what has_outputs looks for, in place (atomic write); True when the file changed."""
    nb = _read_notebook(Path(path))
    clean = _stripped(nb)
    if clean != nb:
        write_text(Path(path), nbformat.writes(clean).rstrip("\n") + "\n")
    return clean != nb


# --------------------------------------------------------------------------- grid files

def make_run_id(varying: dict[str, Any]) -> str:
    """Stable file-name-safe id of a parameter set, e.g. ``LOSSES=basic+coatt__SEED=1``."""
    def text(v):
        if isinstance(v, (list, tuple)):
            return ",".join(map(text, v))
        if isinstance(v, dict):
            return ",".join(f"{k}-{text(x)}" for k, x in v.items())
        return json.dumps(v) if isinstance(v, bool) or v is None else str(v)

    if not varying:
        return ""
    joined = "__".join(f"{k}={text(v)}" for k, v in sorted(varying.items()))
    safe = re.sub(r"[^A-Za-z0-9._+=,-]+", "-", joined).strip("-.") or "run"
    if len(safe) > MAX_ID_LENGTH:  # keep it a valid file name, still distinct
        digest = hashlib.sha1(json.dumps(varying, sort_keys=True, default=str).encode()).hexdigest()[:10]
        safe = f"{safe[: MAX_ID_LENGTH - 11]}-{digest}"
    return safe


def _mapping(entry: dict, key: str, where: str) -> dict:
    value = entry.get(key) or {}
    if not isinstance(value, dict):
        raise GridError(f"{where}: '{key}' must be a mapping NAME: VALUE, got {type(value).__name__}")
    return dict(value)


def _check_keys(mapping: dict, allowed: set[str], where: str) -> None:
    if unknown := sorted(set(mapping) - allowed):
        raise GridError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def _points(entry: dict, where: str) -> list[dict[str, Any]]:
    """The varying part of each run of an entry: runs x grid, in file order."""
    grid = _mapping(entry, "grid", where)
    for name, values in grid.items():
        if not isinstance(values, list) or not values:
            raise GridError(f"{where}: grid value for {name} must be a non-empty list, got {values!r}; "
                            "put a fixed value under 'parameters'")
    runs = entry.get("runs") or [{}]
    if not isinstance(runs, list) or not all(isinstance(r, dict) for r in runs):
        raise GridError(f"{where}: 'runs' must be a list of mappings NAME: VALUE")
    if both := sorted(set().union(*runs) & set(grid)):
        raise GridError(f"{where}: {both} set both in 'runs' and in 'grid'; keep one")
    return [{**run, **dict(zip(grid, combo))} for run in runs for combo in itertools.product(*grid.values())]


def _exp_name(name: Any, where: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9._+=-]+", str(name)) or str(name) in {".", ".."}:
        raise GridError(f"{where}: name {name!r} must be a plain folder name (letters, digits, . _ + = -)")
    return str(name)


def _entry_specs(entry: dict, where: str, base: Path, runs_root: Path, exp: str, shared: dict, overrides: dict,
                 stage: int, list_form: bool, source: Path) -> list[RunSpec]:
    _check_keys(entry, ENTRY_KEYS, where)
    if not isinstance(entry.get("notebook"), str) or not entry["notebook"]:
        raise GridError(f"{where}: 'notebook' must be a path to a .ipynb file")
    notebook = (base / entry["notebook"]).resolve()  # an absolute path stays itself
    if not notebook.is_file():
        raise GridError(f"{where}: notebook {notebook} not found (relative paths start at {base})")
    declared = notebook_parameters(notebook)
    exp = _exp_name(entry.get("name", exp), where)
    if list_form:  # top-level parameters and overrides go where they are defined
        shared, overrides = ({k: v for k, v in d.items() if k in declared} for d in (shared, overrides))
    specs = []
    for varying in _points(entry, where):
        params = {**shared, **_mapping(entry, "parameters", where), **varying, **overrides}
        if RUN_DIR in params:
            raise GridError(f"{where}: {RUN_DIR} is set by the runner (RUNS/EXP/ID); remove it")
        param_id = make_run_id({k: params[k] for k in varying})
        if not param_id:
            run_id = notebook.stem
        elif list_form:  # several notebooks share the experiment: the notebook's name tells them apart
            run_id = f"{notebook.stem}__{param_id}"
        else:
            run_id = param_id
        run_dir = None
        if RUN_DIR in declared:  # the notebook takes its run directory from the runner
            run_dir = runs_root / exp / param_id if param_id else runs_root / exp
            params[RUN_DIR] = str(run_dir)
        output = runs_root / exp / "notebooks" / f"{run_id}.ipynb"
        specs.append(RunSpec(notebook, exp, run_id, params, output, run_dir, stage, source))
    return specs


def load_grid(path: str | Path, *, overrides: dict[str, Any] | None = None,
              runs_root: str | Path | None = None) -> list[RunSpec]:
    """Read a grid file (notebooks/experiments/README.md) into its runs, in execution order."""
    path = Path(path).resolve()
    if not path.is_file():
        raise GridError(f"grid file {path} not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise GridError(f"grid file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict) or not {"notebook", "notebooks"} & set(data):
        raise GridError(f"grid file {path}: needs 'notebook: PATH' or 'notebooks: [...]' "
                        "(notebooks/experiments/README.md)")
    # relative notebook paths start at the repository root (pyproject.toml), else the YAML's folder
    base = next((d for d in path.parents if (d / "pyproject.toml").is_file()), path.parent)
    root = Path(runs_root or os.environ.get("WSSS_RUNS") or base / "runs").resolve()
    overrides = dict(overrides or {})
    exp = _exp_name(data.get("name", path.stem), str(path))
    common = dict(base=base, runs_root=root, overrides=overrides, source=path, exp=exp)
    if "notebook" in data:
        specs = _entry_specs(data, str(path), shared={}, stage=0, list_form=False, **common)
    else:
        _check_keys(data, LIST_KEYS, str(path))
        entries = data["notebooks"]
        if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
            raise GridError(f"{path}: 'notebooks' must be a non-empty list of mappings with a 'notebook' key")
        shared, sequential, specs = _mapping(data, "parameters", str(path)), data.get("sequential", True), []
        for i, entry in enumerate(entries):
            specs += _entry_specs(entry, f"{path} (notebooks[{i}])", shared=shared, stage=i if sequential else 0,
                                  list_form=True, **common)
        declared = set().union(*(notebook_parameters(s.notebook) for s in specs))
        for what, names in (("parameters", shared), ("-p override", overrides)):
            if unused := sorted(set(names) - declared):
                raise GridError(f"{path}: {what} {unused} defined by none of the notebooks; valid: {sorted(declared)}")
    kept: dict[tuple[str, str], RunSpec] = {}  # an override can make two runs equal: run it once
    for spec in specs:
        other = kept.setdefault((spec.exp, spec.run_id), spec)
        if (other.parameters, other.notebook) != (spec.parameters, spec.notebook):
            raise GridError(f"{path}: two runs get the id {spec.exp}/{spec.run_id} ({other.parameters} vs "
                            f"{spec.parameters}); give them distinct values or names")
    return list(kept.values())


# a literal default's type -> the types a value may have, and how to say so
KINDS = {bool: ((bool,), "true or false"), int: ((int,), "an integer"), float: ((int, float), "a number"),
         list: ((list, tuple), "a list"), tuple: ((list, tuple), "a list"), dict: ((dict,), "a mapping")}


def validate(spec: RunSpec) -> None:
    """Refuse parameter names the notebook's ``parameters`` cell does not define, and values
    of another kind than a literal default (an integer for ``EPOCHS = 10``), before running."""
    declared = notebook_parameters(spec.notebook)
    where = f"run {spec.exp}/{spec.run_id}" + (f" (grid file {spec.source})" if spec.source else "")
    if unknown := sorted(set(spec.parameters) - set(declared)):
        raise GridError(f"{where}: notebook {spec.notebook} has no parameter(s) {unknown}; its 'parameters' "
                        f"cell defines: {sorted(declared)}. Fix the name or add it to that cell.")
    for name, value in spec.parameters.items():
        default = declared[name]
        types, want = KINDS.get(type(default), (object, ""))  # None, text, expressions: anything
        if value is None:
            continue
        stray_bool = isinstance(value, bool) and not isinstance(default, bool)  # to Python, True is also an int
        if not isinstance(value, types) or stray_bool:
            raise GridError(f"{where}: parameter {name} = {value!r} should be {want} "
                            f"(its default in {spec.notebook} is {default!r})")


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

def run_state(spec: RunSpec) -> str:
    """'finished', 'stale' (finished with other parameters), 'incomplete' (failed or interrupted), 'pending'."""
    if not (spec.output_path.is_file() and spec.done_path.is_file()):
        return "incomplete" if spec.output_path.exists() else "pending"
    try:
        marker = json.loads(spec.done_path.read_text())
    except (OSError, json.JSONDecodeError):
        return "incomplete"
    same = json.dumps(marker.get("parameters", {}), sort_keys=True, default=str) == \
        json.dumps(spec.parameters, sort_keys=True, default=str)
    return "finished" if same else "stale"


def check_kernel(kernel: str) -> None:
    """Fail early, with the fix, when the Jupyter kernel does not exist."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec(kernel)
    except NoSuchKernel:
        raise GridError(f"no Jupyter kernel named {kernel!r} (found: {sorted(KernelSpecManager().find_kernel_specs())})"
                        f"; register it with `{sys.executable} -m ipykernel install --sys-prefix --name {kernel}` "
                        f"(make does this for '{DEFAULT_KERNEL}') or pass --kernel NAME") from None


def _execute(spec: RunSpec, kernel: str) -> None:
    import papermill

    papermill.execute_notebook(str(spec.notebook), str(spec.output_path), parameters=spec.parameters,
                               kernel_name=kernel, language="python", cwd=str(spec.notebook.parent),
                               progress_bar=False, log_output=False)


def _result(spec: RunSpec, status: str, seconds: float = 0.0, exc: BaseException | str | None = None) -> dict:
    """status ok | skipped | failed | not run; ``error`` has the exception and, for a failing cell,
    its ``In [N]`` in the executed notebook and its first line."""
    error = None
    if exc is not None:
        from papermill.exceptions import PapermillExecutionError

        error = {"exec_count": None, "source_line": "", "evalue": str(exc),
                 "ename": type(exc).__name__ if isinstance(exc, BaseException) else "NotRun"}
        if isinstance(exc, PapermillExecutionError):  # a cell of the notebook raised
            error.update(exec_count=exc.exec_count, ename=exc.ename, evalue=exc.evalue,
                         source_line=next((ln.strip() for ln in exc.source.splitlines() if ln.strip()), ""))
    return {"exp": spec.exp, "run_id": spec.run_id, "notebook": str(spec.notebook), "status": status,
            "seconds": round(seconds, 2), "output_path": str(spec.output_path),
            "run_dir": str(spec.run_dir) if spec.run_dir else None, "parameters": spec.parameters, "error": error}


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
        return _result(spec, "failed", time.perf_counter() - start, exc)
    seconds = time.perf_counter() - start
    write_text(spec.done_path, json.dumps({
        "notebook": str(spec.notebook), "parameters": spec.parameters, "kernel": kernel, "seconds": round(seconds, 2),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}, indent=2, default=str) + "\n")
    return _result(spec, "ok", seconds)


def _describe_failure(result: dict[str, Any]) -> str:
    err = result["error"]
    where = "outside the notebook's cells" if err["exec_count"] is None else f"at In [{err['exec_count']}]"
    lines = [f"{result['exp']}/{result['run_id']} failed in {result['notebook']}",
             f"  {where}" + (f": {err['source_line']}" if err["source_line"] else ""),
             f"  {err['ename']}: {err['evalue']}"]
    if Path(result["output_path"]).exists():
        lines.append(f"  executed notebook: {result['output_path']}")
    return "\n".join(lines)


def run_specs(specs: list[RunSpec], kernel: str = DEFAULT_KERNEL, force: bool = False) -> list[dict[str, Any]]:
    """Run validated specs in order; a sequence stops at its first failing stage."""
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from wsss.progress import progress

    results: list[dict[str, Any]] = []
    # log lines go above the progress bar instead of through it; no bar when stderr is a log (wsss.progress)
    with logging_redirect_tqdm(tqdm_class=tqdm), progress(total=len(specs), desc="notebooks", unit="run") as bar:
        for spec in specs:  # in stage order
            if any(r["status"] == "failed" and s.stage < spec.stage for r, s in zip(results, specs)):
                result = _result(spec, "not run", exc="an earlier notebook of the sequence failed")
            else:
                result = run_one(spec, kernel, force)
            results.append(result)
            if result["status"] == "failed":
                log.error(_describe_failure(result))
            elif result["status"] == "ok":
                log.info("%s/%s finished in %.1f s", spec.exp, spec.run_id, result["seconds"])
            bar.set_postfix(failed=sum(r["status"] == "failed" for r in results))
            bar.update()
    return results


def run_grid(path: str | Path, kernel: str = DEFAULT_KERNEL, force: bool = False, root: str | Path | None = None,
             overrides: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Load, validate and run a grid file; ``root`` is the runs root (default ROOT/runs or $WSSS_RUNS).
    Raises GridError before anything runs when the file, a notebook or a parameter name is wrong."""
    specs = load_grid(path, overrides=overrides, runs_root=root)
    validate_all(specs)
    check_kernel(kernel)
    return run_specs(specs, kernel=kernel, force=force)


# --------------------------------------------------------------------------- reporting + CLI

def format_table(rows: list[list], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def summary(results: list[dict[str, Any]]) -> str:
    """A table of every run (status, id, time, output or error), then the details of each failure."""
    rows = [[r["status"], f"{r['exp']}/{r['run_id']}", f"{r['seconds']:.1f}s",
             (f"{r['error']['ename']}: {r['error']['evalue']}" if r["error"] else r["output_path"])[:100]]
            for r in results]
    counts = {s: sum(r["status"] == s for r in results) for s in ("ok", "skipped", "failed", "not run")}
    return "\n".join([format_table(rows, ["status", "run", "time", "output / error"]),
                      ", ".join(f"{n} {s}" for s, n in counts.items() if n) or "no runs",
                      *(_describe_failure(r) for r in results if r["status"] == "failed")])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m wsss.notebooks",
                                     description="Run notebooks with papermill over a grid of parameters "
                                                 "(grid files: notebooks/experiments/README.md).")
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {"run": "execute every run of a grid file (finished runs are skipped)",
                "check": "validate a grid file and its notebooks' parameters, list the runs and their state"}
    for name, text in commands.items():
        p = sub.add_parser(name, help=text)
        p.add_argument("grid", type=Path, help="grid YAML file")
        p.add_argument("--runs-root", type=Path, default=None, help="outputs under DIR/EXP (default: ROOT/runs)")
        p.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                       help="override a parameter in every run (VALUE parsed as YAML); repeatable")
        if name == "run":
            p.add_argument("--kernel", default=DEFAULT_KERNEL, help=f"Jupyter kernel name (default {DEFAULT_KERNEL})")
            p.add_argument("--force", action="store_true", help="re-run finished runs too")
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
        overrides = {name: _parsed(value, yaml.safe_load, yaml.YAMLError) for name, value in args.parameter}
        if args.command == "check":
            specs = load_grid(args.grid, overrides=overrides, runs_root=args.runs_root)
            validate_all(specs)
            rows = [[run_state(s), s.stage, f"{s.exp}/{s.run_id}", s.notebook.name,
                     json.dumps({k: v for k, v in s.parameters.items() if k != RUN_DIR}, default=str)] for s in specs]
            print(format_table(rows, ["state", "stage", "run", "notebook", "parameters"]))
            print(f"{args.grid}: {len(specs)} run(s) valid")
            return 0
        results = run_grid(args.grid, args.kernel, args.force, root=args.runs_root, overrides=overrides)
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
