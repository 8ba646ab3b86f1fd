"""WiSE-FT: weight-space ensembling of the pre-trained and the fine-tuned model.

``theta = (1 - alpha) * theta_pretrained + alpha * theta_finetuned`` (Wortsman et al., 2022):
alpha = 0 is the pre-trained model, 1 the fine-tuned one. The robust fine-tuning baseline the
SPD paper compares against.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["interpolate"]


def interpolate(
    pretrained_state: Mapping[str, Tensor],
    finetuned_state: Mapping[str, Tensor],
    alpha: float,
    *,
    strict: bool = True,
) -> dict[str, Tensor]:
    """Interpolate two state dicts: ``(1 - alpha) * pretrained + alpha * finetuned``.

    Floating (and complex) tensors are mixed in float64 (complex128) on the fine-tuned tensor's
    device and cast back to the fine-tuned dtype; integer and bool buffers (``position_ids``,
    ``num_batches_tracked``) are taken from ``finetuned_state``. The inputs are not modified.

    Args:
        pretrained_state: ``state_dict()`` of the pre-trained model.
        finetuned_state: ``state_dict()`` of the fine-tuned model (the same architecture).
        alpha: mixing weight: 0 gives the pre-trained model, 1 the fine-tuned one; values in
            [0, 1] interpolate, values outside extrapolate.
        strict: with True (default) the key sets must be equal. With False, keys only in
            ``finetuned_state`` (a new task head) are taken from it and keys only in
            ``pretrained_state`` are dropped.

    Returns:
        A new state dict with the keys of ``finetuned_state``, ready for
        ``model.load_state_dict``.

    Raises:
        ValueError: ``alpha`` is not a finite number; the key sets differ under ``strict=True``
            (the message lists the differences); a tensor's shape differs between the two.
        TypeError: a state is not a mapping, or one of its values is not a tensor.

    Example:
        ```python
        pretrained = {k: v.clone() for k, v in model.state_dict().items()}
        ...  # fine-tune model
        model.load_state_dict(interpolate(pretrained, model.state_dict(), alpha=0.5))
        ```
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number, got {alpha!r}")
    for what, sd in (("pretrained_state", pretrained_state), ("finetuned_state", finetuned_state)):
        if not isinstance(sd, Mapping):
            raise TypeError(f"{what} must be a mapping of name -> Tensor, got {type(sd).__name__}")
    missing = [k for k in finetuned_state if k not in pretrained_state]
    extra = [k for k in pretrained_state if k not in finetuned_state]
    if strict and (missing or extra):
        raise ValueError(
            "state dicts have different keys: "
            f"only in finetuned_state: {_preview(missing)}; only in pretrained_state: {_preview(extra)}. "
            "Pass strict=False to take the fine-tuned value for keys missing from the pre-trained "
            "state (e.g. a new head) and drop keys the fine-tuned state lacks."
        )
    out: dict[str, Tensor] = {}
    for key, ft in finetuned_state.items():
        if not isinstance(ft, Tensor):
            raise TypeError(f"finetuned_state[{key!r}] is a {type(ft).__name__}, expected a Tensor")
        if key not in pretrained_state:
            out[key] = ft.detach().clone()
            continue
        pre = pretrained_state[key]
        if not isinstance(pre, Tensor):
            raise TypeError(f"pretrained_state[{key!r}] is a {type(pre).__name__}, expected a Tensor")
        if pre.shape != ft.shape:
            raise ValueError(
                f"{key!r}: shape {tuple(pre.shape)} in pretrained_state vs {tuple(ft.shape)} in "
                "finetuned_state"
            )
        if not (ft.is_floating_point() or ft.is_complex()):
            out[key] = ft.detach().clone()
            continue
        wide = torch.complex128 if ft.is_complex() else torch.float64
        mixed = torch.lerp(pre.detach().to(ft.device, wide), ft.detach().to(wide), float(alpha))
        out[key] = mixed.to(ft.dtype)
    return out


def _preview(keys: list[str], n: int = 8) -> str:
    if not keys:
        return "none"
    return ", ".join(repr(k) for k in keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")
