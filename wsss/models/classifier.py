"""The co-attention classifier trained on image pairs (METHOD.md sec. 1).

For a pair (I_m, I_n) with backbone features F_m, F_n:

- basic branch: S = phi_0(F) (1x1 conv to K), s = GAP(S);
- co-attention: F_m^{m∩n}, F_n^{m∩n} = co_attention(F_m, F_n, W_P), S_co = phi(F^{m∩n})
  (phi: its own 1x1 conv to K, no bias), s_co = GAP(S_co), or with ``coatt_pool_share`` r < 1
  the mean of each class's r·hw highest scores (top-r pooling, METHOD.md sec. 1);
- contrastive co-attention: B = sigmoid(W_B F^{m∩n}) (1x1 conv to 1 channel),
  S_con = phi(F ⊙ (1 - B)), s_con = GAP(S_con).

``heads`` chooses biases and initialisation of the new layers (METHOD.md, "Recipes"):

- ``"ours"``: phi_0 without bias, W_B with a bias (0), phi_0 / phi / W_B ~ N(0, 0.01),
  W_P = I / sqrt(C);
- ``"reference"`` (the authors' code, Classifier/models/vgg.py): phi_0 with a bias (0) and
  weights ~ N(0, sqrt(2 / K)) (vgg.py:90-96, n = k*k*out_channels), phi and W_B without
  bias (vgg.py:140-141), phi, W_B and W_P (an ``nn.Linear``, vgg.py:137) with PyTorch's
  default initialisation (their custom init is commented out, vgg.py:142-151).

Self-pairs pair I_m with its flip, 0.75x and 2x copies (``wsss.data.pairs.self_pair_views``).
With ``shared=True`` I_m's backbone pass is computed once and reused by the main pair and
the three self-pairs; ``shared=False`` recomputes both passes for every pair, as the
reference does. The two agree exactly because no backbone couples samples of a batch
(tiny: GroupNorm; ResNet with pretrained weights: frozen BatchNorm; VGG16: no norm).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from wsss.data.pairs import self_pair_views
from wsss.models.backbones import build_backbone
from wsss.models.coattention import LearnableCoAttention

HEADS = ("ours", "reference")


def gap(maps: torch.Tensor) -> torch.Tensor:
    """Global average pooling (B, K, h, w) -> (B, K)."""
    return maps.mean(dim=(2, 3))


def top_mean(maps: torch.Tensor, share: float) -> torch.Tensor:
    """Top-r pooling (B, K, h, w) -> (B, K): per class, the mean of the ``share`` x h·w highest
    scores (at least one). ``share = 1`` is GAP."""
    if share == 1:
        return gap(maps)
    flat = maps.flatten(2)
    k = max(1, round(share * flat.shape[2]))
    return flat.topk(k, dim=2).values.mean(dim=2)


class CoAttentionClassifier(nn.Module):
    """Shared backbone + basic head phi_0 + co-attention (W_P) + class-aware head phi + gate W_B."""

    def __init__(self, num_classes: int, backbone: str = "tiny", pretrained: str | None = None, output_stride: int = 8,
                 coatt_impl: str = "fused", heads: str = "ours", attention: str = "softmax",
                 frozen_bn: bool | None = None, freeze_body: bool = False, coatt_pool_share: float = 1.0) -> None:
        super().__init__()
        if heads not in HEADS:
            raise ValueError(f"unknown heads {heads!r}; choose one of {HEADS}")
        self.num_classes = num_classes
        self.coatt_pool_share = coatt_pool_share
        self.backbone = build_backbone(backbone, pretrained=pretrained, output_stride=output_stride,
                                       frozen_bn=frozen_bn, freeze_body=freeze_body)
        c = self.backbone.out_channels
        ref = heads == "reference"
        self.phi0 = nn.Conv2d(c, num_classes, 1, bias=ref)     # basic head phi_0
        self.coatt = LearnableCoAttention(c, impl=coatt_impl, mode=attention)   # W_P
        self.phi = nn.Conv2d(c, num_classes, 1, bias=False)    # class-aware head phi
        self.gate = nn.Conv2d(c, 1, 1, bias=not ref)            # class-agnostic W_B
        if ref:
            nn.init.normal_(self.phi0.weight, std=math.sqrt(2.0 / num_classes))
            nn.init.zeros_(self.phi0.bias)
            # nn.Linear's default init of the reference's W_P: U(-1/sqrt(C), 1/sqrt(C))
            bound = 1.0 / math.sqrt(c)
            nn.init.uniform_(self.coatt.weight, -bound, bound)
        else:
            for conv in (self.phi0, self.phi, self.gate):
                nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(self.gate.bias)

    # ------------------------------------------------------------------ pieces
    def features(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """Backbone features of each batch in ``images``; batches of one size share a call."""
        groups: dict[tuple, list[int]] = {}
        for i, x in enumerate(images):
            groups.setdefault(tuple(x.shape[1:]), []).append(i)
        feats: list[torch.Tensor | None] = [None] * len(images)
        for idx in groups.values():
            out = self.backbone(torch.cat([images[i] for i in idx]))
            for i, f in zip(idx, out.split([images[i].shape[0] for i in idx])):
                feats[i] = f
        return feats

    def _basic(self, f: torch.Tensor) -> dict[str, torch.Tensor]:
        maps = self.phi0(f)
        return {"S": maps, "s": gap(maps)}

    def _pair(self, f_m, f_n, basic_m, basic_n) -> dict[str, torch.Tensor]:
        """Every map and score of the pair (F_m, F_n) (METHOD.md sec. 1)."""
        co_m, co_n = self.coatt(f_m, f_n)
        out = {"S_m": basic_m["S"], "s_m": basic_m["s"], "S_n": basic_n["S"], "s_n": basic_n["s"]}
        for side, f, co in (("m", f_m, co_m), ("n", f_n, co_n)):
            s_co = self.phi(co)
            gate = torch.sigmoid(self.gate(co))
            s_con = self.phi(f * (1 - gate))
            out.update({f"S_co_{side}": s_co, f"s_co_{side}": top_mean(s_co, self.coatt_pool_share), f"B_{side}": gate,
                        f"S_con_{side}": s_con, f"s_con_{side}": gap(s_con)})
        return out

    # ------------------------------------------------------------------ training
    def forward(self, x_m: torch.Tensor, x_n: torch.Tensor, self_pairs: bool = True,
                shared: bool = True, views: dict[str, torch.Tensor] | None = None) -> dict:
        """Scores and maps of the pair (x_m, x_n) and, if ``self_pairs``, of (x_m, T(x_m))
        for T in flip / down (0.75x) / up (2x), under out["self"][T] (m side = x_m).
        ``views``: the transformed copies T(x_m) themselves (e.g. made from the source
        image, ``wsss.data.transforms.source_view_transforms``); default: made from x_m.

        Keys per pair: S_m, S_n (B, K, h, w) basic maps, s_m, s_n (B, K) scores; S_co_*,
        s_co_* co-attention; B_m, B_n (B, 1, h, w) gates; S_con_*, s_con_* contrastive.
        """
        views = (views if views is not None else self_pair_views(x_m)) if self_pairs else {}
        if shared:
            f_m, f_n, *f_views = self.features([x_m, x_n, *views.values()])
            basic_m = self._basic(f_m)
            out = self._pair(f_m, f_n, basic_m, self._basic(f_n))
            if self_pairs:
                out["self"] = {name: self._pair(f_m, f_v, basic_m, self._basic(f_v))
                               for name, f_v in zip(views, f_views)}
            return out
        out = self._pair_from_images(x_m, x_n)
        if self_pairs:
            out["self"] = {name: self._pair_from_images(x_m, v) for name, v in views.items()}
        return out

    def _pair_from_images(self, x_m, x_n):
        f_m, f_n = self.features([x_m, x_n])
        return self._pair(f_m, f_n, self._basic(f_m), self._basic(f_n))

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(backbone body params, new-layer params); the new layers get 10x lr (METHOD.md,
        "Reference classifier training"). For the tiny backbone, trained from scratch, the
        body is still the first group."""
        body = list(self.backbone.backbone_parameters())
        body_ids = {id(p) for p in body}
        new = [p for p in self.parameters() if p.requires_grad and id(p) not in body_ids]
        return body, new

    # ------------------------------------------------------------------ inference
    def cam(self, x: torch.Tensor) -> torch.Tensor:
        """Basic class map S = phi_0(F) (B, K, h, w)."""
        return self.phi0(self.backbone(x))

    def _pair_features(self, x_m, x_n):
        """Features of x_m and x_n; a single x_m (batch 1) is broadcast to x_n's batch."""
        if x_m.shape[0] == 1 and x_n.shape[0] > 1:
            (f_m,), (f_n,) = self.features([x_m]), self.features([x_n])
            return f_m.expand(x_n.shape[0], *f_m.shape[1:]), f_n
        return tuple(self.features([x_m, x_n]))

    def coatt_cam(self, x_m: torch.Tensor, x_n: torch.Tensor, side: str = "m") -> torch.Tensor:
        """Co-attention class map S_m^{m∩n} = phi(F_m^{m∩n}) (B, K, h, w) of x_m with partner
        x_n (METHOD.md sec. 2). x_m may be a single image to pair with a batch of partners.
        ``side="n"``: the partner's map S_n^{m∩n} = phi(F_n^{m∩n}) in the same pair."""
        if side not in ("m", "n"):
            raise ValueError(f"side must be 'm' or 'n', got {side!r}")
        f_m, f_n = self._pair_features(x_m, x_n)
        co_m, co_n = self.coatt(f_m, f_n)
        return self.phi(co_m if side == "m" else co_n)

    def attention(self, x_m: torch.Tensor, x_n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention maps (A_mn (B, HWm, HWn) softmax over n, A_nm (B, HWn, HWm) softmax over m),
        through the explicit co-attention, for visualisation."""
        f_m, f_n = self._pair_features(x_m, x_n)
        _, _, a_mn, a_nm = self.coatt(f_m, f_n, return_attention=True, impl="explicit")
        return a_mn, a_nm
