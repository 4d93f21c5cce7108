"""Feature extractors for the co-attention classifier (METHOD.md sec. 1).

A backbone maps images (B, 3, H, W) to features F (B, C, H/s, W/s) with output stride
s in {8, 16}. Every backbone here is an ``nn.Module`` with

- ``.out_channels``: C,
- ``.output_stride``: s,
- ``backbone_parameters()``: the body whose weights a pretrained checkpoint provides
  (base learning rate; for ``tiny``, which is always trained from scratch, this is the
  whole network so that the learning-rate recipe means the same thing for every
  backbone),
- ``extra``: layers added on top of the body (new layers: 10x learning rate),
- ``load_pretrained(path)``: strict loading of a torchvision state dict.

They are chosen by name from the plain dict ``BACKBONES`` (no registry). Nothing ever
downloads: ``pretrained`` is a local file or ``"hub"`` (the file torchvision would have
put in the torch hub cache), and a missing file raises ``FileNotFoundError`` that says
how to get it.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import torch
import torchvision
from torch import nn

log = logging.getLogger(__name__)

OUTPUT_STRIDES = (8, 16)

#: torchvision weights whose files ``pretrained="hub"`` looks for, in order.
HUB_WEIGHTS = {
    "vgg16": ("VGG16_Weights.IMAGENET1K_V1",),
    "resnet50": ("ResNet50_Weights.IMAGENET1K_V1", "ResNet50_Weights.IMAGENET1K_V2"),
    "resnet101": ("ResNet101_Weights.IMAGENET1K_V1", "ResNet101_Weights.IMAGENET1K_V2"),
}

#: Checkpoint key prefixes that belong to the ImageNet classifier, not the body.
_HEAD_PREFIXES = ("fc.", "classifier.")


# --------------------------------------------------------------------------- helpers
def _weights_url(enum_path: str) -> str:
    """URL of a torchvision weights enum member given as 'ClassName.MEMBER'."""
    cls_name, member = enum_path.split(".")
    return getattr(getattr(torchvision.models, cls_name), member).url


def hub_checkpoint_paths(name: str) -> list[Path]:
    """Files in ``torch.hub.get_dir()/checkpoints`` where torchvision keeps ``name``'s weights."""
    ckpt_dir = Path(torch.hub.get_dir()) / "checkpoints"
    return [ckpt_dir / _weights_url(w).rsplit("/", 1)[-1] for w in HUB_WEIGHTS.get(name, ())]


def resolve_pretrained(name: str, pretrained: str | Path) -> Path:
    """Turn ``pretrained`` (a file path or ``"hub"``) into an existing file, or raise.

    Raises FileNotFoundError naming the path(s) looked at and how to fetch the file.
    """
    if str(pretrained) == "hub":
        candidates = hub_checkpoint_paths(name)
        if not candidates:
            raise FileNotFoundError(f"backbone {name!r} has no torchvision weights; pass a local "
                                    f"state-dict file or pretrained=None")
        for path in candidates:
            if path.is_file():
                return path
        url = _weights_url(HUB_WEIGHTS[name][0])
        raise FileNotFoundError(
            f"pretrained='hub' but no {name} weights in the torch hub cache (looked for "
            f"{', '.join(str(p) for p in candidates)}). Nothing is downloaded automatically: fetch "
            f"{url} into {candidates[0].parent} (e.g. `wget -P {candidates[0].parent} {url}`), "
            f"or pass the local file path as pretrained.")
    path = Path(pretrained).expanduser()
    if not path.is_file():
        hint = (f" The torchvision ImageNet weights for {name} are at {_weights_url(HUB_WEIGHTS[name][0])}."
                if name in HUB_WEIGHTS else "")
        raise FileNotFoundError(f"pretrained weights file not found: {path}. Download it and pass its path (or "
                                f"pretrained='hub' after putting it in the torch hub cache).{hint}")
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


