"""Stage 4 (wsss.stages.train_segmenter) on a tiny embedded benchmark whose ground-truth
masks stand in for the pseudo masks: outputs and loading, the val mIoU by hand, resume
equivalence (after an epoch and mid-epoch), the NaN guard, DDP evaluation gathering the
whole split, config and flags. (That the loss ignores 255 is tested in test_segmenter.py.)"""

from __future__ import annotations

import argparse
import inspect
import json
import shutil
from dataclasses import fields

import numpy as np
import pytest
import torch
from ddp_local import launch_local
from torch import nn
from torchvision import tv_tensors

from wsss import checkpoints, engine, loaders
from wsss import config as C
from wsss import evaluation as evl
from wsss import rundir as R
from wsss.stages import train_segmenter as T
from wsss.stages import training


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    from wsss.data.synth import ensure_benchmark

    return ensure_benchmark(tmp_path_factory.mktemp("bench") / "tiny", size="smoke", image_size=32, num_train=8,
                            num_val=8, num_single=0, num_web=0, num_classes=4)


def with_pseudo(bench, run_dir):
    """A run directory whose RUN/pseudo holds copies of the train split's ground truth."""
    pseudo = run_dir / R.PSEUDO
    pseudo.mkdir(parents=True, exist_ok=True)
    for name in (bench / "ImageSets" / "Segmentation" / "train.txt").read_text().split():
        shutil.copy(bench / "SegmentationClass" / f"{name}.png", pseudo / f"{name}.png")
    return run_dir


def tiny_cfg(bench, run_dir, **kw) -> T.SegmenterConfig:
    with_pseudo(bench, run_dir)
    base = dict(data_root=str(bench), run_dir=str(run_dir), crop=32, batch_size=4, eval_batch_size=3, epochs=2,
                lr=1e-2, new_lr_mult=10.0, log_every=0, device="cpu", workers=0)
    return T.SegmenterConfig(**{**base, **kw})


def weights(run_dir):
    return torch.load(run_dir / R.SEGMENTER, weights_only=True)["model"]


def state_dir(run_dir):
    return run_dir / R.SEGMENTER_STATE


