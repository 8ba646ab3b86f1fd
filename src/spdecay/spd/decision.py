"""The SPD rule, written once: the decision from the per-tensor sums, and the projection.

Every path (each backend, the add-on, AdamL2SP's decoupled pull) calls these. The C and Triton
kernels apply the same projection formula inside their second pass, with ``coef`` from here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

# Temporaries (anchors cast to the parameter's dtype) are made for this many elements at most.
_CHUNK_NUMEL = 1 << 23


def spd_ratio(
    inner: Tensor, dev_sq: Tensor, growth: Tensor, lam: float | Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The SPD decision for stacked per-tensor sums, already reduced over whole tensors.

    ``inner`` = <g, p - p0>, ``dev_sq`` = ||p - p0||^2 and ``growth`` = ||p_adam - p0||^2 -
    ||p - p0||^2, summed element by element (the Adam update ``u``: sum u (2 (p - p0) + u)), so
    that a small step far from the anchor keeps an exact ratio where the difference of two large
    norms would cancel. Fires where c = -inner < 0. Returns ``(fired, ratio, coef)`` with
    ``p_new = p_adam - coef * (p_adam - p0)``; no host sync, no division by zero.
    """
    dev = dev_sq.clamp_min(0).sqrt()
    new_dev = (dev_sq + growth).clamp_min(0).sqrt()
    fired = inner > 0
    # ||a|| - ||b|| = (||a||^2 - ||b||^2) / (||a|| + ||b||)
    total = new_dev + dev
    diff = growth / torch.where(total > 0, total, torch.ones_like(total))
    safe = torch.where(new_dev > 0, new_dev, torch.ones_like(new_dev))
    ratio = (diff / safe).clamp(0, 1)
    ratio = torch.where(fired & (new_dev > 0), ratio, torch.zeros_like(ratio))
    return fired, ratio, ratio * lam


def project_(
    params: Sequence[Tensor], anchors: Sequence[Tensor | None], weights: Sequence[Tensor]
) -> None:
    """``p <- p - w (p - p0)`` in place (``lerp(p, p0, w)``; ``p *= 1 - w`` for zero anchors).

    Local, real tensors of one anchor kind (all None or all tensors); ``weights[i]`` is 0-d or
    has ``params[i]``'s shape (a per-element weight for flat buffers of several tensors)."""
    if not params:
        return
    if anchors[0] is None:
        keep = torch._foreach_add(torch._foreach_neg(list(weights)), 1)
        torch._foreach_mul_(list(params), keep)
        return
    start, numel = 0, 0
    for i, p in enumerate(params):  # chunks bound the anchors' dtype-cast temporaries
        numel += p.numel()
        if numel >= _CHUNK_NUMEL or i == len(params) - 1:
            ps = list(params[start : i + 1])
            targets = [a.to(q.dtype) for q, a in zip(ps, anchors[start : i + 1])]  # type: ignore[union-attr]
            torch._foreach_lerp_(ps, targets, list(weights[start : i + 1]))
            start, numel = i + 1, 0
