"""The anchored-Adam base of AdamSPD and AdamL2SP: param groups, anchors, state, checks.

Both keep torch Adam's state (``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``) plus
``state[p]["anchor"]`` (captured lazily at a parameter's first step, or given), and differ only
in what their ``step`` does with it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from spdecay.spd.interface import AdamHyper, TensorLists
from spdecay.spd.layout import FlatLayout, check_layout, check_params_unchanged, group_shapes
from spdecay.spd.plan import default_cpu_kernel

ANCHOR_MODES = ("init", "zero")
ANCHOR_KEY = "anchor"  # the one state key of anchors (AdamSPD, AdamL2SP and the add-on)
_STATE_KEYS = {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", ANCHOR_KEY}
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


def check_dtype_option(name: str, value: Any, owner: str) -> None:
    if value is None:
        return
    if not isinstance(value, torch.dtype):
        raise TypeError(f"{owner}: {name} must be a torch.dtype, got {value!r}")
    if not value.is_floating_point:
        raise TypeError(f"{owner}: {name} must be a floating dtype, got {value}")


class AnchoredAdam(Optimizer):
    """Adam with an anchor per parameter (see AdamSPD and AdamL2SP for the arguments)."""

    _owner = "AnchoredAdam"
    _strength = "strength"  # what weight_decay means, for error messages

    def __init__(
        self,
        params: Iterable[Any],
        defaults: dict[str, Any],
        *,
        anchor: str | Sequence[Tensor] = "init",
    ) -> None:
        self._check_hyperparameters(**{k: defaults[k] for k in ("lr", "betas", "eps", "weight_decay")})
        for name in ("anchor_dtype", "state_dtype"):
            check_dtype_option(name, defaults.get(name), self._owner)
        if defaults.get("foreach") and defaults.get("fused"):
            raise ValueError(f"{self._owner}: `foreach` and `fused` cannot both be True")
        if anchor is None:
            raise TypeError(
                f"{self._owner}: anchor must be 'init', 'zero' or a sequence of tensors, got None "
                "(use anchor='zero' for zero anchors)"
            )
        if isinstance(params, Tensor):
            params = [params]
        if not isinstance(anchor, str):  # tensors for a single group of parameters
            params = list(params)
            if any(isinstance(p, dict) for p in params):
                raise ValueError(
                    f"{self._owner}: anchor tensors go with a plain list of parameters; with param "
                    "groups, give each group its own 'anchor' list"
                )
            params = [{"params": params, "anchor": list(anchor)}]
            anchor = "init"
        elif anchor not in ANCHOR_MODES:
            raise ValueError(
                f"{self._owner}: unknown anchor mode {anchor!r}; expected 'init', 'zero' or tensors"
            )
        self._spd_last: dict[Tensor, Any] = {}
        self._layouts: dict[Tensor, FlatLayout] = {}
        self._group_shapes: list[tuple] = []
        super().__init__(params, {**defaults, "anchor": anchor})
        self.register_load_state_dict_post_hook(_restore_state_dtypes)
        if any(g["fused"] is None and not g["foreach"] and any(p.device.type == "cpu" for p in g["params"])
               for g in self.param_groups):
            default_cpu_kernel()  # build (or load) the CPU default's kernel now, not in a step

    # ------------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        group = dict(param_group)
        if "pre" in group:  # the reference code's key: a list of anchors, or None for zero
            if "anchor" in group:
                raise ValueError(
                    f"{self._owner}: a param group has both 'pre' and 'anchor'; give one of them"
                )
            pre = group.pop("pre")
            group["anchor"] = "zero" if pre is None else list(pre)
        explicit = group.get("anchor")
        if "anchor" in group and explicit is None:
            raise TypeError(
                f"{self._owner}: group 'anchor' must be 'init', 'zero' or tensors, got None"
            )
        if explicit is not None and not isinstance(explicit, str):
            group["anchor"] = "given"
        elif explicit is not None and explicit not in ANCHOR_MODES:
            raise ValueError(
                f"{self._owner}: unknown anchor mode {explicit!r}; expected 'init', 'zero' or tensors"
            )
        for key in ("lr", "betas", "eps", "weight_decay"):
            if key in group:
                self._check_hyperparameters(**{key: group[key]})
        for name in ("anchor_dtype", "state_dtype"):
            check_dtype_option(name, group.get(name), self._owner)
        if group.get("fused") and group.get("foreach"):
            raise ValueError(f"{self._owner}: `foreach` and `fused` cannot both be True")
        if "spd" in group and not isinstance(group["spd"], bool):
            raise TypeError(f"{self._owner}: group 'spd' must be a bool, got {group['spd']!r}")
        super().add_param_group(group)
        self._group_shapes.append(group_shapes(self.param_groups[-1]))
        if explicit is not None and not isinstance(explicit, str):
            self._set_given_anchors(self.param_groups[-1], list(explicit))

    def _set_given_anchors(self, group: dict[str, Any], anchors: list[Tensor | None]) -> None:
        params = group["params"]
        if len(anchors) != len(params):
            raise ValueError(
                f"{self._owner}: got {len(anchors)} anchor tensors for {len(params)} parameters"
            )
        for i, (p, a) in enumerate(zip(params, anchors)):
            if a is None:  # the reference code allows a zero anchor per parameter
                a = torch.zeros_like(p)
            if not isinstance(a, Tensor):
                raise TypeError(f"{self._owner}: anchor {i} is a {type(a).__name__}, expected a Tensor")
            if a.shape != p.shape:
                raise ValueError(
                    f"{self._owner}: anchor {i} has shape {tuple(a.shape)}, parameter has "
                    f"{tuple(p.shape)}"
                )
            dtype = storage_dtype(p, group["anchor_dtype"])
            self.state[p][ANCHOR_KEY] = a.detach().to(device=p.device, dtype=dtype).clone()

    def set_flat_layout(self, param: Tensor, layout: FlatLayout) -> None:
        """Declare ``param`` a flat engine partition holding the segments ``layout`` describes.

        SPD then decides per logical tensor (see [`FlatLayout`][spdecay.FlatLayout]).

        Args:
            param: a 1-D, real floating, plain (non-DTensor) parameter in one of the groups.
            layout: the segments of ``param`` and the logical tensors they belong to.

        Raises:
            ValueError: ``param`` is in no param group, is not 1-D, or the layout's segments,
                ids or ``num_logical`` do not fit it.
            TypeError: ``layout`` is not a ``FlatLayout``, or ``param`` is a DTensor or not
                real floating.
        """
        self._layouts[param] = check_layout(param, layout, self.param_groups, self._owner)

    def __getstate__(self) -> dict[str, Any]:
        # Copies keep their layouts and the recorded shapes: a copy that lost them would step
        # flat partitions as single tensors.
        return {**super().__getstate__(), "_layouts": self._layouts,
                "_group_shapes": self._group_shapes}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_spd_last", {})
        self.__dict__.setdefault("_layouts", {})
        for group in self.param_groups:
            self._fill_group_defaults(group)

    def _fill_group_defaults(self, group: dict[str, Any]) -> None:
        for key, value in (("spd", True), ("anchor", "init"), ("anchor_dtype", None),
                           ("state_dtype", None), ("maximize", False), ("foreach", None),
                           ("fused", None), ("amsgrad", False)):
            group.setdefault(key, value)

    # --------------------------------------------------------------------- state_dict
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict written by this optimizer class.

        Foreign state_dicts are refused; use ``load_adam_state`` to migrate from torch's
        Adam/AdamW.

        Args:
            state_dict: a state_dict from ``state_dict()`` of the same optimizer class.

        Raises:
            ValueError: ``state_dict`` is not an optimizer state_dict, was not written by
                this class (missing or foreign group keys, unexpected state keys), or a state
                tensor does not fit its parameter (another shape, a real moment for a complex
                parameter, ...); nothing is loaded then.
        """
        self._check_own_state_dict(state_dict)
        self._check_state_fits(state_dict)
        super().load_state_dict(state_dict)

    def _check_state_fits(self, state_dict: dict[str, Any]) -> None:
        """Every saved state tensor against the parameter it will be loaded into (torch maps
        them by position), before anything is copied."""
        saved = state_dict["param_groups"]
        if len(saved) != len(self.param_groups) or any(
            len(a["params"]) != len(b["params"]) for a, b in zip(saved, self.param_groups)
        ):
            return  # torch's load_state_dict raises its own error for this
        where: dict[Any, tuple[Tensor, str]] = {}
        for g, (old, group) in enumerate(zip(saved, self.param_groups)):
            names = group.get("param_names")
            for i, (key, p) in enumerate(zip(old["params"], group["params"])):
                where[key] = (p, repr(names[i]) if names else f"param_groups[{g}]['params'][{i}]")
        for key, entry in state_dict.get("state", {}).items():
            if key not in where:
                continue
            p, name = where[key]
            for field, value in entry.items():
                problem = state_problem(field, value, p)
                if problem:
                    raise ValueError(
                        f"{self._owner}.load_state_dict: state {field!r} of parameter {name} "
                        f"{problem}; nothing was loaded"
                    )

    def _check_own_state_dict(self, state_dict: dict[str, Any]) -> None:
        groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        if not isinstance(groups, list):
            raise ValueError(f"{self._owner}.load_state_dict: not an optimizer state_dict")
        mine = self._group_keys()
        for g in groups:
            missing = [k for k in mine if k not in g]
            foreign = [k for k in self._foreign_keys() if k in g]
            extra = {k for s in state_dict.get("state", {}).values() for k in s} - _STATE_KEYS
            if missing or foreign or extra:
                raise ValueError(
                    f"{self._owner}.load_state_dict: this state_dict was not written by "
                    f"{self._owner} (its param groups lack {missing or 'nothing'}, have "
                    f"{foreign or 'nothing'} of another optimizer, state keys "
                    f"{sorted(extra) or 'as expected'}), e.g. torch.optim.AdamW's. Loading it would "
                    "change what the groups do: spd=False groups would become anchored, AdamW's "
                    "weight_decay would become the strength, and anchors would be captured at "
                    f"the loaded (fine-tuned) weights. To migrate, build {self._owner} with the "
                    "groups and anchors you want (anchor=<pre-trained tensors>) and call "
                    f"{self._owner}.load_adam_state(state_dict) to take over only the moments "
                    "and step counts."
                )

    def _group_keys(self) -> tuple[str, ...]:
        return ("spd", "anchor")

    def _foreign_keys(self) -> tuple[str, ...]:
        return ()

    def load_adam_state(self, state_dict: dict[str, Any]) -> None:
        """Take over the moments and step counts of a torch Adam/AdamW state_dict.

        Keeps this optimizer's groups, settings and anchors.

        Args:
            state_dict: a `torch.optim.Adam`/`AdamW` state_dict over the same parameters in the
                same order.

        Raises:
            ValueError: the state_dict has a different number of parameters, or a moment's
                shape differs from its parameter's.
        """
        saved = state_dict["state"]
        params = [p for g in self.param_groups for p in g["params"]]
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        if len(ids) != len(params):
            raise ValueError(
                f"{self._owner}.load_adam_state: the state_dict has {len(ids)} parameters, this "
                f"optimizer {len(params)}"
            )
        for i, p in zip(ids, params):
            if i not in saved:
                continue
            for key in ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                if key in saved[i]:
                    v = saved[i][key]
                    v = torch.as_tensor(v, dtype=torch.float32) if key == "step" else v
                    if key != "step" and v.shape != p.shape:
                        raise ValueError(
                            f"{self._owner}.load_adam_state: {key} of shape {tuple(v.shape)} for a "
                            f"parameter of shape {tuple(p.shape)}"
                        )
                    self.state[p][key] = v.detach().clone().to(p.device)
        _restore_state_dtypes(self)

    # -------------------------------------------------------------------------- step
    def _uses_anchor(self, group: dict[str, Any]) -> bool:
        return group["spd"] and group["anchor"] != "zero"

    def _check_step(self) -> None:
        """Raise before any state changes where the step cannot be taken as configured."""
        check_params_unchanged(self._owner, self.param_groups, self._group_shapes, self._layouts)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.grad.is_sparse:
                    raise RuntimeError(f"{self._owner} does not support sparse gradients")

    def _gather(self, group: dict[str, Any]) -> TensorLists:
        """The group's tensors with gradients, state initialised (torch's ``_init_group``)."""
        use_anchor = self._uses_anchor(group)
        lists = TensorLists([], [], [], [], [], [], [], [])
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "step" not in state or (group["amsgrad"] and "max_exp_avg_sq" not in state):
                moments = dict(memory_format=torch.preserve_format,
                               dtype=storage_dtype(p, group["state_dtype"]))
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=_step_dtype(), device=p.device)
                state["exp_avg"] = torch.zeros_like(p, **moments)
                state["exp_avg_sq"] = torch.zeros_like(p, **moments)
            elif state["step"].device != p.device:  # e.g. loaded from a CPU checkpoint
                state["step"] = state["step"].to(p.device)
            if group["amsgrad"] and "max_exp_avg_sq" not in state:
                state["max_exp_avg_sq"] = torch.zeros_like(p, **moments)
            if use_anchor and ANCHOR_KEY not in state:
                # Captured lazily, before the first update: the value the parameter has when
                # the optimizer first steps it (robust to frameworks that swap parameters).
                dtype = storage_dtype(p, group["anchor_dtype"])
                state[ANCHOR_KEY] = p.detach().to(dtype=dtype, copy=True)
            lists.params.append(p)
            lists.grads.append(p.grad)
            lists.exp_avgs.append(state["exp_avg"])
            lists.exp_avg_sqs.append(state["exp_avg_sq"])
            lists.max_exp_avg_sqs.append(state["max_exp_avg_sq"] if group["amsgrad"] else None)
            lists.steps.append(state["step"])
            lists.anchors.append(state[ANCHOR_KEY] if use_anchor else None)
            lists.layouts.append(self._layouts.get(p))
        return lists

    def _hyper(self, group: dict[str, Any], *, with_sums: bool, decay: float = 0.0,
               maximize: bool | None = None) -> AdamHyper:
        beta1, beta2 = group["betas"]
        return AdamHyper(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                         amsgrad=group["amsgrad"],
                         maximize=group["maximize"] if maximize is None else maximize,
                         with_sums=with_sums, decay=decay)

    def _check_hyperparameters(self, **values: Any) -> None:
        owner = self._owner
        if "lr" in values:
            lr = values["lr"]
            if isinstance(lr, Tensor) and lr.numel() != 1:
                raise ValueError(f"{owner}: a Tensor lr must have one element, got shape {tuple(lr.shape)}")
            if not 0.0 <= float(lr) < math.inf:
                raise ValueError(
                    f"{owner}: invalid learning rate lr={float(lr)} (must be finite and >= 0)"
                )
        if "eps" in values and not 0.0 <= values["eps"]:
            raise ValueError(f"{owner}: invalid eps={values['eps']} (must be >= 0)")
        if "betas" in values:
            betas = values["betas"]
            if len(betas) != 2:
                raise ValueError(f"{owner}: betas must be a pair, got {betas!r}")
            for i, beta in enumerate(betas):
                if not 0.0 <= float(beta) < 1.0:
                    raise ValueError(f"{owner}: invalid beta{i + 1}={float(beta)} (must be in [0, 1))")
        if "weight_decay" in values:
            check_strength(values["weight_decay"], f"{owner}: invalid weight_decay",
                           f"the {self._strength}")


