"""AdamSPD as a function over lists of tensors: validate, plan, phase 1 per backend, finish.

`step_groups` is what ``AdamSPD.step`` calls with every param group of a step (so the
sums of all groups are reduced together); `adam_spd` is the one-group functional form.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from spdecay.spd.driver import Decisions, PartialStep, finish
from spdecay.spd.layout import FlatLayout
from spdecay.spd.plan import plan, preflight
from spdecay.spd.reduce import check_placements
from spdecay.spd.work import AdamHyper, TensorLists


@dataclass
class GroupStep:
    """One param group's step: its tensors, hyper-parameters, SPD strength and path options."""

    lists: TensorLists
    hyper: AdamHyper
    lam: float | Tensor = 0.0
    foreach: bool | None = None
    fused: bool | None = None


# Per parameter: (decisions, first column in them, number of columns).
ParamDecisions = tuple[Decisions, int, int]


def validate(groups: list[GroupStep], owner: str) -> None:
    """Everything that can fail, checked before any tensor changes."""
    for g in groups:
        check_placements(g.lists.params, owner)
        preflight({p.device.type for p in g.lists.params}, fused=g.fused, owner=owner)


def step_groups(groups: list[GroupStep], owner: str = "AdamSPD",
                found_inf: Tensor | None = None) -> list[list[ParamDecisions] | None]:
    """Step every group; per group (None where ``spd`` is False) the decisions of each param."""
    validate(groups, owner)
    runs: list[tuple[int, list[int], PartialStep]] = []
    for k, g in enumerate(groups):
        for backend, idx in plan(g.lists, foreach=g.foreach, fused=g.fused, spd=g.hyper.spd):
            part = backend.adam_and_sums(g.lists.pick(idx), g.hyper)
            if part is not None:
                part.lam = g.lam
                runs.append((k, idx, part))
    decisions = finish([part for _, _, part in runs], found_inf) if runs else []
    out: list[list[ParamDecisions] | None] = [
        [None] * len(g.lists) if g.hyper.spd else None for g in groups  # type: ignore[list-item]
    ]
    for (k, idx, part), dec in zip(runs, decisions):
        lists, result = groups[k].lists, out[k]
        columns = part.columns if part.columns is not None else range(part.sums.shape[1])
        if not lists.has_layouts():  # one column per parameter: column c is idx[c]
            for j, c in enumerate(columns):
                result[idx[c]] = (dec, j, 1)  # type: ignore[index]
            continue
        first_of, col = {}, 0  # input column of the part -> parameter index in the group
        for i in idx:
            first_of[col] = i
            col += lists.width(i)
        for j, c in enumerate(columns):
            i = first_of.get(c)
            if i is not None:
                result[i] = (dec, j, lists.width(i))  # type: ignore[index]
    return out


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
):
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

    Returns:
        The step's [`SPDStats`][spdecay.SPDStats], or None where ``spd`` is False.
    """
    from spdecay.stats import SPDStats

    lists = TensorLists(params, grads, exp_avgs, exp_avg_sqs,
                        list(max_exp_avg_sqs) if amsgrad else [], state_steps,
                        list(anchors) if spd else [None] * len(params), list(layouts or []))
    hyper = AdamHyper(lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                      weight_decay=0.0 if spd else weight_decay, amsgrad=amsgrad,
                      maximize=maximize, spd=spd)
    if not params:
        return SPDStats.from_lists([], [], [], []) if spd else None
    (result,) = step_groups([GroupStep(lists, hyper, float(weight_decay), foreach, fused)],
                            owner="adam_spd")
    if result is None:
        return None
    return SPDStats.from_decisions([f"param{i}" for i in range(len(params))], result,
                                   [lists.layouts[i] for i in range(len(params))])


__all__ = ["GroupStep", "adam_spd", "step_groups", "validate"]
