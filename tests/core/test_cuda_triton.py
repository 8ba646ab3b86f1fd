"""The Triton AdamSPD kernels against an independent float64 reference, on CUDA.

Runs on a CUDA device. With ``TRITON_INTERPRET=1`` (see test_triton_interpreter.py) the functional
tests also run on CPU tensors through Triton's interpreter, with small sizes; the tests that need
a real GPU (host syncs, CUDA graphs, torch.compile, the default path choice) skip there.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import pytest
import torch

from spdecay import AdamSPD
from spdecay.spd.backends import multi_tensor as MT
from spdecay.spd.backends import single_tensor as REF
from spdecay.spd.driver import Pending, finish
from spdecay.spd.interface import AdamHyper, TensorLists
from tests.helpers.reference import ReferenceAdamSPD

triton = pytest.importorskip("triton")
from spdecay.spd.backends import fused_triton as T  # noqa: E402  (after the skip: needs triton)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available() and not INTERPRET
DEVICE = "cuda" if CUDA else "cpu"
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not (CUDA or INTERPRET), reason="needs CUDA (or TRITON_INTERPRET=1)"),
]
needs_gpu = pytest.mark.skipif(not CUDA, reason="needs a real CUDA device")

if INTERPRET:  # the interpreter runs every block in numpy: small blocks, few per chunk
    T._BLOCK, T._ITERS, T._REDUCE_BLOCK = 64, 4, 2
# A tensor spanning several chunks (and not a multiple of the block) next to tiny ones.
BIG = 3 * T._BLOCK * T._ITERS + 17
STEPS = 6 if INTERPRET else 10
SHAPES = [(), (5,), (4, 3), (33, 70), (BIG,)]
HYPER = dict(beta1=0.9, beta2=0.999, eps=1e-8)


class Stats(NamedTuple):
    fired: list
    ratio: list
    deviation: list


def _functional(choose):
    """A backend (chosen per tensor by ``choose``) plus the driver, as one functional call with
    torch's list convention; returns per-tensor stats lists in the input order."""

    def fn(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, anchors, *, amsgrad,
           beta1, beta2, eps, lr, weight_decay, maximize, spd):
        n = len(params)
        lists = TensorLists(params, grads, exp_avgs, exp_avg_sqs,
                            list(max_exp_avg_sqs) if amsgrad else [], steps,
                            list(anchors) if spd else [None] * n)
        h = AdamHyper(lr=lr, beta1=beta1, beta2=beta2, eps=eps, amsgrad=amsgrad,
                      maximize=maximize, with_sums=spd, decay=0.0 if spd else weight_decay)
        runs = []
        for backend, idx in choose(lists, spd):
            if idx:
                sub = lists.pick(idx)
                part = backend.adam_and_sums(sub, h)
                if part is not None:
                    runs.append((idx, Pending(part, sub.sources(), float(weight_decay))))
        if not spd:
            return None
        out = Stats([None] * n, [None] * n, [None] * n)
        for (idx, _), dec in zip(runs, finish([p for _, p in runs]), strict=True):
            for j, i in enumerate(idx):  # backends return their sums in input order
                for col, values in zip(out, dec, strict=True):
                    col[i] = values[j]
        return out

    return fn


def _triton_or_reference(lists, spd):
    covered = [i for i in range(len(lists)) if T.covers(lists, i)]
    rest = [i for i in range(len(lists)) if i not in covered]
    return [(T, covered), (REF, rest)]


triton_adam_spd = _functional(_triton_or_reference)
_multi_tensor_adam_spd = _functional(lambda lists, spd: [(MT, list(range(len(lists))))])
_single_tensor_adam_spd = _functional(lambda lists, spd: [(REF, list(range(len(lists))))])


