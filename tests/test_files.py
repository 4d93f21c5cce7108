"""wsss.files: the one atomic write and the provenance rule (fingerprints of inputs)."""

import hashlib
import os
import subprocess
import sys

import pytest

from wsss import files


def test_atomic_path_replaces_in_one_rename_and_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "a" / "x.txt"
    files.write_text(target, "one")
    with pytest.raises(RuntimeError), files.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "one" and [p.name for p in target.parent.iterdir()] == ["x.txt"]


def test_fingerprints_nested_in_settings_find_a_changed_input(tmp_path):
    (tmp_path / "classifier.pt").write_bytes(b"weights v1")
    fp = files.fingerprint(tmp_path, "classifier.pt")
    assert fp == {"file": "classifier.pt", "sha256": hashlib.sha256(b"weights v1").hexdigest()}
    masks = {"params": {"alpha": 0.5}, "maps": {"k": 3, "classifier": fp}}   # pseudo-masks' settings
    assert files.stale_inputs(masks, tmp_path) == []
    files.check_current(masks, tmp_path, "the masks", "make them again")
    (tmp_path / "classifier.pt").write_bytes(b"weights v2")
    assert files.stale_inputs(masks, tmp_path) == ["classifier.pt"]
    with pytest.raises(ValueError, match="the masks were made from another classifier.pt .*: make them again"):
        files.check_current(masks, tmp_path, "the masks", "make them again")
    # a copy keeps its outputs valid; a file that is not there cannot be checked
    assert files.stale_inputs({"maps": {"classifier": fp}}, tmp_path / "elsewhere") == []
    assert files.stale_inputs(None, tmp_path) == []


def test_remove_stale_tmp_keeps_the_files_of_writers_still_running(tmp_path):
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f".a.png.{done.stdout.strip()}.tmp"
    alive = tmp_path / f".b.png.{os.getppid()}.tmp"  # the process that started this test still runs
    other = tmp_path / f".c.pt.{done.stdout.strip()}.tmp"
    for path in (dead, alive, other):
        path.write_bytes(b"half")
    assert files.remove_stale_tmp(tmp_path, "*.png") == 1
    assert not dead.exists() and alive.exists() and other.exists()
    assert files.remove_stale_tmp(tmp_path / "missing") == 0
