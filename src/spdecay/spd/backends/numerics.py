"""Numerics shared by the torch backends (and the step coefficients of all of them)."""

from __future__ import annotations

import torch
from torch import Tensor

from spdecay.spd.reduce import to_local

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def coefficient_dtype(device: torch.device) -> torch.dtype:
    # Bias corrections in float64 keep the step size as exact as torch's Python-float path.
    return torch.float32 if device.type == "mps" else torch.float64


def real_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype.to_real() if dtype.is_complex else dtype


def as_real(tensors: list[Tensor | None]) -> list[Tensor | None]:
    return [torch.view_as_real(t) if t is not None and torch.is_complex(t) else t for t in tensors]


def local_real(tensors: list[Tensor | None]) -> list[Tensor | None]:
    """Local shards (DTensor) of real views (complex as pairs)."""
    return [None if t is None else to_local(t) for t in as_real(tensors)]


def adam_coefficients(
    steps: Tensor, *, beta1: float, beta2: float, lr: float | Tensor
) -> tuple[Tensor, Tensor]:
    """(-step_size, bias_correction2_sqrt) for a vector of (already incremented) step counts."""
    steps = steps.to(coefficient_dtype(steps.device))
    bias_correction1 = 1 - torch.pow(beta1, steps)
    bias_correction2_sqrt = (1 - torch.pow(beta2, steps)).sqrt()
    if isinstance(lr, Tensor):
        lr = lr.to(device=steps.device, dtype=steps.dtype)
    return -lr / bias_correction1, bias_correction2_sqrt


def dot(x: Tensor, y: Tensor) -> Tensor:
    """<x, y> in the wider of the two dtypes, at least float32 (one fused multiply-reduce)."""
    dtype = torch.promote_types(x.dtype, y.dtype)
    if dtype in _LOW_PRECISION:
        dtype = torch.float32
    return torch.dot(x.reshape(-1).to(dtype), y.reshape(-1).to(dtype))


def exact_dot(x: Tensor, y: Tensor) -> Tensor:
    """<x, y> accumulated in float64 (the add-on: growth as a difference of two such norms)."""
    return torch.dot(x.reshape(-1).to(torch.float64), y.reshape(-1).to(torch.float64))


def exact_deviation(p: Tensor, a: Tensor | None) -> Tensor:
    """p - p0 in float64 (exact for float32/bf16/fp16 inputs)."""
    if a is None:
        return p
    if p.dtype == torch.float64:
        return p - a
    return p.to(torch.float64).sub_(a)  # computed in float64: one temporary
