"""A slow float64 per-tensor AdamSPD written straight from the algorithm in DEVELOPERS.md.

Independent of spdecay's code: plain Python floats for the step size, explicit `if` on the
condition, no shared helpers. Tests compare every spdecay path against it.
"""

from __future__ import annotations

import math

import torch


class ReferenceAdamSPD:
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1.0,
                 anchors=None, amsgrad=False, maximize=False, spd=True):
        self.params = [p.detach().clone().double() for p in params]
        self.anchors = (
            [p.clone() for p in self.params] if anchors is None
            else [None if a is None else a.detach().clone().double() for a in anchors]
        )
        self.lr, self.betas, self.eps, self.lam = lr, betas, eps, weight_decay
        self.amsgrad, self.maximize, self.spd = amsgrad, maximize, spd
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.vmax = [torch.zeros_like(p) for p in self.params]
        self.t = [0] * len(self.params)
        self.fired_log: list[list[bool]] = []

    def step(self, grads):
        b1, b2 = self.betas
        fired_now = []
        for i, g in enumerate(grads):
            if g is None:
                fired_now.append(None)
                continue
            g = g.detach().double()
            if self.maximize:
                g = -g
            p = self.params[i]
            self.t[i] += 1
            t = self.t[i]
            if not self.spd:
                p = p * (1 - self.lr * self.lam)
            self.m[i] = b1 * self.m[i] + (1 - b1) * g
            self.v[i] = b2 * self.v[i] + (1 - b2) * g * g
            v = self.v[i]
            if self.amsgrad:
                self.vmax[i] = torch.maximum(self.vmax[i], v)
                v = self.vmax[i]
            m_hat = self.m[i] / (1 - b1 ** t)
            v_hat = v / (1 - b2 ** t)
            p_adam = p - self.lr * m_hat / (v_hat.sqrt() + self.eps)
            fired = False
            if self.spd:
                p0 = self.anchors[i] if self.anchors[i] is not None else torch.zeros_like(p)
                c = -float((g * (p - p0)).sum())
                if c < 0:
                    fired = True
                    new_norm = float((p_adam - p0).norm())
                    old_norm = float((p - p0).norm())
                    r = 0.0 if new_norm == 0 else min(max((new_norm - old_norm) / new_norm, 0.0), 1.0)
                    p_adam = p_adam - self.lam * r * (p_adam - p0)
            self.params[i] = p_adam
            fired_now.append(fired)
        self.fired_log.append(fired_now)


def assert_no_nan(ts):
    for t in ts:
        assert not any(math.isnan(x) for x in t.flatten().tolist())
