"""SelectiveProjectionDecay (SPD as an add-on to any torch optimizer)."""

from __future__ import annotations

import io

import pytest
import torch

from spdecay import AdamSPD, SelectiveProjectionDecay
from tests.helpers.optim import SHAPES, clone_params, grad_stream, make_params, set_grads


@pytest.fixture(params=["whole", "sliced", "kernel"])
def layout(request, monkeypatch):
    """Run a test on whole-tensor foreach chunks, again on the cache-sized CPU slices, and again
    with the fused C kernel (``SelectiveProjectionDecay(..., fused=True)`` made the default)."""
    import spdecay.addon as A
    import spdecay.spd.backends.fused_c as C
    import spdecay.spd.backends.single_tensor as S
    import spdecay.spd.decision as D

    init = A.SelectiveProjectionDecay.__init__
    if request.param != "kernel":  # torch ops (the default takes the kernel where it builds)
        monkeypatch.setattr(init, "__kwdefaults__", {**init.__kwdefaults__, "fused": False})
    if request.param == "sliced":
        monkeypatch.setattr(S, "_SLICE_NUMEL", 5)  # tensors above 5 elements measured in slices
        monkeypatch.setattr(D, "_CHUNK_NUMEL", 8)  # several foreach chunks in the projection
    if request.param == "kernel":
        monkeypatch.setattr(init, "__kwdefaults__", {**init.__kwdefaults__, "fused": True})
        measured = []
        real = C.measure
        monkeypatch.setattr(C, "measure", lambda *a: measured.append(1) or real(*a))
        yield request.param
        assert measured, "the fused kernel must have been used"
        return
    yield request.param










class ReferenceSGDThenSPD:
    """float64, per tensor, straight from the algorithm: torch's SGD rule, then SPD."""

    def __init__(self, params, lr, momentum=0.0, dampening=0.0, nesterov=False, lam=1.0,
                 zero_anchor=()):
        self.p = [p.detach().clone().double() for p in params]
        self.p0 = [torch.zeros_like(p) if i in zero_anchor else p.clone() for i, p in enumerate(self.p)]
        self.lr, self.mom, self.damp, self.nesterov, self.lam = lr, momentum, dampening, nesterov, lam
        self.buf = [None] * len(self.p)
        self.fired: list[list[bool]] = []

    def step(self, grads, lr=None):
        lr = self.lr if lr is None else lr
        row = []
        for i, g in enumerate(grads):
            g = g.double()
            d_p = g
            if self.mom != 0:
                if self.buf[i] is None:
                    self.buf[i] = g.clone()
                else:
                    self.buf[i] = self.mom * self.buf[i] + (1 - self.damp) * g
                d_p = g + self.mom * self.buf[i] if self.nesterov else self.buf[i]
            p, p0 = self.p[i], self.p0[i]
            p_sgd = p - lr * d_p
            c = -float((g * (p - p0)).sum())
            if c < 0:
                new_norm, old_norm = float((p_sgd - p0).norm()), float((p - p0).norm())
                r = 0.0 if new_norm == 0 else min(max((new_norm - old_norm) / new_norm, 0.0), 1.0)
                p_sgd = p_sgd - self.lam * r * (p_sgd - p0)
            self.p[i] = p_sgd
            row.append(c < 0)
        self.fired.append(row)


@pytest.mark.parametrize("lam", [1.0, 0.5, 2.0])
@pytest.mark.parametrize("variant", ["plain", "foreach", "fused"])
def test_addon_on_adam_follows_adamspd(lam, variant, layout):
    init = make_params()
    pa, pb = clone_params(init), clone_params(init)
    spd_opt = AdamSPD(pa, lr=0.05, weight_decay=lam)
    kw = {"foreach": False} if variant == "plain" else {variant: True}
    base = torch.optim.Adam(pb, lr=0.05, weight_decay=0, **kw)
    addon = SelectiveProjectionDecay(base, weight_decay=lam)
    fired_seen = []
    for grads in grad_stream(SHAPES, 40):
        set_grads(pa, grads)
        set_grads(pb, grads)
        spd_opt.step()
        base.step()
        for a, b in zip(pa, pb):
            torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-12, atol=1e-13)
        ours, theirs = addon.spd_stats(), spd_opt.spd_stats()
        assert ours.fired.tolist() == theirs.fired.tolist()
        torch.testing.assert_close(ours.ratio, theirs.ratio)
        torch.testing.assert_close(ours.deviation, theirs.deviation)
        fired_seen += ours.fired.tolist()
    assert any(fired_seen) and not all(fired_seen), "both branches of the condition must run"


