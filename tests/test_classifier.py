"""Backbones, the co-attention classifier and the shared backbone pass of self-pairs."""

import pytest
import torch
import torchvision
from torch import nn

from wsss.data.pairs import self_pair_views
from wsss.losses import LossConfig, loss_terms
from wsss.models import BACKBONES, CoAttentionClassifier, build_backbone
from wsss.models.classifier import gap, top_mean
from wsss.models.coattention import co_attention

K = 3


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return CoAttentionClassifier(K, backbone="tiny", **kw).double().train()


def _images(b=2, size=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 3, size, size, generator=g, dtype=torch.float64),
            torch.randn(b, 3, size, size, generator=g, dtype=torch.float64))


def _flat(out, prefix=""):
    for k, v in out.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}.")
        else:
            yield prefix + k, v


# ----------------------------------------------------------------------- backbones
@pytest.mark.parametrize("name, stride", [(name, stride) for name in ("tiny", "vgg16", "resnet50", "efficientnet_lite0")
                                          for stride in (8, 16, 32) if stride < 32 or name in ("resnet50",
                                                                                               "efficientnet_lite0")])
def test_backbone_output_stride(name, stride):
    net = build_backbone(name, output_stride=stride).eval()
    with torch.no_grad():
        y = net(torch.randn(1, 3, 64, 64))
    assert y.shape == (1, net.out_channels, 64 // stride, 64 // stride)
    assert net.output_stride == stride
    assert net.out_channels == {"tiny": 128, "vgg16": 512, "resnet50": 2048, "efficientnet_lite0": 1280}[name]


def test_unknown_backbone_and_stride():
    with pytest.raises(ValueError, match="choose one of"):
        build_backbone("alexnet")
    with pytest.raises(ValueError, match="output_stride"):
        build_backbone("tiny", output_stride=32)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_class_refuses_a_stride_it_does_not_have(name):
    with pytest.raises(ValueError, match="output_stride must be one of"):
        BACKBONES[name](output_stride=4)


def test_resnet_pretrained_from_file_and_imagenet(tmp_path, monkeypatch):
    ref = torchvision.models.resnet50(weights=None)
    nn.init.normal_(ref.layer4[2].conv3.weight)
    hub = tmp_path / "hub"
    path = hub / "checkpoints" / "resnet50-0676ba61.pth"
    path.parent.mkdir(parents=True)
    torch.save(ref.state_dict(), path)   # includes fc.*, which is ignored
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("downloads a cached file"))
    for pretrained in (str(path), "imagenet"):
        net = build_backbone("resnet50", pretrained=pretrained)
        torch.testing.assert_close(net.body.layer4[2].conv3.weight, ref.layer4[2].conv3.weight)
        torch.testing.assert_close(net.body.bn1.running_var, ref.bn1.running_var)
        net.train()   # pretrained ResNet: BatchNorm frozen (eval mode, no grad)
        assert all(not m.training for m in net.modules() if isinstance(m, nn.BatchNorm2d))
        assert not any(p is net.body.bn1.weight for p in net.backbone_parameters())


def test_vgg16_pretrained_strict_keys(tmp_path):
    feats = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
    state = {f"features.{k}": v for k, v in feats.state_dict().items()}
    path = tmp_path / "vgg.pth"
    torch.save({**state, "classifier.6.weight": torch.zeros(10, 4)}, path)
    net = build_backbone("vgg16", pretrained=path)
    torch.testing.assert_close(net.features[28].weight, feats[28].weight)
    assert net.features[28].dilation == (2, 2)
    del state["features.0.bias"]
    torch.save(state, path)
    with pytest.raises(RuntimeError, match="vgg.pth"):
        build_backbone("vgg16", pretrained=path)
    torch.save({**state, "features.0.bias": torch.zeros(64), "extra.weight": torch.zeros(1)}, path)
    with pytest.raises(RuntimeError, match="0 missing, 1 unexpected"):
        build_backbone("vgg16", pretrained=path)


def test_weights_of_another_architecture_give_one_short_message(tmp_path):
    from wsss.models.backbones import TinyBackbone

    torch.save(TinyBackbone(width=16).state_dict(), tmp_path / "narrow.pth")
    with pytest.raises(RuntimeError, match=r"narrow.pth do not fit the TinyBackbone: 21 tensor\(s\) of another "
                                           r"shape, 0 missing, 0 unexpected \(e.g. body.0.0.weight is \(16, 3, 3, 3\)"
                                           r" there, \(32, 3, 3, 3\) here\)") as err:
        build_backbone("tiny", pretrained=tmp_path / "narrow.pth")
    assert len(str(err.value)) < 400
    from wsss import cli

    assert cli.classify_error(err.value) == ("run", str(err.value))  # one line, exit code 4, no traceback


