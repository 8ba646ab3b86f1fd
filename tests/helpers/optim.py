"""Parameters and gradient streams shared by the optimizer tests."""

from __future__ import annotations

import torch

SHAPES = [(), (5,), (4, 3), (2, 3, 2, 2)]


def make_params(dtype=torch.float64, seed=0, shapes=SHAPES):
    """Leaf tensors with requires_grad, one per shape, from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, dtype=dtype, generator=g).requires_grad_() for s in shapes]


def clone_params(params):
    return [p.detach().clone().requires_grad_() for p in params]


def grad_stream(shapes, steps, seed=1, dtype=torch.float64):
    """Gradients whose drift flips sign every 4 steps, so the SPD condition fires on some steps."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in range(steps):
        drift = 0.7 if (t // 4) % 2 == 0 else -0.7
        out.append([torch.randn(s, dtype=dtype, generator=g) + drift for s in shapes])
    return out


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()


def run(opt, params, grads_seq):
    """Step ``opt`` once per entry of ``grads_seq`` (None entries: no gradient that step)."""
    for grads in grads_seq:
        set_grads(params, grads)
        opt.step()
