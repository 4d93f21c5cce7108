"""The fully supervised segmentation network trained on pseudo masks (METHOD.md section 4).

``build_segmenter(name, num_classes_incl_bg)`` picks a model from :data:`SEGMENTERS`:
- "deeplabv3_resnet50" / "deeplabv3_resnet101": torchvision's DeepLabV3 (dilated ResNet,
  output stride 8, ASPP head). The paper trains DeepLab-LargeFOV on ResNet-101; DeepLabV3
  is the closest model torchvision ships. The ImageNet backbone is torchvision's ResNet
  (``pretrained_backbone="imagenet"``, from the torch hub cache) or a local state-dict file.
- "deeplabv3_efficientnet_lite0": the same ASPP head (torchvision's ``DeepLabHead``), after a
  1x1 reduction to 256 channels, on the repo's EfficientNet-Lite0 at output stride 16, with
  ImageNet weights from the installed package (``pretrained_backbone="imagenet"``): the art
  benchmark's segmenter on a CPU.
- "tiny": a small fully convolutional net (output stride 4, dilated context) that trains
  on 96 px images on a laptop CPU in a minute or two, for the embedded benchmark.
Every model maps images (B, 3, H, W) to logits (B, C, H, W) at the input size and has
``param_groups() -> (backbone_params, head_params)`` (the head usually gets 10x the lr); the
ones with an ImageNet backbone also ``load_backbone(weights, name)``.

:func:`segmentation_loss` is cross-entropy that ignores 255; :func:`predict` averages the
softmax over scales and horizontal flips (the reference tests at 0.5-1.5 with flips).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import segmentation
from torchvision.models.segmentation.deeplabv3 import DeepLabHead

from wsss.classes import IGNORE_INDEX
from wsss.models.backbones import BACKBONES, load_body_state, resolve_pretrained


class TinySegmenter(nn.Module):
    """Small FCN: two stride-2 stages (output stride 4), then dilated residual context.

    Receptive field about 130 px, so every pixel sees a whole 96 px benchmark image;
    about 0.24 GFLOPs per 96 px image forward (about 15-30 s per epoch of 600 such
    images on two CPU cores, forward and backward).
    """

    def __init__(self, num_classes: int, width: int = 32, context_width: int = 64,
                 dilations: Sequence[int] = (2, 4, 8), dropout: float = 0.1):
        super().__init__()
        self.stem = nn.Sequential(
            _conv_bn(3, width, stride=2), _conv_bn(width, width),
            _conv_bn(width, 2 * width, stride=2), _conv_bn(2 * width, 2 * width),
        )
        self.expand = _conv_bn(2 * width, context_width, kernel=1)
        self.context = nn.ModuleList(_conv_bn(context_width, context_width, dilation=d) for d in dilations)
        self.head = nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(context_width, num_classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.expand(self.stem(x))
        for block in self.context:
            features = features + block(features)
        logits = self.head(features)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(feature params, classifier params); nothing here is pretrained."""
        head = list(self.head.parameters())
        return [p for name, p in self.named_parameters() if not name.startswith("head.")], head


