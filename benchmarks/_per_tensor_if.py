"""The baseline both step-time benchmarks compare against: the paper's reference structure.

Per tensor, a Python ``if`` on the condition (a host read per tensor, a device sync on GPU),
and, with ``reference_memory``, the reference's state: moments, the anchor and an unused
parameter-sized buffer (4.0x parameter memory).
"""

from __future__ import annotations

import torch


class PerTensorIfSPD(torch.optim.Optimizer):
    def __init__(self, params, anchors=None, lr=1e-4, betas=(0.9, 0.999), eps=1e-8,
                 weight_decay=1.0, reference_memory=False):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.reference_memory = reference_memory
        if anchors is not None:  # else captured at the first step
            for p, a in zip(self.param_groups[0]["params"], anchors, strict=True):
                self.state[p]["pre"] = a

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                state = self.state[p]
                if "step" not in state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                    state.setdefault("pre", p.clone())
                    if self.reference_memory:
                        state["unused"] = torch.zeros_like(p)
                state["step"] += 1
                grad, pre = p.grad, state["pre"]
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                bc1 = 1 - beta1 ** state["step"]
                bc2 = 1 - beta2 ** state["step"]
                denom = (exp_avg_sq.sqrt() / bc2**0.5).add_(group["eps"])
                new_p = p - group["lr"] / bc1 * exp_avg / denom
                condition = -torch.sum(grad * (p - pre))
                if condition < 0.0:  # the host read, once per tensor
                    new_norm = torch.norm(new_p - pre)
                    ratio = ((new_norm - torch.norm(p - pre)) / new_norm).clamp(0, 1)
                    new_p = new_p - group["weight_decay"] * ratio * (new_p - pre)
                p.copy_(new_p)
