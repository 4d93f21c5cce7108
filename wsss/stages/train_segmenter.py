"""Stage 4: train a fully supervised segmenter on the pseudo masks (METHOD.md section 4).

``run(cfg)`` trains a model of :mod:`wsss.models.segmenter` on (image, pseudo mask)
pairs: the images of ``split`` from the dataset, the masks from RUN/pseudo/NAME.png
(written by :mod:`wsss.stages.pseudo_masks`; 255 pixels are ignored by the loss). Joint
random scale / crop / flip, SGD with the head at ``new_lr_mult`` x lr, poly decay per
step; the mean IoU over K + 1 classes on ``val_split`` (ground truth, one confusion
matrix over the split, single scale) after every epoch. Files:

    RUN/config_segmenter.yaml      every setting of this stage
    RUN/segmenter_train/           resumable state: checkpoint_last.pt and log.jsonl (one
                                   JSON line per epoch: loss/total, lr/GROUP, val/miou, seconds);
                                   rerunning the same RUN continues from it
    RUN/segmenter.pt               final weights + config + class names (``load_segmenter``)
    RUN/metrics_segmenter.json     final val mIoU, per-class IoU, per-epoch history

The loop, checkpoints (with RNG states, written atomically), resume, the non-finite loss
guard, bf16 autocast and DDP are :mod:`wsss.engine`'s, exactly as for the classifier
(:mod:`wsss.stages.train_classifier`). Under ``torchrun --nproc_per_node=N`` each process
takes ``batch_size`` images per step; BatchNorm is synchronised across GPUs (``sync_bn``).

``masks_dir`` may point anywhere, e.g. at the dataset's SegmentationClass folder to train
on ground truth (the fully supervised upper bound).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from wsss import config as C
from wsss import distributed, engine, loaders, lr_schedule
from wsss import rundir as R
from wsss.data.voc import PseudoMaskDataset, VOCDataset
from wsss.evaluation import evaluate_miou
from wsss.files import check_current
from wsss.models.segmenter import build_segmenter, segmentation_loss
from wsss.stages import training

log = logging.getLogger(__name__)


@dataclass
class SegmenterConfig(training.TrainingSettings):
    """Settings of stage 4. Defaults suit the embedded demo benchmark on a CPU; the
    reference settings on PASCAL VOC are the segmenter section of configs/voc_vgg16.yaml.

    Calibration on the demo benchmark (1000 train images of 96 px, ground-truth masks as
    the training masks, i.e. the fully supervised upper bound): with these settings and
    ``epochs=12`` the val mIoU is 0.41 after 6 epochs and 0.64 after 12, at about 15 s of
    CPU time per epoch on one thread; a 10x head (0.11 after 6 epochs at lr 1e-2) and
    ``lr=0.1`` (0.09) fail to train the from-scratch "tiny" model.
    """

    data_root: str = C.setting(help="dataset root in VOC layout")
    run_dir: str = C.setting(help="run directory (pseudo masks in, segmenter.pt out)")
    split: str = C.setting("train", "training split (ImageSets/Segmentation/SPLIT.txt)")
    masks_dir: str = C.setting(
        R.PSEUDO, "training masks: a folder inside the run directory (pseudo) or an absolute path")
    val_split: str | None = C.setting("val", "split with ground truth for the per-epoch mIoU ('none' to skip)")
    # model
    model: Literal["tiny", "deeplabv3_resnet50", "deeplabv3_resnet101", "deeplabv3_efficientnet_lite0"] = C.setting(
        "tiny", "tiny | deeplabv3_resnet50 | deeplabv3_resnet101 | deeplabv3_efficientnet_lite0")
    pretrained_backbone: str | None = C.setting(
        None, "DeepLab backbone weights: imagenet (ResNet: torchvision's file in the torch hub cache; Lite0: its "
              "installed package) or a local state-dict file of that backbone; none = from scratch")
    # data
    crop: int = C.setting(96, "training crop, pixels (padded with ignore where the image is smaller)", allowed=">= 16")
    scale: tuple[float, ...] = C.setting((0.7, 1.3), "random rescale range (low high)", allowed="> 0")
    flip: bool = C.setting(True, "random horizontal flips")
    jitter: float = C.setting(0.0, "colour jitter strength (0 = off)", allowed=">= 0")
    batch_size: int = C.setting(8, "images per step per process", allowed=">= 1")
    eval_batch_size: int = C.setting(
        16, "images per val batch (images of different sizes are run apart)", allowed=">= 1")
    # optimisation (momentum, weight decay: training.TrainingSettings)
    lr: float = C.setting(3e-2, "base learning rate (backbone)", allowed="> 0")
    new_lr_mult: float | None = C.setting(
        None, "learning-rate multiplier of the head (none: 10 with a pretrained backbone, else 1)", allowed="> 0")
    schedule: Literal["poly", "step", "constant"] = C.setting(
        "poly", "learning-rate decay per step: poly, step (x0.1 at step_epochs) or constant")
    poly_power: float = C.setting(0.9, "power of the poly decay (1 - step / total) ** power", allowed="> 0")
    step_epochs: tuple[int, ...] = C.setting(
        (), "epochs at which the step schedule divides the lr by 10", allowed=">= 0")
    # epochs, max_steps, momentum, weight_decay, seed and the machinery: training.TrainingSettings
    sync_bn: bool = C.setting(True, "synchronise BatchNorm across GPUs under DDP")


# =========================================================================== data

def _datasets(cfg: SegmenterConfig) -> tuple[PseudoMaskDataset, VOCDataset | None]:
    from wsss.data.transforms import eval_transforms, train_transforms

    masks_dir = Path(cfg.run_dir) / cfg.masks_dir  # an absolute masks_dir stays as it is
    train_tf = train_transforms(crop=cfg.crop, scale=training.scale_range(cfg), flip=cfg.flip, jitter=cfg.jitter)
    train = PseudoMaskDataset(cfg.data_root, cfg.split, masks_dir, transforms=train_tf)
    train.check_files()  # the images and their ground-truth masks; the pseudo-masks are the run's own
    val = training.val_dataset(cfg, eval_transforms(None), train, with_mask=True)
    return train, val


def _masks_settings(cfg: SegmenterConfig) -> dict | None:
    """What the pseudo-masks were made with (their folder's settings.json), or None."""
    path = Path(cfg.run_dir) / cfg.masks_dir / R.SETTINGS
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _state_inputs(run_dir: Path):
    """The masks' settings recorded in the training checkpoint, or None when there is none."""
    path = run_dir / R.SEGMENTER_STATE / R.CHECKPOINT
    if not path.is_file():
        return None
    return (torch.load(path, map_location="cpu", weights_only=False).get("extra") or {}).get("inputs")


# =========================================================================== model and loss

def build_model(cfg: SegmenterConfig, num_classes: int) -> nn.Module:
    """The segmenter with K + 1 outputs (background + ``num_classes``)."""
    return build_segmenter(cfg.model, num_classes + 1, cfg.pretrained_backbone)


def head_lr_mult(cfg: SegmenterConfig) -> float:
    """``new_lr_mult``, or when None: 10 for a new head on a pretrained backbone (the DeepLab
    recipe), 1 when everything starts from scratch (a 10x head then destabilises training)."""
    if cfg.new_lr_mult is not None:
        return float(cfg.new_lr_mult)
    return 10.0 if cfg.pretrained_backbone else 1.0


def build_optimizer(cfg: SegmenterConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD over (backbone: lr, head: head_lr_mult x lr) (METHOD.md section 4)."""
    backbone, head = model.param_groups()
    groups = lr_schedule.param_groups(backbone, head, cfg.lr, cfg.weight_decay, head_lr_mult(cfg))
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def step_fn(model: nn.Module, batch: dict, epoch: int) -> dict:
    """Loss terms of one batch: cross-entropy over the pixels whose mask is not 255."""
    return {"total": segmentation_loss(model(batch["image"]), batch["mask"])}


# =========================================================================== the stage

def run(cfg: SegmenterConfig | dict) -> dict:
    """Train (or resume) the segmenter; returns the final metrics (``val_miou``, ``val_iou``,
    ``val_pixel_acc``, ``epochs``, ``steps``, ``train_loss``, ``seconds_per_epoch``, ``seconds``, ...)."""
    return training.run(C.from_dict(SegmenterConfig, cfg) if isinstance(cfg, dict) else cfg, _run)


def state(cfg: SegmenterConfig | dict) -> tuple[str, str]:
    """What ``run(cfg)`` would do ("keep", "resume", "recompute" or "run") and why; reads RUN only."""
    cfg = C.from_dict(SegmenterConfig, cfg) if isinstance(cfg, dict) else cfg
    return training.state(cfg, "segmenter", _masks_settings(cfg))


def _run(cfg: SegmenterConfig, dist: distributed.DistInfo, t_start: float) -> dict:
    run_dir = Path(cfg.run_dir)
    inputs = _masks_settings(cfg)
    check_current(inputs, (run_dir / cfg.masks_dir).parent, f"the pseudo-masks in {run_dir / cfg.masks_dir}",
                  f"make the maps and pseudo-masks again (python -m wsss make-maps / pseudo-masks --data-root "
                  f"{cfg.data_root} --run-dir {run_dir} --overwrite), then train the segmenter")
    if (done := training.finished(cfg, "segmenter", dist, inputs)) is not None:
        return done
    resume = cfg.resume
    if resume and _state_inputs(run_dir) not in (None, inputs):
        if dist.is_main:
            log.warning("segmenter: the pseudo-masks changed since %s was written (their settings.json differs); "
                        "training again from scratch", run_dir / R.SEGMENTER_STATE)
        resume = False
    device, channels_last = training.start(cfg, "segmenter", dist)

    if cfg.model.startswith("deeplabv3") and cfg.batch_size < 2:
        raise ValueError(f"model={cfg.model} needs batch_size >= 2 per process: the BatchNorm of its ASPP "
                         f"image-pooling branch sees one value per image (got batch_size={cfg.batch_size})")
    train, val = _datasets(cfg)
    loaders.seed_everything(cfg.seed)  # same initial weights on every rank
    model = build_model(cfg, train.num_classes).to(device)
    if cfg.sync_bn and dist.enabled and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg, model)
    scheduler, spe, total = training.schedule(cfg, optimizer, len(train), dist, power=cfg.poly_power)
    ddp_model = distributed.wrap_ddp(model, device, dist, find_unused_parameters=False)
    if dist.is_main:
        log.info("segmenter %s: %d %s images (masks %s), %d val images, %d classes + background, "
                 "%d steps/epoch x %d epochs (%d steps) on %s%s", cfg.model, len(train), cfg.split, train.masks_dir,
                 len(val) if val is not None else 0, train.num_classes, spe, cfg.epochs, total, device,
                 f" x {dist.world_size} processes" if dist.enabled else "")

    evaluate = training.evaluator(evaluate_miou, cfg, val, device, channels_last, dist, collate_fn=list,
                                  num_classes=train.num_classes)
    state_dir = run_dir / R.SEGMENTER_STATE
    resumable = partial(training.check_resumable, new=C.to_dict(cfg), path=state_dir / R.CHECKPOINT)
    history = engine.fit(ddp_model, optimizer, scheduler, train, step_fn, run_dir=state_dir,
                         cfg=C.to_dict(cfg), epochs=cfg.epochs, batch_size=cfg.batch_size, seed=cfg.seed,
                         device=device, dist=dist, max_steps=cfg.max_steps, amp=cfg.amp, channels_last=channels_last,
                         workers=cfg.workers, evaluate=evaluate, log_every=cfg.log_every, ckpt_every=cfg.ckpt_every,
                         resume=resume, extra={"class_names": list(train.class_names), "inputs": inputs},
                         desc="segmenter", check_resumable=resumable)
    if dist.is_main and any(r.get("loss/total") == 0.0 for r in history):
        log.warning("the training loss was exactly 0 in some epoch: every pixel of its masks is 255 (ignored), "
                    "so the segmenter learned nothing there; check the masks in %s (the pseudo-mask stage "
                    "reports num_all_ignored)", train.masks_dir)
    last = history[-1] if history else {}
    metrics = {"val_miou": last.get("val/miou"), "val_pixel_acc": last.get("val/pixel_acc"),
               "val_iou": dict(zip(["background", *train.class_names], last["val/iou"])) if "val/iou" in last else None,
               **training.summary(history, t_start, "val/iou")}
    training.save(cfg, "segmenter", dist, model, train.class_names, metrics, f"val mIoU {metrics['val_miou']}",
                  inputs=inputs)
    return metrics


# =========================================================================== loading

def load_segmenter(run_dir_or_path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The trained segmenter of a run (eval mode, on ``device``): maps normalised images
    (B, 3, H, W) to logits (B, K + 1, H, W); ``.class_names`` (K foreground names) and
    ``.train_config`` (SegmenterConfig) are attached."""
    # the stored weights replace the backbone's initialisation
    return training.load_trained(run_dir_or_path, "segmenter", SegmenterConfig, build_model, device, "model",
                                 pretrained_backbone=None)
