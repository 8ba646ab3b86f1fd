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

from spdecay._sharding import is_dtensor, reduce_partial_sums, to_local


class SPDStepStats(NamedTuple):
    """Per-parameter results of one SPD step (lists of 0-d tensors, one entry per parameter)."""

    fired: list[Tensor]  # c < 0: the layer's progress pointed back towards its anchor
    ratio: list[Tensor]  # the ratio r that was applied (0 where the condition did not fire)
    deviation: list[Tensor]  # ||p - p0|| before the step


def _coefficient_dtype(device: torch.device) -> torch.dtype:
    # Bias corrections in float64 keep the step size as exact as torch's Python-float path.
    return torch.float32 if device.type == "mps" else torch.float64


def _real_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype.to_real() if dtype.is_complex else dtype


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
    inner: Tensor,
    dev_sq: Tensor,
    new_dev_sq: Tensor,
    weight_decay: float,
    *,
    growth: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Vectorised SPD decision for stacked per-tensor sums (one entry per tensor).

    ``inner`` is <g, p - p0>, ``dev_sq`` ||p - p0||^2 and ``new_dev_sq`` ||p_adam - p0||^2, all
    already reduced over the whole logical tensor. ``growth``, if given, is
    ||p_adam - p0||^2 - ||p - p0||^2 summed element by element (sum of d*(2(p - p0) + d) for the
    Adam update d): with small steps far from the anchor it keeps the ratio exact where the
    difference of two large norms would cancel. Returns (fired, ratio, coefficient) where the
    projection is ``p_new = p_adam - coefficient * (p_adam - p0)``.
    """
    dev = dev_sq.clamp_min(0).sqrt()
    new_dev = new_dev_sq.clamp_min(0).sqrt()
    fired = inner > 0  # c = -<g, p - p0> < 0
    if growth is None:
        diff = new_dev - dev
    else:  # ||a|| - ||b|| = (||a||^2 - ||b||^2) / (||a|| + ||b||)
        total = new_dev + dev
        diff = growth / torch.where(total > 0, total, torch.ones_like(total))
    # No division by zero: where ||p_adam - p0|| is 0 the ratio is 0.
    safe = torch.where(new_dev > 0, new_dev, torch.ones_like(new_dev))
    ratio = (diff / safe).clamp(0, 1)
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

        grad = grad.to(exp_avg.dtype)  # moments may be kept in a higher precision (state_dtype)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        if amsgrad:
            torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
            second = max_exp_avg_sq
        else:
            second = exp_avg_sq
        # update = -step_size * m / (sqrt(v) / bc2_sqrt + eps), with tensor coefficients.
        denom = (second.sqrt() / (bc2_sqrt * neg_step_size)).add_(eps / neg_step_size)
        update = exp_avg / denom
        if spd:  # before p moves (dev may alias p)
            update_l = to_local(update)
            # ||p_adam - p0||^2 - ||p - p0||^2 = <u, 2 (p - p0) + u>, free of cancellation
            growth = 2 * torch.sum(update_l * dev) + torch.sum(update_l * update_l)
        param.add_(update)

        if spd:
            sums = reduce_partial_sums(torch.stack([inner, dev_sq, growth]).unsqueeze(1), [param])
            fired, ratio, coef = spd_ratio(
                sums[0], sums[1], sums[1] + sums[2], weight_decay, growth=sums[2]
            )
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
    # Moments may be wider than the parameter (state_dtype): take the wider, at least float32.
    dtype = torch.promote_types(x.dtype, y.dtype)
    if dtype in _LOW_PRECISION:
        dtype = torch.float32
    return torch.dot(x.reshape(-1).to(dtype), y.reshape(-1).to(dtype))


def _growth(updates: list[Tensor], devs: list[Tensor]) -> list[Tensor]:
    """Per tensor ||p + u - p0||^2 - ||p - p0||^2 = <u, 2 (p - p0) + u>, free of cancellation."""
    return [2 * _dot(u, d) + _dot(u, u) for u, d in zip(updates, devs)]


def _deviations(params: list[Tensor], anchors: list[Tensor | None]) -> list[Tensor]:
    # Partitions are split by anchor kind before this is called: all anchors or none.
    if anchors[0] is None:
        return params
    return torch._foreach_sub(params, [a.to(p.dtype) for p, a in zip(params, anchors)])


# Tensors up to this size are gathered into one flat buffer: on CPU a foreach op costs ~1.5 us
# per tensor, so thousands of tiny tensors are cheaper as one long vector.
_SMALL_NUMEL = 4096
# Large tensors are processed in chunks of about this many elements so that temporaries stay
# small enough to be reused by the allocator instead of being faulted in afresh every step.
_CHUNK_NUMEL = 1 << 23


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
    """Multi-tensor path.

    Phase 1 runs Adam and the per-tensor partial sums for every partition (same device, dtype,
    anchor kind and size class); the sums of all tensors are then reduced together (one
    collective per step for sharded tensors) and phase 2 projects.
    """
    one = multi_tensor_phase_one(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, anchors,
        amsgrad=amsgrad, beta1=beta1, beta2=beta2, lr=lr, weight_decay=weight_decay, eps=eps,
        maximize=maximize, spd=spd,
    )
    return finish_alone(one, spd)


def _multi_tensor_phase1(params: list[Tensor], anchors: list[Tensor | None], i: int, small: bool):
    """The phase-1 function of the partition holding tensor ``i`` (torch ops only)."""
    if small:
        return _flat_phase1
    return _sliced_phase1 if params[i].device.type == "cpu" else _foreach_phase1


class PhaseOne(NamedTuple):
    """A step halfway: Adam applied, the per-tensor partial sums [3, n] (local, float64, in the
    order of ``reduced``) not yet reduced over shards, the projections still to run."""

    n: int  # number of parameters of the call
    order: list[int]  # parameter index of each column of ``sums``
    reduced: list[Tensor]  # the parameters in column order (for reduce_partial_sums)
    sums: Tensor
    finishers: list  # (projection, number of columns) per partition
    weight_decay: float


def multi_tensor_phase_one(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
                           anchors, **hyper) -> PhaseOne | None:
    """Phase 1 of the multi-tensor path (AdamSPD batches the reduction of all its groups)."""
    return _phase_one(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
                      anchors, _multi_tensor_phase1, **hyper)


def _phase_one(
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, anchors, choose_phase1,
    *, amsgrad, beta1, beta2, lr, weight_decay, eps, maximize, spd, fused: list | None = None,
) -> PhaseOne | None:
    """Run phase 1 per partition (``choose_phase1`` picks its implementation); None where there
    is nothing to project (``spd=False``, or no parameters).

    ``fused[i]``, where not None, is the partition key of a tensor a fused kernel takes: such
    tensors form partitions of their own, small and large ones together (the kernel has no use
    for the flat gather)."""
    if not params:
        return None
    if not amsgrad:
        max_exp_avg_sqs = [None] * len(params)
    if not spd:
        anchors = [None] * len(params)
    hyper = dict(amsgrad=amsgrad, beta1=beta1, beta2=beta2, lr=lr, weight_decay=weight_decay,
                 eps=eps, maximize=maximize, spd=spd)
    order: list[int] = []
    sums_parts: list[Tensor] = []
    finishers = []
    for idx, small in _partition(params, anchors, spd, fused):
        run_phase1 = choose_phase1(params, anchors, idx[0], small)
        lists = (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, anchors)
        sums, finish = run_phase1(*([xs[i] for i in idx] for xs in lists), **hyper)
        if spd:
            order += idx
            sums_parts.append(sums.to(params[0].device, torch.float64))
            finishers.append((finish, len(idx)))
    if not spd:
        return None
    return PhaseOne(len(params), order, [params[i] for i in order], torch.cat(sums_parts, dim=1),
                    finishers, weight_decay)


def phase_two(one: PhaseOne, sums: Tensor) -> SPDStepStats:
    """Decide on the reduced sums (columns as ``one.sums``) and project; per-parameter stats."""
    fired, ratio, coef = spd_ratio(sums[0], sums[1], sums[1] + sums[2], one.weight_decay,
                                   growth=sums[2])
    start = 0
    for finish, n in one.finishers:
        finish(coef[start : start + n])
        start += n
    deviation = sums[1].clamp_min(0).sqrt()
    positions = [0] * one.n  # where tensor i's sums are (partitions reorder them)
    for k, i in enumerate(one.order):
        positions[i] = k
    columns = [col.unbind() for col in (fired, ratio, deviation)]
    return SPDStepStats(*([col[k] for k in positions] for col in columns))


def finish_alone(one: PhaseOne | None, spd: bool) -> SPDStepStats | None:
    """Phase 2 of one call on its own: reduce its sums over shards, decide and project."""
    if one is None:
        return SPDStepStats([], [], []) if spd else None
    return phase_two(one, reduce_partial_sums(one.sums, one.reduced))


def _partition(
    params: list[Tensor], anchors: list[Tensor | None], spd: bool, fused: list | None = None
) -> list[tuple[list[int], bool]]:
    """Split indices by static properties (device, dtype, sharded or not, anchor kind, small and
    contiguous); the flat path (small) takes local, real, contiguous tensors only."""
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        anchor = anchors[i]
        sharded = is_dtensor(p)
        kernel = None if fused is None else fused[i]
        small = (kernel is None and not sharded and p.numel() <= _SMALL_NUMEL
                 and p.is_contiguous() and not p.is_complex()
                 and (anchor is None or anchor.is_contiguous()))
        key = (p.device, p.dtype, sharded, spd and anchor is None,
               None if anchor is None else anchor.dtype, kernel, small)
        groups.setdefault(key, []).append(i)
    return [(idx, key[-1]) for key, idx in groups.items()]


def _chunks(tensors: list[Tensor]) -> list[slice]:
    out, start, total = [], 0, 0
    for i, t in enumerate(tensors):
        total += t.numel()
        if total >= _CHUNK_NUMEL:
            out.append(slice(start, i + 1))
            start, total = i + 1, 0
    if start < len(tensors):
        out.append(slice(start, len(tensors)))
    return out


def _foreach_phase1(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, anchors,
                    *, amsgrad, beta1, beta2, lr, weight_decay, eps, maximize, spd):
    """Adam via torch._foreach_* over chunks of large tensors.

    Returns partial sums [3, n] (<g, p - p0>, ||p - p0||^2, growth of that) and the projection."""
    if any(torch.is_complex(p) for p in params):
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, anchors = (
            _as_real(x) for x in (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, anchors)
        )
    params_l = [to_local(p) for p in params]
    grads_l = [to_local(g) for g in grads]
    anchors_l = [None if a is None else to_local(a) for a in anchors]
    # DTensor state (FSDP2) goes local too: foreach ops reject mixed DTensor / Tensor lists.
    exp_avgs, exp_avg_sqs = [to_local(t) for t in exp_avgs], [to_local(t) for t in exp_avg_sqs]
    max_exp_avg_sqs = [None if t is None else to_local(t) for t in max_exp_avg_sqs]
    dtype = params[0].dtype
    torch._foreach_add_(state_steps, 1)
    neg_step_size, bc2_sqrt = _adam_coefficients(torch.stack(state_steps), beta1=beta1,
                                                 beta2=beta2, lr=lr)
    state_dtype = exp_avgs[0].dtype
    denom_scale = list((bc2_sqrt * neg_step_size).to(state_dtype).unbind())
    denom_shift = list((eps / neg_step_size).to(state_dtype).unbind())
    inner, dev_sq, growth = [], [], []
    for sl in _chunks(params_l):
        p, g, m, v = params_l[sl], grads_l[sl], exp_avgs[sl], exp_avg_sqs[sl]
        if maximize:
            g = torch._foreach_neg(g)
        if spd:
            devs = _deviations(p, anchors_l[sl])
            dev_sq += _foreach_sum_of_products(devs, devs)
            inner += _foreach_sum_of_products(g, devs)
        elif weight_decay != 0:
            torch._foreach_mul_(p, 1 - lr * weight_decay)
        if g[0].dtype != m[0].dtype:  # moments kept in a higher precision (state_dtype)
            g = [x.to(m[0].dtype) for x in g]
        torch._foreach_lerp_(m, g, 1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, g, g, 1 - beta2)
        if amsgrad:
            torch._foreach_maximum_(max_exp_avg_sqs[sl], v)
            v = max_exp_avg_sqs[sl]
        # denom = sqrt(v) / (bc2_sqrt * -step_size) + eps / -step_size, so p += m / denom.
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, denom_scale[sl])
        torch._foreach_add_(denom, denom_shift[sl])
        if spd:
            update = torch._foreach_div(m, denom)
            del denom
            growth += _growth(update, devs)  # before p moves: devs may alias p
            del devs
            torch._foreach_add_(p, update)
            del update
        else:
            torch._foreach_addcdiv_(p, m, denom)
            del denom
    if not spd:
        return None, None
    sums = torch.stack([torch.stack(inner), torch.stack(dev_sq), torch.stack(growth)])

    def project(coef: Tensor) -> None:
        coef = coef.to(dtype)
        if anchors_l[0] is None:
            torch._foreach_mul_(params_l, list((1 - coef).unbind()))
            return
        weights = list(coef.unbind())
        for sl in _chunks(params_l):
            targets = [a.to(dtype) for a in anchors_l[sl]]
            torch._foreach_lerp_(params_l[sl], targets, weights[sl])

    return sums, project


# On CPU, large tensors are walked in slices of this many elements, every Adam/SPD op applied to
# one slice before the next: the slice's working set stays in the last-level cache, where one
# foreach op per whole tensor list would stream each buffer from memory again and again.
_SLICE_NUMEL = 1 << 19


def _slices(t: Tensor) -> list[slice]:
    n = t.numel()
    if n == 0:  # an empty local shard (FSDP2, more ranks than rows)
        return [slice(0, 0)]
    return [slice(i, min(i + _SLICE_NUMEL, n)) for i in range(0, n, _SLICE_NUMEL)]


def _sliced_phase1(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, anchors,
                   *, amsgrad, beta1, beta2, lr, weight_decay, eps, maximize, spd):
    """CPU path for large tensors: slice by slice, cache-resident; returns sums [3, n]."""
    if any(torch.is_complex(p) for p in params):
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, anchors = (
            _as_real(x) for x in (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, anchors)
        )
    params_l = [to_local(p) for p in params]
    anchors_l = [None if a is None else to_local(a) for a in anchors]
    dtype = params[0].dtype
    torch._foreach_add_(state_steps, 1)
    neg_step_size, bc2_sqrt = _adam_coefficients(torch.stack(state_steps), beta1=beta1,
                                                 beta2=beta2, lr=lr)
    state_dtype = exp_avgs[0].dtype
    denom_scale = (bc2_sqrt * neg_step_size).to(state_dtype).unbind()
    denom_shift = (eps / neg_step_size).to(state_dtype).unbind()
    decay = 1 - lr * weight_decay
    sums = []
    for i, p_full in enumerate(params_l):
        tensors = [p_full, to_local(grads[i]), to_local(exp_avgs[i]), to_local(exp_avg_sqs[i]),
                   to_local(max_exp_avg_sqs[i]) if amsgrad else None, anchors_l[i]]
        # Slice flat views only where every tensor is contiguous (a transposed parameter may
        # have a contiguous gradient); otherwise process the tensors whole, as they are.
        sliced = all(t is None or t.is_contiguous() for t in tensors)
        p, g, m, v, v_max, a = (
            t.view(-1) if sliced and t is not None else t for t in tensors
        )
        parts = []
        for sl in _slices(p) if sliced else [slice(None)]:
            p_s, g_s, m_s, v_s = p[sl], g[sl], m[sl], v[sl]
            if maximize:
                g_s = -g_s
            g_s = g_s.to(m_s.dtype)  # no-op unless moments are kept in a higher precision
            if spd:
                d = p_s if a is None else p_s - a[sl]
                parts += [_dot(g_s, d), _dot(d, d)]
            elif weight_decay != 0:
                p_s.mul_(decay)
            m_s.lerp_(g_s, 1 - beta1)
            v_s.mul_(beta2).addcmul_(g_s, g_s, value=1 - beta2)
            if amsgrad:
                v_s = torch.maximum(v_max[sl], v_s, out=v_max[sl])
            denom = v_s.sqrt().div_(denom_scale[i]).add_(denom_shift[i])
            if spd:
                update = torch.div(m_s, denom, out=denom)
                parts += _growth([update], [d])  # before p moves: d may alias p
                p_s.add_(update)
            else:
                p_s.addcdiv_(m_s, denom)
        if spd:
            sums.append(torch.stack(parts).view(-1, 3).sum(0))
    if not spd:
        return None, None

    def project(coef: Tensor) -> None:
        weights = coef.to(dtype).unbind()
        for i, p in enumerate(params_l):
            if anchors_l[i] is None:
                p.mul_(1 - weights[i])
            else:
                p.lerp_(anchors_l[i].to(dtype), weights[i])

    return torch.stack(sums, dim=1), project


_SEGMENT_CACHE: dict[tuple, Tensor] = {}


def _segment_ids(sizes: tuple[int, ...], device: torch.device) -> Tensor:
    """Which tensor each element of a flat buffer belongs to; built once per layout on the host
    and copied without blocking (a blocking copy would stall the GPU)."""
    key = (sizes, device)
    if key not in _SEGMENT_CACHE:
        if len(_SEGMENT_CACHE) > 64:
            _SEGMENT_CACHE.clear()
        ids = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
        if device.type == "cuda":
            ids = ids.pin_memory().to(device, non_blocking=True)
        _SEGMENT_CACHE[key] = ids.to(device)
    return _SEGMENT_CACHE[key]


def _flat_phase1(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, anchors,
                 *, amsgrad, beta1, beta2, lr, weight_decay, eps, maximize, spd):
    """Adam for many small tensors at once, gathered into flat vectors; sums [3, n]."""
    device, n = params[0].device, len(params)
    # computed in the wider of the parameter and moment dtypes; copied back with a cast
    dtype = torch.promote_types(params[0].dtype, exp_avgs[0].dtype)
    sizes = [p.numel() for p in params]
    segment = _segment_ids(tuple(sizes), device)

    def flat(ts: list[Tensor]) -> Tensor:
        return torch._C._nn.flatten_dense_tensors(ts).to(dtype)

    def scatter(dst: list[Tensor], src: Tensor) -> None:
        torch._foreach_copy_([t.view(-1) for t in dst], list(src.split(sizes)))

    def segment_sum(x: Tensor) -> Tensor:
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        return torch.zeros(n, device=device, dtype=acc).index_add_(0, segment, x.to(acc))

    torch._foreach_add_(state_steps, 1)
    neg_step_size, bc2_sqrt = _adam_coefficients(torch.stack(state_steps), beta1=beta1,
                                                 beta2=beta2, lr=lr)
    p, g, m, v = flat(params), flat(grads), flat(exp_avgs), flat(exp_avg_sqs)
    if maximize:
        g = g.neg_()
    anchor = flat(anchors) if spd and anchors[0] is not None else None
    if spd:
        dev = p if anchor is None else p - anchor
        dev_sq, inner = segment_sum(dev * dev), segment_sum(g * dev)
    elif weight_decay != 0:
        p.mul_(1 - lr * weight_decay)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    scatter(exp_avgs, m)
    scatter(exp_avg_sqs, v)
    if amsgrad:
        v_max = torch.maximum(flat(max_exp_avg_sqs), v)
        scatter(max_exp_avg_sqs, v_max)
        v = v_max
    scale = (bc2_sqrt * neg_step_size).to(dtype).index_select(0, segment)
    shift = (eps / neg_step_size).to(dtype).index_select(0, segment)
    denom = v.sqrt().div_(scale).add_(shift)
    if not spd:
        p.addcdiv_(m, denom)
        scatter(params, p)
        return None, None
    update = torch.div(m, denom, out=denom)
    growth = 2 * segment_sum(update * dev) + segment_sum(update * update)  # before p moves
    del dev
    p.add_(update)
    sums = torch.stack([inner, dev_sq, growth])

    def project(coef: Tensor) -> None:
        weight = coef.to(dtype).index_select(0, segment)
        if anchor is None:
            p.mul_(1 - weight)
        else:
            p.lerp_(anchor, weight)
        scatter(params, p)

    return sums, project


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
    if fused and params and params[0].is_cuda:
        from spdecay._triton import triton_adam_spd as func
    elif fused:
        from spdecay._fused_cpu import fused_adam_spd as func
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
