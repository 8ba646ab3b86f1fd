"""AdamSPD: Adam with Selective Projection Decay (Tian, Huang, Kira, NeurIPS 2024), as an
optimizer class and as a function over lists of tensors (``adam_spd``, torch's functional
convention)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from spdecay._anchored import AnchoredAdam, check_strength
from spdecay.spd.driver import GroupStep, step_groups
from spdecay.spd.interface import AdamHyper, TensorLists
from spdecay.spd.layout import FlatLayout
from spdecay.stats import SPDStats, collect_stats


class AdamSPD(AnchoredAdam):
    r"""Adam with Selective Projection Decay.

    For every parameter tensor ("layer") with gradient ``g``, anchor ``p0`` and strength
    ``lam = weight_decay``:

    1. ``p_adam`` = a plain Adam step from ``p`` (no weight decay);
    2. ``c = -<g, p - p0>`` over the whole tensor;
    3. only if ``c < 0`` (the descent direction points back towards the anchor),
       ``r = clamp((||p_adam - p0|| - ||p - p0||) / ||p_adam - p0||, 0, 1)`` and
       ``p_new = p_adam - lam * r * (p_adam - p0)``; otherwise ``p_new = p_adam``.

    With ``lam = 1`` a layer whose condition fired may not drift further from its anchor.

    Args:
        params: parameters, named parameters ``(name, p)`` or param groups. Group keys beside
            torch's Adam keys: ``spd`` (default True; False makes the group plain AdamW with
            decoupled decay ``p -= lr * weight_decay * p``), ``anchor`` (``"init"``: the value
            at the parameter's first step; ``"zero"``: PEFT mode, regularise ``||p||``; or a
            sequence of tensors matching ``params``), ``pre`` (the paper's reference-code key: a
            list of anchor tensors, or None for zero; not together with ``anchor``),
            ``anchor_dtype`` and ``state_dtype``.
        lr: learning rate, as in `torch.optim.Adam` (a float or a tensor).
        betas: coefficients of the running averages of the gradient and its square.
        eps: term added to the denominator for numerical stability.
        weight_decay: the SPD strength ``lam`` (plain decoupled decay where ``spd=False``).
        amsgrad: use the AMSGrad variant (the maximum of past second moments).
        maximize: maximise the objective instead of minimising it.
        foreach: False: the readable single-tensor reference path; True: the torch
            multi-tensor path (never the fused kernels unless ``fused=True``).
        fused: True: CPU tensors go to a C/OpenMP kernel (compiled once per machine, when the
            optimizer is built; a missing compiler raises), CUDA tensors to Triton kernels
            (always capturable in a CUDA graph); tensors a kernel does not cover take the
            multi-tensor path in the same step. The default (None, with ``foreach=None``) uses
            the C kernel on CPU whenever a C compiler is found and Triton on CUDA when it is
            installed, and the torch multi-tensor path otherwise.
        anchor: default anchor mode for all groups, or anchor tensors for a plain parameter list.
        anchor_dtype: store anchors in this floating dtype (``torch.bfloat16`` halves them).
        state_dtype: store the Adam moments in this floating dtype, e.g. ``torch.float32`` for
            bf16/fp16 parameters (the update is computed in the wider dtype and rounded once).

    Anchors live in ``state[p]["anchor"]``; [`spd_stats`][spdecay.AdamSPD.spd_stats] gives the
    last step's decisions; [`set_flat_layout`][spdecay.AdamSPD.set_flat_layout] declares a flat
    engine partition (DeepSpeed ZeRO).
    """

    _owner = "AdamSPD"
    _strength = "SPD strength"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1.0,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        anchor: str | Sequence[Tensor] = "init",
        anchor_dtype: torch.dtype | None = None,
        state_dtype: torch.dtype | None = None,
    ) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, foreach=foreach, fused=fused, spd=True,
                        anchor_dtype=anchor_dtype, state_dtype=state_dtype)
        super().__init__(params, defaults, anchor=anchor)

    def _foreign_keys(self) -> tuple[str, ...]:
        return ("decoupled",)  # AdamL2SP's: there weight_decay means another strength

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
        groups, steps = [], []
        for group in self.param_groups:
            lists = self._gather(group)
            if not len(lists):
                continue
            lam = float(group["weight_decay"])
            if group["spd"]:  # weight_decay is the SPD strength: the driver's
                hyper, strength = self._hyper(group, with_sums=True), lam
            else:  # plain AdamW: weight_decay is its decoupled decay
                hyper, strength = self._hyper(group, with_sums=False, decay=lam), 0.0
            groups.append(group)
            steps.append(GroupStep(lists, hyper, strength, group["foreach"], group["fused"]))
        for group_step, decisions in zip(steps, step_groups(steps, self._owner)):
            if decisions is not None:  # read back by spd_stats(); no per-tensor tensor work here
                for p, entry in zip(group_step.lists.params, decisions):
                    self._spd_last[p] = entry
        return loss

    def spd_stats(self) -> SPDStats:
        """Per-tensor results of the last step that updated each SPD parameter (no host sync).

        Returns:
            The SPD decisions of the parameters in groups with ``spd=True``; a parameter with a
                [`FlatLayout`][spdecay.FlatLayout] gives one entry per logical tensor.
        """
        return collect_stats(self.param_groups, self._spd_last, self._layouts, spd_only=True)


def adam_spd(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    anchors: list[Tensor | None],
    *,
    layouts: list[FlatLayout | None] | None = None,
    foreach: bool | None = None,
    fused: bool | None = None,
    amsgrad: bool,
    beta1: float,
    beta2: float,
    lr: float | Tensor,
    weight_decay: float,
    eps: float,
    maximize: bool,
    spd: bool = True,
) -> SPDStats | None:
    """Functional AdamSPD over one list of tensors (torch's functional convention).

    The caller builds the state lists; the tensors are updated in place.

    Args:
        params: the parameters.
        grads: their gradients.
        exp_avgs: first moments, one per parameter.
        exp_avg_sqs: second moments, one per parameter.
        max_exp_avg_sqs: maximum second moments (used only where ``amsgrad``).
        state_steps: step counters, one tensor per parameter.
        anchors: the anchor of each parameter; None for a zero anchor.
        layouts: optional [`FlatLayout`][spdecay.FlatLayout] per parameter (None: a plain tensor).
        foreach: False: the reference path; True: the torch multi-tensor path.
        fused: the C/OpenMP (CPU) and Triton (CUDA) kernels; None takes them where available.
        amsgrad: use the AMSGrad variant.
        beta1: coefficient of the running average of the gradient.
        beta2: coefficient of the running average of its square.
        lr: learning rate.
        weight_decay: the SPD strength ``lam`` (decoupled AdamW decay where ``spd`` is False).
        eps: term added to the denominator for numerical stability.
        maximize: maximise the objective instead of minimising it.
        spd: False makes this AdamW with decoupled decay ``weight_decay``.

    Raises:
        ValueError: ``weight_decay`` is not a finite number >= 0.

    Returns:
        The step's [`SPDStats`][spdecay.SPDStats], or None where ``spd`` is False.
    """
    check_strength(weight_decay, "adam_spd: invalid weight_decay")
    lists = TensorLists(list(params), list(grads), list(exp_avgs), list(exp_avg_sqs),
                        list(max_exp_avg_sqs) if amsgrad else [], list(state_steps),
                        list(anchors) if spd else [], list(layouts or []))
    hyper = AdamHyper(lr=lr, beta1=beta1, beta2=beta2, eps=eps, amsgrad=amsgrad,
                      maximize=maximize, with_sums=spd, decay=0.0 if spd else weight_decay)
    if not params:
        return SPDStats.from_lists([], [], [], []) if spd else None
    (result,) = step_groups([GroupStep(lists, hyper, float(weight_decay) if spd else 0.0,
                                       foreach, fused)], owner="adam_spd")
    if result is None:
        return None
    return SPDStats.from_decisions([f"param{i}" for i in range(len(params))], result,
                                   [lists.layouts[i] for i in range(len(params))])

