"""Hypothesis properties of AdamSPD that hold for any shapes, strengths and gradients."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spdecay import AdamSPD

shapes = st.lists(
    st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple), min_size=1, max_size=4
)


@settings(max_examples=40, deadline=None)
@given(
    shapes=shapes,
    lam=st.one_of(st.just(1.0), st.floats(0.0, 2.0)),
    lr=st.floats(1e-4, 0.5),
    seed=st.integers(0, 2**16),
    steps=st.integers(1, 6),
)
def test_paths_agree_ratio_bounded_and_lambda_projection(shapes, lam, lr, seed, steps):
    g = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, dtype=torch.float64, generator=g) for s in shapes]
    pa = [t.clone().requires_grad_() for t in init]
    pb = [t.clone().requires_grad_() for t in init]
    oa = AdamSPD(pa, lr=lr, weight_decay=lam, foreach=False)
    ob = AdamSPD(pb, lr=lr, weight_decay=lam, foreach=True)
    for _ in range(steps):
        grads = [torch.randn(s, dtype=torch.float64, generator=g) for s in shapes]
        before = [(p.detach() - a).norm() for p, a in zip(pa, init)]
        for ps in (pa, pb):
            for p, gr in zip(ps, grads):
                p.grad = gr.clone()
        oa.step()
        ob.step()
        sa, sb = oa.spd_stats(), ob.spd_stats()
        assert torch.equal(sa.fired, sb.fired)
        assert ((sa.ratio >= 0) & (sa.ratio <= 1)).all()
        assert (sa.ratio[~sa.fired] == 0).all()
        for i, p in enumerate(pa):
            torch.testing.assert_close(sa.deviation[i].double(), before[i], rtol=1e-5, atol=1e-6)
            after = (p.detach() - init[i]).norm()
            if sa.fired[i] and lam == 1.0:
                assert after <= before[i] * (1 + 1e-9) + 1e-12
        for x, y in zip(pa, pb):
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
