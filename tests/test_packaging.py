"""Packaging: the two dependency lists (pyproject.toml and environment.yml) name the same
packages; the method note shipped with the repo is the project's."""

import re
from pathlib import Path

import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[ ;]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_name(r): r for r in project["dependencies"] + project["optional-dependencies"]["dev"]}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    got = {_name(r): r for r in pip_section}
    assert wanted, "pyproject.toml lists no dependencies"
    assert set(got) == set(wanted), f"only in pyproject: {set(wanted) - set(got)}; only in environment.yml: {set(got) - set(wanted)}"
    for name in wanted:
        assert got[name].replace(" ", "") == wanted[name].replace(" ", ""), f"{name}: {got[name]!r} vs {wanted[name]!r}"


def test_required_packages_are_listed():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {_name(r) for r in project["dependencies"]}
    for pkg in ["torch", "torchvision", "jupyterlab", "ipywidgets", "matplotlib", "seaborn", "papermill", "pydensecrf2"]:
        assert pkg in names, f"{pkg} missing from pyproject.toml dependencies"


def test_method_note_exists_and_cites_what_the_code_cites():
    """METHOD.md is the project's own document, shipped with the repo: the code cites its
    sections and the recipe items of the reference code."""
    text = (ROOT / "METHOD.md").read_text()
    for needle in ("## 1.", "## 2.", "## 3.", "Recipes", "official"):
        assert needle in text, f"METHOD.md lacks {needle!r}"
