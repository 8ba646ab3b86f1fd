"""AdamL2SP: Adam with L2-SP towards the anchor (Li, Grandvalet, Davoine, 2018), a baseline.

Two forms, selected by ``decoupled``:

* loss-level (classic L2-SP, default): the gradient of ``lam/2 * ||p - p0||^2`` is added to the
  loss gradient, ``g <- g + lam * (p - p0)``, and goes through Adam's moments;
* decoupled (AdamW-style): ``p <- p - lr * lam * (p - p0)`` before the Adam update (SPD's
  projection with the fixed weight ``lr * lam``).

It shares AdamSPD's anchored-Adam base (param groups, ``anchor="init"|"zero"``, given tensors,
``anchor_dtype``, ``state_dtype``, anchors in ``state["anchor"]``, state_dict checks) and its
Adam backends; it is not an AdamSPD and has no SPD statistics. Groups with ``spd=False`` (e.g. a
new head from [`param_groups`][spdecay.param_groups]) get plain AdamW decay ``p *= 1 - lr * weight_decay``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from spdecay._anchored import AnchoredAdam
from spdecay.spd.backends.numerics import local_real
from spdecay.spd.decision import project_
from spdecay.spd.driver import GroupStep, step_groups, validate
from spdecay.spd.interface import TensorLists

__all__ = ["AdamL2SP"]


class AdamL2SP(AnchoredAdam):
    """Adam with L2-SP regularisation towards the anchor.

    The remaining arguments mean the same as in [`AdamSPD`][spdecay.AdamSPD].

    Args:
        params: parameters, named parameters ``(name, p)`` or param groups, with the group keys
            of [`AdamSPD`][spdecay.AdamSPD] (``spd``, ``anchor``, ``pre``, ``anchor_dtype``,
            ``state_dtype``) and ``decoupled``.
        lr: learning rate, as in `torch.optim.Adam` (a float or a tensor).
        betas: coefficients of the running averages of the gradient and its square.
        eps: term added to the denominator for numerical stability.
        weight_decay: the L2-SP strength ``lam`` (AdamW decay in ``spd=False`` groups).
        amsgrad: use the AMSGrad variant (the maximum of past second moments).
        decoupled: False (default): loss-level form through the moments; True: decoupled form.
            Per-group override key ``"decoupled"``.
        maximize: maximise the objective instead of minimising it.
        foreach: False: the readable reference path; True: the torch multi-tensor path.
        fused: the C/OpenMP (CPU) and Triton (CUDA) kernels, as in
            [`AdamSPD`][spdecay.AdamSPD]; the default (None) takes them where available.
        anchor: default anchor mode for all groups (``"init"`` or ``"zero"``), or anchor
            tensors for a plain parameter list.
        anchor_dtype: store anchors in this floating dtype.
        state_dtype: store the Adam moments in this floating dtype.

    Raises:
        TypeError: ``decoupled`` is not a bool.
    """

    _owner = "AdamL2SP"
    _strength = "L2-SP strength"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        decoupled: bool = False,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        anchor: str | Sequence[Tensor] = "init",
        anchor_dtype: torch.dtype | None = None,
        state_dtype: torch.dtype | None = None,
    ) -> None:
        if not isinstance(decoupled, bool):
            raise TypeError(f"AdamL2SP: decoupled must be a bool, got {decoupled!r}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, foreach=foreach, fused=fused, spd=True,
                        anchor_dtype=anchor_dtype, state_dtype=state_dtype, decoupled=decoupled)
        super().__init__(params, defaults, anchor=anchor)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group, checked as in [`AdamSPD`][spdecay.AdamSPD].

        Args:
            param_group: a dict with ``params`` and optional group keys (``lr``, ``spd``,
                ``anchor``, ``decoupled``, ...); missing keys take the optimizer's defaults.

        Raises:
            TypeError: the group's ``decoupled`` (or the default) is not a bool, or another
                group key has the wrong type (``spd``, ``anchor=None``, a non-floating dtype).
            ValueError: an invalid hyperparameter, an unknown anchor mode, both ``pre`` and
                ``anchor``, or ``foreach`` and ``fused`` both True.
        """
        decoupled = param_group.get("decoupled", self.defaults.get("decoupled", False))
        if not isinstance(decoupled, bool):
            raise TypeError(f"AdamL2SP: group 'decoupled' must be a bool, got {decoupled!r}")
        super().add_param_group(param_group)

    def _fill_group_defaults(self, group: dict[str, Any]) -> None:
        super()._fill_group_defaults(group)
        group.setdefault("decoupled", False)

    def _group_keys(self) -> tuple[str, ...]:
        return ("spd", "anchor", "decoupled")

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """Perform one optimisation step.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss; it is
                called with gradients enabled before the step.

        Returns:
            The loss returned by ``closure``, or None when no closure is given.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_step()
        todo = [(group, lists) for group in self.param_groups
                if len(lists := self._gather(group))]
        steps = []
        for group, lists in todo:  # plain Adam steps; spd=False groups: AdamW decay
            decay = 0.0 if group["spd"] else group["weight_decay"]
            hyper = self._hyper(group, with_sums=False, decay=decay)
            steps.append(GroupStep(lists, hyper, 0.0, group["foreach"], group["fused"]))
        validate(steps, self._owner)  # before the regulariser changes anything
        for (group, lists), step in zip(todo, steps):
            lam = group["weight_decay"]
            if group["spd"] and lam != 0:
                if group["decoupled"]:
                    _pull_towards_anchor(lists, group["lr"] * lam)
                else:
                    # Classic L2-SP: the penalty's gradient joins the (minimisation) gradient
                    # before the moments, as torch's Adam adds weight_decay * p.
                    lists.grads = _penalised_grads(lists, lam, group["maximize"])
                    step.hyper = self._hyper(group, with_sums=False, maximize=False)
            lists.anchors = [None] * len(lists)
        step_groups(steps, self._owner)
        return loss


def _pull_towards_anchor(lists: TensorLists, weight: float | Tensor) -> None:
    """p <- p - weight * (p - p0): the projection with a fixed weight (p *= 1 - weight for zero
    anchors)."""
    for zero in (True, False):
        idx = [i for i, a in enumerate(lists.anchors) if (a is None) == zero]
        if idx:
            ps = local_real([lists.params[i] for i in idx])
            ans = local_real([lists.anchors[i] for i in idx])
            w = torch.as_tensor(weight, dtype=torch.float64)
            project_(ps, ans, [w.to(p.device, p.dtype) for p in ps])  # type: ignore[union-attr]


def _penalised_grads(lists: TensorLists, lam: float, maximize: bool) -> list[Tensor]:
    """New gradient tensors (p.grad is left untouched): (+-g) + lam * (p - p0)."""
    grads = [-g for g in lists.grads] if maximize else list(lists.grads)
    out = torch._foreach_add(grads, lists.params, alpha=lam)
    given = [i for i, a in enumerate(lists.anchors) if a is not None]
    if given:
        torch._foreach_add_(
            [out[i] for i in given],
            [lists.anchors[i].to(lists.params[i].dtype) for i in given],  # type: ignore[union-attr]
            alpha=-lam,
        )
    return out