def test_addon_zero_anchor_group_and_maximize_follow_adamspd(layout):
    init = make_params(seed=5)
    pa, pb = clone_params(init), clone_params(init)
    spd_opt = AdamSPD([{"params": pa[:2], "anchor": "zero"}, {"params": pa[2:]}],
                      lr=0.03, maximize=True)
    base = torch.optim.Adam([{"params": pb[:2], "anchor": "zero"}, {"params": pb[2:]}],
                            lr=0.03, maximize=True)
    addon = SelectiveProjectionDecay(base)
    for grads in grad_stream(SHAPES, 30, seed=6):
        set_grads(pa, grads)
        set_grads(pb, grads)
        spd_opt.step()
        base.step()
    for a, b in zip(pa, pb):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-12, atol=1e-13)
    assert "anchor" not in base.state[pb[0]]  # zero anchors are not stored
    torch.testing.assert_close(addon.anchor_of(pb[3]), init[3].detach())


@pytest.mark.parametrize(
    "sgd_kw",
    [
        dict(momentum=0.0),
        dict(momentum=0.9, foreach=True),
        dict(momentum=0.9, nesterov=True, foreach=False),
        dict(momentum=0.8, dampening=0.1, fused=True),
    ],
    ids=["plain", "momentum-foreach", "nesterov-loop", "dampening-fused"],
)
def test_addon_on_sgd_with_scheduler_matches_float64_reference(sgd_kw, layout):
    params = make_params(seed=2)
    ref = ReferenceSGDThenSPD(params, lr=0.1, lam=1.0, zero_anchor=(1,),
                              **{k: v for k, v in sgd_kw.items() if k not in ("foreach", "fused")})
    opt = torch.optim.SGD([{"params": [params[0]] + params[2:]},
                           {"params": [params[1]], "anchor": "zero"}], lr=0.1, **sgd_kw)
    SelectiveProjectionDecay(opt, weight_decay=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)
    for grads in grad_stream(SHAPES, 30, seed=3):
        lr = opt.param_groups[0]["lr"]
        # gradient accumulation: two micro-batches summing to the step's gradient
        for p, g in zip(params, grads):
            p.grad = None
            for half in (0.25 * g, 0.75 * g):
                p.grad = half.clone() if p.grad is None else p.grad + half
        opt.step()
        sched.step()
        ref.step(grads, lr=lr)
    for p, r in zip(params, ref.p):
        torch.testing.assert_close(p.detach(), r, rtol=1e-10, atol=1e-12)
    flat = [f for row in ref.fired for f in row]
    assert any(flat) and not all(flat)


def test_state_is_initialised_by_the_base_optimizer_and_anchor_is_pretrained_value():
    params = make_params()
    init = [p.detach().clone() for p in params]
    opt = torch.optim.Adam(params, lr=0.1)
    spd = SelectiveProjectionDecay(opt)
    assert len(opt.state) == 0
    grads = grad_stream(SHAPES, 3)
    set_grads(params, grads[0])
    params[2].grad = None  # no gradient on the first step: no state, no anchor yet
    opt.step()
    assert set(opt.state[params[0]]) == {"step", "exp_avg", "exp_avg_sq", "anchor"}
    assert params[2] not in opt.state
    torch.testing.assert_close(opt.state[params[0]]["anchor"], init[0])
    set_grads(params, grads[1])
    opt.step()
    assert set(opt.state[params[2]]) == {"step", "exp_avg", "exp_avg_sq", "anchor"}
    torch.testing.assert_close(opt.state[params[2]]["anchor"], init[2])
    assert spd.spd_stats().names == [f"group0.param{i}" for i in range(4)]


