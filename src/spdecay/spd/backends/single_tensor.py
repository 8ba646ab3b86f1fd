"""The readable single-tensor backend: the algorithm in code, one tensor at a time.

Also the add-on's torch measurement (``measure``), which the other torch-side backends share.
"""

from __future__ import annotations

import torch
from torch import Tensor

from spdecay.spd.backends.numerics import adam_coefficients, exact_deviation, exact_dot, local_real
from spdecay.spd.decision import project_
from spdecay.spd.interface import AdamHyper, PartialStep, TensorLists
from spdecay.spd.layout import pieces

# On CPU, ``measure`` walks large tensors in slices of this many elements (its float64
# temporaries stay in the cache).
_SLICE_NUMEL = 1 << 18


def _sum(x: Tensor, y: Tensor) -> Tensor:
    return torch.sum(x * y, dtype=torch.float64)


def covers(lists: TensorLists, i: int) -> bool:
    return True


def _parts(numel: int, layout, sliced: bool) -> list[tuple[slice, int]]:
    """(flat slice, column within the tensor; -1 padding) covering a tensor in order; with
    ``sliced``, no slice longer than ``_SLICE_NUMEL``."""
    spans = [(0, numel, 0)] if layout is None else pieces(layout, numel)
    step = _SLICE_NUMEL if sliced else max(numel, 1)
    return [(slice(s, min(s + step, start + length)), col)
            for start, length, col in spans for s in range(start, start + max(length, 1), step)]


def adam_and_sums(lists: TensorLists, h: AdamHyper) -> PartialStep | None:
    columns: list[Tensor] = []  # one [3] vector per column
    for i in range(len(lists)):
        p, g, m, v, vmax, a = local_real([lists.params[i], lists.grads[i], lists.exp_avgs[i],
                                          lists.exp_avg_sqs[i], lists.max_exp_avg_sqs[i],
                                          lists.anchors[i]])
        step = lists.steps[i]
        step += 1
        neg_step_size, bc2_sqrt = adam_coefficients(step, beta1=h.beta1, beta2=h.beta2, lr=h.lr)
        g = -g if h.maximize else g
        if h.with_sums:
            dev = p if a is None else p - a.to(p.dtype)
        elif h.decay != 0:  # AdamW: decoupled decay before the Adam update
            p.mul_(1 - h.lr * h.decay)
        g = g.to(m.dtype)  # moments may be kept in a higher precision (state_dtype)
        m.lerp_(g, 1 - h.beta1)
        v.mul_(h.beta2).addcmul_(g, g, value=1 - h.beta2)
        if h.amsgrad:
            torch.maximum(vmax, v, out=vmax)
            v = vmax
        # update = -step_size * m / (sqrt(v) / bc2_sqrt + eps), with tensor coefficients
        update = m / (v.sqrt() / (bc2_sqrt * neg_step_size)).add_(h.eps / neg_step_size)
        if h.with_sums:  # the sums before p moves (dev may alias p)
            width = lists.width(i)
            acc = torch.zeros(3, width + 1, dtype=torch.float64, device=p.device)
            for sl, col in _parts(p.numel(), lists.layouts[i], sliced=False):
                whole = lists.layouts[i] is None  # else p is 1-D: its segments are slices
                d, u, gs = (dev, update, g) if whole else (dev[sl], update[sl], g[sl])
                # ||p_adam - p0||^2 - ||p - p0||^2 = <u, 2 (p - p0) + u>: no cancellation
                acc[:, col] += torch.stack([_sum(gs, d), _sum(d, d), 2 * _sum(u, d) + _sum(u, u)])
            columns += list(acc[:, :width].unbind(1))  # padding (-1) went to the last column
        p.add_(update)
    if not h.with_sums:
        return None
    sums = torch.stack(columns, dim=1) if columns else torch.zeros(3, 0, dtype=torch.float64)
    return PartialStep(sums, _Projector(lists))


def measure(lists: TensorLists) -> PartialStep:
    """The add-on's sums of tensors as they are: ``[<g, p - p0>, ||p - p0||^2, 0]`` per column
    (row 0 is 0 where ``lists.grads`` are None), ``p - p0`` taken exactly in float64 and
    summed in float64, and a projector for these tensors."""
    columns: list[Tensor] = []
    for i in range(len(lists)):
        p, a, g = local_real([lists.params[i], lists.anchors[i], lists.grads[i]])
        width = lists.width(i)
        acc = torch.zeros(3, width + 1, dtype=torch.float64, device=p.device)
        flat = all(t is None or t.is_contiguous() for t in (p, a, g))
        if not flat:  # whole, as it is (never with a layout: those are 1-D)
            d = exact_deviation(p, a)
            acc[1, 0] = exact_dot(d, d)
            if g is not None:
                acc[0, 0] = exact_dot(g, d)
        else:
            pf, af = p.view(-1), None if a is None else a.view(-1)
            gf = None if g is None else g.view(-1)
            for sl, col in _parts(pf.numel(), lists.layouts[i], sliced=p.device.type == "cpu"):
                d = exact_deviation(pf[sl], None if af is None else af[sl])
                if gf is not None:
                    acc[0, col] += exact_dot(gf[sl], d)
                acc[1, col] += exact_dot(d, d)
        columns += list(acc[:, :width].unbind(1))
    sums = torch.stack(columns, dim=1) if columns else torch.zeros(3, 0, dtype=torch.float64)
    return PartialStep(sums, _Projector(lists))


class _Projector:
    """``p <- p - coef (p - p0)`` per column, through ``decision.project_`` (whole tensors in one
    multi-tensor call per anchor kind)."""

    def __init__(self, lists: TensorLists) -> None:
        self.lists = lists

    def project(self, coef: Tensor) -> None:
        lists, start = self.lists, 0
        by_dtype: dict[torch.dtype, Tensor] = {}
        whole: dict[bool, tuple[list, list, list]] = {True: ([], [], []), False: ([], [], [])}
        for i in range(len(lists)):
            p, a = local_real([lists.params[i], lists.anchors[i]])
            width = lists.width(i)
            if p.dtype not in by_dtype:
                by_dtype[p.dtype] = coef.to(p.dtype)
            c = by_dtype[p.dtype][start : start + width]
            start += width
            if lists.layouts[i] is None:
                ps, anchors, weights = whole[a is None]
                ps.append(p)
                anchors.append(a)
                weights.append(c[0])
                continue
            pf, af = p.view(-1), None if a is None else a.view(-1)
            for sl, col in _parts(pf.numel(), lists.layouts[i], sliced=False):
                if col >= 0:
                    project_([pf[sl]], [None if af is None else af[sl]], [c[col]])
        for ps, anchors, weights in whole.values():
            project_(ps, anchors, weights)
