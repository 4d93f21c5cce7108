"""Stage 1 (wsss.stages.train_classifier) on a tiny embedded benchmark: average precision by
hand, config and flags, resume equivalence, the NaN guard, DDP (gloo, 2 processes) against
a single process on the same global batch, and loading the result."""

from __future__ import annotations

import argparse
import inspect
import json
from dataclasses import fields, replace

import numpy as np
import pytest
import torch
from ddp_local import launch_local

from wsss import checkpoints, engine, loaders
from wsss import config as C
from wsss import evaluation as evl
from wsss import metrics as M
from wsss import rundir as R
from wsss.stages import train_classifier as T
from wsss.stages import training

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cfg(bench, run_dir, **kw) -> T.ClassifierConfig:
    base = dict(data_root=str(bench), run_dir=str(run_dir), image_size=32, batch_size=4, eval_batch_size=8,
                epochs=2, lr=1e-2, log_every=0, device="cpu", workers=0,
                loss=T.LossConfig(self_pairs=True))  # every loss term, self-pairs included
    return T.ClassifierConfig(**{**base, **kw})


def weights(run_dir):
    return torch.load(run_dir / R.CLASSIFIER, weights_only=True)["model"]


@pytest.fixture(scope="module")
def finished_run(bench, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "full"
    metrics = T.run(tiny_cfg(bench, run_dir))
    return run_dir, metrics


# --------------------------------------------------------------------------- average precision

def test_average_precision_by_hand():
    scores = np.array([[0.9, 0.5, 0.3], [0.8, 0.5, 0.2], [0.7, 0.2, 0.1], [0.6, 0.1, 0.0]])
    labels = np.array([[1, 1, 0], [0, 0, 0], [1, 0, 0], [0, 1, 0]])
    ap = M.average_precision(scores, labels)
    # class 0: positives at ranks 1 and 3 -> (1/1 + 2/3) / 2
    # class 1: a tie (one positive, one negative) at 0.5 -> P=1/2 at R=1/2; then P=2/4 at R=1
    # class 2: no positives -> NaN, left out of the mean
    assert ap[0] == pytest.approx((1 + 2 / 3) / 2)
    assert ap[1] == pytest.approx(0.5 * 0.5 + 0.5 * 0.5)
    assert np.isnan(ap[2])
    assert M.mean_average_precision(scores, labels) == pytest.approx(((1 + 2 / 3) / 2 + 0.5) / 2)
    assert M.average_precision(np.array([[0.2], [0.9]]), np.array([[0], [1]]))[0] == 1.0
    with pytest.raises(ValueError, match="must both be"):
        M.average_precision(np.zeros(3), np.zeros(3))


# --------------------------------------------------------------------------- config

def test_config_rejects_unknown_keys_and_every_field_is_read():
    with pytest.raises(C.ConfigError) as err:
        C.from_dict(T.ClassifierConfig, {"data_root": "d", "run_dir": "r", "learning_rate": 0.1})
    assert "'learning_rate'" in str(err.value) and "lr" in str(err.value) and "loss.w_con" in str(err.value)
    source = inspect.getsource(T) + inspect.getsource(training)  # the stage and its shared steps
    unread = [f.name for f in fields(T.ClassifierConfig) if f"cfg.{f.name}" not in source]
    assert not unread, f"ClassifierConfig fields never read by the stage: {unread}"


def test_command_line_flags():
    parser = C.command_line(argparse.ArgumentParser(), T.ClassifierConfig)
    args = parser.parse_args(["--data-root", "D", "--run-dir", "R", "--no-amp", "--loss.w-con", "0.5",
                              "--no-loss.self-pairs", "--step-epochs", "3", "6", "--max-steps", "5",
                              "--val-split", "none", "--schedule", "step", "--scale", "0.9", "1.1"])
    cfg = C.from_args(T.ClassifierConfig, args, parser=parser)
    assert (cfg.data_root, cfg.run_dir, cfg.amp, cfg.step_epochs, cfg.max_steps, cfg.val_split, cfg.schedule,
            cfg.scale) == ("D", "R", False, (3, 6), 5, None, "step", (0.9, 1.1))
    assert cfg.loss.w_con == 0.5 and cfg.loss.self_pairs is False and cfg.loss.coatt is True
    with pytest.raises(SystemExit):
        parser.parse_args(["--data-root", "D", "--run-dir", "R", "--coatt-impl", "slow"])


def test_none_means_none_for_optional_fields_in_yaml_flags_and_parameters(tmp_path):
    """`pretrained: none` in a YAML file was read as a file named "none"."""
    path = tmp_path / "c.yaml"
    path.write_text("data_root: d\nrun_dir: r\npretrained: none\nval_split: Null\nmax_steps: none\n"
                    "frozen_bn: none\n")
    cfg = C.load_yaml(T.ClassifierConfig, path)
    assert (cfg.pretrained, cfg.val_split, cfg.max_steps, cfg.frozen_bn) == (None, None, None, None)
    parser = C.command_line(argparse.ArgumentParser(), T.ClassifierConfig)
    args = parser.parse_args(["--data-root", "D", "--run-dir", "R", "--pretrained", "none"])
    assert C.from_args(T.ClassifierConfig, args, parser=parser).pretrained is None
    papermill = {"data_root": "d", "run_dir": "r", "pretrained": "null", "loss.con_warmup_epochs": 0}
    assert C.from_dict(T.ClassifierConfig, papermill).pretrained is None
    with pytest.raises(C.ConfigError, match="image_size: expected an integer, got 'none'"):  # not optional
        C.from_dict(T.ClassifierConfig, {"data_root": "d", "run_dir": "r", "image_size": "none"})


# --------------------------------------------------------------------------- training

def test_run_writes_every_output(finished_run, bench):
    run_dir, metrics = finished_run
    for name in (R.CLASSIFIER, R.CHECKPOINT, R.LOG, R.CLASSIFIER_METRICS, R.CLASSIFIER_CONFIG):
        assert (run_dir / name).is_file(), name
    log = engine.read_log(run_dir)
    assert [r["epoch"] for r in log] == [1, 2]
    for term in ("basic", "coatt", "contrastive", "self_basic", "self_coatt", "total"):
        assert np.isfinite(log[-1][f"loss/{term}"]), term
    assert log[-1]["loss/self_basic"] > 0 and log[0]["loss/contrastive"] == 0  # warm-up: 2 epochs
    assert 0 <= metrics["val_map"] <= 1 and metrics["steps"] == 4
    assert json.loads((run_dir / R.CLASSIFIER_METRICS).read_text())["val_map"] == metrics["val_map"]
    assert C.load_yaml(T.ClassifierConfig, run_dir / R.CLASSIFIER_CONFIG) == tiny_cfg(bench, run_dir)


def test_load_classifier_reproduces_the_recorded_map(finished_run, bench):
    from wsss.data.transforms import eval_transforms
    from wsss.data.voc import VOCDataset

    run_dir, metrics = finished_run
    model = T.load_classifier(run_dir, "cpu")
    assert not model.training and len(model.class_names) == 4 and model.train_config.image_size == 32
    val = VOCDataset(bench, "val", transforms=eval_transforms(32), with_mask=False)
    loader = loaders.make_eval_loader(val, 8)
    assert evl.evaluate_map(model, loader, torch.device("cpu"))["val/map"] == pytest.approx(metrics["val_map"])
    with pytest.raises(FileNotFoundError, match="train the classifier first"):
        T.load_classifier(run_dir.parent / "nothing-here")


def test_rerunning_a_finished_run_keeps_classifier_pt(finished_run, bench, tmp_path):
    run_dir, metrics = finished_run
    path = run_dir / R.CLASSIFIER
    before = path.stat().st_mtime_ns
    again = T.run(tiny_cfg(bench, run_dir, workers=0, log_every=5))  # runtime settings only: nothing to do
    assert path.stat().st_mtime_ns == before and again == metrics
    # other settings: trained again (here in a copy, so the shared fixture stays as it was)
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    more = T.run(tiny_cfg(bench, copy, epochs=3))
    assert more["epochs"] == 3 and (copy / R.CLASSIFIER).stat().st_mtime_ns != before


class Interrupt(Exception):
    pass


def test_interrupted_then_resumed_run_ends_with_the_same_weights(finished_run, bench, tmp_path, monkeypatch):
    ref_dir, _ = finished_run
    original = engine.append_log

    def log_then_crash(run_dir, record):
        original(run_dir, record)
        raise Interrupt  # after epoch 1: its checkpoint and log line are written

    monkeypatch.setattr(engine, "append_log", log_then_crash)
    with pytest.raises(Interrupt):
        T.run(tiny_cfg(bench, tmp_path))
    assert not (tmp_path / R.CLASSIFIER).exists()
    monkeypatch.setattr(engine, "append_log", original)
    T.run(tiny_cfg(bench, tmp_path))

    ref, got = weights(ref_dir), weights(tmp_path)
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    timing = ("seconds", "eval_seconds")
    assert [{k: v for k, v in r.items() if k not in timing} for r in engine.read_log(tmp_path)] == \
        [{k: v for k, v in r.items() if k not in timing} for r in engine.read_log(ref_dir)]


def test_nan_loss_raises_and_keeps_the_last_good_checkpoint(bench, tmp_path, monkeypatch):
    calls = {"n": 0}
    real_loss_terms = T.loss_terms

    def nan_in_epoch_2(out, l_m, l_n, cfg, epoch):
        calls["n"] += 1
        terms = real_loss_terms(out, l_m, l_n, cfg, epoch)
        if calls["n"] == 3:  # step 3 = epoch 2, batch 1 (2 steps per epoch)
            terms["coatt"] = terms["coatt"] + float("nan")
            terms["total"] = terms["total"] + terms["coatt"]
        return terms

    monkeypatch.setattr(T, "loss_terms", nan_in_epoch_2)
    with pytest.raises(engine.NonFiniteLossError) as err:
        T.run(tiny_cfg(bench, tmp_path))
    ckpt = tmp_path / R.CHECKPOINT
    msg = str(err.value)
    for part in ("step 3", "epoch 2", "'coatt'", str(ckpt), "lower the learning rate", "--no-amp"):
        assert part in msg, part
    assert "'basic'" not in msg.split("are NaN")[0]
    assert not (tmp_path / R.CLASSIFIER).exists()
    model = T.build_model(tiny_cfg(bench, tmp_path), 4)
    ck = checkpoints.load_checkpoint(ckpt, model)
    assert ck["epoch"] == 1 and ck["step"] == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.slow
def test_ddp_two_processes_match_one_process_on_the_same_global_batch(bench, tmp_path):
    """2 x 2 pairs per step under DDP (gloo) vs 4 pairs per step in one process: the
    sampler splits each global batch between the ranks, augmentation is seeded per item,
    the tiny backbone normalises per sample (GroupNorm) and the warm-up keeps the
    per-nonempty-sample contrastive mean out of the loss, so the runs agree."""
    single = tiny_cfg(bench, tmp_path / "single", epochs=1)
    launch_local(T.run, 2, replace(single, run_dir=str(tmp_path / "ddp"), batch_size=2))
    T.run(single)
    one, two = engine.read_log(tmp_path / "single"), engine.read_log(tmp_path / "ddp")
    assert len(one) == len(two) == 1 and one[0]["step"] == two[0]["step"] == 2
    for key in ("loss/total", "loss/basic", "loss/coatt", "loss/self_basic", "val/map"):
        assert two[0][key] == pytest.approx(one[0][key], rel=1e-5, abs=1e-6), key
    a, b = weights(tmp_path / "single"), weights(tmp_path / "ddp")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)


def test_settings_stored_by_an_older_version_compare_in_todays_form():
    """A classifier.pt from before the split list and the self-pair weighting existed:
    still 'the same settings' when it is, not when its self-pair terms were summed."""
    cfg = T.ClassifierConfig(data_root="d", run_dir="r")
    old = C.to_dict(cfg)
    old["split"] = "train"
    del old["loss"]["self_weighting"]
    assert not C.config_differences(T.stored_settings(old), C.to_dict(cfg))
    old["loss"]["self_pairs"] = True
    with_self = C.to_dict(T.ClassifierConfig(data_root="d", run_dir="r", loss=T.LossConfig(self_pairs=True)))
    assert C.config_differences(T.stored_settings(old), with_self) == ["loss.self_weighting: 'sum' -> 'mean'"]