def test_resume_from_state_dict_is_exact(layout):
    shapes = SHAPES
    grads = grad_stream(shapes, 30, seed=9)
    ref_params = make_params(seed=4)
    ref_opt = torch.optim.AdamW(ref_params, lr=0.05, weight_decay=0.0, foreach=True)
    SelectiveProjectionDecay(ref_opt, weight_decay=1.0, anchor_dtype=torch.float32)
    for g in grads:
        set_grads(ref_params, g)
        ref_opt.step()

    params = make_params(seed=4)
    opt = torch.optim.AdamW(params, lr=0.05, weight_decay=0.0, foreach=True)
    SelectiveProjectionDecay(opt, weight_decay=1.0, anchor_dtype=torch.float32)
    for g in grads[:12]:
        set_grads(params, g)
        opt.step()
    buf = io.BytesIO()
    torch.save({"model": [p.detach() for p in params], "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)

    resumed = [p.clone().requires_grad_() for p in ckpt["model"]]  # fine-tuned values, not init
    opt2 = torch.optim.AdamW(resumed, lr=0.05, weight_decay=0.0, foreach=True)
    spd2 = SelectiveProjectionDecay(opt2, weight_decay=1.0, anchor_dtype=torch.float32)
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.state[resumed[0]]["anchor"].dtype == torch.float64  # torch casts on load
    for g in grads[12:]:
        set_grads(resumed, g)
        opt2.step()
    assert spd2.anchor_of(resumed[0]).dtype == torch.float32  # restored to anchor_dtype
    for a, b in zip(resumed, ref_params):
        # float32 anchors of float64 params: exact up to the anchor rounding shared by both runs
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=0)


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


@pytest.mark.parametrize("fused", [False, True], ids=["unscale-then-step", "fused-found-inf"])
def test_grad_scaler_skipped_step_applies_no_projection(fused):
    model = _tiny_model()
    opt = torch.optim.Adam(model.parameters(), lr=0.1, fused=fused or None)
    spd = SelectiveProjectionDecay(opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = torch.randn(16, 4), torch.randn(16, 2)
    calls = []
    opt.register_step_post_hook(lambda *a: calls.append(1))

    def backward():
        opt.zero_grad()
        scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()

    for _ in range(3):  # a few ordinary steps so the condition can fire
        backward()
        scaler.step(opt)
        scaler.update()
    before = [p.detach().clone() for p in model.parameters()]
    stats_before = spd.spd_stats()
    backward()
    next(model.parameters()).grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)
    if fused:  # the fused kernel ran (and skipped) inside step: the hooks saw found_inf
        assert len(calls) == 4
        assert not spd.spd_stats().fired.any() and not spd.spd_stats().ratio.any()
    else:  # GradScaler does not call step at all
        assert len(calls) == 3
        assert torch.equal(spd.spd_stats().ratio, stats_before.ratio)


def test_grad_scaler_step_uses_unscaled_gradients_same_as_unscaled_run():
    m1, m2 = _tiny_model(1), _tiny_model(1)
    o1 = torch.optim.SGD(m1.parameters(), lr=0.2, momentum=0.9)
    o2 = torch.optim.SGD(m2.parameters(), lr=0.2, momentum=0.9)
    SelectiveProjectionDecay(o1)
    s2 = SelectiveProjectionDecay(o2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        x, y = torch.randn(16, 4, generator=g), torch.randn(16, 2, generator=g)
        o1.zero_grad()
        torch.nn.functional.mse_loss(m1(x), y).backward()
        o1.step()
        o2.zero_grad()
        scaler.scale(torch.nn.functional.mse_loss(m2(x), y)).backward()
        scaler.step(o2)
        scaler.update()
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert s2.spd_stats().fired.any()


def test_spd_false_group_and_group_strength_override():
    params = make_params(seed=8)
    init = [p.detach().clone() for p in params]
    opt = torch.optim.SGD([{"params": params[:2], "spd": False},
                           {"params": params[2:], "spd_weight_decay": 0.0}], lr=0.1)
    spd = SelectiveProjectionDecay(opt, weight_decay=1.0)
    grads = grad_stream(SHAPES, 5)
    for g in grads:
        set_grads(params, g)
        opt.step()
    expected = [i - 0.1 * sum(g[k] for g in grads) for k, i in enumerate(init)]
    for p, e in zip(params, expected):  # SPD off / lam = 0: plain SGD
        torch.testing.assert_close(p.detach(), e)
    assert spd.spd_stats().names == ["group1.param0", "group1.param1"]


def test_remove_detaches():
    init = make_params()
    pa, pb = clone_params(init), clone_params(init)
    oa = torch.optim.SGD(pa, lr=0.3)
    ob = torch.optim.SGD(pb, lr=0.3)
    spd = SelectiveProjectionDecay(oa)
    grads = grad_stream(SHAPES, 12)
    for g in grads[:6]:
        set_grads(pa, g)
        oa.step()
    spd.remove(drop_anchors=True)
    assert all("anchor" not in s for s in oa.state.values())
    for p, q in zip(pa, pb):
        q.data.copy_(p.detach())
    for g in grads[6:]:
        set_grads(pa, g)
        set_grads(pb, g)
        oa.step()
        ob.step()
    for p, q in zip(pa, pb):
        assert torch.equal(p, q)


def test_named_parameters_give_names_in_stats():
    model = _tiny_model()
    opt = torch.optim.SGD(model.named_parameters(), lr=0.1)
    spd = SelectiveProjectionDecay(opt)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    assert spd.spd_stats().names == [n for n, _ in model.named_parameters()]


def test_complex_parameter_matches_real_view():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, dtype=torch.complex128, generator=g).requires_grad_()
    r = torch.view_as_real(z.detach()).clone().requires_grad_()
    oz, orl = torch.optim.SGD([z], lr=0.2), torch.optim.SGD([r], lr=0.2)
    SelectiveProjectionDecay(oz)
    SelectiveProjectionDecay(orl)
    for t in range(10):
        gr = torch.randn(6, 2, dtype=torch.float64, generator=g) + (0.5 if t % 4 < 2 else -0.5)
        z.grad, r.grad = torch.view_as_complex(gr.clone()), gr.clone()
        oz.step()
        orl.step()
    torch.testing.assert_close(torch.view_as_real(z.detach()), r.detach())


def test_clear_errors():
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        SelectiveProjectionDecay([p])
    opt = torch.optim.SGD([p], lr=0.1)
    with pytest.raises(ValueError, match="weight_decay.*-1"):
        SelectiveProjectionDecay(opt, weight_decay=-1)
    with pytest.raises(ValueError, match="anchor.*'pretrained'"):
        SelectiveProjectionDecay(opt, anchor="pretrained")
    with pytest.raises(TypeError, match="anchor_dtype"):
        SelectiveProjectionDecay(opt, anchor_dtype=torch.int8)
    bad = torch.optim.SGD([{"params": [p], "anchor": "origin"}], lr=0.1)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['anchor'\].*'origin'"):
        SelectiveProjectionDecay(bad)
    bad = torch.optim.SGD([{"params": [p], "spd_weight_decay": "big"}], lr=0.1)
    with pytest.raises(ValueError, match="spd_weight_decay.*'big'"):
        SelectiveProjectionDecay(bad)


def test_per_group_strengths_follow_adamspd(layout):
    init = make_params(seed=11)
    pa, pb = clone_params(init), clone_params(init)
    spd_opt = AdamSPD([{"params": pa[:2], "weight_decay": 0.5}, {"params": pa[2:]}], lr=0.05,
                      weight_decay=2.0)
    base = torch.optim.Adam([{"params": pb[:2], "spd_weight_decay": 0.5}, {"params": pb[2:]}],
                            lr=0.05)
    SelectiveProjectionDecay(base, weight_decay=2.0)
    for grads in grad_stream(SHAPES, 30, seed=12):
        set_grads(pa, grads)
        set_grads(pb, grads)
        spd_opt.step()
        base.step()
    for a, b in zip(pa, pb):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-12, atol=1e-13)


