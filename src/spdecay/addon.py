"""Selective Projection Decay as an add-on to any ``torch.optim.Optimizer``.

SPD is a rule about where a step may go, not about Adam: it only needs the gradient the base
optimizer used, the parameter before the step and the parameter after it. The add-on hooks into
the wrapped optimizer's step:

* pre-hook (before the base step): evaluates a closure if one was given (the base then gets
  its loss, not a second evaluation), then per tensor the local sums ``<g, p - p0>`` and
  ``||p - p0||^2`` through the backends' ``measure`` (float64, ``p - p0`` taken exactly);
* post-hook (after it): ``||p_new - p0||^2`` the same way, the growth as the difference of the
  two float64 norms, then the same driver as AdamSPD (one reduction over shards, the one
  decision ``spd_ratio``, the one projection).

No ``.item()``, no Python branching on data: the add-on never forces a host-device sync. Anchors
live in the wrapped optimizer's state (``opt.state[p]["anchor"]``) so ``opt.state_dict()``
carries them. A deep copy or pickle of the optimizer carries the add-on along.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from spdecay._anchored import (
    ANCHOR_KEY,
    ANCHOR_MODES,
    check_dtype_option,
    check_strength,
    state_problem,
    storage_dtype,
)
from spdecay.spd.backends import fused_c
from spdecay.spd.driver import Pending, finish
from spdecay.spd.interface import PartialStep, TensorLists
from spdecay.spd.layout import FlatLayout, check_layout, check_params_unchanged, group_shapes
from spdecay.spd.plan import default_cpu_kernel, plan
from spdecay.spd.reduce import check_placements
from spdecay.stats import SPDStats, collect_stats

__all__ = ["SelectiveProjectionDecay"]


class _Measured:
    """One backend's share of a step: its tensors (without gradients), what the pre-hook
    measured and the strength of each column."""

    __slots__ = ("backend", "lists", "before", "lams")

    def __init__(self, backend: Any, lists: TensorLists, before: Tensor, lams: list[float]):
        self.backend, self.lists, self.before, self.lams = backend, lists, before, lams


class _Evaluated:
    """The closure handed to the base step after the add-on evaluated the real one: it returns
    that loss once (the gradients are already there) and refuses a second call."""

    def __init__(self, loss: Any) -> None:
        self.loss, self.calls = loss, 0

    def __call__(self) -> Any:
        self.calls += 1
        if self.calls > 1:
            raise RuntimeError(
                "SelectiveProjectionDecay: the base optimizer called the closure more than once "
                "in one step; SPD decides on the gradient measured before the step, so "
                "optimizers that re-evaluate (line searches, LBFGS) are not supported"
            )
        return self.loss


def _closure_of(args: tuple, kwargs: dict) -> tuple[Callable | None, tuple, dict]:
    """The closure passed to ``step``: a keyword, or the first argument after the optimizer
    (a step hook sees ``args = (optimizer, ...)``); with ``args``/``kwargs`` copies to edit."""
    if kwargs.get("closure") is not None:
        return kwargs["closure"], args, dict(kwargs)
    if len(args) > 1 and callable(args[1]):
        return args[1], args, kwargs
    return None, args, kwargs


class SelectiveProjectionDecay:
    """Add Selective Projection Decay to any ``torch.optim.Optimizer``.

    Args:
        optimizer: the base optimizer; keep stepping, scheduling and checkpointing it yourself.
            ``step(closure)`` works: the add-on evaluates the closure once, measures, then
            steps the base optimizer with that loss. Optimizers that evaluate the closure
            several times per step (``torch.optim.LBFGS``, line searches) are refused.
            Its own ``weight_decay`` should normally be 0 in SPD groups (SPD replaces it).
        weight_decay: SPD strength ``lam`` (>= 0); per group override key ``"spd_weight_decay"``.
        anchor: ``"init"`` (the parameter's value when the add-on first sees it with a
            gradient, i.e. the pre-trained weights) or ``"zero"`` (PEFT/LoRA weights); per group
            override key ``"anchor"``. A group with ``"spd": False`` is left alone.
        anchor_dtype: floating dtype to store anchors in (default: the parameter's dtype;
            complex parameters keep complex anchors of that precision, as in ``AdamSPD``).
        fused: measure and project CPU tensors with spdecay's C/OpenMP kernel (one pass per
            measurement), as ``AdamSPD`` does. None (default): where the kernel can be built or
            loaded (built once per machine, when the add-on is created), else torch ops;
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
        ValueError: ``weight_decay`` (or a group's ``spd_weight_decay``) is not a finite
            number >= 0, ``anchor`` (or a group's) is not a known mode, the optimizer already
            carries an add-on, or it is an ``LBFGS`` (it evaluates the closure several times).
        RuntimeError: ``fused=True`` and the C kernel cannot be built or loaded (no C
            compiler, an untrusted cache).
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
        if isinstance(optimizer, torch.optim.LBFGS):
            raise ValueError(
                "SelectiveProjectionDecay does not support LBFGS: it evaluates the closure "
                "several times per step, so no single gradient and step exist to decide on"
            )
        check_strength(weight_decay, "weight_decay")
        _check_anchor(anchor, "anchor")
        check_dtype_option("anchor_dtype", anchor_dtype, "SelectiveProjectionDecay")
        for i, group in enumerate(optimizer.param_groups):
            _check_group(group, i)
        if fused is not None and not isinstance(fused, bool):
            raise TypeError(f"fused must be a bool or None, got {fused!r}")
        if getattr(optimizer, "_spd_addon", None) is not None:
            raise ValueError("this optimizer already carries a SelectiveProjectionDecay")
        if fused:
            fused_c.library()  # build now: why it cannot is reported here, not mid-step
        elif fused is None:
            default_cpu_kernel()  # the default takes the kernel where it can: built now
        self.fused = fused
        self.optimizer = optimizer
        self.weight_decay = float(weight_decay)
        self.anchor = anchor
        self.anchor_dtype = anchor_dtype
        # Anchors captured in a pre-hook wait here until the base step has initialised the
        # parameter's state: torch optimizers initialise state only while it is empty.
        self._pending: dict[Tensor, Tensor] = {}
        self._measured: list[_Measured] = []
        self._last: dict[Tensor, Any] = {}
        self._layouts: dict[Tensor, FlatLayout] = {}
        self._group_shapes = [group_shapes(g) for g in optimizer.param_groups]
        self._handles = [
            optimizer.register_step_pre_hook(self._pre_step),
            optimizer.register_step_post_hook(self._post_step),
            optimizer.register_load_state_dict_pre_hook(self._check_loaded),
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
        self._measured = []
        for name in ("_spd_addon", "__reduce_ex__"):
            self.optimizer.__dict__.pop(name, None)
        if drop_anchors:
            for st in self.optimizer.state.values():
                st.pop(ANCHOR_KEY, None)

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

    def anchor_of(self, p: Tensor) -> Tensor | None:
        """The anchor of a parameter.

        Args:
            p: a parameter of the optimizer.

        Returns:
            Its anchor tensor, or None for zero anchors or before its first step.
        """
        st = self.optimizer.state.get(p)
        a = st.get(ANCHOR_KEY) if st else None
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
    def _anchor_for(self, p: Tensor, mode: str) -> Tensor | None:
        if mode == "zero":
            return None
        st = self.optimizer.state.get(p)  # .get: never create a state entry here
        a = st.get(ANCHOR_KEY) if st else None
        if a is None:
            a = self._pending.get(p)
            if a is None:
                a = p.detach().to(dtype=storage_dtype(p, self.anchor_dtype), copy=True)
                self._pending[p] = a
        else:
            # Optimizer.load_state_dict casts floating state to the parameter's dtype/device.
            want = storage_dtype(p, self.anchor_dtype)
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

    def _check_loaded(self, opt: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
        """Refuse anchors that do not fit their parameters before the base loads anything."""
        saved = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        if not isinstance(saved, list) or len(saved) != len(opt.param_groups):
            return  # the base optimizer's own checks report this
        where = {}
        for g, (old, group) in enumerate(zip(saved, opt.param_groups)):
            if len(old.get("params", ())) == len(group["params"]):
                where.update({k: (p, f"param_groups[{g}]['params'][{i}]")
                              for i, (k, p) in enumerate(zip(old["params"], group["params"]))})
        for key, entry in state_dict.get("state", {}).items():
            if key in where and ANCHOR_KEY in entry:
                p, name = where[key]
                problem = state_problem(ANCHOR_KEY, entry[ANCHOR_KEY], p)
                if problem:
                    raise ValueError(
                        f"SelectiveProjectionDecay: the saved anchor of parameter {name} "
                        f"{problem}; nothing was loaded"
                    )

    @torch.no_grad()
    def _pre_step(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> Any:
        closure, args, kwargs = _closure_of(args, kwargs)
        if closure is not None:  # the gradient SPD decides on is the one the base will use
            with torch.enable_grad():
                loss = closure()
            if "closure" in kwargs:
                kwargs["closure"] = _Evaluated(loss)
            else:
                args = (args[0], _Evaluated(loss), *args[2:])
        self._validate(opt)
        params: list[Tensor] = []
        grads: list[Tensor] = []
        anchors: list[Tensor | None] = []
        layouts: list[FlatLayout | None] = []
        lams: list[float] = []
        for group in opt.param_groups:
            if not group.get("spd", True):
                continue
            lam = float(group.get("spd_weight_decay", self.weight_decay))
            mode = group.get("anchor", self.anchor)
            flip = bool(group.get("maximize", False))
            for p in group["params"]:
                if p.grad is None:
                    continue
                params.append(p)
                # The direction the base optimizer descends along (it negates for maximize).
                # Only the sign of <g, p - p0> matters, so grads still scaled by a GradScaler
                # (fused optimizers unscale inside their kernel) give the same decision.
                grads.append(-p.grad if flip else p.grad)
                anchors.append(self._anchor_for(p, mode))
                layout = self._layouts.get(p)
                layouts.append(layout)
                lams += [lam] * (1 if layout is None else layout.num_logical)
        self._measured = []
        if params:
            lists = TensorLists(params, grads, anchors=anchors, layouts=layouts)  # type: ignore[arg-type]
            for backend, idx in plan(lists, foreach=None, fused=self.fused):
                part = lists.pick(idx)
                before = backend.measure(part).sums
                part.grads = [None] * len(part)  # the post-hook measures p_new only
                cols = lists.first_columns(idx)
                self._measured.append(_Measured(backend, part, before, [lams[c] for c in cols]))
        return (args, kwargs) if closure is not None else None

    @torch.no_grad()
    def _post_step(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        measured, self._measured = self._measured, []
        pending = []
        for m in measured:
            after = m.backend.measure(m.lists)
            # Both norms are float64 sums of exact differences: their difference keeps the
            # growth accurate where float32 norms would cancel.
            before = m.before.to(after.sums.device)
            sums = torch.stack([before[0], before[1], after.sums[1] - before[1]])
            pending.append(Pending(PartialStep(sums, after.projector), m.lists.sources(), m.lams))
        decisions = finish(pending, getattr(opt, "found_inf", None)) if pending else []
        for m, dec in zip(measured, decisions):
            start = 0
            for i, p in enumerate(m.lists.params):
                width = m.lists.width(i)
                self._last[p] = (dec, start, width)
                start += width
                # The base step has initialised the state of every stepped parameter by now.
                a = self._pending.pop(p, None)
                if a is not None:
                    opt.state[p][ANCHOR_KEY] = a


def _rebuild_with_spd(cls: type, state: dict[str, Any], config: dict[str, Any],
                      layouts: dict[Tensor, FlatLayout]) -> torch.optim.Optimizer:
    """Unpickle / deep-copy an optimizer that carried the add-on: the copy carries its own."""
    opt = cls.__new__(cls)
    opt.__setstate__(state)
    addon = SelectiveProjectionDecay(opt, **config)
    for p, layout in layouts.items():
        addon.set_flat_layout(p, layout)
    return opt


def _check_anchor(v: Any, name: str) -> None:
    if v not in ANCHOR_MODES:
        raise ValueError(f"{name} must be one of {ANCHOR_MODES}, got {v!r}")


def _check_group(group: dict, i: int) -> None:
    if "spd_weight_decay" in group:
        check_strength(group["spd_weight_decay"], f"param_groups[{i}]['spd_weight_decay']")
    if "anchor" in group:
        _check_anchor(group["anchor"], f"param_groups[{i}]['anchor']")
    if "spd" in group and not isinstance(group["spd"], bool):
        raise TypeError(f"param_groups[{i}]['spd'] must be a bool, got {group['spd']!r}")
