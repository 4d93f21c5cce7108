"""Stage 3 (wsss.stages.pseudo_masks) on a hand-made VOC tree: expected labels from
hand-made maps, palette PNGs, skipping finished images, an interrupted run resumed with
the finished masks untouched and no temporary files, identical masks with 1 or 2 worker
processes, saliency mode, and the messages for missing inputs or changed settings."""

from __future__ import annotations

import argparse
import inspect
import subprocess
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsss import config as C
from wsss import rundir as R
from wsss.crf import CRF_REFERENCE_SIZE, CRFParams
from wsss.maps import save_maps
from wsss.pseudo import PseudoMaskParams, crf_params_for
from wsss.stages import pseudo_masks as P

H, W = 12, 16
NAMES = ["a", "b", "c", "d"]


def left_right(h=H, w=W, split=8):
    m = np.zeros((h, w), np.float32)
    m[:, :split] = 1.0
    return m


def hand_made_maps() -> dict[str, tuple[np.ndarray, list[int]]]:
    """name -> (maps (n, H, W) in [0, 1], class ids), with the expected masks in ``expected``."""
    left = left_right()
    half = np.full((H, W), 0.5, np.float32)
    return {
        "a": (left[None], [2]),                       # left: 2, right: background
        "b": (np.stack([left, 1 - left]), [1, 3]),    # left: 1, right: 3
        "c": (np.stack([left, left]), [1, 2]),        # left: both > 0.99 -> 255, right: background
        "d": (np.stack([half * left, 0.2 * (1 - left)]), [3, 1]),  # left 0.5 vs bg 0.5^4: 3; right: 0.2 floored
    }


def expected() -> dict[str, np.ndarray]:
    left = left_right().astype(bool)
    out = {}
    out["a"] = np.where(left, 2, 0)
    out["b"] = np.where(left, 1, 3)
    out["c"] = np.where(left, 255, 0)
    out["d"] = np.where(left, 3, 0)
    return {k: v.astype(np.uint8) for k, v in out.items()}


