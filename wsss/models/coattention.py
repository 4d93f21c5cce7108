"""Co-attention between two feature maps (METHOD.md sec. 1, "Co-attention").

With F_m (C x HW_m), F_n (C x HW_n) and a learned W_P (C x C):

    P = F_m^T W_P F_n                                   (HW_m x HW_n)
    F_m^{m∩n}(i) = sum_j softmax_j(P(i, :)) F_n(j)       (each position of m gathers n)
    F_n^{m∩n}(j) = sum_i softmax_i(P(:, j)) F_m(i)       (each position of n gathers m)

``mode="mutual"`` (a variant, not the paper's; docs/localisation.md) weighs each pair of
positions by both softmaxes, so a position gathers the partner's features only where the
attention is returned (the dual softmax of feature matching), relative to uniform attention:

    M(i, j) = softmax_j(P(i, :)) * softmax_i(P(:, j))
    F_m^{m∩n}(i) = HW_m sum_j M(i, j) F_n(j),   F_n^{m∩n}(j) = HW_n sum_i M(i, j) F_m(i)

With uniform attention both are the partner's mean feature, as with the softmax; a position
whose partners attend elsewhere gathers less. Computed explicitly, whatever ``impl``.

Two implementations of the paper's softmax mode that agree to float tolerance:

- ``impl="explicit"`` builds P and both softmaxes (can return the attention maps,
  for visualisation); memory O(B * HW_m * HW_n).
- ``impl="fused"`` writes each side as one scaled-dot-product attention with scale 1:
  P(i, j) = (W_P^T f_m_i) . f_n_j, so for m: query W_P^T f_m_i, key = value = f_n_j;
  P(i, j) = f_m_i . (W_P f_n_j), so for n: query W_P f_n_j, key = value = f_m_i.
  ``torch.nn.functional.scaled_dot_product_attention`` never holds the HW x HW matrix
  when a fused kernel applies (CPU flash attention; on CUDA the flash/memory-efficient
  kernels, subject to their head-size limits).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

IMPLS = ("explicit", "fused")
MODES = ("softmax", "mutual")


def _flatten(f: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, HW, C)."""
    return f.flatten(2).transpose(1, 2)


