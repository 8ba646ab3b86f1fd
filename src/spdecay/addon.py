"""Selective Projection Decay as an add-on to any ``torch.optim.Optimizer``.

SPD is a rule about where a step may go, not about Adam: it only needs the gradient the base
optimizer used, the parameter before the step and the parameter after it. The add-on hooks into
the wrapped optimizer's step:

* pre-hook (before the base step): per tensor, record ``c = -<g, p - p0>`` and ``||p - p0||``
  as 0-d tensors (no parameter-sized copies survive the step);
* post-hook (after it): ``r = clamp((||p_new - p0|| - ||p - p0||) / ||p_new - p0||, 0, 1)`` and
  ``p_new -= lam * r * (p_new - p0)`` only where ``c < 0``.

Everything is tensor arithmetic (no ``.item()``, no Python branching on data), so the add-on
never forces a host-device sync. Anchors live in the wrapped optimizer's state
(``opt.state[p]["spd_anchor"]``) so ``opt.state_dict()`` carries them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

import spdecay._functional as _F
from spdecay._functional import (
    _as_real,
    _deviations,
    _dot,
    _foreach_sum_of_products,
    _real_dtype,
    _slices,
    spd_ratio,
)
from spdecay._sharding import is_dtensor, reduce_partial_sums, to_local
from spdecay.stats import SPDStats

__all__ = ["SelectiveProjectionDecay"]

_ANCHOR_MODES = ("init", "zero")
# Parameter-sized temporaries are made for at most this many elements at a time, which bounds
# the add-on's transient memory (one chunk) independently of the model size.
_CHUNK_NUMEL = 1 << 25


class _Bucket:
    """Tensors of one (device, dtype, anchor kind) with what the pre-hook measured."""

    __slots__ = ("params", "anchors", "lams", "inner", "dev_sq", "kernel")

    def __init__(self) -> None:
        self.params: list[Tensor] = []
        self.anchors: list[Tensor | None] = []  # all None (zero anchors) or all tensors
        self.lams: list[float] = []
        self.inner: Tensor | None = None  # <g, p - p0> per tensor (c = -inner)
        self.dev_sq: Tensor | None = None  # ||p - p0||^2 before the step
        self.kernel = False  # measured and projected by the fused CPU kernel


def _chunks(tensors: list[Tensor]) -> Iterator[slice]:
    start, numel = 0, 0
    for i, t in enumerate(tensors):
        if i > start and numel + t.numel() > _CHUNK_NUMEL:
            yield slice(start, i)
            start, numel = i, 0
        numel += t.numel()
    if start < len(tensors):
        yield slice(start, len(tensors))


def _local(ts: list[Tensor | None]) -> list[Tensor | None]:
    return [None if t is None else to_local(t) for t in _as_real(ts)]


def _sliceable(ts: list[Tensor | None]) -> bool:
    # CPU, local, real, contiguous and large: walk it in cache-sized slices.
    return all(
        t is None
        or (t.device.type == "cpu" and not is_dtensor(t) and not t.is_complex() and t.is_contiguous())
        for t in ts
    ) and ts[0] is not None and ts[0].numel() > _F._SLICE_NUMEL


def _measure_sliced(
    p: Tensor, a: Tensor | None, g: Tensor | None, buf: dict[torch.dtype, Tensor]
) -> list[Tensor]:
    """[<g, p - p0>,] ||p - p0||^2 of one large CPU tensor, slice by slice: the difference of
    a slice stays in the cache (in one reused buffer), where a whole-tensor temporary would
    stream through memory."""
    pf = p.view(-1)
    af = None if a is None else a.view(-1)
    gf = None if g is None else g.view(-1)
    if af is not None and pf.dtype not in buf:
        buf[pf.dtype] = torch.empty(_F._SLICE_NUMEL, dtype=pf.dtype)
    parts = []
    for sl in _slices(pf):
        if af is None:
            d = pf[sl]
        else:
            d = torch.sub(pf[sl], af[sl].to(pf.dtype), out=buf[pf.dtype][: sl.stop - sl.start])
        if gf is not None:
            parts.append(_dot(gf[sl], d))
        parts.append(_dot(d, d))
    return list(torch.stack(parts).view(-1, 1 if gf is None else 2).sum(0).unbind())


def _measure(
    params: list[Tensor], anchors: list[Tensor | None], grads: list[Tensor] | None
) -> tuple[Tensor | None, Tensor]:
    """Per tensor (local partial sums): <g, p - p0> (when grads are given) and ||p - p0||^2."""
    n = len(params)
    inner: list[Tensor | None] = [None] * n
    dev_sq: list[Tensor | None] = [None] * n
    rest = []
    buf: dict[torch.dtype, Tensor] = {}
    for i in range(n):
        g = None if grads is None else grads[i]
        if _sliceable([params[i], anchors[i], g]):
            out = _measure_sliced(params[i], anchors[i], g, buf)
            if g is not None:
                inner[i] = out[0]
            dev_sq[i] = out[-1]
        else:
            rest.append(i)
    for k in _chunks([params[i] for i in rest]):
        idx = rest[k]
        devs = _deviations(_local([params[i] for i in idx]), _local([anchors[i] for i in idx]))
        for i, v in zip(idx, _foreach_sum_of_products(devs, devs), strict=True):
            dev_sq[i] = v
        if grads is not None:
            gs = _local([grads[i] for i in idx])
            for i, v in zip(idx, _foreach_sum_of_products(gs, devs), strict=True):
                inner[i] = v
        del devs
    return (None if grads is None else torch.stack(inner)), torch.stack(dev_sq)  # type: ignore[arg-type]


class SelectiveProjectionDecay:
    """Add Selective Projection Decay to any ``torch.optim.Optimizer``.

    Args:
        optimizer: the base optimizer; keep stepping, scheduling and checkpointing it yourself.
            Its own ``weight_decay`` should normally be 0 in SPD groups (SPD replaces it).
        weight_decay: SPD strength ``lam`` (>= 0); per group override key ``"spd_weight_decay"``.
        anchor: ``"init"`` (the parameter's value when the add-on first sees it with a
            gradient, i.e. the pre-trained weights) or ``"zero"`` (PEFT/LoRA weights); per group
            override key ``"anchor"``. A group with ``"spd": False`` is left alone.
        anchor_dtype: dtype to store anchors in (default: the parameter's dtype).
        fused: measure and project CPU tensors with spdecay's fused C kernel (one pass per
            measurement; compiled once on first use, like ``AdamSPD(fused=True)``). Tensors it
            does not cover (other devices, dtypes or layouts) use torch ops as with the default.

    A step skipped by ``torch.amp.GradScaler`` applies no projection: the scaler does not call
    ``optimizer.step()`` (so the hooks do not run), and fused optimizers that skip inside the
    kernel expose ``found_inf``, which masks the projection.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        weight_decay: float = 1.0,
        anchor: str = "init",
        *,
        anchor_dtype: torch.dtype | None = None,
        fused: bool = False,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        _check_lam(weight_decay, "weight_decay")
        _check_anchor(anchor, "anchor")
        if anchor_dtype is not None and not (
            isinstance(anchor_dtype, torch.dtype) and anchor_dtype.is_floating_point
        ):
            raise TypeError(f"anchor_dtype must be a floating torch.dtype, got {anchor_dtype!r}")
        for i, group in enumerate(optimizer.param_groups):
            _check_group(group, i)
        if not isinstance(fused, bool):
            raise TypeError(f"fused must be a bool, got {fused!r}")
        if fused:
            from spdecay import _fused_cpu

            _fused_cpu.library()  # build now: a missing compiler is reported here, not mid-step
        self.fused = fused
        self.optimizer = optimizer
        self.weight_decay = float(weight_decay)
        self.anchor = anchor
        self.anchor_dtype = anchor_dtype
        # Anchors captured in a pre-hook wait here until the base step has initialised the
        # parameter's state: torch optimizers initialise state only while it is empty.
        self._pending: dict[Tensor, Tensor] = {}
        self._buckets: list[_Bucket] = []
        self._last: dict[Tensor, tuple[Tensor, Tensor, Tensor]] = {}
        self._handles = [
            optimizer.register_step_pre_hook(self._pre_step),
            optimizer.register_step_post_hook(self._post_step),
        ]

    # ----------------------------------------------------------------------------------- API
    def remove(self, drop_anchors: bool = False) -> None:
        """Detach from the optimizer. With ``drop_anchors`` also delete the anchors from its state."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._pending.clear()
        self._buckets = []
        if drop_anchors:
            for st in self.optimizer.state.values():
                st.pop("spd_anchor", None)

    def stats(self) -> SPDStats:
        """Per-tensor results of the last step that updated each SPD parameter, like
        :meth:`AdamSPD.spd_stats`: names (``param_names`` of the group when the optimizer was
        built from named parameters, else ``group{g}.param{i}``), fired, ratio, deviation.
        No host sync until you read the values."""
        names, fired, ratio, deviation = [], [], [], []
        for g, group in enumerate(self.optimizer.param_groups):
            group_names = group.get("param_names")
            for i, p in enumerate(group["params"]):
                if p not in self._last:
                    continue
                names.append(group_names[i] if group_names else f"group{g}.param{i}")
                f, r, d = self._last[p]
                fired.append(f)
                ratio.append(r)
                deviation.append(d)
        return SPDStats.from_lists(names, fired, ratio, deviation)

    def anchor_of(self, p: Tensor) -> Tensor | None:
        """The anchor of ``p`` (None for zero anchors or before its first step)."""
        st = self.optimizer.state.get(p)
        a = st.get("spd_anchor") if st else None
        return a if a is not None else self._pending.get(p)

    # --------------------------------------------------------------------------------- hooks
    def _anchor_dtype(self, p: Tensor) -> torch.dtype:
        return p.dtype if self.anchor_dtype is None or p.is_complex() else self.anchor_dtype

    def _anchor_for(self, p: Tensor, mode: str) -> Tensor | None:
        if mode == "zero":
            return None
        st = self.optimizer.state.get(p)  # .get: never create a state entry here
        a = st.get("spd_anchor") if st else None
        if a is None:
            a = self._pending.get(p)
            if a is None:
                a = p.detach().to(dtype=self._anchor_dtype(p), copy=True)
                self._pending[p] = a
        else:
            # Optimizer.load_state_dict casts floating state to the parameter's dtype/device.
            want = self._anchor_dtype(p)
            if a.dtype != want or a.device != p.device:
                a = a.to(device=p.device, dtype=want)
                st["spd_anchor"] = a  # type: ignore[index]
        return a

    @torch.no_grad()
    def _pre_step(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        buckets: dict[tuple[torch.device, torch.dtype, bool], _Bucket] = {}
        grads: dict[int, list[Tensor]] = {}
        for i, group in enumerate(opt.param_groups):
            _check_group(group, i)
            if not group.get("spd", True):
                continue
            lam = float(group.get("spd_weight_decay", self.weight_decay))
            mode = group.get("anchor", self.anchor)
            flip = bool(group.get("maximize", False))
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise TypeError("SelectiveProjectionDecay does not support sparse gradients")
                anchor = self._anchor_for(p, mode)
                b = buckets.setdefault((p.device, p.dtype, anchor is None), _Bucket())
                b.params.append(p)
                b.anchors.append(anchor)
                b.lams.append(lam)
                # The direction the base optimizer descends along (it negates for maximize).
                grads.setdefault(id(b), []).append(-p.grad if flip else p.grad)
        for b in buckets.values():
            # Only the sign of <g, p - p0> matters, so grads still scaled by a GradScaler
            # (fused optimizers unscale inside their kernel) give the same decision.
            b.kernel = self.fused and _kernel().addon_covers(b.params, b.anchors, grads[id(b)])
            if b.kernel:
                sums = _kernel().measure(b.params, b.anchors, grads[id(b)])
                sums = sums.to(b.params[0].device)
            else:
                inner, dev_sq = _measure(b.params, b.anchors, grads[id(b)])
                sums = torch.stack([inner, dev_sq])  # type: ignore[list-item]
            sums = reduce_partial_sums(sums, b.params)
            b.inner, b.dev_sq = sums[0], sums[1]
        self._buckets = list(buckets.values())

    @torch.no_grad()
    def _post_step(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        buckets, self._buckets = self._buckets, []
        found_inf = getattr(opt, "found_inf", None)
        for b in buckets:
            assert b.inner is not None and b.dev_sq is not None
            # One strength per bucket is the common case: a Python float, no host-to-device copy.
            lam: float | Tensor = b.lams[0]
            if len(set(b.lams)) > 1:
                lam = torch.tensor(b.lams, dtype=b.dev_sq.dtype, device=b.dev_sq.device)
            n = len(b.params)
            if b.kernel:  # one pass for the new norms, one over the tensors that fired
                new_sq = _kernel().measure(b.params, b.anchors, None)[1].to(b.dev_sq.device)
                new_sq = reduce_partial_sums(new_sq.unsqueeze(0), b.params)[0]
                fired, ratio, coef = _decide(b.inner, b.dev_sq, new_sq, lam, found_inf)
                _kernel().project(b.params, b.anchors, coef)
                self._record(opt, b, fired, ratio)
                continue
            fired_l: list[Tensor] = [None] * n  # type: ignore[list-item]
            ratio_l: list[Tensor] = [None] * n  # type: ignore[list-item]
            # Large CPU tensors one by one: norm, decision and projection back to back, so the
            # projection finds the tensor and its anchor still in the last-level cache.
            sliced = [i for i in range(n) if _sliceable([b.params[i], b.anchors[i]])]
            buf: dict[torch.dtype, Tensor] = {}
            for i in sliced:
                p, a = b.params[i], b.anchors[i]
                new_sq = _measure_sliced(p, a, None, buf)[0].view(1)
                k = slice(i, i + 1)
                lam_k = lam if isinstance(lam, float) else lam[k]
                f, r, c = _decide(b.inner[k], b.dev_sq[k], new_sq, lam_k, found_inf)
                _project([p], [a], c)
                fired_l[i], ratio_l[i] = f[0], r[0]
            in_sliced = set(sliced)
            rest = [i for i in range(n) if i not in in_sliced]
            if rest:
                ps = [b.params[i] for i in rest]
                ans = [b.anchors[i] for i in rest]
                # Pass 1: ||p_new - p0|| (the whole norm is needed before any of it is projected).
                _, new_sq = _measure(ps, ans, None)
                new_sq = reduce_partial_sums(new_sq.unsqueeze(0), ps)[0]
                inner, dev_sq, lam_r = b.inner, b.dev_sq, lam
                if sliced:  # CPU only (sliced tensors are), so this index tensor costs no copy
                    idx = torch.tensor(rest, device=inner.device)
                    inner, dev_sq = inner[idx], dev_sq[idx]
                    lam_r = lam if isinstance(lam, float) else lam[idx]
                f, r, c = _decide(inner, dev_sq, new_sq, lam_r, found_inf)
                _project(ps, ans, c)  # pass 2
                for j, i in enumerate(rest):
                    fired_l[i], ratio_l[i] = f[j], r[j]
            self._record(opt, b, torch.stack(fired_l), torch.stack(ratio_l))

    def _record(self, opt: torch.optim.Optimizer, b: _Bucket, fired: Tensor, ratio: Tensor) -> None:
        assert b.dev_sq is not None
        devs_out = b.dev_sq.clamp_min(0).sqrt()
        rows = zip(b.params, fired.unbind(), ratio.unbind(), devs_out.unbind(), strict=True)
        for p, f, r, d in rows:
            self._last[p] = (f, r, d)
        # The base step has initialised the state of every stepped parameter by now.
        for p in b.params:
            a = self._pending.pop(p, None)
            if a is not None:
                opt.state[p]["spd_anchor"] = a


def _kernel():
    from spdecay import _fused_cpu

    return _fused_cpu


def _decide(
    inner: Tensor, dev_sq: Tensor, new_sq: Tensor, lam: float | Tensor, found_inf: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    fired, ratio, coef = spd_ratio(inner, dev_sq, new_sq, lam)  # type: ignore[arg-type]
    if found_inf is not None:
        # Fused optimizers under GradScaler skip an overflowing step inside their kernel and
        # expose the flag; other optimizers are simply not stepped (the hooks do not run).
        ok = found_inf.to(fired.device) == 0
        fired, ratio, coef = fired & ok, ratio * ok, coef * ok
    return fired, ratio, coef


def _project(params: list[Tensor], anchors: list[Tensor | None], coef: Tensor) -> None:
    """p <- p - coef * (p - p0), as lerp(p, p0, coef); p *= 1 - coef for zero anchors."""
    coefs = coef.to(_real_dtype(params[0].dtype)).unbind()
    for sl in _chunks(params):
        ps = _local(params[sl])
        if anchors[0] is None:
            torch._foreach_mul_(ps, [1 - c for c in coefs[sl]])
        else:
            ans = [a.to(p.dtype) for p, a in zip(ps, _local(anchors[sl]), strict=True)]
            torch._foreach_lerp_(ps, ans, list(coefs[sl]))


def _check_lam(v: Any, name: str) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
        raise ValueError(f"{name} must be a number >= 0, got {v!r}")


def _check_anchor(v: Any, name: str) -> None:
    if v not in _ANCHOR_MODES:
        raise ValueError(f"{name} must be one of {_ANCHOR_MODES}, got {v!r}")


def _check_group(group: dict, i: int) -> None:
    if "spd_weight_decay" in group:
        _check_lam(group["spd_weight_decay"], f"param_groups[{i}]['spd_weight_decay']")
    if "anchor" in group:
        _check_anchor(group["anchor"], f"param_groups[{i}]['anchor']")
    if "spd" in group and not isinstance(group["spd"], bool):
        raise TypeError(f"param_groups[{i}]['spd'] must be a bool, got {group['spd']!r}")
