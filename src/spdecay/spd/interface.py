"""The backend interface: what a backend is given, what it returns, and how parts are joined.

A *column* is one decision: a parameter, or one logical tensor of a parameter with a
``FlatLayout``. Sums and projection weights are indexed by column, in the order of the lists a
backend was given ("input order").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from spdecay.spd.cache import Memo, to_device
from spdecay.spd.layout import FlatLayout


@dataclass(frozen=True)
class AdamHyper:
    """The Adam hyper-parameters of one param group's step.

    ``with_sums``: also take the SPD sums and return a ``PartialStep`` (the driver then decides
    and projects); False: a plain Adam(W) step, nothing returned. ``decay`` is AdamW's decoupled
    weight decay (``p *= 1 - lr * decay`` before the update), only without sums: the SPD
    strength is the driver's, never a backend's."""

    lr: float | Tensor
    beta1: float
    beta2: float
    eps: float
    amsgrad: bool
    maximize: bool
    with_sums: bool
    decay: float = 0.0

    def __post_init__(self) -> None:
        if self.with_sums and self.decay != 0:
            raise ValueError("AdamHyper: decoupled decay is for steps without SPD sums")


@dataclass
class TensorLists:
    """Parallel lists, one entry per parameter (torch's functional-optimizer convention).

    ``anchors`` entries are None for a zero anchor (and wherever no sums are taken);
    ``max_exp_avg_sqs`` None without amsgrad; ``layouts`` None for ordinary tensors. Lists left
    empty are filled with None (the add-on has no moments or step counts of its own)."""

    params: list[Tensor]
    grads: list[Tensor | None]
    exp_avgs: list[Tensor | None] = field(default_factory=list)
    exp_avg_sqs: list[Tensor | None] = field(default_factory=list)
    max_exp_avg_sqs: list[Tensor | None] = field(default_factory=list)
    steps: list[Tensor | None] = field(default_factory=list)
    anchors: list[Tensor | None] = field(default_factory=list)
    layouts: list[FlatLayout | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.params)
        for name in ("grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "steps", "anchors",
                     "layouts"):
            if not getattr(self, name):
                setattr(self, name, [None] * n)

    def __len__(self) -> int:
        return len(self.params)

    def fields(self) -> tuple[list, ...]:
        return (self.params, self.grads, self.exp_avgs, self.exp_avg_sqs, self.max_exp_avg_sqs,
                self.steps, self.anchors, self.layouts)

    def pick(self, idx: list[int]) -> TensorLists:
        return TensorLists(*([xs[i] for i in idx] for xs in self.fields()))

    def width(self, i: int) -> int:
        """Columns of parameter ``i``: one, or its layout's logical tensors."""
        layout = self.layouts[i]
        return 1 if layout is None else layout.num_logical

    def first_columns(self, idx: list[int]) -> list[int]:
        """The input columns of parameters ``idx`` (each parameter's columns, in that order)."""
        if all(x is None for x in self.layouts):
            return list(idx)
        base = [0]
        for i in range(len(self)):
            base.append(base[-1] + self.width(i))
        return [base[i] + k for i in idx for k in range(self.width(i))]

    def sources(self) -> list:
        """Per column: the parameter, or the layout whose process group reduces it."""
        if all(x is None for x in self.layouts):
            return list(self.params)
        out: list = []
        for p, layout in zip(self.params, self.layouts):
            out += [p] if layout is None else [layout] * layout.num_logical
        return out


class Projector(Protocol):
    def project(self, coef: Tensor) -> None:
        """Apply ``p <- p - coef[j] (p - p0)`` to the tensors of column ``j`` (float64 ``[n]``,
        on the sums' device; 0 leaves a column as it is)."""


@dataclass
class PartialStep:
    """What a backend returns: the update applied, decision and projection still to come.

    ``sums`` is ``[3, n]`` float64, local (not reduced over shards), one column per input
    column: ``<g, p - p0>``, ``||p - p0||^2`` and the growth ``||p_adam - p0||^2 - ||p - p0||^2``
    (0 for ``measure``)."""

    sums: Tensor
    projector: Projector


class Decisions(NamedTuple):
    """Per column of one partial step."""

    fired: Tensor  # bool: c = -<g, p - p0> < 0
    ratio: Tensor  # the ratio r applied (0 where it did not fire)
    deviation: Tensor  # ||p - p0|| before the step


_ORDER: Memo[Tensor] = Memo()


def joined(parts: list[PartialStep], columns: list[list[int]]) -> PartialStep:
    """One ``PartialStep`` in input order from parts a backend stepped separately (by dtype,
    anchor kind, ...); ``columns[k]`` are the input columns of ``parts[k]``, in its order."""
    if len(parts) == 1 and columns[0] == list(range(len(columns[0]))):
        return parts[0]
    order = tuple(c for cols in columns for c in cols)
    sums = torch.cat([p.sums for p in parts], dim=1)
    identity = order == tuple(range(len(order)))
    if not identity:
        inverse = _ORDER.get(("inv", order, sums.device), lambda: to_device(
            torch.argsort(torch.tensor(order, dtype=torch.int64)), sums.device))
        sums = sums.index_select(1, inverse)
    return PartialStep(sums, _Joined([p.projector for p in parts], [len(c) for c in columns],
                                     None if identity else order))


class _Joined:
    def __init__(self, projectors: list[Projector], widths: list[int],
                 order: tuple[int, ...] | None) -> None:
        self.projectors, self.widths, self.order = projectors, widths, order

    def project(self, coef: Tensor) -> None:
        if self.order is not None:
            order = self.order
            coef = coef.index_select(0, _ORDER.get(("fwd", order, coef.device), lambda: to_device(
                torch.tensor(order, dtype=torch.int64), coef.device)))
        start = 0
        for projector, width in zip(self.projectors, self.widths):
            projector.project(coef[start : start + width])
            start += width