@pytest.fixture(scope="module")
def finished_run(bench, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "full"
    return run_dir, T.run(tiny_cfg(bench, run_dir))


def test_rerun_keeps_the_segmenter_unless_its_masks_changed(bench, tmp_path, caplog):
    run_dir = tmp_path / "run"
    cfg = tiny_cfg(bench, run_dir, epochs=1)
    (run_dir / R.PSEUDO / "settings.json").write_text(json.dumps({"alpha": 4.0}))
    first = T.run(cfg)
    path = run_dir / R.SEGMENTER
    stamp = path.stat().st_mtime_ns
    assert T.run(cfg) == first and path.stat().st_mtime_ns == stamp  # same settings, same masks: kept
    (run_dir / R.PSEUDO / "settings.json").write_text(json.dumps({"alpha": 0.5}))  # masks remade
    with caplog.at_level("WARNING"):
        T.run(cfg)
    assert path.stat().st_mtime_ns != stamp and "pseudo-masks changed" in caplog.text
    assert [r["epoch"] for r in engine.read_log(state_dir(run_dir))] == [1]  # trained again from scratch
    assert torch.load(path, weights_only=False)["inputs"] == {"alpha": 0.5}


def comparable(log):
    return [{k: v for k, v in r.items() if k not in ("seconds", "eval_seconds")} for r in log]


# --------------------------------------------------------------------------- training

def test_run_writes_every_output_and_the_loss_is_finite(finished_run, bench):
    run_dir, metrics = finished_run
    for path in (run_dir / R.SEGMENTER, run_dir / R.SEGMENTER_METRICS, run_dir / R.SEGMENTER_CONFIG,
                 state_dir(run_dir) / R.CHECKPOINT, state_dir(run_dir) / R.LOG):
        assert path.is_file(), path
    log = engine.read_log(state_dir(run_dir))
    assert [r["epoch"] for r in log] == [1, 2] and [r["step"] for r in log] == [2, 4]
    assert all(np.isfinite(r["loss/total"]) and 0 <= r["val/miou"] <= 1 for r in log)
    assert log[1]["lr/new"] == pytest.approx(10 * log[1]["lr/backbone"])
    assert metrics["val_miou"] == log[-1]["val/miou"] and metrics["steps"] == 4
    assert list(metrics["val_iou"])[0] == "background" and len(metrics["val_iou"]) == 5
    assert json.loads((run_dir / R.SEGMENTER_METRICS).read_text())["val_miou"] == metrics["val_miou"]
    assert C.load_yaml(T.SegmenterConfig, run_dir / R.SEGMENTER_CONFIG) == tiny_cfg(bench, run_dir)


def test_load_segmenter_reproduces_the_recorded_miou(finished_run, bench):
    from wsss.data.transforms import eval_transforms
    from wsss.data.voc import VOCDataset

    run_dir, metrics = finished_run
    model = T.load_segmenter(run_dir, "cpu")
    assert not model.training and len(model.class_names) == 4 and model.train_config.crop == 32
    val = VOCDataset(bench, "val", transforms=eval_transforms(None))
    loader = loaders.make_eval_loader(val, 5, collate_fn=list)
    got = evl.evaluate_miou(model, loader, torch.device("cpu"), 4)
    assert got["val/miou"] == pytest.approx(metrics["val_miou"])
    with pytest.raises(FileNotFoundError, match="train the segmenter first"):
        T.load_segmenter(run_dir.parent / "nothing-here")


def test_more_steps_lower_the_training_loss(bench, tmp_path):
    T.run(tiny_cfg(bench, tmp_path, epochs=4, val_split=None, scale=(1.0, 1.0), flip=False, new_lr_mult=None))
    log = engine.read_log(state_dir(tmp_path))
    assert log[-1]["loss/total"] < log[0]["loss/total"]
    assert "val/miou" not in log[0]


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("crash_at_call,ckpt_every", [(3, 0), (4, 1)], ids=["after-epoch-1", "mid-epoch-2"])
def test_interrupted_then_resumed_run_ends_with_the_same_weights(finished_run, bench, tmp_path, monkeypatch,
                                                                 crash_at_call, ckpt_every):
    ref_dir, _ = finished_run
    real_loss = T.segmentation_loss
    calls = {"n": 0}

    def loss_then_crash(logits, target):
        calls["n"] += 1
        if calls["n"] == crash_at_call:
            raise Interrupt
        return real_loss(logits, target)

    monkeypatch.setattr(T, "segmentation_loss", loss_then_crash)
    with pytest.raises(Interrupt):
        T.run(tiny_cfg(bench, tmp_path, ckpt_every=ckpt_every))
    assert not (tmp_path / R.SEGMENTER).exists()
    ckpt = torch.load(state_dir(tmp_path) / R.CHECKPOINT, weights_only=True)
    assert ckpt["step"] == crash_at_call - 1
    monkeypatch.setattr(T, "segmentation_loss", real_loss)
    T.run(tiny_cfg(bench, tmp_path, ckpt_every=ckpt_every))

    ref, got = weights(ref_dir), weights(tmp_path)
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    finished = [r for r in engine.read_log(state_dir(tmp_path)) if float(r["epoch"]).is_integer()]
    assert comparable(finished) == comparable(engine.read_log(state_dir(ref_dir)))


def test_nan_loss_raises_and_keeps_the_last_good_checkpoint(bench, tmp_path, monkeypatch):
    real_loss = T.segmentation_loss
    calls = {"n": 0}

    def nan_in_epoch_2(logits, target):
        calls["n"] += 1
        loss = real_loss(logits, target)
        return loss + float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(T, "segmentation_loss", nan_in_epoch_2)
    with pytest.raises(engine.NonFiniteLossError) as err:
        T.run(tiny_cfg(bench, tmp_path))
    ckpt = state_dir(tmp_path) / R.CHECKPOINT
    for part in ("step 3", "epoch 2", "'total'", str(ckpt), "lower the learning rate"):
        assert part in str(err.value), part
    assert not (tmp_path / R.SEGMENTER).exists()
    model = T.build_model(tiny_cfg(bench, tmp_path), 4)
    assert checkpoints.load_checkpoint(ckpt, model)["step"] == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_missing_pseudo_masks_name_the_file_and_the_fix(bench, tmp_path):
    cfg = tiny_cfg(bench, tmp_path)
    victim = sorted((tmp_path / R.PSEUDO).glob("*.png"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError) as err:
        T.run(cfg)
    assert str(victim) in str(err.value) and "pseudo-mask stage" in str(err.value)


@pytest.mark.slow
def test_ddp_evaluation_covers_the_split_once(finished_run, bench, tmp_path):
    """Two processes (gloo): each evaluates half of val and the confusion matrices are
    summed, so the logged mIoU is that of the saved weights on the whole split."""
    from wsss.data.transforms import eval_transforms
    from wsss.data.voc import VOCDataset

    cfg = tiny_cfg(bench, tmp_path, epochs=1, batch_size=2)
    launch_local(T.run, 2, cfg)
    log = engine.read_log(state_dir(tmp_path))
    assert len(log) == 1 and log[0]["step"] == 2 and np.isfinite(log[0]["loss/total"])
    model = T.load_segmenter(tmp_path, "cpu")
    loader = loaders.make_eval_loader(VOCDataset(bench, "val", transforms=eval_transforms(None)), 8,
                                collate_fn=list)
    assert evl.evaluate_miou(model, loader, torch.device("cpu"), 4)["val/miou"] == pytest.approx(log[0]["val/miou"])


# --------------------------------------------------------------------------- evaluation by hand

class Background(nn.Module):
    """Predicts background everywhere."""

    def __init__(self, num_outputs):
        super().__init__()
        self.num_outputs = num_outputs
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        logits = torch.zeros(x.shape[0], self.num_outputs, *x.shape[-2:])
        logits[:, 0] = 1.0
        return logits + self.dummy


def item(mask):
    mask = torch.as_tensor(mask)
    return {"image": tv_tensors.Image(torch.zeros(3, *mask.shape)), "mask": tv_tensors.Mask(mask.long())}


def test_evaluate_miou_by_hand_on_images_of_different_sizes():
    a = item([[0, 1], [1, 255]])               # 2 x 2
    b = item([[0, 0, 2], [0, 2, 2], [0, 0, 0]])  # 3 x 3
    c = item([[1, 0, 0]])                       # 1 x 3
    groups = evl.same_size_groups([a, b, item([[0, 0, 0], [0, 0, 0], [0, 0, 0]]), c])
    assert [len(g) for g in groups] == [1, 2, 1]
    result = evl.evaluate_miou(Background(3), [[a, b], [c]], torch.device("cpu"), 2)
    # background: 1 + 6 + 2 = 9 true pixels, predicted on all 3 + 9 + 3 = 15 valid pixels
    assert result["val/iou"] == pytest.approx([9 / 15, 0.0, 0.0])
    assert result["val/miou"] == pytest.approx(9 / 15 / 3)
    assert result["val/pixel_acc"] == pytest.approx(9 / 15)


# --------------------------------------------------------------------------- config

def test_config_fields_are_read_flags_parse_and_the_reference_builds():
    source = inspect.getsource(T) + inspect.getsource(training)  # the stage and its shared steps
    unread = [f.name for f in fields(T.SegmenterConfig) if f"cfg.{f.name}" not in source]
    assert not unread, f"SegmenterConfig fields never read by the stage: {unread}"
    parser = C.command_line(argparse.ArgumentParser(), T.SegmenterConfig)
    args = parser.parse_args(["--data-root", "D", "--run-dir", "R", "--no-amp", "--crop", "64", "--scale", "0.5",
                              "1.5", "--model", "deeplabv3_resnet50", "--max-steps", "7", "--val-split", "none",
                              "--masks-dir", "/abs/masks"])
    cfg = C.from_args(T.SegmenterConfig, args, parser=parser)
    assert (cfg.amp, cfg.crop, cfg.scale, cfg.model, cfg.max_steps, cfg.val_split, cfg.masks_dir) == \
        (False, 64, (0.5, 1.5), "deeplabv3_resnet50", 7, None, "/abs/masks")
    with pytest.raises(SystemExit):
        parser.parse_args(["--data-root", "D", "--run-dir", "R", "--model", "unet"])


def test_the_head_gets_10x_the_lr_only_on_a_pretrained_backbone():
    cfg = T.SegmenterConfig(data_root="d", run_dir="r")
    assert T.head_lr_mult(cfg) == 1.0
    assert T.head_lr_mult(T.SegmenterConfig(data_root="d", run_dir="r", pretrained_backbone="w.pth")) == 10.0
    assert T.head_lr_mult(T.SegmenterConfig(data_root="d", run_dir="r", pretrained_backbone="w.pth",
                                            new_lr_mult=3.0)) == 3.0
    groups = T.build_optimizer(cfg, T.build_model(cfg, 2)).param_groups
    assert [g["name"] for g in groups] == ["backbone", "new"] and groups[0]["lr"] == groups[1]["lr"] == cfg.lr
