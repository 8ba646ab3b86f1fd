"""The readable single-tensor backend: the algorithm in code, one tensor at a time."""

from __future__ import annotations

import torch
from torch import Tensor

from spdecay.spd.backends.numerics import adam_coefficients, local_real
from spdecay.spd.decision import project_
from spdecay.spd.driver import PartialStep
from spdecay.spd.layout import pieces
from spdecay.spd.work import AdamHyper, TensorLists


def _sum(x: Tensor, y: Tensor) -> Tensor:
    return torch.sum(x * y, dtype=torch.float64)


def adam_and_sums(lists: TensorLists, h: AdamHyper) -> PartialStep | None:
    columns: list[Tensor] = []  # one [3] vector per column
    targets = []  # per parameter: (param view, anchor view, [(slice, column)]) for the projection
    for i in range(len(lists)):
        p, g, m, v, vmax, a = local_real([lists.params[i], lists.grads[i], lists.exp_avgs[i],
                                          lists.exp_avg_sqs[i], lists.max_exp_avg_sqs[i],
                                          lists.anchors[i] if h.spd else None])
        step = lists.steps[i]
        step += 1
        neg_step_size, bc2_sqrt = adam_coefficients(step, beta1=h.beta1, beta2=h.beta2, lr=h.lr)
        g = -g if h.maximize else g
        if h.spd:
            dev = p if a is None else p - a.to(p.dtype)
        elif h.weight_decay != 0:  # AdamW: decoupled decay before the Adam update
            p.mul_(1 - h.lr * h.weight_decay)
        g = g.to(m.dtype)  # moments may be kept in a higher precision (state_dtype)
        m.lerp_(g, 1 - h.beta1)
        v.mul_(h.beta2).addcmul_(g, g, value=1 - h.beta2)
        if h.amsgrad:
            torch.maximum(vmax, v, out=vmax)
            v = vmax
        # update = -step_size * m / (sqrt(v) / bc2_sqrt + eps), with tensor coefficients
        update = m / (v.sqrt() / (bc2_sqrt * neg_step_size)).add_(h.eps / neg_step_size)
        if h.spd:  # the sums before p moves (dev may alias p)
            layout = lists.layouts[i]
            parts = ([(slice(None), 0)] if layout is None else
                     [(slice(s, s + n), lid) for s, n, lid in pieces(layout, p.numel())])
            width = lists.width(i)
            acc = torch.zeros(3, width + 1, dtype=torch.float64, device=p.device)
            for sl, col in parts:  # padding (-1) lands in the extra last column
                d, u = (dev, update) if layout is None else (dev[sl], update[sl])
                # ||p_adam - p0||^2 - ||p - p0||^2 = <u, 2 (p - p0) + u>: no cancellation
                gs = g if layout is None else g[sl]
                acc[:, col] += torch.stack([_sum(gs, d), _sum(d, d), 2 * _sum(u, d) + _sum(u, u)])
            columns += list(acc[:, :width].unbind(1))
            targets.append((p, a, parts, width))
        p.add_(update)
    if not h.spd:
        return None
    sums = torch.stack(columns, dim=1) if columns else torch.zeros(3, 0, dtype=torch.float64)
    return PartialStep(sums, _Projector(targets), lists.sources(), 0.0)


class _Projector:
    def __init__(self, targets: list) -> None:
        self.targets = targets

    def project(self, coef: Tensor) -> None:
        start = 0
        for p, a, parts, width in self.targets:
            c = coef[start : start + width].to(p.dtype)
            start += width
            if len(parts) == 1 and parts[0][0] == slice(None):
                project_([p], [a], [c[0]])
                continue
            for sl, col in parts:
                if col >= 0:
                    project_([p[sl]], [None if a is None else a[sl]], [c[col]])
