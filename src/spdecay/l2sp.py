"""AdamL2SP: Adam with L2-SP towards the anchor (Li, Grandvalet, Davoine, 2018), a baseline.

Two forms, selected by ``decoupled``:

* loss-level (classic L2-SP, default): the gradient of ``lam/2 * ||p - p0||^2`` is added to the
  loss gradient, ``g <- g + lam * (p - p0)``, and goes through Adam's moments;
* decoupled (AdamW-style): ``p <- p - lr * lam * (p - p0)`` before the Adam update.

It shares AdamSPD's param groups, anchor handling (``anchor="init"|"zero"``, given tensors,
``anchor_dtype``, anchors in ``state["anchor"]``), state_dict and fast paths: only the
regulariser differs. Groups with ``spd=False`` (e.g. a new head from :func:`param_groups`) get
plain AdamW decay ``p *= 1 - lr * weight_decay``, exactly as in AdamSPD.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from spdecay._functional import adam_spd
from spdecay.adam_spd import AdamSPD, _choose_path, _uses_anchor

__all__ = ["AdamL2SP"]


class AdamL2SP(AdamSPD):
    """Adam with L2-SP regularisation towards the anchor.

    Args:
        weight_decay: the L2-SP strength ``lam``.
        decoupled: False (default): loss-level form through the moments; True: decoupled form.
            Per-group override key ``"decoupled"``.
        Everything else as in :class:`AdamSPD`.
    """

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
        capturable: bool = False,
        anchor: str | Sequence[Tensor] = "init",
        anchor_dtype: torch.dtype | None = None,
    ) -> None:
        if not isinstance(decoupled, bool):
            raise TypeError(f"AdamL2SP: decoupled must be a bool, got {decoupled!r}")
        self._decoupled_default = decoupled  # read by add_param_group during super().__init__
        super().__init__(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            maximize=maximize, foreach=foreach, fused=fused, capturable=capturable,
            anchor=anchor, anchor_dtype=anchor_dtype,
        )
        self.defaults["decoupled"] = decoupled

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        group = dict(param_group)
        group.setdefault("decoupled", self._decoupled_default)
        if not isinstance(group["decoupled"], bool):
            raise TypeError(f"AdamL2SP: group 'decoupled' must be a bool, got {group['decoupled']!r}")
        super().add_param_group(group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_decoupled_default", False)
        for group in self.param_groups:
            group.setdefault("decoupled", False)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """Perform one optimisation step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, anchors = (
                [] for _ in range(7)
            )
            # AdamSPD's state handling: moments, steps and lazily captured anchors.
            self._init_group(
                group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, anchors
            )
            if not params:
                continue
            if not _uses_anchor(group):  # zero anchors (PEFT) or spd=False: no anchor tensors
                anchors = [None] * len(params)
            foreach, fused = _choose_path(group, params)
            lam, lr, maximize = group["weight_decay"], group["lr"], group["maximize"]
            decay = lam  # spd=False groups: plain AdamW decay in the shared Adam path
            if group["spd"]:
                decay = 0.0
                if lam != 0 and group["decoupled"]:
                    _pull_towards_anchor(params, anchors, lr * lam, foreach)
                elif lam != 0:
                    # Classic L2-SP: the penalty's gradient joins the (minimisation) gradient
                    # before the moments, as torch's Adam adds weight_decay * p.
                    grads = _add_penalty_grad(grads, params, anchors, lam, maximize, foreach)
                    maximize = False
            beta1, beta2 = group["betas"]
            adam_spd(
                params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
                [None] * len(params),
                foreach=foreach, fused=fused, amsgrad=group["amsgrad"], beta1=beta1, beta2=beta2,
                lr=lr, weight_decay=decay, eps=group["eps"], maximize=maximize, spd=False,
                capturable=group["capturable"],
            )
        return loss


def _split(params: list[Tensor], anchors: list[Tensor | None]) -> tuple[list[int], list[int]]:
    zero = [i for i, a in enumerate(anchors) if a is None]
    given = [i for i, a in enumerate(anchors) if a is not None]
    return zero, given


def _pull_towards_anchor(
    params: list[Tensor], anchors: list[Tensor | None], weight: float | Tensor, foreach: bool
) -> None:
    """p <- p - weight * (p - p0), i.e. lerp(p, p0, weight); p0 = 0 gives p *= 1 - weight."""
    zero, given = _split(params, anchors)
    if foreach:
        per = isinstance(weight, Tensor)  # a Tensor lr: one 0-d weight per tensor
        if zero:
            zp = [params[i] for i in zero]
            torch._foreach_mul_(zp, [1 - weight] * len(zp) if per else 1 - weight)
        if given:
            ps = [params[i] for i in given]
            targets = [anchors[i].to(params[i].dtype) for i in given]  # type: ignore[union-attr]
            torch._foreach_lerp_(ps, targets, [weight] * len(ps) if per else weight)
        return
    for i, p in enumerate(params):
        a = anchors[i]
        if a is None:
            p.mul_(1 - weight)
        else:
            p.lerp_(a.to(p.dtype), weight)


def _add_penalty_grad(
    grads: list[Tensor], params: list[Tensor], anchors: list[Tensor | None], lam: float,
    maximize: bool, foreach: bool,
) -> list[Tensor]:
    """New gradient tensors (p.grad is left untouched): (+-g) + lam * (p - p0)."""
    if maximize:
        grads = [-g for g in grads]
    if foreach:
        out = torch._foreach_add(grads, params, alpha=lam)
        zero, given = _split(params, anchors)
        if given:
            torch._foreach_add_(
                [out[i] for i in given],
                [anchors[i].to(params[i].dtype) for i in given],  # type: ignore[union-attr]
                alpha=-lam,
            )
        return out
    return [
        g.add(p if a is None else p - a.to(p.dtype), alpha=lam)
        for g, p, a in zip(grads, params, anchors, strict=True)
    ]
