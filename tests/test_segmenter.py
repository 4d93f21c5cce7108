"""wsss.models.segmenter: segmentation models, the ignore-aware loss and multi-scale prediction."""

import pytest
import torch
from torch import nn

from wsss.models.segmenter import build_segmenter, predict, segmentation_loss


@pytest.mark.parametrize("name", ["tiny", "deeplabv3_resnet50", "deeplabv3_efficientnet_lite0"])
def test_output_is_logits_at_the_input_size(name):
    torch.manual_seed(0)
    model = build_segmenter(name, 6).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 6, 64, 64)
    backbone, head = model.param_groups()
    assert backbone and head
    assert len(backbone) + len(head) == len(list(model.parameters()))


def test_tiny_handles_sizes_not_divisible_by_its_stride_and_trains():
    torch.manual_seed(0)
    model = build_segmenter("tiny", 3)
    assert model(torch.randn(2, 3, 50, 37)).shape == (2, 3, 50, 37)
    x = 0.1 * torch.randn(2, 3, 32, 32)
    x[0, :, 8:24, 4:20] += 1.0
    x[1, :, 12:28, 14:30] += 1.0
    target = (x.mean(1) > 0.5).long()  # a bright square on a dark background
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(15):
        loss = segmentation_loss(model(x), target)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_loss_ignores_255_pixels():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5, 5)
    target = torch.randint(0, 4, (2, 5, 5))
    target[0, :2] = 255
    ignored = (target == 255).unsqueeze(1).expand_as(logits)
    changed = logits.clone()
    changed[ignored] = torch.randn(int(ignored.sum())) * 10
    torch.testing.assert_close(segmentation_loss(logits, target), segmentation_loss(changed, target))
    valid = target != 255
    expected = nn.functional.cross_entropy(logits.permute(0, 2, 3, 1)[valid], target[valid])
    torch.testing.assert_close(segmentation_loss(logits, target), expected)


def test_all_ignored_target_gives_zero_loss_with_a_gradient():
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    loss = segmentation_loss(logits, torch.full((1, 4, 4), 255))
    assert loss.item() == 0.0 and not torch.isnan(loss)
    loss.backward()
    assert logits.grad is not None and torch.all(logits.grad == 0)


def test_loss_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="do not match"):
        segmentation_loss(torch.randn(1, 3, 4, 4), torch.zeros(1, 5, 4, dtype=torch.long))


def test_backbone_loads_from_a_local_torchvision_resnet_file(tmp_path):
    reference = build_segmenter("deeplabv3_resnet50", 3)
    state = {k: torch.full_like(v, 0.5) if v.is_floating_point() else v
             for k, v in reference.net.backbone.state_dict().items()}
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)  # as in a resnet50 file
    path = tmp_path / "resnet50.pth"
    torch.save(state, path)
    model = build_segmenter("deeplabv3_resnet50", 3, pretrained_backbone=path)
    assert torch.all(model.net.backbone.conv1.weight == 0.5)
    assert torch.all(model.net.backbone.layer4[2].conv3.weight == 0.5)
    assert not torch.all(model.net.classifier[4].weight == 0.5)  # the head stays new


def test_missing_backbone_file_says_so(tmp_path):
    missing = tmp_path / "nope" / "resnet50.pth"
    with pytest.raises(FileNotFoundError, match="pretrained weights file not found") as err:
        build_segmenter("deeplabv3_resnet50", 3, pretrained_backbone=missing)
    assert str(missing) in str(err.value)


def test_imagenet_backbone_comes_from_the_torch_hub_cache(tmp_path, monkeypatch):
    reference = build_segmenter("deeplabv3_resnet101", 3)
    state = {k: torch.full_like(v, 0.25) if v.is_floating_point() else v
             for k, v in reference.net.backbone.state_dict().items()}
    path = tmp_path / "checkpoints" / "resnet101-63fe2227.pth"   # torchvision's IMAGENET1K_V1 file name
    path.parent.mkdir()
    torch.save(state, path)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("downloads"))
    model = build_segmenter("deeplabv3_resnet101", 3, pretrained_backbone="imagenet")
    assert torch.all(model.net.backbone.layer3[22].conv2.weight == 0.25)


def test_wrong_file_and_names_are_refused(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "bogus.weight": torch.zeros(1)}, path)
    with pytest.raises(RuntimeError, match="other.pth do not fit the deeplabv3_resnet50 backbone"):
        build_segmenter("deeplabv3_resnet50", 3, pretrained_backbone=path)
    with pytest.raises(ValueError, match="unknown segmenter"):
        build_segmenter("unet", 3)
    with pytest.raises(ValueError, match="tiny"):
        build_segmenter("tiny", 3, pretrained_backbone=path)


class Pointwise(nn.Module):
    """A 1x1 conv: commutes with flips (and, on a constant image, with rescaling)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.conv(x)


def test_predict_is_a_distribution_and_flip_is_a_no_op_on_a_flip_equivariant_model():
    model = Pointwise().eval()
    image = torch.randn(2, 3, 16, 20)
    plain = predict(model, image)
    flipped = predict(model, image, flip=True)
    assert plain.shape == (2, 4, 16, 20)
    torch.testing.assert_close(plain.sum(1), torch.ones(2, 16, 20))
    torch.testing.assert_close(flipped, plain)
    torch.testing.assert_close(plain, model(image).softmax(1))


def test_predict_averages_scales_and_flips():
    constant = torch.ones(1, 3, 12, 12) * torch.tensor([0.5, -1.0, 2.0]).view(1, 3, 1, 1)
    model = Pointwise().eval()
    multi = predict(model, constant, scales=(0.5, 1.0, 1.5), flip=True)
    torch.testing.assert_close(multi, predict(model, constant))

    # a model that is not flip-equivariant: the flipped pass differs and is averaged in
    class LeftRamp(nn.Module):
        def forward(self, x):
            ramp = torch.linspace(-3, 3, x.shape[-1]).view(1, 1, 1, -1)
            return torch.cat([ramp, -ramp], 1).expand(x.shape[0], 2, x.shape[-2], x.shape[-1])

    image = torch.randn(1, 3, 8, 8)
    assert torch.all(predict(LeftRamp(), image)[:, 0, :, -1] > 0.99)
    torch.testing.assert_close(predict(LeftRamp(), image, flip=True), torch.full((1, 2, 8, 8), 0.5))


def test_lite_segmenter_loads_imagenet_weights_and_freezes_batchnorm():
    from wsss.models.backbones import build_backbone

    model = build_segmenter("deeplabv3_efficientnet_lite0", 4, pretrained_backbone="imagenet")
    reference = build_backbone("efficientnet_lite0", "imagenet", output_stride=16)
    assert torch.equal(model.backbone.body.head[0].weight, reference.body.head[0].weight)
    model.train()
    assert not model.backbone.body.stem[1].training and model.head[0][1].training  # body BN frozen, the head's trains
    backbone, head = model.param_groups()
    assert all(p.requires_grad for p in backbone + head) and len(head) > 0
    assert not any(p is q for p in backbone for q in model.backbone.body.stem[1].parameters())
    x = torch.randn(2, 3, 40, 56)
    assert model(x).shape == (2, 4, 40, 56)
