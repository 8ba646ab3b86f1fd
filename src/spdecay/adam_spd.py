"""AdamSPD: Adam with Selective Projection Decay (Tian, Huang, Kira, NeurIPS 2024)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from spdecay._anchored import AnchoredAdam
from spdecay.spd.functional import GroupStep, step_groups
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
            spd = group["spd"]
            hyper = self._hyper(group, spd=spd, weight_decay=0.0 if spd else group["weight_decay"])
            groups.append(group)
            steps.append(GroupStep(lists, hyper, float(group["weight_decay"]), group["foreach"],
                                   group["fused"]))
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
