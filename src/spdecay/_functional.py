"""The math of AdamSPD, as plain functions over lists of tensors.

Every path (single-tensor reference, multi-tensor ``torch._foreach_*``, fused kernels) shares the
signature of :func:`adam_spd` and the semantics written in DEVELOPERS.md:

1. ``p_adam`` = a plain Adam step from ``p`` (no weight decay);
2. ``c = -<g, p - p0>`` over the whole tensor;
3. only where ``c < 0``: ``r = clamp((||p_adam - p0|| - ||p - p0||) / ||p_adam - p0||, 0, 1)``
   and ``p_new = p_adam - lam * r * (p_adam - p0)``.

Nothing here branches in Python on tensor values or calls ``.item()``: the condition and the ratio
are tensors, applied arithmetically, so a step never waits for the device and can be captured in a
CUDA graph. Hyper-parameter-derived coefficients (bias corrections) are computed from the step
tensors, on the parameters' device.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from spdecay._sharding import reduce_partial_sums, to_local


class SPDStepStats(NamedTuple):
    """Per-parameter results of one SPD step (lists of 0-d tensors, one entry per parameter)."""

    fired: list[Tensor]  # c < 0: the layer's progress pointed back towards its anchor
    ratio: list[Tensor]  # the ratio r that was applied (0 where the condition did not fire)
    deviation: list[Tensor]  # ||p - p0|| before the step


def _coefficient_dtype(device: torch.device) -> torch.dtype:
    # Bias corrections in float64 keep the step size as exact as torch's Python-float path.
    return torch.float32 if device.type == "mps" else torch.float64


def _as_real(tensors: list[Tensor | None]) -> list[Tensor | None]:
    return [torch.view_as_real(t) if t is not None and torch.is_complex(t) else t for t in tensors]


def _adam_coefficients(
    steps: Tensor, *, beta1: float, beta2: float, lr: float | Tensor
) -> tuple[Tensor, Tensor]:
    """Return (-step_size, bias_correction2_sqrt) for a stacked vector of step counts."""
    steps = steps.to(_coefficient_dtype(steps.device))
    bias_correction1 = 1 - torch.pow(beta1, steps)
    bias_correction2_sqrt = (1 - torch.pow(beta2, steps)).sqrt()
    if isinstance(lr, Tensor):
        lr = lr.to(device=steps.device, dtype=steps.dtype)
    return -lr / bias_correction1, bias_correction2_sqrt


def spd_ratio(
    inner: Tensor, dev_sq: Tensor, new_dev_sq: Tensor, weight_decay: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Vectorised SPD decision for stacked per-tensor sums (one entry per tensor).

    ``inner`` is <g, p - p0>, ``dev_sq`` ||p - p0||^2 and ``new_dev_sq`` ||p_adam - p0||^2, all
    already reduced over the whole logical tensor. Returns (fired, ratio, coefficient) where the
    projection is ``p_new = p_adam - coefficient * (p_adam - p0)``.
    """
    dev = dev_sq.clamp_min(0).sqrt()
    new_dev = new_dev_sq.clamp_min(0).sqrt()
    fired = inner > 0  # c = -<g, p - p0> < 0
    # No division by zero: where ||p_adam - p0|| is 0 the ratio is 0.
    safe = torch.where(new_dev > 0, new_dev, torch.ones_like(new_dev))
    ratio = ((new_dev - dev) / safe).clamp(0, 1)
    ratio = torch.where(fired & (new_dev > 0), ratio, torch.zeros_like(ratio))
    return fired, ratio, ratio * weight_decay