def _conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    padding = dilation * (kernel // 2)
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, padding, dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class TorchvisionSegmenter(nn.Module):
    """Wraps a torchvision segmentation model so that forward returns the logits tensor.

    torchvision's models return ``{"out": logits}``; ``.net`` is the wrapped model.
    Note: the ASPP image-pooling branch has BatchNorm on a 1x1 map, so training needs
    batches of two or more images.
    """

    def __init__(self, factory: Callable[..., nn.Module], num_classes: int):
        super().__init__()
        self.net = factory(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)["out"]

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(backbone params, head params): the pretrained ResNet and the new DeepLab head."""
        return list(self.net.backbone.parameters()), list(self.net.classifier.parameters())

    def load_backbone(self, weights: dict, name: str) -> None:
        """Load an ImageNet ResNet state dict into the backbone, strictly (its fc dropped)."""
        load_body_state(self.net.backbone, weights, f"{name} backbone")


class BackboneSegmenter(nn.Module):
    """DeepLabV3's ASPP head on a :mod:`wsss.models.backbones` body (output stride 16).

    A 1x1 convolution first reduces the body's channels to ``width`` (Lite0: 1280 -> 256):
    the ASPP's three 3x3 convolutions on 1280 channels would cost about four times the
    Lite0 body itself. The backbone's BatchNorm is frozen once ImageNet weights are loaded
    (as the classifier's is, ``Backbone.set_frozen``): CPU batches of a few crops give poor
    batch statistics.
    """

    def __init__(self, backbone: str, num_classes: int, width: int = 256):
        super().__init__()
        self.backbone = BACKBONES[backbone](output_stride=16)
        self.head = nn.Sequential(_conv_bn(self.backbone.out_channels, width, kernel=1),
                                  DeepLabHead(width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.backbone(x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(backbone params, head params): the pretrained body and the new ASPP head."""
        return list(self.backbone.backbone_parameters()), list(self.head.parameters())

    def load_backbone(self, weights: dict, name: str) -> None:
        """Load the body's ImageNet weights, then freeze its BatchNorm."""
        self.backbone.load_pretrained(weights)
        self.backbone.set_frozen(frozen_bn=True, freeze_body=False)


#: name -> constructor(num_classes_incl_bg)
SEGMENTERS: dict[str, Callable[[int], nn.Module]] = {
    "tiny": TinySegmenter,
    "deeplabv3_resnet50": partial(TorchvisionSegmenter, segmentation.deeplabv3_resnet50),
    "deeplabv3_resnet101": partial(TorchvisionSegmenter, segmentation.deeplabv3_resnet101),
    "deeplabv3_efficientnet_lite0": partial(BackboneSegmenter, "efficientnet_lite0"),
}


def build_segmenter(name: str, num_classes_incl_bg: int, pretrained_backbone: str | Path | None = None) -> nn.Module:
    """The segmentation model ``name`` with ``num_classes_incl_bg`` outputs (K + 1).

    ``pretrained_backbone``: "imagenet" (torchvision's ResNet weights in the torch hub cache,
    downloaded into it when missing and online; Lite0's from its installed package) or the
    path of a state dict of that backbone, loaded strictly (ImageNet classifier keys
    dropped); None leaves it randomly initialised. "tiny" has no pretrained weights.
    """
    if name not in SEGMENTERS:
        raise ValueError(f"unknown segmenter {name!r}; choose one of {sorted(SEGMENTERS)}")
    if num_classes_incl_bg < 2:
        raise ValueError(f"num_classes_incl_bg must count background plus at least one class, got {num_classes_incl_bg}")
    if name == "tiny" and pretrained_backbone is not None:
        raise ValueError("the 'tiny' segmenter has no pretrained backbone; pass pretrained_backbone=None")
    model = SEGMENTERS[name](num_classes_incl_bg)
    if pretrained_backbone is None:
        return model
    model.load_backbone(resolve_pretrained(name.removeprefix("deeplabv3_"), pretrained_backbone), name)
    return model


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Pixel-wise cross-entropy averaged over the pixels whose target is not 255.

    ``logits`` (B, C, H, W), ``target`` (B, H, W) integer labels. When every pixel is 255
    the loss is 0 (still attached to the graph, so backward works and gives zero
    gradients) instead of PyTorch's NaN for a mean over no pixels.
    """
    if logits.ndim != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(f"segmentation_loss: logits (B, C, H, W) {tuple(logits.shape)} and "
                         f"target (B, H, W) {tuple(target.shape)} do not match")
    target = target.long()
    total = F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX, reduction="sum")
    valid = (target != IGNORE_INDEX).sum().clamp(min=1)
    return total / valid


@torch.no_grad()
def predict(model: nn.Module, image: torch.Tensor, scales: Sequence[float] = (1.0,), flip: bool = False) -> torch.Tensor:
    """Softmax probabilities (B, C, H, W) averaged over ``scales`` and, with ``flip``, mirror images.

    ``image`` (B, 3, H, W) is the normalised input. Each scale s resizes it (bilinear)
    to round(s * H) x round(s * W); the logits are resized back to (H, W) and softmaxed;
    a flipped pass is flipped back before averaging. The model's train/eval mode is left
    as it is: call ``model.eval()`` first.
    """
    if image.ndim != 4:
        raise ValueError(f"predict: image must be (B, 3, H, W), got shape {tuple(image.shape)}")
    if not scales:
        raise ValueError("predict: scales is empty")
    size = image.shape[-2:]
    total, count = None, 0
    for scale in scales:
        scaled = image if scale == 1.0 else F.interpolate(
            image, size=(max(1, round(size[0] * scale)), max(1, round(size[1] * scale))),
            mode="bilinear", align_corners=False)
        for flipped in (False, True) if flip else (False,):
            logits = model(scaled.flip(-1)).flip(-1) if flipped else model(scaled)
            probs = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False).softmax(dim=1)
            total = probs if total is None else total + probs
            count += 1
    return total / count
