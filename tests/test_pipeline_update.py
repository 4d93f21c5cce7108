"""`pipeline` brings a run up to date: after a changed setting it recomputes the stale stage
and everything after it, keeps what is current, and an interrupted recomputation, run
again, ends with the outputs of an uninterrupted one (never old and new outputs mixed)."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from wsss import cli
from wsss import config as C
from wsss import rundir as R
from wsss.stages import make_maps, pipeline, pseudo_masks, training

LR, NEW_LR = 1e-2, 5e-3


pytestmark = pytest.mark.usefixtures("one_thread")


def config(bench, run_dir, lr=LR, **kw) -> dict:
    classifier = dict(image_size=32, batch_size=4, eval_batch_size=8, epochs=2, lr=lr, log_every=0, device="cpu")
    return {"run_dir": str(run_dir), "data_root": str(bench), "stages": ["classifier", "maps", "pseudo"],
            "classifier": classifier, "maps": {"k": 1, "device": "cpu", "image_size": 32},
            "pseudo": {"workers": 0}, **kw}


def actions(caplog) -> dict[str, str]:
    """{stage: "action (why)"} from the pipeline's log lines."""
    lines = [r.getMessage() for r in caplog.records if r.name == "wsss.stages.pipeline"]
    return dict(m.groups() for line in lines if (m := re.match(r"(\w+): (?:would )?(\w+ \(.*\))$", line)))


def outputs(run_dir: Path) -> dict[str, bytes]:
    """The weights (tensors, not the file: it also holds timings) and every map and mask file."""
    out = {f"{k}": v.numpy().tobytes() for k, v in
           torch.load(run_dir / R.CLASSIFIER, weights_only=False)["model"].items()}
    for folder in (R.MAPS, R.PSEUDO):
        out.update({f"{folder}/{p.name}": p.read_bytes() for p in sorted((run_dir / folder).iterdir())
                    if p.suffix in (".npz", ".png")})
    return out


@pytest.fixture(scope="module")
def reference(bench, tmp_path_factory):
    """An uninterrupted run with the new lr from the start."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    pipeline.run(config(bench, run_dir, NEW_LR))
    return outputs(run_dir)


@pytest.fixture(scope="module")
def old_run(bench, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("old") / "run"
    pipeline.run(config(bench, run_dir))
    return run_dir


def copy_of(old_run: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(old_run, run_dir)
    return run_dir


def test_a_changed_setting_recomputes_its_stage_and_what_follows_then_nothing(bench, old_run, reference, tmp_path,
                                                                              caplog):
    run_dir = copy_of(old_run, tmp_path)
    caplog.set_level(logging.INFO, logger="wsss.stages.pipeline")
    plan = pipeline.run(config(bench, run_dir, NEW_LR, dry_run=True))["plan"]
    assert [(p["stage"], p["action"]) for p in plan] == [("classifier", "recompute"), ("maps", "recompute"),
                                                         ("pseudo", "recompute")]
    assert plan[0]["why"] == "lr changed" and plan[1]["why"] == "after classifier"
    assert outputs(run_dir) == outputs(old_run)  # a dry run changes nothing

    caplog.clear()
    path = tmp_path / "p.yaml"  # the user's YAML with the new lr: no resume / overwrite edit needed
    path.write_text(yaml.safe_dump(config(bench, run_dir, NEW_LR)))
    assert cli.main(["pipeline", "--config", str(path)]) == 0
    assert actions(caplog) == {"classifier": "recompute (lr changed)", "maps": "recompute (classifier.pt changed)",
                               "pseudo": "recompute (the maps changed)"}
    assert outputs(run_dir) == reference

    caplog.clear()
    stamps = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.suffix in (".pt", ".npz", ".png")}
    pipeline.run(config(bench, run_dir, NEW_LR))
    assert set(actions(caplog).values()) == {"keep (classifier.pt has these settings)",
                                             "keep (settings equal, all made)"}
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.suffix in (".pt", ".npz", ".png")} == stamps


def test_a_changed_maps_setting_keeps_the_classifier(bench, old_run, tmp_path, caplog):
    run_dir = copy_of(old_run, tmp_path)
    caplog.set_level(logging.INFO, logger="wsss.stages.pipeline")
    pipeline.run({**config(bench, run_dir), "maps": {"k": 2, "device": "cpu", "image_size": 32}})
    assert actions(caplog) == {"classifier": "keep (classifier.pt has these settings)",
                               "maps": "recompute (k changed)", "pseudo": "recompute (the maps changed)"}


class Interrupt(KeyboardInterrupt):
    pass


def interrupt_after(n: int, fn):
    """``fn`` that raises Interrupt (as a SIGINT would) on its (n + 1)-th call."""
    calls = []

    def wrapped(*args, **kwargs):
        if len(calls) == n:
            raise Interrupt
        calls.append(1)
        return fn(*args, **kwargs)

    return wrapped


@pytest.mark.parametrize("where", ["classifier", "maps", "pseudo"])
def test_an_interrupted_recomputation_ends_as_an_uninterrupted_one(bench, old_run, reference, tmp_path, where,
                                                                   monkeypatch):
    run_dir = copy_of(old_run, tmp_path)
    target, name = {"classifier": (training, "save"), "maps": (make_maps, "save_maps"),
                    "pseudo": (pseudo_masks, "save_mask")}[where]
    with monkeypatch.context() as patch:
        patch.setattr(target, name, interrupt_after(0 if where == "classifier" else 3, getattr(target, name)))
        with pytest.raises(Interrupt):
            pipeline.run(config(bench, run_dir, NEW_LR))
    if where != "classifier":  # the folder holds the new settings' first 3 files and nothing older
        folder = run_dir / (R.MAPS if where == "maps" else R.PSEUDO)
        made = sorted(p.name for p in folder.iterdir() if p.suffix in (".npz", ".png"))
        assert len(made) == 3
        assert all((folder / n).read_bytes() == reference[f"{folder.name}/{n}"] for n in made)
    pipeline.run(config(bench, run_dir, NEW_LR))
    assert outputs(run_dir) == reference


def test_a_stage_run_alone_still_refuses_stale_work(bench, old_run, tmp_path):
    run_dir = copy_of(old_run, tmp_path)
    stages = pipeline.stage_configs(C.from_dict(pipeline.PipelineConfig, config(bench, run_dir)), bench, run_dir)
    with pytest.raises(ValueError, match=r"other settings \(changed: k; .*--overwrite.*--maps-dir"):
        make_maps.run(C.merge(C.to_dict(stages["maps"]), {"k": 2}))
    assert make_maps.state(C.merge(C.to_dict(stages["maps"]), {"k": 2})) == ("recompute", "k changed")


def flags_named(message: str, command: str) -> list[tuple[str, str]]:
    """(command, flag) for every --flag in an error message: a flag inside "python -m wsss CMD
    ..." (up to the next ")" or ";") belongs to CMD, any other to the command that raised it."""
    found = []
    for cmd, rest in re.findall(r"python -m wsss ([a-z-]+)([^);]*)", message):
        found += [(cmd, f) for f in re.findall(r"--[a-z][a-z-]*", rest)]
    outside = re.sub(r"python -m wsss [a-z-]+[^);]*", "", message)
    return found + [(command, f) for f in re.findall(r"--[a-z][a-z-]*", outside)]


