"""AdamSPD as Triton kernels: two passes over memory, a handful of launches per step.

SPD needs a reduction over each *whole* tensor before it can decide and project, so a step is at
least two passes over memory (DEVELOPERS.md). This module does exactly that, for all tensors of a
param group at once:

1. ``_pass1``: Adam update, plus per-chunk partial sums of <g, p - p0>, ||p - p0||^2 and
   ||p_adam - p0||^2 - ||p - p0||^2 (summed directly, free of cancellation) written to a
   [3, n_chunks] buffer (no atomics: deterministic);
2. ``_reduce``: one program per tensor sums its chunks in float64 (and increments its step
   count); the driver reduces the sums over shards and takes the decision
   (``spdecay.spd.decision.spd_ratio``);
3. ``_pass2`` (the projector): ``p += coef * (p0 - p)``; chunks of tensors whose condition did
   not fire return at once, so pass 2 only costs bandwidth where SPD acts.

All tensors of a launch are reached through a device table of base addresses (one row per
tensor) and a table of chunks (tensor index, first element), cached per set of addresses, so a
step is a few launches whatever the number of tensors, with no host sync: step counts and a
tensor ``lr`` are read by the kernels from device memory, so the step can be captured in a CUDA
graph.

Mixed precision: parameters, gradients, moments and anchors each keep their own dtype (e.g. bf16
parameters with fp32 ``exp_avg``/``exp_avg_sq`` and bf16 anchors). Every element is computed in
float32 (float64 for float64 tensors) and rounded once when stored; the SPD sums use the rounded
``p_adam``, i.e. the value the parameter really takes. Each lane accumulates its products in that
compute dtype (float32 for float32, bf16 and fp16 tensors); the chunk sums are added up in
float64. ``measure`` (the add-on's) is the single-tensor backend's torch code.
"""

from __future__ import annotations

import math
import os
import weakref
from collections import OrderedDict
from operator import attrgetter

import torch
from torch import Tensor

from spdecay.spd.backends.numerics import as_real
from spdecay.spd.backends.single_tensor import measure
from spdecay.spd.interface import AdamHyper, PartialStep, TensorLists, joined
from spdecay.spd.reduce import is_dtensor, to_local

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - exercised where triton is missing
    triton = tl = libdevice = None

HAS_TRITON = triton is not None
__all__ = ["HAS_TRITON", "adam_and_sums", "covers", "measure"]  # measure: the add-on's (torch)

# Measured on an H100 (benchmarks/gpu_step_time.py --sweep): 1024 x 4 with 4 warps was 2-3%
# faster than larger chunks or more warps on ViT-B, ViT-L and a LLaMA-7B layer stack.
_BLOCK = 1024  # elements per inner iteration (128 threads x 8 contiguous elements)
_ITERS = 4  # inner iterations per program: a chunk is _BLOCK * _ITERS elements
_NUM_WARPS = 4
_REDUCE_BLOCK = 128
_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# Triton's CPU interpreter has no libdevice: beta**t goes through exp2 there.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def covers(lists: TensorLists, i: int) -> bool:
    """Whether the kernels take tensor ``i``: dense tensors of one layout (any dim order) in a
    supported dtype, on the step count's device; no FlatLayout."""
    if not HAS_TRITON or lists.layouts[i] is not None:
        return False
    row = [lists.params[i], lists.grads[i], lists.exp_avgs[i], lists.exp_avg_sqs[i],
           lists.max_exp_avg_sqs[i], lists.anchors[i]]
    row = [None if t is None else to_local(t) for t in as_real(row)]
    return _kernel_compatible(row, lists.steps[i])


