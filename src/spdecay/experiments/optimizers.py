"""The optimizers the runner compares, built with the same parameter grouping for every method.

The anchored methods take their groups from ``spdecay.param_groups`` (each group carries
``param_names`` so SPD statistics are reported per named layer):

* backbone weights with a pre-trained value: regularised by the method (AdamW decay, L2-SP
  penalty towards the pre-trained value, SPD projection towards it);
* backbone biases and normalisation parameters: SPD and L2-SP regularise them too (their anchor
  is the pre-trained value, as in the paper), AdamW does not decay them (the usual practice);
* the new classification head: never anchored (it has no pre-trained value), plain decay
  ``HEAD_WEIGHT_DECAY`` for the anchored methods, the swept decay for AdamW;
* LoRA adapters (``--lora-rank``): SPD anchors them at zero, as in the paper's PEFT
  experiments (its projection is selective and bounded by the step, so it cannot pull a
  randomly initialised ``lora_A`` to zero); L2-SP anchors them at their initial values
  (``lora_B`` at zero, ``lora_A`` at its random init): a plain pull of ``lora_A`` to zero
  would collapse the adapters (and the model to the majority class).

``lpft`` and ``wise_ft`` use AdamW exactly as ``adamw`` does (see ``train``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from spdecay.experiments.errors import RunnerError

HEAD_WEIGHT_DECAY = 0.01
SGD_MOMENTUM = 0.9


@dataclass
class BuiltOptimizer:
    optimizer: torch.optim.Optimizer
    stats: Callable[[], object] | None  # -> SPDStats (names, fired, ratio, deviation) or None
    addon: object | None = None  # SelectiveProjectionDecay (its anchors live in optimizer.state)


def _split_params(model: nn.Module, head_patterns: list[str]):
    """AdamW's groups (the anchored methods use ``spdecay.param_groups``)."""
    head, decay, no_decay, lora = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if any(f".{h}." in f".{name}." for h in head_patterns):
            head.append((name, p))
        elif "lora_" in name:
            lora.append((name, p))
        elif p.ndim < 2:
            no_decay.append((name, p))
        else:
            decay.append((name, p))
    return head, decay, no_decay, lora


def _group(named, **options) -> dict:
    return {"params": [p for _, p in named], "param_names": [n for n, _ in named], **options}


def build_optimizer(
    name: str, model: nn.Module, head_patterns: list[str], lr: float, strength: float
) -> BuiltOptimizer:
    """``strength`` is the method's regularisation hyper-parameter (``weight_decay``);
    ``head_patterns`` name the new head's modules (e.g. ``["classifier"]``)."""
    if name in ("adamw", "lpft", "wise_ft"):
        head, decay, no_decay, lora = _split_params(model, head_patterns)
        groups = [
            _group(decay + lora, weight_decay=strength),
            _group(no_decay, weight_decay=0.0),
            _group(head, weight_decay=strength),
        ]
        # foreach: the multi-tensor path, as AdamSPD uses by default on one device (a fair timing).
        return BuiltOptimizer(torch.optim.AdamW(_nonempty(groups), lr=lr, foreach=True), None)
    import spdecay

    groups = spdecay.param_groups(
        model, head=head_patterns or None, no_decay=None, peft="auto", weight_decay=strength,
        head_weight_decay=HEAD_WEIGHT_DECAY, for_addon=name == "sgdspd",
    )
    if name == "adamspd":
        opt = spdecay.AdamSPD(groups, lr=lr, weight_decay=strength)
        return BuiltOptimizer(opt, opt.spd_stats)
    if name == "l2sp":
        # Classic (loss-level) L2-SP: lam/2 ||p - p0||^2 joins the loss, through Adam's moments.
        for group in groups:
            if group.get("anchor") == "zero":
                group["anchor"] = "init"  # LoRA adapters: their initial values (see the module doc)
        return BuiltOptimizer(spdecay.AdamL2SP(groups, lr=lr, weight_decay=strength), None)
    if name == "sgdspd":
        opt = torch.optim.SGD(groups, lr=lr, momentum=SGD_MOMENTUM)
        addon = spdecay.SelectiveProjectionDecay(opt, weight_decay=strength)
        # spd_stats() (the one name since issue 10); stats() on older versions
        return BuiltOptimizer(opt, getattr(addon, "spd_stats", None) or addon.stats, addon)
    raise RunnerError(f"unknown optimizer {name!r}")


def _nonempty(groups: list[dict]) -> list[dict]:
    return [g for g in groups if g["params"]]
