"""co_attention against a slow loop reference written from METHOD.md sec. 1."""

import math

import pytest
import torch

from wsss.models.coattention import LearnableCoAttention, co_attention


def reference_co_attention(f_m, f_n, w):
    """Loops over positions: P(i,j) = F_m(i)^T W F_n(j); softmax over j (for m), over i (for n)."""
    b, c, hm, wm = f_m.shape
    hn, wn = f_n.shape[2:]
    fm, fn = f_m.reshape(b, c, -1), f_n.reshape(b, c, -1)
    nm, nn_ = fm.shape[2], fn.shape[2]
    out_m, out_n = torch.zeros_like(fm), torch.zeros_like(fn)
    a_mn, a_nm = torch.zeros(b, nm, nn_, dtype=f_m.dtype), torch.zeros(b, nn_, nm, dtype=f_m.dtype)
    for k in range(b):
        p = [[float(fm[k, :, i] @ w @ fn[k, :, j]) for j in range(nn_)] for i in range(nm)]
        for i in range(nm):
            z = sum(math.exp(p[i][j]) for j in range(nn_))
            for j in range(nn_):
                a_mn[k, i, j] = math.exp(p[i][j]) / z
                out_m[k, :, i] += a_mn[k, i, j] * fn[k, :, j]
        for j in range(nn_):
            z = sum(math.exp(p[i][j]) for i in range(nm))
            for i in range(nm):
                a_nm[k, j, i] = math.exp(p[i][j]) / z
                out_n[k, :, j] += a_nm[k, j, i] * fm[k, :, i]
    return out_m.reshape(f_m.shape), out_n.reshape(f_n.shape), a_mn, a_nm


