"""What a backend is given: the tensors of one param group's step and its hyper-parameters."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from spdecay.spd.layout import FlatLayout


@dataclass(frozen=True)
class AdamHyper:
    """``weight_decay`` is the decoupled AdamW decay applied where ``spd`` is False; SPD
    strengths go to the driver instead."""

    lr: float | Tensor
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    amsgrad: bool
    maximize: bool
    spd: bool


@dataclass
class TensorLists:
    """Parallel lists, one entry per parameter (torch's functional-optimizer convention).

    ``max_exp_avg_sqs`` entries are None without amsgrad, ``anchors`` None for zero anchors (and
    where ``spd`` is False), ``layouts`` None for ordinary tensors."""

    params: list[Tensor]
    grads: list[Tensor]
    exp_avgs: list[Tensor]
    exp_avg_sqs: list[Tensor]
    max_exp_avg_sqs: list[Tensor | None]
    steps: list[Tensor]
    anchors: list[Tensor | None]
    layouts: list[FlatLayout | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.params)
        if not self.layouts:
            self.layouts = [None] * n
        if not self.max_exp_avg_sqs:
            self.max_exp_avg_sqs = [None] * n

    def __len__(self) -> int:
        return len(self.params)

    def pick(self, idx: list[int]) -> TensorLists:
        return TensorLists(*([xs[i] for i in idx] for xs in self.columns_of_lists()))

    def columns_of_lists(self) -> tuple[list, ...]:
        return (self.params, self.grads, self.exp_avgs, self.exp_avg_sqs, self.max_exp_avg_sqs,
                self.steps, self.anchors, self.layouts)

    def has_layouts(self) -> bool:
        return any(x is not None for x in self.layouts)

    def input_columns(self, idx: list[int]) -> list[int]:
        """The input columns of parameters ``idx`` (in that order)."""
        if not self.has_layouts():
            return list(idx)
        base = [0]
        for i in range(len(self)):
            base.append(base[-1] + self.width(i))
        return [base[i] + k for i in idx for k in range(self.width(i))]

    def width(self, i: int) -> int:
        """Columns (decisions) of parameter ``i``: one, or a layout's logical tensors."""
        layout = self.layouts[i]
        return 1 if layout is None else layout.num_logical

    def sources(self) -> list:
        """Per column: the parameter, or the layout whose process group reduces it."""
        if not self.has_layouts():
            return list(self.params)
        out: list = []
        for p, layout in zip(self.params, self.layouts):
            out += [p] if layout is None else [layout] * layout.num_logical
        return out