def load_body_state(body: nn.Module, path: Path, what: str = "backbone", ignore_prefixes=_HEAD_PREFIXES) -> None:
    """Load ``path`` into ``body`` strictly, ignoring the ImageNet classifier keys.

    Every parameter and buffer of ``body`` must be in the file and the file may hold
    nothing else except keys under ``ignore_prefixes``.
    """
    state = {k: v for k, v in read_state_dict(path).items() if not k.startswith(ignore_prefixes)}
    load_weights(body, state, path, what)
    log.info("loaded pretrained backbone weights from %s", path)


class WeightsError(RuntimeError):
    """Weights that do not fit the model they are loaded into (the CLI prints one line)."""


def load_weights(module: nn.Module, state: dict, source, what: str) -> None:
    """``module.load_state_dict(state)``, strictly; weights that do not fit raise one short
    RuntimeError naming ``source`` and counting the keys (not torch's line per tensor)."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        example = (f"{shapes[0]} is {tuple(state[shapes[0]].shape)} there, {tuple(own[shapes[0]].shape)} here"
                   if shapes else f"{(missing or unexpected)[0]!r} is {'missing' if missing else 'unexpected'}")
        raise WeightsError(f"weights in {source} do not fit the {what}: {len(shapes)} tensor(s) of another shape, "
                           f"{len(missing)} missing, {len(unexpected)} unexpected (e.g. {example}); they are "
                           f"from another architecture: pass weights of this one")
    module.load_state_dict(state)


class Backbone(nn.Module):
    """Common interface: ``body`` (pretrainable) + ``extra`` (new layers)."""

    out_channels: int
    output_stride: int

    def __init__(self, output_stride: int) -> None:
        super().__init__()
        if output_stride not in OUTPUT_STRIDES:
            raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES}, got {output_stride}")
        self.output_stride = output_stride
        self.extra: nn.Module = nn.Identity()

    def body_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.extra(self.body_forward(x))

    def body_modules(self) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.body_modules().parameters() if p.requires_grad)

    def load_pretrained(self, path: str | Path) -> None:
        load_body_state(self.body_modules(), Path(path), what=type(self).__name__)


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
    """torchvision ResNet-50/101 up to layer4 (2048 channels), dilated for stride 8/16.

    ``frozen_bn``: BatchNorm layers stay in eval mode with their affine parameters
    frozen (the usual choice with ImageNet weights and a few images per batch; it also
    makes a sample's features independent of its batch). Default: frozen when
    pretrained weights are loaded, trained otherwise.
    """

    def __init__(self, depth: int = 50, output_stride: int = 8) -> None:
        super().__init__(output_stride)
        dilate = [False, output_stride == 8, True]
        net = getattr(torchvision.models, f"resnet{depth}")(weights=None, replace_stride_with_dilation=dilate)
        self.body = nn.Sequential(OrderedDict(list(net.named_children())[:-2]))  # conv1 ... layer4
        self.out_channels = 2048
        self.frozen_bn = False

    def load_pretrained(self, path: str | Path) -> None:
        super().load_pretrained(path)
        self.frozen_bn = True
        self.train(self.training)

    def train(self, mode: bool = True) -> "ResNetBackbone":
        super().train(mode)
        if self.frozen_bn:
            for m in self.body.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
                    m.requires_grad_(False)
        return self

    def body_modules(self) -> nn.Module:
        return self.body


# --------------------------------------------------------------------------- builders
BACKBONES: dict[str, Callable[..., Backbone]] = {
    "tiny": TinyBackbone,
    "vgg16": VGG16Backbone,
    "resnet50": partial(ResNetBackbone, 50),
    "resnet101": partial(ResNetBackbone, 101),
}


def build_backbone(name: str, pretrained: str | Path | None = None, output_stride: int = 8) -> Backbone:
    """Build backbone ``name`` (a key of BACKBONES) without downloading anything.

    pretrained: None (random init), a local state-dict file of the torchvision model
    (classifier/fc keys ignored, every body key required), or "hub" for torchvision's
    file in the torch hub cache. A missing file raises FileNotFoundError.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    backbone = BACKBONES[name](output_stride=output_stride)  # refuses a stride it does not have
    if pretrained is not None:
        backbone.load_pretrained(resolve_pretrained(name, pretrained))
    return backbone
