"""Selective Projection Decay as an add-on to any ``torch.optim.Optimizer``.

SPD is a rule about where a step may go, not about Adam: it only needs the gradient the base
optimizer used, the parameter before the step and the parameter after it. The add-on hooks into
the wrapped optimizer's step:

* pre-hook (before the base step): per tensor, the local sums ``<g, p - p0>`` and
  ``||p - p0||^2`` (float64, ``p - p0`` taken exactly; no parameter-sized copy survives);
* post-hook (after it): ``||p_new - p0||^2``, the growth as the difference of the two float64
  norms, then the same driver as AdamSPD (one reduction over shards, the one decision
  ``spd_ratio``, the one projection).

No ``.item()``, no Python branching on data: the add-on never forces a host-device sync. Anchors
live in the wrapped optimizer's state (``opt.state[p]["anchor"]``) so ``opt.state_dict()``
carries them. A deep copy or pickle of the optimizer carries the add-on along.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from spdecay._anchored import ANCHOR_KEY, check_dtype_option
from spdecay.spd.backends.numerics import exact_deviation, exact_dot, local_real, real_dtype
from spdecay.spd.decision import project_
from spdecay.spd.driver import PartialStep, finish
from spdecay.spd.engines import check_params_unchanged, group_shapes
from spdecay.spd.layout import FlatLayout, check_layout, pieces, segment_ids
from spdecay.spd.reduce import check_placements, is_dtensor
from spdecay.stats import SPDStats, collect_stats

__all__ = ["SelectiveProjectionDecay"]

_ANCHOR_MODES = ("init", "zero")
_OLD_ANCHOR_KEY = "spd_anchor"  # before one key was shared with AdamSPD
# On CPU, large tensors are measured in slices of this many elements (float64 temporaries stay
# in the cache).
_SLICE_NUMEL = 1 << 18


class _Bucket:
    """Tensors of one (device, dtype, anchor kind) with what the pre-hook measured."""

    __slots__ = ("params", "anchors", "layouts", "lams", "before", "kernel")

    def __init__(self) -> None:
        self.params: list[Tensor] = []
        self.anchors: list[Tensor | None] = []  # all None (zero anchors) or all tensors
        self.layouts: list[FlatLayout | None] = []
        self.lams: list[float] = []
        self.before: Tensor | None = None  # [2, columns]: <g, p - p0>, ||p - p0||^2 (local)
        self.kernel = False  # measured and projected by the fused CPU kernel

    def widths(self) -> list[int]:
        return [1 if lay is None else lay.num_logical for lay in self.layouts]


def _parts(p: Tensor, layout: FlatLayout | None) -> list[tuple[slice, int]]:
    """(flat slice, column within the tensor; -1 padding) covering a tensor; CPU slices bounded."""
    n = p.numel()
    spans = [(0, n, 0)] if layout is None else pieces(layout, n)
    step = _SLICE_NUMEL if p.device.type == "cpu" else max(n, 1)
    return [(slice(s, min(s + step, start + length)), col)
            for start, length, col in spans for s in range(start, start + max(length, 1), step)]


def _measure(params: list[Tensor], anchors: list[Tensor | None], grads: list[Tensor] | None,
             layouts: list[FlatLayout | None]) -> Tensor:
    """Local [<g, p - p0>, ||p - p0||^2] per column in float64 ([2, columns]; row 0 is 0
    without grads), p - p0 taken exactly in float64."""
    columns: list[Tensor] = []
    for i, p in enumerate(params):
        g = None if grads is None else grads[i]
        pl, al, gl = local_real([p, anchors[i], g])
        width = 1 if layouts[i] is None else layouts[i].num_logical
        acc = torch.zeros(2, width + 1, dtype=torch.float64, device=pl.device)
        flat = pl.is_contiguous() and (al is None or al.is_contiguous()) and (
            gl is None or gl.is_contiguous())
        if not flat:  # whole, as it is (never with a layout: those are 1-D)
            d = exact_deviation(pl, al)
            acc[1, 0] = exact_dot(d, d)
            if gl is not None:
                acc[0, 0] = exact_dot(gl, d)
        else:
            pf, af = pl.view(-1), None if al is None else al.view(-1)
            gf = None if gl is None else gl.view(-1)
            for sl, col in _parts(pf, layouts[i]):
                d = exact_deviation(pf[sl], None if af is None else af[sl])
                inner = exact_dot(gf[sl], d) if gf is not None else acc.new_zeros(())
                acc[:, col] += torch.stack([inner, exact_dot(d, d)])
        columns.append(acc[:, :width])
    return torch.cat(columns, dim=1)


class _TorchProjector:
    def __init__(self, params: list[Tensor], anchors: list[Tensor | None],
                 layouts: list[FlatLayout | None]) -> None:
        self.params, self.anchors, self.layouts = params, anchors, layouts

    def project(self, coef: Tensor) -> None:
        ps = local_real(self.params)
        ans = local_real(self.anchors)
        dtype = real_dtype(self.params[0].dtype)
        coef = coef.to(dtype)
        weights, start = [], 0
        for p, layout in zip(ps, self.layouts):
            if layout is None:
                weights.append(coef[start])
                start += 1
            else:
                ids = segment_ids(layout, p.numel(), p.device)
                c = coef[start : start + layout.num_logical]
                weights.append(torch.cat([c, c.new_zeros(1)]).index_select(0, ids))
                start += layout.num_logical
        project_(ps, ans, weights)  # type: ignore[arg-type]


class _KernelProjector:
    def __init__(self, b: _Bucket) -> None:
        self.b = b

    def project(self, coef: Tensor) -> None:
        _kernel().project(self.b.params, self.b.anchors, coef, self.b.layouts)


class SelectiveProjectionDecay:
    """Add Selective Projection Decay to any ``torch.optim.Optimizer``.

    Args:
        optimizer: the base optimizer; keep stepping, scheduling and checkpointing it yourself.
            Its own ``weight_decay`` should normally be 0 in SPD groups (SPD replaces it).
        weight_decay: SPD strength ``lam`` (>= 0); per group override key ``"spd_weight_decay"``.
        anchor: ``"init"`` (the parameter's value when the add-on first sees it with a
            gradient, i.e. the pre-trained weights) or ``"zero"`` (PEFT/LoRA weights); per group
            override key ``"anchor"``. A group with ``"spd": False`` is left alone.
        anchor_dtype: floating dtype to store anchors in (default: the parameter's dtype).
        fused: measure and project CPU tensors with spdecay's C/OpenMP kernel (one pass per
            measurement), as ``AdamSPD`` does. None (default): where the kernel can be built
            (a C compiler; built once per machine, when the add-on is created), else torch ops;
            True: the kernel or a clear error; False: torch ops. Tensors the kernel does not
            cover (other devices, dtypes or layouts) always use torch ops.

    A step skipped by ``torch.amp.GradScaler`` applies no projection: the scaler does not call
    ``optimizer.step()`` (so the hooks do not run), and fused optimizers that skip inside the
    kernel expose ``found_inf``, which masks the projection. ``copy.deepcopy`` and pickling of the
    optimizer carry the add-on (find the copy's with
    [`of`][spdecay.SelectiveProjectionDecay.of]).

    Raises:
        TypeError: ``optimizer`` is not a ``torch.optim.Optimizer``, ``fused`` is not a bool or
            None, ``anchor_dtype`` is not a floating dtype, or a group's ``spd`` is not a bool.
        ValueError: ``weight_decay`` (or a group's ``spd_weight_decay``) is not a number >= 0,
            ``anchor`` (or a group's) is not a known mode, or the optimizer already carries
            an add-on.
        RuntimeError: ``fused=True`` and the C kernel cannot be built (no C compiler).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        weight_decay: float = 1.0,
        anchor: str = "init",
        *,
        anchor_dtype: torch.dtype | None = None,
        fused: bool | None = None,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        _check_lam(weight_decay, "weight_decay")
        _check_anchor(anchor, "anchor")
        check_dtype_option("anchor_dtype", anchor_dtype, "SelectiveProjectionDecay")
        for i, group in enumerate(optimizer.param_groups):
            _check_group(group, i)
        if fused is not None and not isinstance(fused, bool):
            raise TypeError(f"fused must be a bool or None, got {fused!r}")
        if getattr(optimizer, "_spd_addon", None) is not None:
            raise ValueError("this optimizer already carries a SelectiveProjectionDecay")
        if fused:
            _kernel().library()  # build now: a missing compiler is reported here, not mid-step
        # The default takes the kernel where it can be built (now, not in a step), else torch.
        self._kernel = bool(fused) or (fused is None and _kernel().available())
        self.fused = fused
        self.optimizer = optimizer
        self.weight_decay = float(weight_decay)
        self.anchor = anchor
        self.anchor_dtype = anchor_dtype
        # Anchors captured in a pre-hook wait here until the base step has initialised the
        # parameter's state: torch optimizers initialise state only while it is empty.
        self._pending: dict[Tensor, Tensor] = {}
        self._buckets: list[_Bucket] = []
        self._last: dict[Tensor, Any] = {}
        self._layouts: dict[Tensor, FlatLayout] = {}
        self._group_shapes = [group_shapes(g) for g in optimizer.param_groups]
        self._handles = [
            optimizer.register_step_pre_hook(self._pre_step),
            optimizer.register_step_post_hook(self._post_step),
        ]
        # Copies of the optimizer keep SPD: copy/pickle look these up on the instance.
        optimizer._spd_addon = self  # type: ignore[attr-defined]
        optimizer.__reduce_ex__ = self._reduce_optimizer  # type: ignore[method-assign]

    # ----------------------------------------------------------------------------------- API
    @staticmethod
    def of(optimizer: torch.optim.Optimizer) -> SelectiveProjectionDecay | None:
        """The add-on attached to an optimizer (e.g. a deep copy's).

        Args:
            optimizer: the optimizer to look at.

        Returns:
            Its [`SelectiveProjectionDecay`][spdecay.SelectiveProjectionDecay], or None.
        """
        return getattr(optimizer, "_spd_addon", None)

    def remove(self, drop_anchors: bool = False) -> None:
        """Detach from the optimizer; its later steps are plain.

        Args:
            drop_anchors: also delete the anchors from the optimizer's state.
        """
        for h in self._handles:
            h.remove()
        self._handles = []
        self._pending.clear()
        self._buckets = []
        for name in ("_spd_addon", "__reduce_ex__"):
            self.optimizer.__dict__.pop(name, None)
        if drop_anchors:
            for st in self.optimizer.state.values():
                st.pop(ANCHOR_KEY, None)
                st.pop(_OLD_ANCHOR_KEY, None)

    def set_flat_layout(self, param: Tensor, layout: FlatLayout) -> None:
        """Declare ``param``, a parameter of the base optimizer, a flat engine partition.

        The same contract, arguments and errors as
        [`AdamSPD.set_flat_layout`][spdecay.AdamSPD.set_flat_layout]; the DeepSpeed integration
        calls it for you.

        Args:
            param: a 1-D, real floating, plain parameter in one of the base optimizer's groups.
            layout: its segments and the logical tensors they belong to.
        """
        self._layouts[param] = check_layout(param, layout, self.optimizer.param_groups,
                                            "SelectiveProjectionDecay")

    def spd_stats(self) -> SPDStats:
        """Per-tensor results of the last step that updated each SPD parameter.

        As [`AdamSPD.spd_stats`][spdecay.AdamSPD.spd_stats]; no host sync until you read the
        values.

        Returns:
            Names (``param_names`` of the group when the optimizer was built from named
                parameters, else ``group{g}.param{i}``), fired, ratio and deviation per tensor.
        """
        return collect_stats(self.optimizer.param_groups, self._last, self._layouts)

    def stats(self) -> SPDStats:
        """Deprecated name of [`spd_stats`][spdecay.SelectiveProjectionDecay.spd_stats].

        Returns:
            The same as ``spd_stats()``, after a ``DeprecationWarning``.
        """
        warnings.warn("SelectiveProjectionDecay.stats() is deprecated; use spd_stats()",
                      DeprecationWarning, stacklevel=2)
        return self.spd_stats()

    def anchor_of(self, p: Tensor) -> Tensor | None:
        """The anchor of a parameter.

        Args:
            p: a parameter of the optimizer.

        Returns:
            Its anchor tensor, or None for zero anchors or before its first step.
        """
        st = self.optimizer.state.get(p)
        a = (st.get(ANCHOR_KEY, st.get(_OLD_ANCHOR_KEY))) if st else None
        return a if a is not None else self._pending.get(p)

    # ------------------------------------------------------------------------ copy / pickle
    def _config(self) -> dict[str, Any]:
        return dict(weight_decay=self.weight_decay, anchor=self.anchor,
                    anchor_dtype=self.anchor_dtype, fused=self.fused)

    def _reduce_optimizer(self, protocol: int) -> tuple:
        opt = self.optimizer
        return (_rebuild_with_spd, (type(opt), opt.__getstate__(), self._config(),
                                    dict(self._layouts)))

    # --------------------------------------------------------------------------------- hooks
    def _anchor_dtype(self, p: Tensor) -> torch.dtype:
        return p.dtype if self.anchor_dtype is None or p.is_complex() else self.anchor_dtype

    def _anchor_for(self, p: Tensor, mode: str) -> Tensor | None:
        if mode == "zero":
            return None
        st = self.optimizer.state.get(p)  # .get: never create a state entry here
        if st and _OLD_ANCHOR_KEY in st:  # a checkpoint from before the shared key
            st[ANCHOR_KEY] = st.pop(_OLD_ANCHOR_KEY)
        a = st.get(ANCHOR_KEY) if st else None
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
                st[ANCHOR_KEY] = a  # type: ignore[index]
        return a

    def _validate(self, opt: torch.optim.Optimizer) -> None:
        check_params_unchanged("SelectiveProjectionDecay", opt.param_groups, self._group_shapes,
                               self._layouts)
        for i, group in enumerate(opt.param_groups):
            _check_group(group, i)
            if not group.get("spd", True):
                continue
            for p in group["params"]:
                if p.grad is not None and p.grad.is_sparse:
                    raise RuntimeError("SelectiveProjectionDecay does not support sparse gradients")
            check_placements(group["params"], "SelectiveProjectionDecay")

    @torch.no_grad()
    def _pre_step(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._validate(opt)
        buckets: dict[tuple, _Bucket] = {}
        grads: dict[int, list[Tensor]] = {}
        for group in opt.param_groups:
            if not group.get("spd", True):
                continue
            lam = float(group.get("spd_weight_decay", self.weight_decay))
            mode = group.get("anchor", self.anchor)
            flip = bool(group.get("maximize", False))
            for p in group["params"]:
                if p.grad is None:
                    continue
                anchor = self._anchor_for(p, mode)
                key = (p.device, p.dtype, anchor is None, is_dtensor(p))
                b = buckets.setdefault(key, _Bucket())
                b.params.append(p)
                b.anchors.append(anchor)
                b.layouts.append(self._layouts.get(p))
                b.lams.append(lam)
                # The direction the base optimizer descends along (it negates for maximize).
                grads.setdefault(id(b), []).append(-p.grad if flip else p.grad)
        for b in buckets.values():
            # Only the sign of <g, p - p0> matters, so grads still scaled by a GradScaler
            # (fused optimizers unscale inside their kernel) give the same decision.
            g = grads[id(b)]
            b.kernel = self._kernel and _kernel().addon_covers(b.params, b.anchors, g)
            if b.kernel:
                b.before = _kernel().measure(b.params, b.anchors, g, b.layouts).to(b.params[0].device)
            else:
                b.before = _measure(b.params, b.anchors, g, b.layouts)
        self._buckets = list(buckets.values())

    @torch.no_grad()
    def _post_step(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        buckets, self._buckets = self._buckets, []
        parts = []
        for b in buckets:
            assert b.before is not None
            if b.kernel:
                new_sq = _kernel().measure(b.params, b.anchors, None, b.layouts)[1]
                new_sq = new_sq.to(b.before.device)
                projector: Any = _KernelProjector(b)
            else:
                new_sq = _measure(b.params, b.anchors, None, b.layouts)[1]
                projector = _TorchProjector(b.params, b.anchors, b.layouts)
            # Both norms are float64 sums of exact differences: their difference keeps the
            # growth exact where float32 norms would cancel.
            sums = torch.stack([b.before[0], b.before[1], new_sq - b.before[1]])
            sources = [s for p, lay in zip(b.params, b.layouts)
                       for s in ([p] if lay is None else [lay] * lay.num_logical)]
            parts.append(PartialStep(sums, projector, sources, _lams(b, sums)))
        decisions = finish(parts, getattr(opt, "found_inf", None)) if parts else []
        for b, dec in zip(buckets, decisions):
            start = 0
            for p, width in zip(b.params, b.widths()):
                self._last[p] = (dec, start, width)
                start += width
            # The base step has initialised the state of every stepped parameter by now.
            for p in b.params:
                a = self._pending.pop(p, None)
                if a is not None:
                    opt.state[p][ANCHOR_KEY] = a


def _lams(b: _Bucket, sums: Tensor) -> float | Tensor:
    if len(set(b.lams)) == 1:
        return b.lams[0]
    per_column = [lam for lam, w in zip(b.lams, b.widths()) for _ in range(w)]
    return torch.tensor(per_column, dtype=torch.float64).to(sums.device)


def _rebuild_with_spd(cls: type, state: dict[str, Any], config: dict[str, Any],
                      layouts: dict[Tensor, FlatLayout]) -> torch.optim.Optimizer:
    """Unpickle / deep-copy an optimizer that carried the add-on: the copy carries its own."""
    opt = cls.__new__(cls)
    opt.__setstate__(state)
    addon = SelectiveProjectionDecay(opt, **config)
    for p, layout in layouts.items():
        addon.set_flat_layout(p, layout)
    return opt


def _kernel():
    from spdecay.spd.backends import cpu

    return cpu


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
