"""The fused CPU kernel (``AdamSPD(fused=True)`` on CPU) against the float64 reference and the
multi-tensor path, on the layouts it covers and the ones it hands back to torch ops."""

from __future__ import annotations

import pytest
import torch

import spdecay.spd.backends.fused_c as FC
from spdecay import AdamL2SP, AdamSPD
from tests.helpers.optim import make_params
from tests.helpers.reference import ReferenceAdamSPD

# Sizes around the kernel's work items (65,536 elements) and its serial threshold (131,072).
SHAPES = [(), (3,), (7, 5), (65_537,), (300, 500)]


def grads_for(shapes, steps, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    for t in range(steps):
        drift = 0.7 if (t // 3) % 2 == 0 else -0.7
        yield [torch.randn(s, dtype=dtype, generator=g) + drift for s in shapes]




@pytest.mark.parametrize("options", [
    {},
    {"amsgrad": True, "maximize": True},
    {"anchor": "zero", "weight_decay": 0.5},
    {"weight_decay": 2.5},
], ids=["plain", "amsgrad-maximize", "zero-anchor", "lam2.5"])
def test_float64_trajectory_matches_reference(options):
    params = make_params(shapes=SHAPES)
    ref_options = {k: v for k, v in options.items() if k != "anchor"}
    if options.get("anchor") == "zero":
        ref_options["anchors"] = [None] * len(params)
    ref = ReferenceAdamSPD(params, lr=0.05, **ref_options)
    opt = AdamSPD(params, lr=0.05, fused=True, **options)
    for grads in grads_for(SHAPES, 15):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        ref.step(grads)
        assert opt.spd_stats().fired.tolist() == ref.fired_log[-1]
    for p, r in zip(params, ref.params):
        torch.testing.assert_close(p.detach(), r, rtol=1e-10, atol=1e-12)
    log = [f for row in ref.fired_log for f in row]
    assert any(log) and not all(log)


def test_float32_with_bf16_anchors_matches_multi_tensor_path():
    pa = make_params(torch.float32, shapes=SHAPES, seed=2)
    pb = [p.detach().clone().requires_grad_() for p in pa]
    oa = AdamSPD(pa, lr=0.01, anchor_dtype=torch.bfloat16, foreach=True)
    ob = AdamSPD(pb, lr=0.01, anchor_dtype=torch.bfloat16, fused=True)
    for grads in grads_for(SHAPES, 12, seed=3, dtype=torch.float32):
        for p, q, g in zip(pa, pb, grads):
            p.grad, q.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
        sa, sb = oa.spd_stats(), ob.spd_stats()
        assert sa.fired.tolist() == sb.fired.tolist()
        torch.testing.assert_close(sb.ratio, sa.ratio, rtol=1e-4, atol=1e-7)
    assert ob.state[pb[3]]["anchor"].dtype == torch.bfloat16
    for p, q in zip(pa, pb):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


def test_result_does_not_depend_on_the_number_of_threads():
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            params = make_params(torch.float32, shapes=SHAPES, seed=4)
            opt = AdamSPD(params, lr=0.01, fused=True)
            for grads in grads_for(SHAPES, 5, seed=5, dtype=torch.float32):
                for p, g in zip(params, grads):
                    p.grad = g
                opt.step()
            results.append([p.detach().clone() for p in params])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_layouts_outside_the_kernel_fall_back_in_the_same_step(monkeypatch):
    """fp16 parameters, a non-contiguous parameter and complex ones go through torch ops."""
    taken = []
    real = FC.adam_and_sums
    monkeypatch.setattr(FC, "adam_and_sums", lambda lists, h: taken.append(len(lists)) or real(lists, h))
    base = torch.randn(6, 8, dtype=torch.float64)
    strided = torch.nn.Parameter(base.t())  # non-contiguous; its gradients will be contiguous
    plain = torch.randn(9, dtype=torch.float64, requires_grad=True)
    half = torch.randn(5, dtype=torch.float16, requires_grad=True)
    z = torch.randn(4, dtype=torch.complex128, requires_grad=True)
    mixed = [strided, plain, half, z]
    mirror = [torch.nn.Parameter(strided.detach().clone()), plain.detach().clone().requires_grad_(),
              half.detach().clone().requires_grad_(), z.detach().clone().requires_grad_()]
    ofused = AdamSPD(mixed, lr=0.02, fused=True)
    oloop = AdamSPD(mirror, lr=0.02, foreach=False)
    g = torch.Generator().manual_seed(6)
    for _ in range(6):
        for p, q in zip(mixed, mirror):
            grad = torch.randn(p.shape, dtype=torch.float64, generator=g)
            if p.is_complex():
                grad = torch.complex(grad, torch.randn(p.shape, dtype=torch.float64, generator=g))
            grad = grad.to(p.dtype)
            p.grad, q.grad = grad.clone(), grad.clone()
        ofused.step()
        oloop.step()
    # per step: the float64 tensor and the complex one go to the kernel, the others not
    assert taken == [2] * 6
    for p, q in zip(mixed, mirror):
        tol = dict(rtol=1e-3, atol=1e-3) if p.dtype == torch.float16 else dict(rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(p.detach(), q.detach(), **tol)


@pytest.mark.parametrize("decoupled", [False, True])
def test_l2sp_and_adamw_groups_use_the_kernel_exactly(decoupled):
    pa, pb = make_params(shapes=SHAPES, seed=7), make_params(shapes=SHAPES, seed=7)
    oa = AdamL2SP(pa, lr=0.02, weight_decay=0.3, decoupled=decoupled, foreach=False)
    ob = AdamL2SP(pb, lr=0.02, weight_decay=0.3, decoupled=decoupled, fused=True)
    for grads in grads_for(SHAPES, 6, seed=8):
        for p, q, g in zip(pa, pb, grads):
            p.grad, q.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    for p, q in zip(pa, pb):
        torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-13)


def test_missing_compiler_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", "no-such-compiler-spdecay")
    monkeypatch.setenv("SPDECAY_CACHE_DIR", str(tmp_path))
    FC.library.cache_clear()
    try:
        p = torch.zeros(3, requires_grad=True)
        p.grad = torch.ones(3)
        opt = AdamSPD([p], lr=0.1, fused=True)
        with pytest.raises(RuntimeError, match="needs a C compiler.*no-such-compiler-spdecay"):
            opt.step()
        assert "step" not in opt.state[p] or int(opt.state[p]["step"]) == 0
        assert torch.equal(p.detach(), torch.zeros(3))
    finally:
        FC.library.cache_clear()


def test_l2sp_decoupled_pull_waits_for_the_checks(monkeypatch, tmp_path):
    """A step that cannot run (here: no compiler for fused=True) changes nothing, not even the
    decoupled pull towards the anchor that precedes the Adam update."""
    monkeypatch.setenv("CC", "no-such-compiler-spdecay")
    monkeypatch.setenv("SPDECAY_CACHE_DIR", str(tmp_path))
    FC.library.cache_clear()
    try:
        p = torch.ones(3, requires_grad=True)
        opt = AdamL2SP([p], lr=0.1, weight_decay=0.5, decoupled=True, anchor="zero", fused=True)
        p.grad = torch.ones(3)
        with pytest.raises(RuntimeError, match="needs a C compiler"):
            opt.step()
        assert torch.equal(p.detach(), torch.ones(3))
    finally:
        FC.library.cache_clear()