if HAS_TRITON:

    @triton.jit
    def _sqrt(x):
        # IEEE-rounded, like torch (tl.sqrt is the fast approximation in float32).
        if x.dtype == tl.float32:
            return tl.sqrt_rn(x)
        else:
            return tl.sqrt(x)

    @triton.jit
    def _div(x, y):
        if x.dtype == tl.float32:
            return tl.div_rn(x, y)
        else:
            return x / y

    @triton.jit
    def _pass1(
        param_ptrs, grad_ptrs, exp_avg_ptrs, exp_avg_sq_ptrs, max_sq_ptrs, anchor_ptrs,
        step_ptrs, numels, chunk_tensor, chunk_start, partials, n_chunks,
        lr_ptr, lr: tl.float64, beta1: tl.float64, beta2: tl.float64, log2_beta1: tl.float64,
        log2_beta2: tl.float64, eps: tl.float64, decay: tl.float64,
        P_DT: tl.constexpr, G_DT: tl.constexpr, S_DT: tl.constexpr, A_DT: tl.constexpr,
        C_DT: tl.constexpr, SUMS: tl.constexpr, HAS_ANCHOR: tl.constexpr,
        AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, LR_IS_TENSOR: tl.constexpr,
        STEP_DT: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr,
        INTERPRET: tl.constexpr,
    ):
        pid = tl.program_id(0)
        t = tl.load(chunk_tensor + pid)
        start = tl.load(chunk_start + pid)
        numel = tl.load(numels + t)
        p_ptr = tl.load(param_ptrs + t).to(tl.pointer_type(P_DT))
        g_ptr = tl.load(grad_ptrs + t).to(tl.pointer_type(G_DT))
        m_ptr = tl.load(exp_avg_ptrs + t).to(tl.pointer_type(S_DT))
        v_ptr = tl.load(exp_avg_sq_ptrs + t).to(tl.pointer_type(S_DT))

        # Bias corrections in float64 from the device step count. With SUMS the reduce kernel
        # increments it after this pass (one program per tensor); without, it was done before.
        step = tl.load(tl.load(step_ptrs + t).to(tl.pointer_type(STEP_DT))).to(tl.float64)
        if SUMS:
            step = step + 1.0
        if LR_IS_TENSOR:
            lr_v = tl.load(lr_ptr).to(tl.float64)
        else:
            lr_v = lr
        if INTERPRET:
            bc1 = 1.0 - tl.exp2(step * log2_beta1)
            bc2_sqrt = tl.sqrt(1.0 - tl.exp2(step * log2_beta2))
        else:  # float64 pow from libdevice
            bc1 = 1.0 - libdevice.pow(beta1, step)
            bc2_sqrt = tl.sqrt(1.0 - libdevice.pow(beta2, step))
        step_size = (lr_v / bc1).to(C_DT)
        bc2_sqrt = bc2_sqrt.to(C_DT)
        keep = tl.cast(1.0 - lr_v * decay, C_DT)
        # Scalars in the compute dtype, so the element-wise math stays in float32 for float32.
        b1c = tl.cast(1.0 - beta1, C_DT)
        b2 = tl.cast(beta2, C_DT)
        b2c = tl.cast(1.0 - beta2, C_DT)
        eps_c = tl.cast(eps, C_DT)

        acc_inner = tl.zeros((BLOCK,), dtype=C_DT)
        acc_dev = tl.zeros((BLOCK,), dtype=C_DT)
        acc_delta = tl.zeros((BLOCK,), dtype=C_DT)
        for i in range(0, ITERS):  # a constant bound: masked lanes move no memory
            offs = start + i * BLOCK + tl.arange(0, BLOCK)
            mask = offs < numel
            p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(C_DT)
            g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(C_DT)
            m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(C_DT)
            v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(C_DT)
            if MAXIMIZE:
                g = -g
            if SUMS:
                if HAS_ANCHOR:
                    a_ptr = tl.load(anchor_ptrs + t).to(tl.pointer_type(A_DT))
                    a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(C_DT)
                    d = p - a
                else:
                    d = p
                acc_inner += g * d
                acc_dev += d * d
            else:  # AdamW: decoupled decay before the Adam update
                p = p * keep
            m = m + b1c * (g - m)  # lerp, as torch's exp_avg.lerp_(g, 1 - beta1)
            v = v * b2 + b2c * g * g
            if AMSGRAD:
                vm_ptr = tl.load(max_sq_ptrs + t).to(tl.pointer_type(S_DT))
                vmax = tl.maximum(tl.load(vm_ptr + offs, mask=mask, other=0.0).to(C_DT), v)
                tl.store(vm_ptr + offs, vmax.to(S_DT), mask=mask)
                second = vmax
            else:
                second = v
            denom = _div(_sqrt(second), bc2_sqrt) + eps_c
            p_new = (p - _div(step_size * m, denom)).to(P_DT)
            tl.store(p_ptr + offs, p_new, mask=mask)
            tl.store(m_ptr + offs, m.to(S_DT), mask=mask)
            tl.store(v_ptr + offs, v.to(S_DT), mask=mask)
            if SUMS:
                # ||p_adam - p0||^2 - ||p - p0||^2 = <u, u + 2 (p - p0)> with u = p_adam - p,
                # summed directly: the difference of the two norms would cancel catastrophically
                # when the step is small next to the deviation (the usual case in fine-tuning).
                u = p_new.to(C_DT) - p  # the rounded value the parameter really takes
                acc_delta += tl.where(mask, u * (u + 2.0 * d), 0.0)  # masked lanes: 0/0 if eps=0
        if SUMS:
            tl.store(partials + pid, tl.sum(acc_inner, axis=0).to(tl.float64))
            tl.store(partials + n_chunks + pid, tl.sum(acc_dev, axis=0).to(tl.float64))
            tl.store(partials + 2 * n_chunks + pid, tl.sum(acc_delta, axis=0).to(tl.float64))

    @triton.jit
    def _reduce(
        partials, n_chunks, tensor_first_chunk, sums, n_tensors, step_ptrs,
        STEP_DT: tl.constexpr, RBLOCK: tl.constexpr, R_ITERS: tl.constexpr,
    ):
        t = tl.program_id(0)
        step_ptr = tl.load(step_ptrs + t).to(tl.pointer_type(STEP_DT))
        tl.store(step_ptr, tl.load(step_ptr) + 1)  # after pass 1 has read it
        first = tl.load(tensor_first_chunk + t)
        last = tl.load(tensor_first_chunk + t + 1)
        s0 = tl.zeros((RBLOCK,), dtype=tl.float64)
        s1 = tl.zeros((RBLOCK,), dtype=tl.float64)
        s2 = tl.zeros((RBLOCK,), dtype=tl.float64)
        # A constexpr bound (a power of two covering the largest tensor's chunks): few variants.
        for c in range(0, R_ITERS):
            offs = first + c * RBLOCK + tl.arange(0, RBLOCK)
            mask = offs < last
            s0 += tl.load(partials + offs, mask=mask, other=0.0)
            s1 += tl.load(partials + n_chunks + offs, mask=mask, other=0.0)
            s2 += tl.load(partials + 2 * n_chunks + offs, mask=mask, other=0.0)
        tl.store(sums + t, tl.sum(s0, axis=0))
        tl.store(sums + n_tensors + t, tl.sum(s1, axis=0))
        tl.store(sums + 2 * n_tensors + t, tl.sum(s2, axis=0))  # ||p_adam - p0||^2 - ||p - p0||^2

    @triton.jit
    def _pass2(
        param_ptrs, anchor_ptrs, numels, chunk_tensor, chunk_start, coef_ptr,
        P_DT: tl.constexpr, A_DT: tl.constexpr, C_DT: tl.constexpr,
        HAS_ANCHOR: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr,
    ):
        pid = tl.program_id(0)
        t = tl.load(chunk_tensor + pid)
        coef = tl.load(coef_ptr + t).to(C_DT)
        if coef != 0:  # not fired: nothing to read or write
            start = tl.load(chunk_start + pid)
            numel = tl.load(numels + t)
            p_ptr = tl.load(param_ptrs + t).to(tl.pointer_type(P_DT))
            for i in range(0, ITERS):
                offs = start + i * BLOCK + tl.arange(0, BLOCK)
                mask = offs < numel
                p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(C_DT)
                if HAS_ANCHOR:
                    a_ptr = tl.load(anchor_ptrs + t).to(tl.pointer_type(A_DT))
                    a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(C_DT)
                    p = p + coef * (a - p)
                else:
                    p = p * (1.0 - coef)
                tl.store(p_ptr + offs, p.to(P_DT), mask=mask)

    _TL_DTYPES = {
        torch.float32: tl.float32,
        torch.bfloat16: tl.bfloat16,
        torch.float16: tl.float16,
        torch.float64: tl.float64,
    }