# ------------------------------------------------------------------ closures, non-finite values


def _closure_problem(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(6, 3).double()
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randn(16, 3, dtype=torch.float64)
    return model, x, y


@pytest.mark.parametrize("as_keyword", [False, True])
def test_step_with_a_closure_follows_adamspd(layout, as_keyword):
    """The add-on evaluates the closure once, then measures, then steps the base: decisions use
    the gradient of this step (before, they used the previous one: 0.1 off AdamSPD)."""
    m1, x, y = _closure_problem()
    m2, _, _ = _closure_problem()
    ref = AdamSPD(m1.parameters(), lr=0.05, weight_decay=1.0, foreach=False)
    base = torch.optim.Adam(m2.parameters(), lr=0.05)
    spd = SelectiveProjectionDecay(base, weight_decay=1.0)
    calls = []

    def closure_for(model, opt):
        def closure():
            calls.append(1)
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss
        return closure

    fired = []
    for _ in range(12):
        calls.clear()
        l1 = ref.step(closure_for(m1, ref))
        calls.clear()
        c2 = closure_for(m2, base)
        l2 = base.step(closure=c2) if as_keyword else base.step(c2)
        assert len(calls) == 1  # evaluated once, by the add-on
        torch.testing.assert_close(l2, l1)
        fired += spd.spd_stats().fired.tolist()
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-10, atol=1e-12)
    assert any(fired) and not all(fired)


def test_optimizers_that_reevaluate_the_closure_are_refused():
    p = torch.randn(3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="LBFGS.*closure several times"):
        SelectiveProjectionDecay(torch.optim.LBFGS([p]))

    class LineSearch(torch.optim.SGD):
        def step(self, closure=None):
            closure()
            return super().step(closure)  # SGD calls it again

    opt = LineSearch([p], lr=0.1)
    SelectiveProjectionDecay(opt)

    def closure():
        opt.zero_grad()
        loss = (p * p).sum()
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="called the closure more than once"):
        opt.step(closure)


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), -1.0])
def test_non_finite_strengths_are_refused(bad):
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="finite number >= 0"):
        SelectiveProjectionDecay(torch.optim.SGD([p], lr=0.1), weight_decay=bad)
    group = torch.optim.SGD([{"params": [p], "spd_weight_decay": bad}], lr=0.1)
    with pytest.raises(ValueError, match="spd_weight_decay.*finite number >= 0"):
        SelectiveProjectionDecay(group)
