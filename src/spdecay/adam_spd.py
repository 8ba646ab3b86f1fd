"""AdamSPD: Adam with Selective Projection Decay (Tian, Huang, Kira, NeurIPS 2024)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from spdecay._functional import (
    PhaseOne,
    SPDStepStats,
    adam_spd,
    multi_tensor_phase_one,
    phase_two,
)
from spdecay._sharding import reduce_partial_sums
from spdecay.stats import SPDStats

_ANCHOR_MODES = ("init", "zero")


class AdamSPD(Optimizer):
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
            list of anchor tensors, or None for zero) and ``anchor_dtype``.
        lr, betas, eps, amsgrad, maximize: as in :class:`torch.optim.Adam`.
        weight_decay: the SPD strength ``lam`` (plain decoupled decay where ``spd=False``).
        foreach: use the multi-tensor path (default: True when all tensors share one device).
        fused: use a fused kernel (CPU: a C++ kernel compiled once on first use).
        capturable: keep step counts on the device so the step can be captured in a CUDA graph.
        anchor: default anchor mode for all groups.
        anchor_dtype: store anchors in this dtype (e.g. ``torch.bfloat16`` halves their memory).
        state_dtype: store the Adam moments in this dtype, e.g. ``torch.float32`` for bf16/fp16
            parameters (mixed precision without master weights: the update is computed in the
            wider dtype and rounded once into the parameter).
    """

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
        capturable: bool = False,
        anchor: str | Sequence[Tensor] = "init",
        anchor_dtype: torch.dtype | None = None,
        state_dtype: torch.dtype | None = None,
    ) -> None:
        _check_hyperparameters(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        for name, value in (("anchor_dtype", anchor_dtype), ("state_dtype", state_dtype)):
            if value is not None and not isinstance(value, torch.dtype):
                raise TypeError(f"AdamSPD: {name} must be a torch.dtype, got {value!r}")
        if not isinstance(anchor, str):  # tensors for a single group of parameters
            params = [{"params": list(params), "anchor": list(anchor)}]
            anchor = "init"
        elif anchor not in _ANCHOR_MODES:
            raise ValueError(f"AdamSPD: unknown anchor mode {anchor!r}; expected 'init', 'zero' or tensors")
        if foreach and fused:
            raise ValueError("AdamSPD: `foreach` and `fused` cannot both be True")
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            foreach=foreach,
            fused=fused,
            capturable=capturable,
            spd=True,
            anchor=anchor,
            anchor_dtype=anchor_dtype,
            state_dtype=state_dtype,
        )
        self._spd_last: dict[Tensor, tuple[SPDStepStats, int]] = {}
        super().__init__(params, defaults)
        self.register_load_state_dict_post_hook(_restore_anchor_dtypes)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        group = dict(param_group)
        if "pre" in group:  # the reference code's key: a list of anchors, or None for zero
            pre = group.pop("pre")
            group["anchor"] = "zero" if pre is None else list(pre)
        explicit = group.get("anchor")
        if explicit is not None and not isinstance(explicit, str):
            group["anchor"] = "given"
        elif explicit is not None and explicit not in _ANCHOR_MODES:
            raise ValueError(f"AdamSPD: unknown anchor mode {explicit!r}; expected 'init', 'zero' or tensors")
        for key in ("lr", "betas", "eps", "weight_decay"):
            if key in group:
                _check_hyperparameters(**{key: group[key]})
        if group.get("fused") and group.get("foreach"):
            raise ValueError("AdamSPD: `foreach` and `fused` cannot both be True")
        super().add_param_group(group)
        if explicit is not None and not isinstance(explicit, str):
            self._set_given_anchors(self.param_groups[-1], list(explicit))

    def _set_given_anchors(self, group: dict[str, Any], anchors: list[Tensor | None]) -> None:
        params = group["params"]
        if len(anchors) != len(params):
            raise ValueError(
                f"AdamSPD: got {len(anchors)} anchor tensors for {len(params)} parameters"
            )
        for i, (p, a) in enumerate(zip(params, anchors)):
            if a is None:  # the reference code allows a zero anchor per parameter
                a = torch.zeros_like(p)
            if not isinstance(a, Tensor):
                raise TypeError(f"AdamSPD: anchor {i} is a {type(a).__name__}, expected a Tensor")
            if a.shape != p.shape:
                raise ValueError(
                    f"AdamSPD: anchor {i} has shape {tuple(a.shape)}, parameter has {tuple(p.shape)}"
                )
            dtype = storage_dtype(p, group["anchor_dtype"])
            self.state[p]["anchor"] = a.detach().to(device=p.device, dtype=dtype).clone()

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_spd_last", {})
        for group in self.param_groups:
            for key, value in (
                ("spd", True), ("anchor", "init"), ("anchor_dtype", None), ("state_dtype", None)
            ):
                group.setdefault(key, value)
            for key in ("maximize", "foreach", "fused", "capturable", "amsgrad"):
                group.setdefault(key, False if key != "foreach" else None)

    def _init_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        exp_avgs: list[Tensor],
        exp_avg_sqs: list[Tensor],
        max_exp_avg_sqs: list[Tensor],
        state_steps: list[Tensor],
        anchors: list[Tensor],
    ) -> bool:
        """Fill the lists with the group's parameters that have gradients (torch's convention,
        which torch.compile relies on); returns whether any of them is complex."""
        has_complex = False
        use_anchor = _uses_anchor(group)
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("AdamSPD does not support sparse gradients")
            has_complex |= torch.is_complex(p)
            state = self.state[p]
            moments = dict(memory_format=torch.preserve_format,
                           dtype=storage_dtype(p, group["state_dtype"]))
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=_step_dtype(), device=p.device)
                state["exp_avg"] = torch.zeros_like(p, **moments)
                state["exp_avg_sq"] = torch.zeros_like(p, **moments)
            elif state["step"].device != p.device:  # e.g. a state_dict saved by torch's Adam
                state["step"] = state["step"].to(p.device)
            if group["amsgrad"] and "max_exp_avg_sq" not in state:
                state["max_exp_avg_sq"] = torch.zeros_like(p, **moments)
            if use_anchor and "anchor" not in state:
                # Captured lazily, before the first update: the value the parameter has when
                # the optimizer first steps it (robust to frameworks that swap parameters).
                dtype = storage_dtype(p, group["anchor_dtype"])
                state["anchor"] = p.detach().to(dtype=dtype, copy=True)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            if group["amsgrad"]:
                max_exp_avg_sqs.append(state["max_exp_avg_sq"])
            state_steps.append(state["step"])
            if use_anchor:
                anchors.append(state["anchor"])
        return has_complex

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """Perform one optimisation step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # SPD groups on the multi-tensor and fused CPU paths stop after phase 1, so that the
        # partial sums of all their tensors are reduced over shards in one collective per step.
        halfway: list[tuple[list[Tensor], PhaseOne]] = []
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, anchors = (
                [] for _ in range(7)
            )
            self._init_group(
                group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, anchors
            )
            if not params:
                continue
            beta1, beta2 = group["betas"]
            foreach, fused = _choose_path(group, params)
            lists = (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
                     anchors if _uses_anchor(group) else [None] * len(params))
            hyper = dict(amsgrad=group["amsgrad"], beta1=beta1, beta2=beta2, lr=group["lr"],
                         weight_decay=group["weight_decay"], eps=group["eps"],
                         maximize=group["maximize"], spd=group["spd"])
            phase_one = _phase_one_of(foreach, fused, params) if group["spd"] else None
            if phase_one is not None:
                one = phase_one(*lists, **hyper)
                if one is not None:
                    halfway.append((params, one))
                continue
            stats = adam_spd(*lists, foreach=foreach, fused=fused,
                             capturable=group["capturable"], **hyper)
            self._record(params, stats)
        if halfway:
            self._finish(halfway)
        return loss

    def _finish(self, halfway: list[tuple[list[Tensor], PhaseOne]]) -> None:
        by_device: dict[torch.device, list[tuple[list[Tensor], PhaseOne]]] = {}
        for item in halfway:
            by_device.setdefault(item[1].sums.device, []).append(item)
        for items in by_device.values():
            sums = torch.cat([one.sums for _, one in items], dim=1)
            sums = reduce_partial_sums(sums, [p for _, one in items for p in one.reduced])
            start = 0
            for params, one in items:
                width = one.sums.shape[1]
                self._record(params, phase_two(one, sums[:, start : start + width]))
                start += width

    def _record(self, params: list[Tensor], stats: SPDStepStats | None) -> None:
        if stats is not None:  # read back by spd_stats(); no per-tensor work here
            for i, p in enumerate(params):
                self._spd_last[p] = (stats, i)

    def spd_stats(self) -> SPDStats:
        """Per-tensor results of the last step that updated each SPD parameter (no host sync)."""
        names, fired, ratio, deviation = [], [], [], []
        for g, group in enumerate(self.param_groups):
            if not group["spd"]:
                continue
            group_names = group.get("param_names")
            for i, p in enumerate(group["params"]):
                if p not in self._spd_last:
                    continue
                names.append(group_names[i] if group_names else f"group{g}.param{i}")
                stats, k = self._spd_last[p]
                fired.append(stats.fired[k])
                ratio.append(stats.ratio[k])
                deviation.append(stats.deviation[k])
        return SPDStats.from_lists(names, fired, ratio, deviation)


def _uses_anchor(group: dict[str, Any]) -> bool:
    return group["spd"] and group["anchor"] != "zero"


def _step_dtype() -> torch.dtype:
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _choose_path(group: dict[str, Any], params: list[Tensor]) -> tuple[bool, bool]:
    fused = group["fused"]
    if fused is None and not group["foreach"] and all(p.is_cuda for p in params):
        # On CUDA the Triton kernels are the default when Triton imports (else multi-tensor).
        from spdecay._triton import supports

        fused = supports(params)
    if fused:
        return False, True
    foreach = group["foreach"]
    if foreach is None:  # multi-tensor by default whenever all tensors share one device
        foreach = len({p.device for p in params}) == 1
    return bool(foreach), False


def _phase_one_of(foreach: bool, fused: bool, params: list[Tensor]):
    """The phase-1 function of a path that can defer its reduction, else None (the
    single-tensor reference path and the Triton kernels finish each call themselves)."""
    if fused and not params[0].is_cuda:
        from spdecay._fused_cpu import fused_phase_one

        return fused_phase_one
    if foreach and not fused:
        return multi_tensor_phase_one
    return None


def _check_hyperparameters(**values: Any) -> None:
    if "lr" in values:
        lr = values["lr"]
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError(f"AdamSPD: a Tensor lr must have one element, got shape {tuple(lr.shape)}")
        if not 0.0 <= float(lr):
            raise ValueError(f"AdamSPD: invalid learning rate lr={float(lr)} (must be >= 0)")
    if "eps" in values and not 0.0 <= values["eps"]:
        raise ValueError(f"AdamSPD: invalid eps={values['eps']} (must be >= 0)")
    if "betas" in values:
        betas = values["betas"]
        if len(betas) != 2:
            raise ValueError(f"AdamSPD: betas must be a pair, got {betas!r}")
        for i, beta in enumerate(betas):
            if not 0.0 <= float(beta) < 1.0:
                raise ValueError(f"AdamSPD: invalid beta{i + 1}={float(beta)} (must be in [0, 1))")
    if "weight_decay" in values and not 0.0 <= values["weight_decay"]:
        raise ValueError(
            f"AdamSPD: invalid weight_decay={values['weight_decay']} (the SPD strength must be >= 0)"
        )


def _restore_anchor_dtypes(optimizer: Optimizer) -> None:
    # load_state_dict casts every floating state entry to the parameter's dtype; anchors and
    # moments kept in another precision (anchor_dtype, state_dtype) must be cast back.
    for group in optimizer.param_groups:
        wanted = {"anchor": group.get("anchor_dtype")}
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            wanted[key] = group.get("state_dtype")
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for key, dtype in wanted.items():
                if dtype is not None and key in state:
                    state[key] = state[key].to(storage_dtype(p, dtype))


_COMPLEX_OF = {torch.float32: torch.complex64, torch.float64: torch.complex128}


def storage_dtype(p: Tensor, wanted: torch.dtype | None) -> torch.dtype:
    """The dtype of a parameter-sized state entry (``anchor_dtype``, ``state_dtype``): a complex
    parameter keeps complex state, of the wanted precision where torch has a complex type for it
    (float32, float64); otherwise such entries stay in the parameter's dtype."""
    if wanted is None:
        return p.dtype
    if p.is_complex() and not wanted.is_complex:
        return _COMPLEX_OF.get(wanted, p.dtype)
    return wanted
