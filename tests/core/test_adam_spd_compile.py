"""AdamSPD.step under torch.compile follows the eager trajectory (CPU; compiles once, ~30 s)."""

from __future__ import annotations

import pytest
import torch

from spdecay import AdamSPD


@pytest.mark.slow
@pytest.mark.parametrize("kw", [{}, {"foreach": True}], ids=["default", "multi-tensor"])
def test_compiled_step_matches_eager(kw):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    shapes = [(5,), (4, 3), (70, 70)]  # multi-tensor: the gathered (small) and sliced (large) pieces
    eager = [torch.randn(s, generator=g).requires_grad_() for s in shapes]
    compiled = [p.detach().clone().requires_grad_() for p in eager]
    opt_eager = AdamSPD(eager, lr=0.05, **kw)
    opt_compiled = AdamSPD(compiled, lr=0.05, **kw)
    step = torch.compile(opt_compiled.step)
    fired = []
    for t in range(6):
        for p, q in zip(eager, compiled):
            grad = torch.randn(p.shape, generator=g) + (0.5 if t % 4 < 2 else -0.5)
            p.grad, q.grad = grad, grad.clone()
        opt_eager.step()
        step()
        fired += opt_eager.spd_stats().fired.tolist()
        assert opt_compiled.spd_stats().fired.tolist() == opt_eager.spd_stats().fired.tolist()
    for p, q in zip(eager, compiled):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    assert any(fired)