def _single_tensor_adam_spd(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    anchors: list[Tensor | None],
    *,
    amsgrad: bool,
    beta1: float,
    beta2: float,
    lr: float | Tensor,
    weight_decay: float,
    eps: float,
    maximize: bool,
    spd: bool,
    capturable: bool = False,
) -> SPDStepStats | None:
    """Readable per-tensor reference path."""
    stats = SPDStepStats([], [], [])
    for i, param in enumerate(params):
        grad = -grads[i] if maximize else grads[i]
        exp_avg, exp_avg_sq, step_t = exp_avgs[i], exp_avg_sqs[i], state_steps[i]
        max_exp_avg_sq = max_exp_avg_sqs[i] if amsgrad else None
        anchor = anchors[i] if spd else None
        param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, anchor = _as_real(
            [param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, anchor]
        )
        param_l, grad_l = to_local(param), to_local(grad)
        anchor_l = None if anchor is None else to_local(anchor)

        step_t += 1
        neg_step_size, bc2_sqrt = _adam_coefficients(step_t, beta1=beta1, beta2=beta2, lr=lr)

        if spd:
            dev = param_l if anchor_l is None else param_l - anchor_l
            inner = torch.sum(grad_l * dev)
            dev_sq = torch.sum(dev * dev)
        elif weight_decay != 0:  # AdamW: decoupled decay before the Adam update
            param.mul_(1 - lr * weight_decay)

        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        if amsgrad:
            torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
            second = max_exp_avg_sq
        else:
            second = exp_avg_sq
        # p += -step_size * m / (sqrt(v) / bc2_sqrt + eps), written with tensor coefficients.
        denom = (second.sqrt() / (bc2_sqrt * neg_step_size)).add_(eps / neg_step_size)
        param.addcdiv_(exp_avg, denom)

        if spd:
            new_dev = param_l if anchor_l is None else param_l - anchor_l
            new_dev_sq = torch.sum(new_dev * new_dev)
            sums = reduce_partial_sums(torch.stack([inner, dev_sq, new_dev_sq]).unsqueeze(1), [param])
            fired, ratio, coef = spd_ratio(sums[0], sums[1], sums[2], weight_decay)
            coef = coef[0].to(param.dtype)
            if anchor_l is None:
                param_l.mul_(1 - coef)
            else:
                param_l.lerp_(anchor_l.to(param_l.dtype), coef)
            stats.fired.append(fired[0])
            stats.ratio.append(ratio[0])
            stats.deviation.append(sums[1, 0].clamp_min(0).sqrt())
    return stats if spd else None


_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _foreach_sum_of_products(xs: list[Tensor], ys: list[Tensor]) -> list[Tensor]:
    """Per-tensor <x, y>: one fused multiply-reduce per tensor, no temporaries in fp32/fp64."""
    return [_dot(x, y) for x, y in zip(xs, ys)]


def _dot(x: Tensor, y: Tensor) -> Tensor:
    if x.dtype in _LOW_PRECISION or y.dtype in _LOW_PRECISION:
        return torch.dot(x.reshape(-1).float(), y.reshape(-1).float())
    return torch.dot(x.reshape(-1), y.reshape(-1))


def _deviations(params: list[Tensor], anchors: list[Tensor | None]) -> list[Tensor]:
    # Groups are split by anchor kind before this is called: all anchors or none.
    if anchors[0] is None:
        return params
    return torch._foreach_sub(params, [a.to(p.dtype) for p, a in zip(params, anchors)])


def _multi_tensor_adam_spd(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    anchors: list[Tensor | None],
    *,
    amsgrad: bool,
    beta1: float,
    beta2: float,
    lr: float | Tensor,
    weight_decay: float,
    eps: float,
    maximize: bool,
    spd: bool,
    capturable: bool = False,
) -> SPDStepStats | None:
    """Multi-tensor path: ``torch._foreach_*`` over tensors grouped by device, dtype, anchor kind."""
    if not params:
        return SPDStepStats([], [], []) if spd else None
    results: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
    for idx in _partition(params, anchors, spd):
        out = _multi_tensor_bucket(
            [params[i] for i in idx],
            [grads[i] for i in idx],
            [exp_avgs[i] for i in idx],
            [exp_avg_sqs[i] for i in idx],
            [max_exp_avg_sqs[i] for i in idx] if amsgrad else [],
            [state_steps[i] for i in idx],
            [anchors[i] for i in idx] if spd else [None] * len(idx),
            amsgrad=amsgrad,
            beta1=beta1,
            beta2=beta2,
            lr=lr,
            weight_decay=weight_decay,
            eps=eps,
            maximize=maximize,
            spd=spd,
        )
        if out is not None:
            for j, i in enumerate(idx):
                results[i] = (out[0][j], out[1][j], out[2][j])
    if not spd:
        return None
    ordered = [results[i] for i in range(len(params))]
    return SPDStepStats(*(list(col) for col in zip(*ordered)))