def check_strength(value: Any, prefix: str, what: str = "the SPD strength") -> None:
    """A finite number >= 0 (an infinite strength would turn every tensor into NaN)."""
    try:
        number = float(value)
    except (TypeError, ValueError, RuntimeError):
        number = math.nan
    if isinstance(value, bool) or not 0.0 <= number < math.inf:
        raise ValueError(f"{prefix}={value!r} ({what} must be a finite number >= 0)")


def state_problem(field: str, value: Any, p: Tensor) -> str | None:
    """Why a saved state entry cannot be the state ``field`` of parameter ``p`` (None: it fits)."""
    if field == "step":
        if isinstance(value, Tensor) and value.numel() != 1:
            return f"has {value.numel()} elements, expected one"
        return None
    if not isinstance(value, Tensor):
        return f"is a {type(value).__name__}, expected a Tensor"
    if value.shape != p.shape:
        return f"has shape {tuple(value.shape)}, the parameter {tuple(p.shape)}"
    if value.is_complex() != p.is_complex() or not (value.is_floating_point() or value.is_complex()):
        return f"has dtype {value.dtype}, which cannot hold the state of a {p.dtype} parameter"
    return None


def _step_dtype() -> torch.dtype:
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _restore_state_dtypes(optimizer: Optimizer) -> None:
    # load_state_dict casts every floating state entry to the parameter's dtype; anchors and
    # moments kept in another precision (anchor_dtype, state_dtype) must be cast back.
    for group in optimizer.param_groups:
        wanted = {ANCHOR_KEY: group.get("anchor_dtype")}
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            wanted[key] = group.get("state_dtype")
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for key, dtype in wanted.items():
                if dtype is not None and key in state:
                    state[key] = state[key].to(storage_dtype(p, dtype))