def grad_stream(shapes, steps, dtype, seed=1):
    """Gradients with a drift that flips sign, so the SPD condition fires on some steps only."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in range(steps):
        drift = 0.7 if (t // 4) % 2 == 0 else -0.7
        out.append([(torch.randn(s, generator=g, dtype=torch.float64) + drift).to(dtype) for s in shapes])
    return out


def make_params(shapes, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]


class FunctionalRun:
    """State lists for one functional path (no optimizer class: the kernels are tested directly)."""

    def __init__(self, params, anchors, *, state_dtype=None, amsgrad=False, device=DEVICE):
        self.params = [p.to(device).clone() for p in params]
        self.anchors = [None if a is None else a.to(device).clone() for a in anchors]
        sd = lambda p: state_dtype or p.dtype  # noqa: E731
        self.m = [torch.zeros_like(p, dtype=sd(p)) for p in self.params]
        self.v = [torch.zeros_like(p, dtype=sd(p)) for p in self.params]
        self.vmax = [torch.zeros_like(p, dtype=sd(p)) for p in self.params] if amsgrad else []
        # float64 parameters get float64 step counts (AdamSPD's choice under a float64 default).
        self.steps = [torch.zeros((), device=device, dtype=torch.float64 if p.dtype == torch.float64
                                  else torch.float32) for p in self.params]
        self.amsgrad = amsgrad

    def step(self, fn, grads, **kw):
        grads = [g.to(self.params[0].device) for g in grads]
        return fn(self.params, grads, self.m, self.v, self.vmax, self.steps, self.anchors,
                  amsgrad=self.amsgrad, **{**HYPER, **kw})


def tol(dtype):
    if dtype == torch.float64:
        # The interpreter passes float arguments as float32 (the compiled kernel uses float64).
        return dict(rtol=1e-6, atol=1e-7) if INTERPRET else dict(rtol=1e-10, atol=1e-12)
    return dict(rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("zero_anchor", [False, True], ids=["anchor", "zero"])
def test_matches_float64_reference_and_fires_both_ways(dtype, zero_anchor):
    params = make_params(SHAPES, dtype)
    anchors = [None] * len(params) if zero_anchor else [p.clone() for p in params]
    ref = ReferenceAdamSPD(params, lr=0.05, weight_decay=1.0, anchors=anchors)
    run = FunctionalRun(params, anchors)
    for grads in grad_stream(SHAPES, 6 if INTERPRET else 24, dtype):
        stats = run.step(triton_adam_spd, grads, lr=0.05, weight_decay=1.0, maximize=False, spd=True)
        ref.step(grads)
        assert [bool(f) for f in stats.fired] == ref.fired_log[-1]
        for p, r in zip(run.params, ref.params, strict=True):
            torch.testing.assert_close(p.cpu().double(), r, **tol(dtype))
    log = [f for row in ref.fired_log for f in row]
    assert any(log) and not all(log), "the test must exercise both branches of the condition"


def test_amsgrad_maximize_and_device_tensor_lr():
    dtype = torch.float64
    params = make_params(SHAPES, dtype, seed=3)
    ref = ReferenceAdamSPD(params, lr=0.02, weight_decay=2.0, amsgrad=True, maximize=True)
    run = FunctionalRun(params, [p.clone() for p in params], amsgrad=True)
    lr = torch.tensor(0.02, dtype=torch.float32, device=DEVICE)  # read by the kernel
    for grads in grad_stream(SHAPES, STEPS, dtype, seed=4):
        run.step(triton_adam_spd, grads, lr=lr, weight_decay=2.0, maximize=True, spd=True)
        ref.step(grads)
        assert [s.item() for s in run.steps] == [ref.t[0]] * len(SHAPES)
    # lr passes through float32 here, so compare at float32 precision.
    for p, r in zip(run.params, ref.params, strict=True):
        torch.testing.assert_close(p.cpu(), r, rtol=1e-5, atol=1e-6)


def test_spd_false_is_adamw_like_torch():
    params = make_params(SHAPES, torch.float64, seed=5)
    run = FunctionalRun(params, [None] * len(params))
    leaves = [p.clone().to(DEVICE).requires_grad_() for p in params]
    torch_opt = torch.optim.AdamW(leaves, lr=0.01, weight_decay=0.1, foreach=False, **{
        "betas": (HYPER["beta1"], HYPER["beta2"]), "eps": HYPER["eps"]})
    for grads in grad_stream(SHAPES, 6, torch.float64, seed=6):
        out = run.step(triton_adam_spd, grads, lr=0.01, weight_decay=0.1, maximize=False, spd=False)
        assert out is None
        for leaf, g in zip(leaves, grads, strict=True):
            leaf.grad = g.to(DEVICE)
        torch_opt.step()
    for p, leaf in zip(run.params, leaves, strict=True):
        torch.testing.assert_close(p, leaf.detach(), **tol(torch.float64))


def test_same_stats_as_the_foreach_path():
    dtype = torch.float32
    params = make_params(SHAPES, dtype, seed=7)
    anchors = [p.clone() for p in params]
    runs = {k: FunctionalRun(params, anchors) for k in ("foreach", "fused")}
    kw = dict(lr=0.05, weight_decay=1.0, maximize=False, spd=True)
    for grads in grad_stream(SHAPES, STEPS, dtype, seed=8):
        a = runs["foreach"].step(_multi_tensor_adam_spd, grads, **kw)
        b = runs["fused"].step(triton_adam_spd, grads, **kw)
        for other in (b,):
            assert torch.equal(torch.stack(a.fired).cpu(), torch.stack(other.fired).cpu())
            for x, y in ((a.ratio, other.ratio), (a.deviation, other.deviation)):
                torch.testing.assert_close(torch.stack(y).cpu().float(), torch.stack(x).cpu().float(),
                                           rtol=1e-4, atol=1e-6)
    for p, q in zip(runs["fused"].params, runs["foreach"].params, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_ratio_is_accurate_for_small_steps_next_to_a_large_deviation():
    """lr 1e-4 against an O(1) deviation: r ~ 2e-5, where a difference of float32 norms is off
    by tens of percent. The kernels sum ||p_adam - p0||^2 - ||p - p0||^2 directly."""
    g = torch.Generator().manual_seed(14)
    shapes = [(16, 3, 16, 16), (3000,)]
    params = [torch.randn(s, generator=g) for s in shapes]
    grads = [torch.randn(s, generator=g) for s in shapes]
    # <g, d> > 0 but <sign(g), d> < 0: fires, and Adam's step moves away from the anchor.
    anchors = [p - torch.where(gr.abs() > 1, gr, -1.5 * gr.sign()) for p, gr in zip(params, grads, strict=True)]
    ref = ReferenceAdamSPD(params, lr=1e-4, weight_decay=1.0, anchors=anchors)
    run = FunctionalRun(params, anchors)
    for _ in range(3):
        stats = run.step(triton_adam_spd, grads, lr=1e-4, weight_decay=1.0, maximize=False, spd=True)
        ref.step(grads)
        assert all(bool(f) for f in stats.fired) and all(float(r) > 0 for r in stats.ratio)
    for p, r in zip(run.params, ref.params, strict=True):
        torch.testing.assert_close(p.cpu().double(), r, rtol=5e-7, atol=1e-6)


def _round(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.to(dtype).double()


@pytest.mark.parametrize("pdtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_mixed_precision_low_precision_params_fp32_state_bf16_anchor(pdtype):
    """Each step from the kernel's own state, against float64 arithmetic rounded to the parameter
    dtype where the kernel stores it (after the Adam step and after the projection)."""
    if INTERPRET and pdtype == torch.bfloat16:
        pytest.skip("Triton's interpreter truncates float32 -> bfloat16 (the GPU rounds to nearest)")
    shapes = [(7,), (33, 70), (BIG,)]
    params = make_params(shapes, pdtype, seed=9)
    anchors = [p.to(torch.bfloat16) for p in params]
    run = FunctionalRun(params, anchors, state_dtype=torch.float32)
    b1, b2, eps, lr, lam = HYPER["beta1"], HYPER["beta2"], HYPER["eps"], 0.05, 1.0
    a64 = [a.double() for a in anchors]
    ulp = 2.0**-7 if pdtype == torch.bfloat16 else 2.0**-10
    fired_any = []
    for t, grads in enumerate(grad_stream(shapes, 6, pdtype, seed=10), start=1):
        before = [(p.cpu().double(), m.cpu().double(), v.cpu().double())
                  for p, m, v in zip(run.params, run.m, run.v, strict=True)]
        stats = run.step(triton_adam_spd, grads, lr=lr, weight_decay=lam, maximize=False, spd=True)
        assert all(p.dtype == pdtype for p in run.params) and run.m[0].dtype == torch.float32
        for i, (g, (p, m, v)) in enumerate(zip(grads, before, strict=True)):
            g = g.double()
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            torch.testing.assert_close(run.m[i].cpu().double(), m, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(run.v[i].cpu().double(), v, rtol=1e-6, atol=1e-9)
            p_adam = _round(p - lr / (1 - b1**t) * m / ((v / (1 - b2**t)).sqrt() + eps), pdtype)
            inner = float((g * (p - a64[i])).sum())
            if inner > 0:
                new, old = float((p_adam - a64[i]).norm()), float((p - a64[i]).norm())
                r = min(max((new - old) / new, 0.0), 1.0) if new > 0 else 0.0
                p_adam = _round(p_adam + lam * r * (a64[i] - p_adam), pdtype)
            assert bool(stats.fired[i]) == (inner > 0)
            fired_any.append(inner > 0)
            # float32 vs float64 intermediates may round to the neighbouring value: 1 ulp per
            # rounding (two where the projection rounds again).
            got = run.params[i].cpu().double()
            diff = (got - p_adam).abs()
            bad = diff > (2 if inner > 0 else 1) * ulp * p_adam.abs() * 1.01 + 1e-7
            assert not bad.any(), (t, i, got[bad][:5].tolist(), p_adam[bad][:5].tolist(),
                                   p[bad][:5].tolist(), bool(stats.fired[i]))
            assert (diff > 0).float().mean() < 0.02
    assert any(fired_any) and not all(fired_any)


def test_plan_is_reused_with_static_grads_and_rebuilt_for_new_state(monkeypatch):
    built = []
    real_plan = T._Plan
    monkeypatch.setattr(T, "_Plan", lambda *a, **k: built.append(1) or real_plan(*a, **k))
    params = make_params(SHAPES, torch.float64, seed=15)
    ref = ReferenceAdamSPD(params, lr=0.05, weight_decay=1.0)
    run = FunctionalRun(params, [p.clone() for p in params])
    static = [torch.zeros(s, dtype=torch.float64, device=DEVICE) for s in SHAPES]
    for t, grads in enumerate(grad_stream(SHAPES, STEPS, torch.float64, seed=16)):
        if t == STEPS // 2:  # like load_state_dict: new moment tensors, same values
            run.m = [m.clone() for m in run.m]
            run.v = [v.clone() for v in run.v]
        for s_, g in zip(static, grads, strict=True):
            s_.copy_(g)
        run.step(triton_adam_spd, static, lr=0.05, weight_decay=1.0, maximize=False, spd=True)
        ref.step(grads)
    assert len(built) == 2
    for p, r in zip(run.params, ref.params, strict=True):
        torch.testing.assert_close(p.cpu(), r, **tol(torch.float64))


def test_complex_dense_noncontiguous_and_strided_fallback():
    g = torch.Generator().manual_seed(11)
    base = torch.randn(40, 30, dtype=torch.float64, generator=g)
    params = [
        torch.randn(6, 5, dtype=torch.complex128, generator=g),  # as real pairs
        base.t().contiguous().t().clone(memory_format=torch.preserve_format),  # dense, transposed
        torch.randn(20, 12, dtype=torch.float64, generator=g)[:, ::3],  # not dense: fallback path
    ]
    assert not params[1].is_contiguous() and T._is_dense(params[1]) and not T._is_dense(params[2])
    anchors = [p.clone() for p in params]
    real = lambda ts: [torch.view_as_real(t) if t.is_complex() else t for t in ts]  # noqa: E731
    ref = ReferenceAdamSPD(real(params), lr=0.05, weight_decay=1.0, anchors=real(anchors))
    run = FunctionalRun(params, anchors)
    for step in range(STEPS):
        grads = [torch.randn(p.shape, dtype=p.dtype, generator=g) + (0.5 if step < 4 else -0.5)
                 for p in params]
        grads = [gr.t().contiguous().t() if i == 1 else gr for i, gr in enumerate(grads)]
        run.step(triton_adam_spd, grads, lr=0.05, weight_decay=1.0, maximize=False, spd=True)
        ref.step(real(grads))
    for p, r in zip(real(run.params), ref.params, strict=True):
        torch.testing.assert_close(p.cpu(), r, **tol(torch.float64))


def test_empty_tensor_and_single_element():
    params = [torch.randn(0), torch.randn(1), torch.randn(3)]
    run = FunctionalRun(params, [p.clone() for p in params])
    ref = ReferenceAdamSPD(params, lr=0.1, weight_decay=1.0)
    for grads in grad_stream([(0,), (1,), (3,)], 6, torch.float32):
        stats = run.step(triton_adam_spd, grads, lr=0.1, weight_decay=1.0, maximize=False, spd=True)
        ref.step(grads)
        assert not bool(stats.fired[0]) and float(stats.deviation[0]) == 0.0
    for p, r in zip(run.params, ref.params, strict=True):
        torch.testing.assert_close(p.cpu().double(), r, **tol(torch.float32))


# ---------------------------------------------------------------- real GPU only


def _model_params(seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    shapes = [(64, 32), (32,), (BIG,), (3, 3, 8, 8), (17,), (128, 64)][:n]
    return [torch.randn(s, generator=g).cuda().requires_grad_() for s in shapes]


def _grads(params, step):
    g = torch.Generator().manual_seed(100 + step)
    drift = 0.5 if (step // 3) % 2 == 0 else -0.5
    return [(torch.randn(p.shape, generator=g) + drift).cuda() for p in params]


@needs_gpu
def test_adamspd_defaults_to_triton_on_cuda(monkeypatch):
    calls = []
    real = T.adam_and_sums
    monkeypatch.setattr(T, "adam_and_sums", lambda *a, **k: calls.append(1) or real(*a, **k))
    for kwargs, expected in (({}, 1), ({"foreach": True}, 0), ({"fused": False}, 0)):
        calls.clear()
        params = _model_params(n=2)
        opt = AdamSPD(params, lr=0.01, **kwargs)
        for p, g in zip(params, _grads(params, 0), strict=True):
            p.grad = g
        opt.step()
        assert len(calls) == expected, kwargs
    # Without Triton the default falls back to the multi-tensor path, silently.
    monkeypatch.setattr(T, "HAS_TRITON", False)
    calls.clear()
    params = _model_params(n=2)
    opt = AdamSPD(params, lr=0.01)
    for p, g in zip(params, _grads(params, 0), strict=True):
        p.grad = g
    opt.step()
    assert not calls and opt.spd_stats().fired.shape == (2,)
    with pytest.raises(RuntimeError, match="Triton"):
        AdamSPD(params, lr=0.01, fused=True).step()


@needs_gpu
@pytest.mark.parametrize("path", [{}, {"foreach": True}], ids=["triton", "foreach"])
def test_no_host_sync_in_step(path):
    params = _model_params()
    opt = AdamSPD(params, lr=0.01, **path)
    grads = [_grads(params, s) for s in range(4)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step_grads in grads:  # the first step (state creation) included
            for p, g in zip(params, step_grads, strict=True):
                p.grad = g
            opt.step()
            opt.spd_stats()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(p).all() for p in params)


def _run_eager_and_graph(opt_kwargs, steps=8, warmup=3):
    params_e = _model_params(seed=1)
    params_g = [p.detach().clone().requires_grad_() for p in params_e]
    opt_e = AdamSPD(params_e, lr=0.02, **opt_kwargs)
    opt_g = AdamSPD(params_g, lr=0.02, **opt_kwargs)
    for p in params_g:
        p.grad = torch.zeros_like(p)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (state, anchors, kernels) outside the capture
        for s in range(warmup):
            for p, g in zip(params_g, _grads(params_g, s), strict=True):
                p.grad.copy_(g)
            opt_g.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt_g.step()
    for s in range(warmup):
        for p, g in zip(params_e, _grads(params_e, s), strict=True):
            p.grad = g
        opt_e.step()
    fired_seen = []
    for s in range(warmup, warmup + steps):
        grads = _grads(params_e, s)
        for p, g in zip(params_g, grads, strict=True):
            p.grad.copy_(g)
        graph.replay()
        for p, g in zip(params_e, grads, strict=True):
            p.grad = g.clone()
        opt_e.step()
        fe, fg = opt_e.spd_stats().fired, opt_g.spd_stats().fired
        assert torch.equal(fe, fg)
        fired_seen += fe.tolist()
        for pe, pg in zip(params_e, params_g, strict=True):
            torch.testing.assert_close(pg, pe, rtol=1e-6, atol=1e-6)
    assert any(fired_seen) and not all(fired_seen)
    step_e = [opt_e.state[p]["step"] for p in params_e]
    step_g = [opt_g.state[p]["step"] for p in params_g]
    assert [float(s) for s in step_g] == [float(s) for s in step_e] == [warmup + steps] * len(step_e)


@needs_gpu
@pytest.mark.parametrize("path", [{}, {"foreach": True}], ids=["triton", "foreach"])
def test_cuda_graph_replay_matches_eager(path):
    _run_eager_and_graph(path)


@needs_gpu
@pytest.mark.parametrize("path", [{}, {"foreach": True}], ids=["triton", "foreach"])
def test_torch_compile_step_matches_eager(path):
    params_e = _model_params(seed=2, n=3)
    params_c = [p.detach().clone().requires_grad_() for p in params_e]
    opt_e = AdamSPD(params_e, lr=0.02, **path)
    opt_c = AdamSPD(params_c, lr=0.02, **path)

    @torch.compile
    def compiled_step():
        opt_c.step()

    for s in range(6):
        grads = _grads(params_e, s)
        for pe, pc, g in zip(params_e, params_c, grads, strict=True):
            pe.grad, pc.grad = g, g.clone()
        opt_e.step()
        compiled_step()
        assert torch.equal(opt_e.spd_stats().fired, opt_c.spd_stats().fired)
    for pe, pc in zip(params_e, params_c, strict=True):
        torch.testing.assert_close(pc, pe, rtol=1e-5, atol=1e-6)


@needs_gpu
def test_bf16_params_through_adamspd_class_match_single_tensor_path():
    """bf16 end to end (bf16 state, as AdamSPD allocates it): Triton vs the reference path."""
    params = [p.detach().to(torch.bfloat16).requires_grad_() for p in _model_params(seed=4)]
    twins = [p.detach().clone().requires_grad_() for p in params]
    opt = AdamSPD(params, lr=0.02)
    ref = AdamSPD(twins, lr=0.02, foreach=False, fused=False)
    for s in range(5):
        grads = [g.to(torch.bfloat16) for g in _grads(params, s)]
        for p, q, g in zip(params, twins, grads, strict=True):
            p.grad, q.grad = g, g.clone()
        opt.step()
        ref.step()
    for p, q in zip(params, twins, strict=True):
        assert p.dtype == torch.bfloat16
        # Triton computes in fp32 and rounds once; the reference rounds after every op.
        torch.testing.assert_close(p.float(), q.float(), rtol=2e-2, atol=2e-2)


@needs_gpu
def test_single_tensor_and_triton_agree_on_cuda_float32():
    params = make_params(SHAPES, torch.float32, seed=12)
    anchors = [p.clone() for p in params]
    a, b = FunctionalRun(params, anchors), FunctionalRun(params, anchors)
    kw = dict(lr=0.05, weight_decay=1.0, maximize=False, spd=True)
    for grads in grad_stream(SHAPES, 10, torch.float32, seed=13):
        a.step(_single_tensor_adam_spd, grads, **kw)
        b.step(triton_adam_spd, grads, **kw)
    for p, q in zip(a.params, b.params, strict=True):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not INTERPRET, reason="single-process gloo mesh on CPU tensors (interpreter)")
def test_dtensor_route_matches_plain_tensors(monkeypatch):
    """Sharded parameters go through reduce_partial_sums and spd_ratio (one-rank gloo mesh)."""
    import socket

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        shapes = [(40, 6), (7,)]
        base = make_params(shapes, torch.float32, seed=17)
        results = []
        for sharded in (False, True):
            wrap = (lambda t: distribute_tensor(t, mesh, [Shard(0)])) if sharded else (lambda t: t)
            params = [wrap(b.clone()) for b in base]
            run = FunctionalRun(params, [p.detach().clone() for p in params])
            fired = []
            for grads in grad_stream(shapes, STEPS, torch.float32, seed=18):
                stats = run.step(triton_adam_spd, [wrap(g) for g in grads], lr=0.05,
                                 weight_decay=1.0, maximize=False, spd=True)
                fired.append([bool(f) for f in stats.fired])
            full = [p.full_tensor() if sharded else p for p in run.params]
            results.append((full, fired))
        (plain, f_plain), (dt, f_dt) = results
        assert f_plain == f_dt and any(any(row) for row in f_dt)
        for a, b in zip(plain, dt, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    finally:
        dist.destroy_process_group()


@needs_gpu
def test_class_state_dtype_fp32_moments_and_bf16_anchors_on_triton():
    """AdamSPD(state_dtype=fp32, anchor_dtype=bf16) with bf16 parameters: Triton (the default)
    against the multi-tensor torch path of the same class, and the state layout kept."""
    params = [p.detach().to(torch.bfloat16).requires_grad_() for p in _model_params(seed=5)]
    twins = [p.detach().clone().requires_grad_() for p in params]
    kw = dict(lr=0.02, state_dtype=torch.float32, anchor_dtype=torch.bfloat16)
    opt, ref = AdamSPD(params, **kw), AdamSPD(twins, foreach=True, **kw)
    fired = []
    for s in range(6):
        grads = [g.to(torch.bfloat16) for g in _grads(params, s)]
        for p, q, g in zip(params, twins, grads, strict=True):
            p.grad, q.grad = g, g.clone()
        opt.step()
        ref.step()
        fired += opt.spd_stats().fired.tolist()
        assert opt.spd_stats().fired.tolist() == ref.spd_stats().fired.tolist()
    state = opt.state[params[-1]]
    assert state["exp_avg"].dtype == torch.float32 and state["anchor"].dtype == torch.bfloat16
    assert any(fired)
    for p, q in zip(params, twins, strict=True):
        # Both compute in fp32 from fp32 moments; their roundings to bf16 (after the Adam step
        # and the projection) may differ by an ulp now and then, which later steps carry on.
        ulp = 2.0 ** -7 * q.float().abs().clamp_min(1e-2)  # about one bf16 ulp
        diff = (p.float() - q.float()).abs()
        worst = float((diff / ulp).max())
        assert worst <= 8 and float(diff.mean()) <= float(ulp.mean()), (
            worst, float(diff.mean()), float(ulp.mean()), float((diff > ulp).float().mean()))