def _inputs(b=2, c=6, m_hw=(3, 4), n_hw=(2, 5), dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    f_m = torch.randn(b, c, *m_hw, generator=g, dtype=dtype)
    f_n = torch.randn(b, c, *n_hw, generator=g, dtype=dtype)
    w = torch.randn(c, c, generator=g, dtype=dtype) / c
    return f_m, f_n, w


def test_explicit_matches_loop_reference():
    f_m, f_n, w = _inputs()
    out_m, out_n, a_mn, a_nm = co_attention(f_m, f_n, w, impl="explicit", return_attention=True)
    ref_m, ref_n, ref_amn, ref_anm = reference_co_attention(f_m, f_n, w)
    assert out_m.shape == f_m.shape and out_n.shape == f_n.shape
    assert a_mn.shape == (2, 12, 10) and a_nm.shape == (2, 10, 12)
    torch.testing.assert_close(out_m, ref_m)
    torch.testing.assert_close(out_n, ref_n)
    torch.testing.assert_close(a_mn, ref_amn)
    torch.testing.assert_close(a_nm, ref_anm)


def test_mutual_mode_matches_loop_reference():
    """M(i, j) = softmax_j(P(i, :)) softmax_i(P(:, j)); each side gathers the other with
    its own number of positions times M (uniform attention: the partner's mean feature)."""
    f_m, f_n, w = _inputs()
    _, _, a_mn, a_nm = reference_co_attention(f_m, f_n, w)  # a_nm[k, j, i] = softmax_i(P(:, j))
    fm, fn = f_m.flatten(2), f_n.flatten(2)
    ref_m, ref_n = torch.zeros_like(fm), torch.zeros_like(fn)
    for k in range(2):
        for i in range(fm.shape[2]):
            for j in range(fn.shape[2]):
                weight = a_mn[k, i, j] * a_nm[k, j, i]
                ref_m[k, :, i] += fm.shape[2] * weight * fn[k, :, j]
                ref_n[k, :, j] += fn.shape[2] * weight * fm[k, :, i]
    for impl in ("explicit", "fused"):  # mutual is computed explicitly whatever impl says
        out_m, out_n = co_attention(f_m, f_n, w, impl=impl, mode="mutual")
        torch.testing.assert_close(out_m, ref_m.reshape(f_m.shape))
        torch.testing.assert_close(out_n, ref_n.reshape(f_n.shape))
    _, _, rows_m, rows_n = co_attention(f_m, f_n, w, return_attention=True, mode="mutual")
    torch.testing.assert_close(rows_m.sum(2), torch.ones(2, 12, dtype=f_m.dtype))
    torch.testing.assert_close(rows_n.sum(2), torch.ones(2, 10, dtype=f_m.dtype))
    f_m.requires_grad_(True)
    co_attention(f_m, f_n, w, mode="mutual")[0].sum().backward()
    assert torch.isfinite(f_m.grad).all() and f_m.grad.abs().sum() > 0
    out_m, out_n = co_attention(f_m, f_n, torch.zeros_like(w), mode="mutual")  # P = 0: uniform attention
    torch.testing.assert_close(out_m, f_n.mean((2, 3), keepdim=True).expand_as(f_m))
    torch.testing.assert_close(out_n, f_m.mean((2, 3), keepdim=True).expand_as(f_n))
    with pytest.raises(ValueError, match="mode"):
        co_attention(f_m, f_n, w, mode="dual")


def test_attention_rows_sum_to_one():
    f_m, f_n, w = _inputs(seed=1)
    _, _, a_mn, a_nm = co_attention(f_m, f_n, w, return_attention=True)
    torch.testing.assert_close(a_mn.sum(-1), torch.ones(2, 12, dtype=a_mn.dtype))
    torch.testing.assert_close(a_nm.sum(-1), torch.ones(2, 10, dtype=a_nm.dtype))
    assert (a_mn >= 0).all() and (a_nm >= 0).all()


@pytest.mark.parametrize("m_hw,n_hw", [((5, 7), (6, 3)), ((8, 8), (8, 8))])
def test_fused_matches_explicit_values_and_gradients(m_hw, n_hw):
    f_m, f_n, w = _inputs(b=3, c=16, m_hw=m_hw, n_hw=n_hw, dtype=torch.float32, seed=2)
    grads, outs = [], []
    g = torch.Generator().manual_seed(3)
    up_m, up_n = torch.randn(3, 16, *m_hw, generator=g), torch.randn(3, 16, *n_hw, generator=g)
    for impl in ("explicit", "fused"):
        leaves = [t.clone().requires_grad_(True) for t in (f_m, f_n, w)]
        o_m, o_n = co_attention(*leaves, impl=impl)
        ((o_m * up_m).sum() + (o_n * up_n).sum()).backward()
        outs.append((o_m.detach(), o_n.detach()))
        grads.append([t.grad for t in leaves])
    for a, b in zip(outs[0], outs[1]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    for a, b in zip(grads[0], grads[1]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", ["explicit", "fused"])
def test_bf16_autocast_close_to_float32(impl):
    f_m, f_n, w = _inputs(b=2, c=32, m_hw=(4, 4), n_hw=(3, 5), dtype=torch.float32, seed=4)
    ref_m, ref_n = co_attention(f_m, f_n, w / 4, impl="explicit")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_m, out_n = co_attention(f_m, f_n, w / 4, impl=impl)
    torch.testing.assert_close(out_m.float(), ref_m, rtol=0.05, atol=0.05)
    torch.testing.assert_close(out_n.float(), ref_n, rtol=0.05, atol=0.05)


def test_errors():
    f_m, f_n, w = _inputs()
    with pytest.raises(ValueError, match="explicit"):
        co_attention(f_m, f_n, w, impl="fused", return_attention=True)
    with pytest.raises(ValueError, match="unknown"):
        co_attention(f_m, f_n, w, impl="nope")
    with pytest.raises(ValueError, match="weight"):
        co_attention(f_m, f_n, w[:3, :3])
    with pytest.raises(ValueError, match="share"):
        co_attention(f_m, f_n[:1], w)
    with pytest.raises(ValueError, match="dtype"):
        co_attention(f_m, f_n.float(), w)


def test_learnable_module_init_and_impl_override():
    mod = LearnableCoAttention(16, impl="fused")
    torch.testing.assert_close(mod.weight.detach(), torch.eye(16) / 4)
    f_m, f_n, _ = _inputs(c=16, dtype=torch.float32)
    fused = mod(f_m, f_n)
    out_m, out_n, a_mn, _ = mod(f_m, f_n, return_attention=True, impl="explicit")
    torch.testing.assert_close(fused[0], out_m, rtol=1e-4, atol=1e-5)
    assert a_mn.shape == (2, 12, 10)


def test_fused_uses_a_fused_kernel_on_cpu():
    """Restricted to the flash kernel, SDPA raises instead of silently using its math
    fallback (which would materialise HW x HW): the fused path must qualify."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    f_m, f_n, w = _inputs(c=16, dtype=torch.float32)
    leaves = [t.requires_grad_(True) for t in (f_m, f_n, w)]
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        o_m, o_n = co_attention(*leaves, impl="fused")
        (o_m.sum() + o_n.sum()).backward()
    assert all(t.grad is not None for t in leaves)