class _Tables:
    """Device tables for one set of tensors: base addresses, sizes and the chunk decomposition."""

    def __init__(self, addresses: list[list[int]], numels: list[int], device: torch.device) -> None:
        chunk = _BLOCK * _ITERS
        counts = [max(1, -(-n // chunk)) for n in numels]
        chunk_tensor = [t for t, c in enumerate(counts) for _ in range(c)]
        chunk_start = [k * chunk for c in counts for k in range(c)]
        first = [0]
        for c in counts:
            first.append(first[-1] + c)
        rows = [*addresses, numels, chunk_start, first, chunk_tensor]
        width = max(len(r) for r in rows)
        host = torch.zeros(len(rows), width, dtype=torch.int64)
        for i, r in enumerate(rows):
            host[i, : len(r)] = torch.tensor(r, dtype=torch.int64)
        if device.type == "cuda":
            # Pinned + non_blocking: no host sync. The host copy is kept alive with the table so
            # a copy captured into a CUDA graph stays valid.
            host = host.pin_memory()
        self.host = host
        self.device_table = host.to(device, non_blocking=True)
        k = len(addresses)
        self.addresses = [self.device_table[i] for i in range(k)]
        self.numels = self.device_table[k]
        self.chunk_start = self.device_table[k + 1]
        self.first_chunk = self.device_table[k + 2]
        self.chunk_tensor = self.device_table[k + 3].to(torch.int32)[: len(chunk_tensor)]
        self.n_chunks = len(chunk_tensor)
        self.r_iters = triton.next_power_of_2(-(-max(counts) // _REDUCE_BLOCK))


def _is_dense(t: Tensor) -> bool:
    """Non-overlapping and dense (any dim order): its storage is a flat array of numel elements."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride(), strict=True), key=lambda d: d[1]):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def _kernel_compatible(tensors: list[Tensor | None], step: Tensor | None) -> bool:
    """All present tensors dense with one shape, layout and supported dtype: walkable as flat
    arrays of the parameter's size (the kernels touch exactly that many elements of each)."""
    present = [t for t in tensors if t is not None]
    first = present[0]
    return (
        _is_dense(first)
        and (step is None or (step.device == first.device
                              and step.dtype in (torch.float32, torch.float64)))
        and all(
            t.dtype in _SUPPORTED_DTYPES and t.shape == first.shape
            and t.stride() == first.stride() and t.device == first.device
            for t in present
        )
    )


class _Group:
    """One launch set: tensors sharing dtypes, with their tables and persistent outputs."""

    def __init__(self, idx: list[int], cols: list[list[Tensor | None]], steps: list[Tensor],
                 *, sums: bool, amsgrad: bool, maximize: bool) -> None:
        params, grads, exp_avgs, _, _, anchors = cols
        device = params[0].device
        self.idx, self.device, self.n = idx, device, len(idx)
        self.steps = steps  # only read without sums (a foreach increment)
        addrs = [[0 if t is None else t.data_ptr() for t in col] for col in (*cols, steps)]
        self.tables = _Tables(addrs, [t.numel() for t in params], device)
        has_anchor = sums and anchors[0] is not None
        p_dt = _TL_DTYPES[params[0].dtype]
        wide = torch.float64 in (params[0].dtype, exp_avgs[0].dtype)
        self.meta = dict(
            P_DT=p_dt, G_DT=_TL_DTYPES[grads[0].dtype], S_DT=_TL_DTYPES[exp_avgs[0].dtype],
            A_DT=_TL_DTYPES[anchors[0].dtype] if has_anchor else p_dt,
            C_DT=tl.float64 if wide else tl.float32, SUMS=sums, HAS_ANCHOR=has_anchor,
            AMSGRAD=amsgrad, MAXIMIZE=maximize, STEP_DT=_TL_DTYPES[steps[0].dtype],
        )
        n, chunks = self.n, self.tables.n_chunks
        # Persistent buffers: no allocation per step, and stable addresses for CUDA graphs.
        self.partials = torch.empty(3 * chunks if sums else 1, dtype=torch.float64, device=device)
        self.sums = torch.empty(3, n, dtype=torch.float64, device=device)
        self.coef = torch.zeros(n, dtype=torch.float64, device=device)

    def launch(self, lr: float | Tensor, *, beta1: float, beta2: float, decay: float,
               eps: float) -> Tensor | None:
        """Pass 1 and the chunk sums; returns the sums [3, n] (None without sums)."""
        t, meta = self.tables, self.meta
        p_ptrs, g_ptrs, m_ptrs, v_ptrs, vm_ptrs, a_ptrs, step_ptrs = t.addresses
        sums = meta["SUMS"]
        if not sums:
            torch._foreach_add_(self.steps, 1)
        lr_is_tensor = isinstance(lr, Tensor) and lr.device == self.device
        _pass1[(t.n_chunks,)](
            p_ptrs, g_ptrs, m_ptrs, v_ptrs, vm_ptrs, a_ptrs, step_ptrs, t.numels,
            t.chunk_tensor, t.chunk_start, self.partials, t.n_chunks,
            lr if lr_is_tensor else step_ptrs,  # step_ptrs: a dummy the kernel never reads
            0.0 if lr_is_tensor else float(lr),  # a CPU tensor lr is read on the host
            beta1, beta2, _log2(beta1), _log2(beta2), eps, decay,
            **meta, LR_IS_TENSOR=lr_is_tensor, BLOCK=_BLOCK, ITERS=_ITERS, INTERPRET=_INTERPRET,
            num_warps=_NUM_WARPS,
        )
        if not sums:
            return None
        _reduce[(self.n,)](
            self.partials, t.n_chunks, t.first_chunk, self.sums, self.n, step_ptrs,
            STEP_DT=meta["STEP_DT"], RBLOCK=_REDUCE_BLOCK, R_ITERS=t.r_iters,
        )
        return self.sums

    def project(self, coef: Tensor) -> None:
        t, meta = self.tables, self.meta
        self.coef.copy_(coef)  # a persistent buffer: stable address for CUDA graphs
        _pass2[(t.n_chunks,)](
            t.addresses[0], t.addresses[5], t.numels, t.chunk_tensor, t.chunk_start, self.coef,
            P_DT=meta["P_DT"], A_DT=meta["A_DT"], C_DT=meta["C_DT"],
            HAS_ANCHOR=meta["HAS_ANCHOR"], BLOCK=_BLOCK, ITERS=_ITERS, num_warps=_NUM_WARPS,
        )


class _Plan:
    """Everything about a step that depends only on which tensors are stepped, not their values."""

    def __init__(self, cols: list[list[Tensor | None]], state_steps: list[Tensor], *,
                 sums: bool, amsgrad: bool, maximize: bool) -> None:
        # Flat local views (complex as real pairs, DTensors as their local shards).
        local = [[None if x is None else to_local(x) for x in as_real(list(col))] for col in cols]
        groups: dict[tuple, list[int]] = {}
        for i, step in enumerate(state_steps):  # the planner sent only tensors that covers() took
            row = [col[i] for col in local]
            key = (*(None if x is None else x.dtype for x in row), row[0].device, step.dtype)
            groups.setdefault(key, []).append(i)
        self.groups = [
            _Group(idx, [[col[i] for i in idx] for col in local], [state_steps[i] for i in idx],
                   sums=sums, amsgrad=amsgrad, maximize=maximize)
            for idx in groups.values()
        ]
        self.n = len(state_steps)
        self._refs: list[weakref.ref] = []


_PLANS: OrderedDict[tuple, _Plan] = OrderedDict()
_PLAN_CACHE_SIZE = 8
_dtype = attrgetter("dtype")


def _plan_key(cols: list[list[Tensor | None]], state_steps: list[Tensor], flags: tuple) -> tuple:
    """Cheap per-step identity of a plan (C-level maps, no per-tensor Python).

    Parameters and gradients by address, dtype and contiguity (autograd re-allocates gradients,
    and frameworks swap parameter storage); optimizer-owned state by object identity, kept
    unambiguous by weak references that drop the plan when a state tensor dies.
    """
    params, grads, exp_avgs, exp_avg_sqs, max_sqs, anchors = cols
    return (
        flags, _BLOCK * _ITERS,
        tuple(map(Tensor.data_ptr, params)), tuple(map(Tensor.data_ptr, grads)),
        tuple(map(_dtype, params)), tuple(map(_dtype, grads)),
        tuple(map(Tensor.is_contiguous, params)), tuple(map(Tensor.is_contiguous, grads)),
        tuple(map(Tensor.numel, params)),
        tuple(map(id, exp_avgs)), tuple(map(id, exp_avg_sqs)), tuple(map(id, max_sqs)),
        tuple(map(id, anchors)), tuple(map(id, state_steps)),
    )


def _get_plan(cols, state_steps, *, sharded: bool, sums: bool, amsgrad: bool, maximize: bool) -> _Plan:
    flags = dict(sums=sums, amsgrad=amsgrad, maximize=maximize)
    key_cols = cols
    if sharded:  # DTensors have no data_ptr: key on the local shards' addresses
        key_cols = [[to_local(t) for t in cols[0]], [to_local(t) for t in cols[1]], *cols[2:]]
    key = _plan_key(key_cols, state_steps, (sums, amsgrad, maximize))
    plan = _PLANS.get(key)
    if plan is not None:
        _PLANS.move_to_end(key)
        return plan
    plan = _Plan(cols, state_steps, **flags)
    drop = lambda _ref, key=key: _PLANS.pop(key, None)  # noqa: E731
    state = [*cols[2], *cols[3], *cols[4], *cols[5], *state_steps]
    plan._refs = [weakref.ref(t, drop) for t in state if t is not None]
    _PLANS[key] = plan
    if len(_PLANS) > _PLAN_CACHE_SIZE:
        _PLANS.popitem(last=False)
    return plan


def adam_and_sums(lists: TensorLists, h: AdamHyper) -> PartialStep | None:
    """Triton phase 1 for tensors ``covers`` accepts. Always capturable: step counts and a
    device ``lr`` are read by the kernels, buffers are persistent per set of tensors."""
    if not HAS_TRITON:
        raise RuntimeError("AdamSPD(fused=True) on this device needs Triton: pip install triton")
    return _adam_and_sums(lists, h)


@torch.compiler.disable  # data_ptr() tables and Triton launches run eagerly inside compiled code
def _adam_and_sums(lists: TensorLists, h: AdamHyper) -> PartialStep | None:
    n = len(lists)
    none = [None] * n
    cols = [lists.params, lists.grads, lists.exp_avgs, lists.exp_avg_sqs,
            lists.max_exp_avg_sqs if h.amsgrad else none, lists.anchors]
    sharded = any(map(is_dtensor, lists.params))
    plan = _get_plan(cols, lists.steps, sharded=sharded, sums=h.with_sums, amsgrad=h.amsgrad,
                     maximize=h.maximize)
    hyper = dict(beta1=h.beta1, beta2=h.beta2, decay=h.decay, eps=h.eps)
    sums = [g.launch(h.lr, **hyper) for g in plan.groups]
    if not h.with_sums:
        return None
    return joined([PartialStep(s, g) for s, g in zip(sums, plan.groups)],  # type: ignore[arg-type]
                  [g.idx for g in plan.groups])


def _log2(beta: float) -> float:
    return math.log2(beta) if beta > 0 else -math.inf