def _unflatten(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B, HW, C) -> shaped like ``like`` (B, C, H, W)."""
    return x.transpose(1, 2).reshape(like.shape)


def _check_inputs(f_m: torch.Tensor, f_n: torch.Tensor, weight: torch.Tensor) -> None:
    if f_m.dim() != 4 or f_n.dim() != 4:
        raise ValueError(f"co_attention expects (B, C, H, W) features, got {tuple(f_m.shape)} "
                         f"and {tuple(f_n.shape)}")
    if f_m.shape[:2] != f_n.shape[:2]:
        raise ValueError(f"f_m and f_n must share batch and channels, got {tuple(f_m.shape)} "
                         f"and {tuple(f_n.shape)}")
    if f_m.dtype != f_n.dtype:
        raise ValueError(f"f_m and f_n must have one dtype, got {f_m.dtype} and {f_n.dtype} "
                         f"(under autocast both come out of the backbone alike)")
    c = f_m.shape[1]
    if weight.shape != (c, c):
        raise ValueError(f"weight must be (C, C) = ({c}, {c}), got {tuple(weight.shape)}")


def affinity(f_m: torch.Tensor, f_n: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """P = F_m^T W_P F_n, shape (B, HW_m, HW_n)."""
    w = weight.to(f_m.dtype)
    return torch.matmul(torch.matmul(_flatten(f_m), w), f_n.flatten(2))


def _explicit(f_m, f_n, weight, return_attention):
    p = affinity(f_m, f_n, weight)                       # (B, HWm, HWn)
    a_mn = torch.softmax(p, dim=2)                       # softmax_j P(i, :)
    a_nm = torch.softmax(p, dim=1).transpose(1, 2)       # softmax_i P(:, j), as (B, HWn, HWm)
    v_n, v_m = _flatten(f_n), _flatten(f_m)
    out_m = _unflatten(torch.matmul(a_mn.to(v_n.dtype), v_n), f_m)
    out_n = _unflatten(torch.matmul(a_nm.to(v_m.dtype), v_m), f_n)
    if return_attention:
        return out_m, out_n, a_mn, a_nm
    return out_m, out_n


def _mutual(f_m, f_n, weight, return_attention):
    p = affinity(f_m, f_n, weight)                           # (B, HWm, HWn)
    p = p.float() if p.dtype in (torch.float16, torch.bfloat16) else p
    m = torch.softmax(p, dim=2) * torch.softmax(p, dim=1)     # M(i, j)
    v_n, v_m = _flatten(f_n), _flatten(f_m)
    hw_m, hw_n = m.shape[1], m.shape[2]
    out_m = _unflatten(torch.matmul((hw_m * m).to(v_n.dtype), v_n), f_m)
    out_n = _unflatten(torch.matmul((hw_n * m.transpose(1, 2)).to(v_m.dtype), v_m), f_n)
    if return_attention:  # where the gathered features come from: M's rows (columns) normalised
        return (out_m, out_n, m / m.sum(2, keepdim=True).clamp_min(1e-12),
                m.transpose(1, 2) / m.sum(1).unsqueeze(2).clamp_min(1e-12))
    return out_m, out_n


def _fused(f_m, f_n, weight):
    w = weight.to(f_m.dtype)
    # (B, 1, HW, C), contiguous: the fused kernels need a unit stride on C (a transposed
    # view silently sends SDPA to its math fallback, which materialises HW x HW).
    x_m = _flatten(f_m).unsqueeze(1).contiguous()
    x_n = _flatten(f_n).unsqueeze(1).contiguous()
    q_m = torch.matmul(x_m, w)              # rows f_m_i^T W   = (W^T f_m_i)^T
    q_n = torch.matmul(x_n, w.t())          # rows f_n_j^T W^T = (W f_n_j)^T
    out_m = F.scaled_dot_product_attention(q_m, x_n, x_n, scale=1.0)
    out_n = F.scaled_dot_product_attention(q_n, x_m, x_m, scale=1.0)
    return _unflatten(out_m.squeeze(1), f_m), _unflatten(out_n.squeeze(1), f_n)


def co_attention(f_m: torch.Tensor, f_n: torch.Tensor, weight: torch.Tensor,
                 impl: str = "explicit", return_attention: bool = False, mode: str = "softmax"):
    """Co-attentive features of a pair (METHOD.md sec. 1).

    f_m (B, C, Hm, Wm), f_n (B, C, Hn, Wn) (sizes may differ), weight W_P (C, C), cast to
    the features' dtype (autocast handles bf16 inside the matmuls/attention).
    Returns (F_m^{m∩n} shaped like f_m, F_n^{m∩n} shaped like f_n); with
    ``return_attention`` (explicit only) also A_mn (B, HWm, HWn), rows softmax over n,
    and A_nm (B, HWn, HWm), rows softmax over m. ``mode="mutual"``: the dual-softmax
    weights HW M above (explicit; the attention returned is M with its rows normalised).
    """
    _check_inputs(f_m, f_n, weight)
    if mode not in MODES:
        raise ValueError(f"unknown co-attention mode {mode!r}; choose one of {MODES}")
    if mode == "mutual":
        return _mutual(f_m, f_n, weight, return_attention)
    if impl == "explicit":
        return _explicit(f_m, f_n, weight, return_attention)
    if impl == "fused":
        if return_attention:
            raise ValueError("return_attention needs impl='explicit' (the fused kernel never "
                             "builds the attention matrix)")
        return _fused(f_m, f_n, weight)
    raise ValueError(f"unknown co-attention impl {impl!r}; choose one of {IMPLS}")


class LearnableCoAttention(nn.Module):
    """Holds W_P (C x C) and applies ``co_attention``.

    Initialisation: W_P = I / sqrt(C), so at the start P(i, j) is the scaled dot product
    f_m_i . f_n_j / sqrt(C) (each position attends to similar features, softmaxes not
    saturated), like transformer attention's 1/sqrt(d).
    """

    def __init__(self, channels: int, impl: str = "explicit", mode: str = "softmax") -> None:
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"unknown co-attention impl {impl!r}; choose one of {IMPLS}")
        if mode not in MODES:
            raise ValueError(f"unknown co-attention mode {mode!r}; choose one of {MODES}")
        self.impl, self.mode = impl, mode
        self.weight = nn.Parameter(torch.eye(channels) / math.sqrt(channels))

    def forward(self, f_m: torch.Tensor, f_n: torch.Tensor, return_attention: bool = False,
                impl: str | None = None):
        return co_attention(f_m, f_n, self.weight, impl=impl or self.impl,
                            return_attention=return_attention, mode=self.mode)