@pytest.fixture
def tree(tmp_path) -> tuple[Path, Path]:
    """(dataset root, run dir) with 4 images of 12 x 16, 3 classes, labels in train.txt, maps."""
    root, run = tmp_path / "voc", tmp_path / "run"
    (root / "JPEGImages").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "classes.txt").write_text("alpha\nbeta\ngamma\n")
    rng = np.random.default_rng(0)
    lines = []
    for name, (maps, ids) in hand_made_maps().items():
        image = np.zeros((H, W, 3), np.uint8)
        image[:, :8] = (200, 40, 40)
        image[:, 8:] = (30, 30, 160)
        image = np.clip(image + rng.integers(0, 20, image.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(root / "JPEGImages" / f"{name}.jpg", quality=95)
        save_maps(run / "maps" / f"{name}.npz", maps, ids)
        lines.append(" ".join([name, *map(str, ids)]))
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(lines) + "\n")
    return root, run


def cfg(tree, **kw) -> P.PseudoConfig:
    root, run = tree
    base = dict(data_root=str(root), run_dir=str(run), use_crf=False, min_fg_fraction=0.0, workers=1)
    return P.PseudoConfig(**{**base, **kw})


def read(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "P"
        return np.asarray(im)


def tmp_files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.endswith(".tmp")]


# --------------------------------------------------------------------------- masks

def test_masks_hold_the_expected_labels_as_palette_pngs(tree):
    result = P.run(cfg(tree))
    out = tree[1] / "pseudo"
    for name, mask in expected().items():
        np.testing.assert_array_equal(read(out / f"{name}.png"), mask, err_msg=name)
    pixels = 4 * H * W
    assert result["num_images"] == 4 and result["num_skipped"] == 0
    assert result["ignored_fraction"] == pytest.approx(H * 8 / pixels)
    assert result["fg_fraction"] == pytest.approx((H * 8 + H * W + H * 8) / pixels)
    assert result["num_all_ignored"] == 0
    assert (out / R.SETTINGS).is_file() and (tree[1] / "config_pseudo.yaml").is_file()


def test_min_foreground_rule_ignores_whole_images_and_a_mostly_ignored_split_is_reported(tree, caplog):
    with caplog.at_level("WARNING", logger=P.__name__):
        result = P.run(cfg(tree, min_fg_fraction=0.75))  # only b (all foreground) keeps its labels
    assert result["num_all_ignored"] == 3
    assert (read(tree[1] / "pseudo" / "a.png") == 255).all()
    assert "3 of 4 pseudo masks are ignored whole" in caplog.text and "train the classifier longer" in caplog.text


def test_rerun_skips_finished_images(tree):
    P.run(cfg(tree))
    out = tree[1] / "pseudo"
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    again = P.run(cfg(tree))
    assert again["num_images"] == 0 and again["num_skipped"] == 4
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")} == before
    assert again["fg_fraction"] is not None  # counted from the existing masks


class Crash(Exception):
    pass


def test_interrupted_run_leaves_finished_masks_and_the_rerun_completes(tree, monkeypatch):
    out = tree[1] / "pseudo"
    real_save = P.save_mask
    calls = {"n": 0}

    def save_then_crash(path, mask):
        calls["n"] += 1
        if calls["n"] == 3:
            raise Crash  # the third image dies before its file is written
        real_save(path, mask)

    monkeypatch.setattr(P, "save_mask", save_then_crash)
    with pytest.raises(Crash):
        P.run(cfg(tree))
    done = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    assert sorted(done) == ["a.png", "b.png"] and not tmp_files(out)

    # a temporary file left by a process that was killed mid-write
    dead = _finished_pid()
    (out / f".c.png.{dead}.tmp").write_bytes(b"half a png")
    monkeypatch.setattr(P, "save_mask", real_save)
    result = P.run(cfg(tree))
    assert (result["num_images"], result["num_skipped"]) == (2, 2)
    assert {n: (out / n).stat().st_mtime_ns for n in done} == done
    assert not tmp_files(out)
    for name, mask in expected().items():
        np.testing.assert_array_equal(read(out / f"{name}.png"), mask)


def _finished_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_one_or_two_worker_processes_write_identical_masks_with_crf(tree):
    one = P.run(cfg(tree, use_crf=True, workers=1, out_dir="one"))
    two = P.run(cfg(tree, use_crf=True, workers=2, out_dir="two"))
    assert one["num_images"] == two["num_images"] == 4
    for name in NAMES:
        assert (tree[1] / "one" / f"{name}.png").read_bytes() == (tree[1] / "two" / f"{name}.png").read_bytes()
    assert one["fg_fraction"] == two["fg_fraction"]


def test_an_error_in_a_worker_process_names_the_file_and_leaves_no_temporary_files(tree):
    (tree[1] / "maps" / "c.npz").write_bytes(b"not an npz")
    with pytest.raises(ValueError, match=r"cannot read localization maps .*c\.npz"):
        P.run(cfg(tree, workers=2))
    out = tree[1] / "pseudo"
    assert not tmp_files(out) and not (out / "c.png").exists()
    save_maps(tree[1] / "maps" / "c.npz", *hand_made_maps()["c"])
    result = P.run(cfg(tree, workers=2))
    assert result["num_images"] + result["num_skipped"] == 4
    np.testing.assert_array_equal(read(out / "c.png"), expected()["c"])


def test_crf_widths_scale_with_the_image():
    params = P.PseudoConfig(data_root="d", run_dir="r").mask_params()
    scaled = crf_params_for(params, (250, 100), scale=True)
    assert scaled.crf.bilateral_sxy == pytest.approx(params.crf.bilateral_sxy * 250 / CRF_REFERENCE_SIZE)
    assert scaled.crf.gauss_sxy == pytest.approx(params.crf.gauss_sxy * 0.5)
    assert scaled.crf.bilateral_srgb == params.crf.bilateral_srgb
    assert crf_params_for(params, (250, 100), scale=False) is params


# --------------------------------------------------------------------------- saliency

def test_saliency_mode_reads_saliency_maps_and_names_a_missing_one(tree):
    root, run = tree
    sal = root / "saliency"
    sal.mkdir()
    for name in NAMES[:3]:
        Image.fromarray(np.full((H, W), 255, np.uint8)).save(sal / f"{name}.png")  # everything salient
    with pytest.raises(FileNotFoundError) as err:
        P.run(cfg(tree, bg_mode="saliency", saliency_dir=str(sal)))
    assert str(sal / "d.png") in str(err.value) and "bg_mode='power'" in str(err.value)
    Image.fromarray(np.full((H, W), 255, np.uint8)).save(sal / "d.png")
    P.run(cfg(tree, bg_mode="saliency", saliency_dir=str(sal)))
    # background score 0 everywhere: the right half of "a" (no class there) is salient background -> 255
    np.testing.assert_array_equal(read(run / "pseudo" / "a.png"), np.where(left_right() > 0, 2, 255))
    with pytest.raises(ValueError, match="needs saliency_dir"):
        P.run(cfg(tree, bg_mode="saliency", out_dir="other"))


# --------------------------------------------------------------------------- bad input

def test_missing_maps_file_names_the_file_and_the_fix(tree):
    (tree[1] / "maps" / "c.npz").unlink()
    with pytest.raises(FileNotFoundError) as err:
        P.run(cfg(tree))
    msg = str(err.value)
    assert str(tree[1] / "maps" / "c.npz") in msg and "make-maps" in msg
    assert not (tree[1] / "pseudo").exists() or not list((tree[1] / "pseudo").glob("*.png"))


def test_maps_of_another_size_are_refused(tree):
    save_maps(tree[1] / "maps" / "b.npz", np.ones((1, H, W + 2), np.float32), [1])
    with pytest.raises(ValueError, match="b.npz are 18x12 but image .*b.jpg is 16x12"):
        P.run(cfg(tree))


def test_changed_settings_are_refused_unless_overwriting(tree):
    P.run(cfg(tree))
    with pytest.raises(ValueError, match="other settings.*params.*overwrite=True"):
        P.run(cfg(tree, alpha=2.0))
    result = P.run(cfg(tree, alpha=2.0, overwrite=True))
    assert result["num_images"] == 4 and result["num_skipped"] == 0


# --------------------------------------------------------------------------- config

def test_every_field_is_read_and_flags_parse():
    source = inspect.getsource(P)
    rules = {f.name for f in fields(PseudoMaskParams)}  # read together by mask_params()
    unread = [f.name for f in fields(P.PseudoConfig)
              if f.name not in rules and f"cfg.{f.name}" not in source and f"self.{f.name}" not in source]
    assert not unread, f"PseudoConfig fields never read by the stage: {unread}"
    cfg = C.from_dict(P.PseudoConfig, {"data_root": "d", "run_dir": "r", "alpha": 0.5, "conflict": 0.9, "crf.iters": 2})
    assert cfg.mask_params() == PseudoMaskParams(alpha=0.5, conflict=0.9, crf=CRFParams(iters=2))
    parser = C.command_line(argparse.ArgumentParser(), P.PseudoConfig)
    args = parser.parse_args(["--data-root", "D", "--run-dir", "R", "--no-use-crf", "--crf.iters", "3",
                              "--bg-mode", "threshold", "--limit", "5", "--no-crf-scale"])
    got = C.from_args(P.PseudoConfig, args, parser=parser)
    assert (got.use_crf, got.crf.iters, got.bg_mode, got.limit, got.crf_scale) == (False, 3, "threshold", 5, False)
    with pytest.raises(SystemExit):
        parser.parse_args(["--data-root", "D", "--run-dir", "R", "--bg-mode", "sal"])
    assert C.from_dict(P.PseudoConfig, {"data_root": "d", "run_dir": "r", "crf.bilateral_sxy": 20}).crf.bilateral_sxy == 20