def _partition(params: list[Tensor], anchors: list[Tensor | None], spd: bool) -> list[list[int]]:
    """Split indices by (device, dtype, zero anchor): static properties, never tensor values."""
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        key = (p.device, p.dtype, spd and anchors[i] is None)
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def _multi_tensor_bucket(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    anchors: list[Tensor | None],
    *,
    amsgrad: bool,
    beta1: float,
    beta2: float,
    lr: float | Tensor,
    weight_decay: float,
    eps: float,
    maximize: bool,
    spd: bool,
) -> tuple[Tensor, Tensor, Tensor] | None:
    if maximize:
        grads = torch._foreach_neg(grads)
    if any(torch.is_complex(p) for p in params):
        params, grads, exp_avgs, exp_avg_sqs, anchors = (
            _as_real(params), _as_real(grads), _as_real(exp_avgs), _as_real(exp_avg_sqs), _as_real(anchors)
        )
        max_exp_avg_sqs = _as_real(max_exp_avg_sqs)
    params_l, grads_l = [to_local(p) for p in params], [to_local(g) for g in grads]
    anchors_l = [None if a is None else to_local(a) for a in anchors]

    torch._foreach_add_(state_steps, 1)
    neg_step_size, bc2_sqrt = _adam_coefficients(
        torch.stack(state_steps), beta1=beta1, beta2=beta2, lr=lr
    )
    dtype = params[0].dtype

    if spd:
        devs = _deviations(params_l, anchors_l)
        dev_sq = torch.stack(_foreach_sum_of_products(devs, devs))
        inner = torch.stack(_foreach_sum_of_products(grads_l, devs))
        del devs
    elif weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)

    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    if amsgrad:
        torch._foreach_maximum_(max_exp_avg_sqs, exp_avg_sqs)
        denom = torch._foreach_sqrt(max_exp_avg_sqs)
    else:
        denom = torch._foreach_sqrt(exp_avg_sqs)
    # denom = sqrt(v) / (bc2_sqrt * -step_size) + eps / -step_size, so p += m / denom.
    torch._foreach_div_(denom, list((bc2_sqrt * neg_step_size).to(dtype).unbind()))
    torch._foreach_add_(denom, list((eps / neg_step_size).to(dtype).unbind()))
    torch._foreach_addcdiv_(params, exp_avgs, denom)
    del denom

    if not spd:
        return None
    new_devs = _deviations(params_l, anchors_l)
    new_dev_sq = torch.stack(_foreach_sum_of_products(new_devs, new_devs))
    del new_devs
    sums = reduce_partial_sums(torch.stack([inner, dev_sq, new_dev_sq]), params)
    fired, ratio, coef = spd_ratio(sums[0], sums[1], sums[2], weight_decay)
    coef_list = list(coef.to(dtype).unbind())
    if anchors_l[0] is None:
        torch._foreach_mul_(params_l, list((1 - coef).to(dtype).unbind()))
    else:
        anchors_cast = [a.to(dtype) for a in anchors_l]
        torch._foreach_lerp_(params_l, anchors_cast, coef_list)
    return fired.unbind(), ratio.unbind(), sums[1].clamp_min(0).sqrt().unbind()


def adam_spd(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    anchors: list[Tensor | None],
    *,
    foreach: bool = True,
    fused: bool = False,
    amsgrad: bool,
    beta1: float,
    beta2: float,
    lr: float | Tensor,
    weight_decay: float,
    eps: float,
    maximize: bool,
    spd: bool,
    capturable: bool = False,
) -> SPDStepStats | None:
    """Functional AdamSPD: dispatch to the fused, multi-tensor or single-tensor path."""
    if fused:
        from spdecay._fused import fused_adam_spd as func
    elif foreach:
        func = _multi_tensor_adam_spd
    else:
        func = _single_tensor_adam_spd
    return func(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        max_exp_avg_sqs,
        state_steps,
        anchors,
        amsgrad=amsgrad,
        beta1=beta1,
        beta2=beta2,
        lr=lr,
        weight_decay=weight_decay,
        eps=eps,
        maximize=maximize,
        spd=spd,
        capturable=capturable,
    )