def test_every_flag_an_error_names_is_one_its_command_accepts(bench, old_run, tmp_path, capsys):
    run_dir = copy_of(old_run, tmp_path)
    stages = pipeline.stage_configs(C.from_dict(pipeline.PipelineConfig, config(bench, run_dir)), bench, run_dir)
    files = {}
    for name, stage in stages.items():
        files[name] = str(C.save_yaml(stage, tmp_path / f"{name}.yaml"))
    cases = [("train-classifier", ["--lr", "0.003"]), ("train-classifier", ["--epochs", "1"]),
             ("make-maps", ["--k", "2"]), ("pseudo-masks", ["--alpha", "2"])]
    messages = []
    for command, extra in cases:
        stage = {"train-classifier": "classifier", "make-maps": "maps", "pseudo-masks": "pseudo"}[command]
        assert cli.main([command, "--config", files[stage], *extra]) == 2
        messages.append((command, capsys.readouterr().err))
    ckpt = torch.load(run_dir / R.CLASSIFIER, weights_only=False)  # a classifier.pt the maps were not made from
    ckpt["model"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    torch.save(ckpt, run_dir / R.CLASSIFIER)
    assert cli.main(["pseudo-masks", "--config", files["pseudo"]]) == 2
    messages.append(("pseudo-masks", capsys.readouterr().err))

    parser = cli.build_parser()
    parsers = parser._subparsers._group_actions[0].choices
    named = [(cmd, flag) for command, err in messages for cmd, flag in flags_named(err, command)]
    assert {flag for _, flag in named} >= {"--no-resume", "--overwrite", "--maps-dir", "--out-dir", "--run-dir"}
    for cmd, flag in named:
        accepted = {**parser._option_string_actions, **parsers[cmd]._option_string_actions}  # --debug: top level
        assert flag in accepted, f"{cmd} has no {flag}: {messages}"


def test_resume_off_or_overwrite_on_in_the_yaml_is_reported_as_a_recomputation(bench, old_run, tmp_path):
    """The log says what the stage will do: with `resume: false` the classifier trains again,
    with `overwrite: true` the maps are made again, every run."""
    from wsss.stages import train_classifier

    run_dir = copy_of(old_run, tmp_path)
    stages = pipeline.stage_configs(C.from_dict(pipeline.PipelineConfig, config(bench, run_dir)), bench, run_dir)
    assert train_classifier.state(stages["classifier"]) == ("keep", "classifier.pt has these settings")
    assert train_classifier.state(C.merge(C.to_dict(stages["classifier"]), {"resume": False})) == (
        "recompute", "resume is off")
    assert make_maps.state(stages["maps"]) == ("keep", "settings equal, all made")
    assert make_maps.state(C.merge(C.to_dict(stages["maps"]), {"overwrite": True})) == ("recompute", "overwrite is on")
