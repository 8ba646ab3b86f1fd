"""The accuracy of each path's ratio in a cancellation-heavy case, against float64.

A float32 layer far from its anchor (|p - p0| = 1 per element) takes a tiny Adam step
(lr = 1e-5): ||p_adam - p0|| - ||p - p0|| is ~1e-6 of the norms, below float32's resolution if
taken as a difference of two float32 norms, and the growth's terms u (2 (p - p0) + u) have both
signs (a sum that cancels five-fold). What each path does (docs/algorithm.md, "Numerics"):

* ``single_tensor``: products in the tensor's dtype, summed in float64;
* ``multi_tensor``: products and sums in the tensor's dtype (at least float32), then float64;
* ``fused_c``: products and sums in float64;
* ``fused_triton``: products and per-lane sums in float32, chunk sums in float64;
* the add-on: ``p - p0`` exact in float64, both norms summed in float64, the growth their
  difference.

The AdamSPD paths sum the update u itself; the add-on (and Triton) see the parameter after it is
rounded to float32, so their reference is float64 arithmetic on those rounded values.
"""

from __future__ import annotations

import pytest
import torch

import spdecay.spd.backends.multi_tensor as MT
from spdecay import AdamSPD, SelectiveProjectionDecay

N, K, LR = 50_000, 20_000, 1e-5  # K elements at +1 from the anchor, N - K at -1


def _case(device="cpu"):
    g = torch.Generator().manual_seed(3)
    anchor = torch.randn(N, generator=g)
    d = torch.ones(N)
    d[K:] = -1.0
    grad = torch.full((N,), 10.0)
    grad[K:] = 0.001  # <g, d> > 0: the condition fires, yet the step grows the deviation
    return (anchor + d).to(device), anchor.to(device), grad.to(device)


def _ratio64(before, after, anchor, update=None):
    """The ratio in float64 from float32 values (exact differences), the growth summed as
    sum u (2 d + u)."""
    d = before.double() - anchor.double()
    u = after.double() - before.double() if update is None else update
    growth = (u * (2 * d + u)).sum()
    old = d.square().sum().sqrt()
    new = (d.square().sum() + growth).sqrt()
    return float(growth / (new + old) / new)


def _adam_update(p, grad):
    """Adam's first step in float64 from the float32 gradient: -lr * g / (|g| + eps)."""
    g = grad.double()
    return -LR * g / (g.abs() + 1e-8)


# Bounds on the relative error (measured here: fused_c 4e-8, single_tensor 3e-7, multi_tensor
# 1.3e-5, the add-on 2e-9 (torch) and 2e-7 (C)); the stats hold the ratio in float32 (6e-8).
F64, F64_PRODUCTS, F32 = 2e-7, 1e-6, 1e-4


@pytest.mark.parametrize(("path", "bound"), [
    ({"foreach": False}, F64_PRODUCTS),  # float32 products, float64 sums
    ({"foreach": True}, F32),
    ({"foreach": True, "batched": True}, F32),  # the whole-tensor batches other devices take
    ({"fused": True}, F64),
], ids=["single_tensor", "multi_tensor", "multi_tensor-batched", "fused_c"])
def test_adamspd_ratio_is_accurate_where_norms_cancel(path, bound, monkeypatch):
    path = dict(path)
    if path.pop("batched", False):
        monkeypatch.setattr(MT, "_walk_in_slices", lambda device: False)
    start, anchor, grad = _case()
    p = start.clone().requires_grad_()
    opt = AdamSPD([p], lr=LR, weight_decay=0.0, anchor=[anchor], **path)  # lam 0: no projection
    p.grad = grad
    opt.step()
    expected = _ratio64(start, None, anchor, _adam_update(start, grad))
    stats = opt.spd_stats()
    assert bool(stats.fired[0]) and 0 < expected < 1e-4
    assert float(stats.ratio[0]) == pytest.approx(expected, rel=bound)
    # a difference of two float32 norms would be off by far more than the bound
    naive = (p.detach() - anchor).norm() - (start - anchor).norm()
    assert abs(float(naive / (p.detach() - anchor).norm()) / expected - 1) > 100 * bound


@pytest.mark.parametrize("fused", [False, True], ids=["torch", "fused_c"])
def test_addon_ratio_is_accurate_where_norms_cancel(fused):
    start, anchor, grad = _case()
    p = anchor.clone().requires_grad_()
    base = torch.optim.Adam([p], lr=LR)
    spd = SelectiveProjectionDecay(base, weight_decay=0.0, fused=fused)
    p.grad = torch.zeros(N)
    base.step()  # captures the anchor; a zero gradient does not move p
    with torch.no_grad():
        p.copy_(start)
    p.grad = grad
    base.step()
    expected = _ratio64(start, p.detach(), anchor)
    stats = spd.spd_stats()
    assert bool(stats.fired[0]) and 0 < expected < 1e-4
    assert float(stats.ratio[0]) == pytest.approx(expected, rel=F64_PRODUCTS)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_ratio_is_accurate_where_norms_cancel():
    pytest.importorskip("triton")
    start, anchor, grad = _case("cuda")
    p = start.clone().requires_grad_()
    opt = AdamSPD([p], lr=LR, weight_decay=0.0, anchor=[anchor])  # Triton: the CUDA default
    p.grad = grad
    opt.step()
    expected = _ratio64(start, p.detach(), anchor)
    assert float(opt.spd_stats().ratio[0]) == pytest.approx(expected, rel=F32)