def test_tiny_loads_its_own_state_dict(tmp_path):
    src = build_backbone("tiny")
    torch.save(src.state_dict(), tmp_path / "tiny.pth")
    net = build_backbone("tiny", pretrained=tmp_path / "tiny.pth")
    torch.testing.assert_close(net.body[3][1][0].weight, src.body[3][1][0].weight)


def test_missing_weights_raise_clear_error(tmp_path, monkeypatch):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_backbone("vgg16", pretrained=missing)
    with pytest.raises(FileNotFoundError, match="no ImageNet weights"):
        build_backbone("tiny", pretrained="imagenet")


def test_imagenet_offline_without_the_cached_file_is_one_line(tmp_path, monkeypatch):
    """pretrained='imagenet' for a torchvision backbone downloads into the torch hub cache as
    torchvision does; offline, the error names the URL and the file (never downloads here)."""
    import urllib.error

    from wsss import cli

    def offline(url, dst, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(FileNotFoundError) as err:
        build_backbone("resnet101", pretrained="imagenet")
    message = str(err.value)
    assert "\n" not in message and "could not be downloaded" in message
    assert "https://download.pytorch.org/models/resnet101-63fe2227.pth" in message
    assert str(tmp_path / "checkpoints" / "resnet101-63fe2227.pth") in message
    assert cli.classify_error(err.value) == ("run", message)  # one line, exit code 4, as other weight errors


def test_imagenet_online_downloads_into_the_torch_hub_cache(tmp_path, monkeypatch):
    calls = []

    def fake_download(url, dst, hash_prefix=None, progress=True):  # what torch.hub would fetch
        calls.append((url, dst, hash_prefix))
        torch.save(torchvision.models.resnet50(weights=None).state_dict(), dst)

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    build_backbone("resnet50", pretrained="imagenet")
    build_backbone("resnet50", pretrained="imagenet")  # the second time from the cache
    assert calls == [("https://download.pytorch.org/models/resnet50-0676ba61.pth",
                      str(tmp_path / "checkpoints" / "resnet50-0676ba61.pth"), "0676ba61")]


# ----------------------------------------------------------------------- classifier
def test_pair_outputs_follow_method():
    model = _model()
    x_m, x_n = _images()
    out = model(x_m, x_n, self_pairs=False)
    with torch.no_grad():
        f_m, f_n = model.backbone(x_m), model.backbone(x_n)
        co_m, co_n = co_attention(f_m, f_n, model.coatt.weight, impl="explicit")
        for side, f, co in (("m", f_m, co_m), ("n", f_n, co_n)):
            gate = torch.sigmoid(model.gate(co))
            torch.testing.assert_close(out[f"S_{side}"], model.phi0(f))
            torch.testing.assert_close(out[f"S_co_{side}"], model.phi(co))
            torch.testing.assert_close(out[f"B_{side}"], gate)
            torch.testing.assert_close(out[f"S_con_{side}"], model.phi(f * (1 - gate)))
            assert ((gate >= 0) & (gate <= 1)).all()
            for kind in ("", "co_", "con_"):
                torch.testing.assert_close(out[f"s_{kind}{side}"], gap(out[f"S_{kind}{side}"]))
    assert out["s_m"].shape == (2, K) and out["B_m"].shape == (2, 1, 4, 4)
    assert "self" not in out


def test_top_r_pooling_matches_a_sorting_reference():
    """s^{m∩n} with coatt_pool_share r: per sample and class the mean of the round(r·hw)
    largest scores (at least one); r = 1 is GAP; only the co-attention scores change."""
    maps = torch.randn(2, K, 4, 5, dtype=torch.float64)
    for share in (0.05, 0.25, 0.5, 1.0):
        k = max(1, round(share * 20))
        ref = torch.tensor([[sorted(maps[b, c].flatten().tolist(), reverse=True)[:k] for c in range(K)]
                            for b in range(2)], dtype=torch.float64).mean(dim=2)
        torch.testing.assert_close(top_mean(maps, share), ref)
    assert torch.equal(top_mean(maps, 1.0), gap(maps))
    x_m, x_n = _images()
    plain, top = _model()(x_m, x_n, self_pairs=False), _model(coatt_pool_share=0.25)(x_m, x_n, self_pairs=False)
    for side in ("m", "n"):
        torch.testing.assert_close(top[f"s_co_{side}"], top_mean(top[f"S_co_{side}"], 0.25))
        torch.testing.assert_close(top[f"S_co_{side}"], plain[f"S_co_{side}"])
        for kind in ("", "con_"):
            torch.testing.assert_close(top[f"s_{kind}{side}"], plain[f"s_{kind}{side}"])


def test_self_pairs_pair_x_m_with_its_views():
    model = _model().eval()
    x_m, x_n = _images()
    with torch.no_grad():
        out = model(x_m, x_n)
        views = self_pair_views(x_m)
        assert set(out["self"]) == {"flip", "down", "up"}
        for name, v in views.items():
            torch.testing.assert_close(out["self"][name]["S_m"], model.cam(x_m))
            torch.testing.assert_close(out["self"][name]["S_n"], model.cam(v))
            torch.testing.assert_close(out["self"][name]["S_co_m"], model.coatt_cam(x_m, v))
    assert out["self"]["up"]["S_n"].shape[-1] == 8 and out["self"]["down"]["S_n"].shape[-1] == 3


def test_shared_equals_per_pair_in_train_mode():
    """Loss and every gradient agree; the shared pass feeds 5B images instead of 8B."""
    x_m, x_n = _images(b=2, size=32)
    l_m = torch.tensor([[1, 0, 1], [0, 1, 0]], dtype=torch.float64)
    l_n = torch.tensor([[1, 1, 0], [0, 1, 1]], dtype=torch.float64)
    results = []
    for shared in (True, False):
        model = _model(seed=5)
        seen = []
        model.backbone.register_forward_hook(lambda m, inp, o: seen.append(inp[0].shape[0]))
        out = model(x_m, x_n, shared=shared)
        loss = loss_terms(out, l_m, l_n, LossConfig(con_warmup_epochs=0), epoch=0)["total"]
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        results.append((dict(_flat(out)), loss.detach(), grads, sum(seen)))
    (out_s, loss_s, grad_s, n_s), (out_p, loss_p, grad_p, n_p) = results
    assert (n_s, n_p) == (5 * 2, 8 * 2)
    torch.testing.assert_close(loss_s, loss_p, rtol=1e-12, atol=1e-12)
    assert out_s.keys() == out_p.keys()
    for k in out_s:
        torch.testing.assert_close(out_s[k], out_p[k], rtol=1e-10, atol=1e-12)
    for k in grad_s:
        assert grad_s[k] is not None, k
        torch.testing.assert_close(grad_s[k], grad_p[k], rtol=1e-9, atol=1e-12)


def test_fused_and_explicit_models_agree():
    torch.manual_seed(0)
    fused = CoAttentionClassifier(K, coatt_impl="fused").eval()
    explicit = CoAttentionClassifier(K, coatt_impl="explicit").eval()
    explicit.load_state_dict(fused.state_dict())
    x_m, x_n = (x.float() for x in _images())
    with torch.no_grad():
        a, b = fused(x_m, x_n), explicit(x_m, x_n)
    for (k, va), (_, vb) in zip(_flat(a), _flat(b)):
        torch.testing.assert_close(va, vb, rtol=1e-4, atol=1e-5)


def test_cam_coatt_cam_broadcast_and_attention():
    model = _model().eval()
    x_m, x_n = _images(b=3)
    with torch.no_grad():
        one = model.coatt_cam(x_m[:1], x_n)
        each = model.coatt_cam(x_m[:1].expand(3, -1, -1, -1), x_n)
        a_mn, a_nm = model.attention(x_m, x_n)
    assert model.cam(x_m).shape == (3, K, 4, 4)
    torch.testing.assert_close(one, each)
    assert a_mn.shape == (3, 16, 16) and a_nm.shape == (3, 16, 16)


@pytest.mark.parametrize("backbone,n_new_body", [("tiny", 0), ("vgg16", 6)])
def test_param_groups_partition(backbone, n_new_body):
    model = CoAttentionClassifier(K, backbone=backbone)
    body, new = model.param_groups()
    ids_b, ids_n = {id(p) for p in body}, {id(p) for p in new}
    assert not ids_b & ids_n
    assert ids_b | ids_n == {id(p) for p in model.parameters()}
    heads = [model.phi0.weight, model.phi.weight, model.gate.weight, model.gate.bias,
             model.coatt.weight]
    assert all(id(p) in ids_n for p in heads)
    assert len(new) == len(heads) + n_new_body


def test_bf16_autocast_training_step_is_finite():
    torch.manual_seed(0)
    model = CoAttentionClassifier(K).train()
    x_m, x_n = (x.float() for x in _images())
    l = torch.tensor([[1, 0, 1], [0, 1, 0]], dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x_m, x_n, self_pairs=False)
        terms = loss_terms(out, l, l.flip(0), LossConfig(con_warmup_epochs=0, self_pairs=False),
                           epoch=0)
    assert out["S_co_m"].dtype == torch.bfloat16 and terms["total"].dtype == torch.float32
    terms["total"].backward()
    assert torch.isfinite(terms["total"]) and torch.isfinite(model.coatt.weight.grad).all()


def test_corrupt_weights_file(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pth"):
        build_backbone("tiny", pretrained=bad)
