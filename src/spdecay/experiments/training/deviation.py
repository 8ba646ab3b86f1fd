"""How far a fine-tuned model moved from where it started, per layer and in total."""

from __future__ import annotations

import math

import torch
from torch import nn


@torch.no_grad()
def parameter_deviation(model: nn.Module, start: dict[str, torch.Tensor]) -> dict:
    """||theta - theta0|| per layer and in total over the trained non-head parameters (theta0:
    the pre-trained weights; for LoRA the adapters' initial values)."""
    names, dev, rel, ndim = [], [], [], []
    total_sq, ref_sq = 0.0, 0.0
    for name, p in model.named_parameters():
        if name not in start:
            continue
        d = float((p.detach().double() - start[name].double()).norm())
        r = float(start[name].double().norm())
        names.append(name)
        ndim.append(p.ndim)
        dev.append(d)
        rel.append(d / r if r > 0 else float("nan"))
        total_sq += d * d
        ref_sq += r * r
    total = math.sqrt(total_sq)
    return {
        "deviation": {"total": total, "relative": total / math.sqrt(ref_sq) if ref_sq > 0 else float("nan")},
        "layers": {"names": names, "deviation": dev, "relative": rel, "ndim": ndim},
    }


def no_deviation() -> dict:
    """The deviation fields of a row whose backbone never moved (probe, pre-trained model)."""
    return {"deviation": {"total": 0.0, "relative": 0.0},
            "layers": {"names": [], "deviation": [], "relative": [], "ndim": []}}


@torch.no_grad()
def total_deviation(model: nn.Module, start: dict[str, torch.Tensor]) -> float:
    """||theta - theta0|| over the parameters in ``start`` only (cheap: float32 per tensor, one
    sum; the D(t) trace recorded during training)."""
    total = 0.0
    for name, p in model.named_parameters():
        if name in start:
            total += float((p.detach().float() - start[name].float()).pow(2).sum())
    return math.sqrt(total)


TRACE_POINTS = 30  # D(t) is recorded about this many times per run (and at the last step)


def trace_every(total_steps: int) -> int:
    return max(1, total_steps // TRACE_POINTS)
