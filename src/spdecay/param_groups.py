"""Turn a real model into param groups for AdamSPD, AdamL2SP or the SPD add-on.

Kinds of trainable parameters (frozen ones are skipped):

* ``backbone``: pre-trained weights, SPD towards their initial value (``anchor="init"``);
* ``peft``: LoRA/adapter weights (HF PEFT naming), SPD towards zero (``anchor="zero"``);
* ``head``: the new task head, ``spd=False`` with ordinary decoupled decay: a randomly
  initialised head has nothing to stay close to;
* ``no_decay``: biases and norm weights when excluded by the usual conventions
  (``spd=False``, ``weight_decay=0``).

Name patterns are dotted-name fragments matched on component boundaries, with ``*`` as a
wildcard: ``"classifier"`` matches ``classifier.weight`` and
``base_model.model.classifier.modules_to_save.default.weight``, not ``pre_classifier.weight``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["param_groups", "llrd_param_groups", "resolve_head", "PEFT_PATTERNS", "HEAD_NAMES"]

# Top-level module names of task heads in common model families (HF transformers, timm,
# torchvision, EfficientNet-PyTorch), and the decoders of semantic-segmentation models (HF
# SegFormer / UperNet / DPT: ``decode_head``, ``auxiliary_head``; segmentation_models_pytorch:
# ``segmentation_head``). Only direct children of the (PEFT-unwrapped) model count; every one
# present is part of the head (UperNet: both decoders).
HEAD_NAMES = (
    "classifier", "pre_classifier", "score", "qa_outputs", "classification_head",
    "head", "heads", "fc", "_fc", "decode_head", "auxiliary_head", "segmentation_head",
)
# HF PEFT parameter naming of weights that start at (or represent a delta from) zero.
PEFT_PATTERNS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "adapter*")
_NORM_TYPES: tuple[type, ...] = (
    nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm,
    nn.modules.batchnorm._NormBase,  # BatchNorm*d, InstanceNorm*d, SyncBatchNorm
)
if hasattr(nn, "RMSNorm"):
    _NORM_TYPES = (*_NORM_TYPES, nn.RMSNorm)

Patterns = str | Sequence[str]
HeadSpec = str | Sequence[str] | nn.Module | Sequence[nn.Module] | None


def _compile(pattern: str) -> re.Pattern[str]:
    if not isinstance(pattern, str) or not pattern or pattern.strip(".") != pattern:
        raise ValueError(f"invalid name pattern {pattern!r}: use a non-empty dotted name fragment")
    body = ".*".join(re.escape(part) for part in pattern.split("*"))
    return re.compile(rf"(?:^|\.){body}(?:\.|$)")


def _as_patterns(value: Patterns, what: str) -> list[str]:
    pats = [value] if isinstance(value, str) else list(value)
    for p in pats:
        if not isinstance(p, str):
            raise TypeError(f"{what}: patterns must be strings, got {p!r}")
    return pats


def _match(names: Iterable[str], patterns: list[str], what: str) -> set[str]:
    """Names matched by any pattern; a ValueError for a pattern that matches nothing."""
    names = list(names)
    out: set[str] = set()
    for pat in patterns:
        rx = _compile(pat)
        hit = {n for n in names if rx.search(n)}
        if not hit:
            sample = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
            raise ValueError(
                f"{what} pattern {pat!r} matches no parameter of the model (names look like: {sample})"
            )
        out |= hit
    return out


def _unwrap(model: nn.Module) -> nn.Module:
    # PEFT's PeftModel -> LoraModel -> the transformers model; the head is a child of the latter.
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def resolve_head(model: nn.Module, head: HeadSpec) -> set[str]:
    """Names of the parameters (frozen included) that make up the task head."""
    names = [n for n, _ in model.named_parameters()]
    if head is None:
        return set()
    if head == "auto":
        core = _unwrap(model)
        mods = [m for n, m in core.named_children() if n in HEAD_NAMES]
        if not mods:
            children = [n for n, _ in core.named_children()]
            raise ValueError(
                f"could not find the task head automatically: none of the top-level modules "
                f"{children} is one of {list(HEAD_NAMES)}; pass head=<module or name pattern>, "
                f"or head=None when the model has no new head"
            )
        return _names_of_modules(model, mods)
    if isinstance(head, nn.Module):
        return _names_of_modules(model, [head])
    if not isinstance(head, str) and all(isinstance(h, nn.Module) for h in head):
        return _names_of_modules(model, list(head))  # type: ignore[arg-type]
    return _match(names, _as_patterns(head, "head"), "head")  # type: ignore[arg-type]


def _auto_head_or_none(model: nn.Module, peft_names: set[str]) -> set[str]:
    """``head="auto"``: the top-level head module, or no head at all when every trainable
    parameter is a PEFT adapter (e.g. LoRA on a causal LM: the LM head is pre-trained and
    frozen, there is no new head to find). Anything else without a recognisable head raises, so
    a new head is never silently anchored at its random initial value."""
    try:
        return resolve_head(model, "auto")
    except ValueError:
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        if trainable and trainable <= peft_names:
            return set()
        raise


def _names_of_modules(model: nn.Module, mods: list[nn.Module]) -> set[str]:
    ids = {id(p) for m in mods for p in m.parameters()}
    out = {n for n, p in model.named_parameters() if id(p) in ids}
    if not out:
        raise ValueError("head module has no parameters in this model (is it part of the model?)")
    return out


def _no_decay_names(model: nn.Module, no_decay: Patterns | None) -> set[str]:
    if no_decay is None:
        return set()
    if no_decay == "auto":  # biases and the weights of normalisation layers
        out = set()
        for mname, mod in model.named_modules():
            is_norm = isinstance(mod, _NORM_TYPES) or "norm" in type(mod).__name__.lower()
            for pname, _ in mod.named_parameters(recurse=False):
                if pname == "bias" or is_norm:
                    out.add(f"{mname}.{pname}" if mname else pname)
        return out
    names = [n for n, _ in model.named_parameters()]
    return _match(names, _as_patterns(no_decay, "no_decay"), "no_decay")


def _peft_names(model: nn.Module, peft: bool | str | Sequence[str]) -> set[str]:
    names = [n for n, _ in model.named_parameters()]
    if peft is False:
        return set()
    if peft == "auto" or peft is True:
        hits = {n for n in names if any(_compile(p).search(n) for p in PEFT_PATTERNS)}
        if peft is True and not hits:
            raise ValueError(
                f"peft=True but no parameter matches the PEFT patterns {list(PEFT_PATTERNS)}"
            )
        return hits
    return _match(names, _as_patterns(peft, "peft"), "peft")


def param_groups(
    model: nn.Module,
    *,
    head: HeadSpec = "auto",
    no_decay: Patterns | None = None,
    peft: bool | str | Sequence[str] = "auto",
    weight_decay: float = 1.0,
    head_weight_decay: float = 0.01,
    lr: float | None = None,
    head_lr: float | None = None,
    for_addon: bool = False,
) -> list[dict[str, Any]]:
    """Param groups for ``AdamSPD(groups, ...)`` (or ``AdamL2SP``, or the add-on).

    Args:
        model: the model (a PEFT-wrapped model works: frozen base weights are skipped).
        head: the new task head: ``"auto"`` (every top-level module named one of
            `HEAD_NAMES`, a segmentation model's ``decode_head`` / ``auxiliary_head``
            included; no head when every trainable parameter is a PEFT adapter, as
            for LoRA on a causal LM), name pattern(s), module(s), or None for no head group.
            A checkpoint whose decoder is already trained (only its classifier is new) takes
            a pattern such as ``head="decode_head.classifier"``, so the rest is anchored.
        no_decay: parameters excluded from decay: ``"auto"`` (biases and norm weights, the
            usual convention), name pattern(s), or None (SPD on every backbone tensor, as in
            the paper).
        peft: ``"auto"`` (parameters named like `PEFT_PATTERNS` get ``anchor="zero"``),
            True (the same, but an error if none match), False, or explicit pattern(s).
        weight_decay: SPD strength for the backbone and PEFT groups.
        head_weight_decay: plain decoupled decay for the head.
        lr: optional learning rate of every group (omitted: the optimizer's default).
        head_lr: optional learning rate of the head group (omitted: ``lr``).
        for_addon: groups for [`SelectiveProjectionDecay`][spdecay.SelectiveProjectionDecay]
            around a torch optimizer: the SPD strength goes to ``"spd_weight_decay"`` and the
            optimizer's own ``weight_decay`` is 0 in SPD groups.

    Returns:
        The non-empty groups. Every group carries ``"param_names"`` (so ``spd_stats()`` reports
            names) and ``"name"`` (one of backbone, peft, head, no_decay).

    Raises:
        ValueError: ``weight_decay`` or ``head_weight_decay`` is not a number >= 0; the model
            has no trainable parameters; ``head="auto"`` finds no head (and not every trainable
            parameter is a PEFT adapter); a name pattern is invalid or matches no parameter; a
            head module has no parameters in the model; or ``peft=True`` and nothing matches.
        TypeError: a pattern is not a string.
    """
    for key, value in (("weight_decay", weight_decay), ("head_weight_decay", head_weight_decay)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"{key} must be a number >= 0, got {value!r}")
    all_peft = _peft_names(model, peft)
    head_names = _auto_head_or_none(model, all_peft) if head == "auto" else resolve_head(model, head)
    nd_names = _no_decay_names(model, no_decay)
    peft_names = all_peft - head_names

    kinds: dict[str, list[tuple[str, torch.Tensor]]] = {
        "backbone": [], "peft": [], "head": [], "no_decay": []
    }
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name in nd_names:
            kind = "no_decay"
        elif name in head_names:
            kind = "head"
        elif name in peft_names:
            kind = "peft"
        else:
            kind = "backbone"
        kinds[kind].append((name, p))
    if not any(kinds.values()):
        raise ValueError("the model has no trainable parameters (all have requires_grad=False)")

    settings: dict[str, dict[str, Any]] = {
        "backbone": {"spd": True, "anchor": "init", "weight_decay": float(weight_decay)},
        "peft": {"spd": True, "anchor": "zero", "weight_decay": float(weight_decay)},
        "head": {"spd": False, "weight_decay": float(head_weight_decay)},
        "no_decay": {"spd": False, "weight_decay": 0.0},
    }
    groups = []
    for kind, items in kinds.items():
        if not items:
            continue
        g: dict[str, Any] = {
            "params": [p for _, p in items],
            "param_names": [n for n, _ in items],
            "name": kind,
            **settings[kind],
        }
        if for_addon and g["spd"]:
            g["spd_weight_decay"] = g["weight_decay"]
            g["weight_decay"] = 0.0
        chosen_lr = head_lr if kind == "head" and head_lr is not None else lr
        if chosen_lr is not None:
            g["lr"] = float(chosen_lr)
        groups.append(g)
    return groups


def _default_layer_of(model: nn.Module) -> tuple[Callable[[str], int], int]:
    """Layer ids from the model's largest ``nn.ModuleList`` (the transformer/residual stack).

    Parameters registered before the stack (embeddings) are layer 0, block ``i`` is ``i + 1``,
    everything after it (final norm, pooler, head) is ``num_blocks + 1``.
    """
    stacks = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not stacks:
        raise ValueError(
            "llrd_param_groups: the model has no nn.ModuleList of blocks; pass layer_of= and num_layers="
        )
    prefix, stack = max(stacks, key=lambda s: len(s[1]))
    n_blocks = len(stack)
    rx = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    seen_stack = False
    order: dict[str, int] = {}
    for name, _ in model.named_parameters():
        m = rx.match(name)
        if m:
            seen_stack = True
            order[name] = int(m.group(1)) + 1
        else:
            order[name] = n_blocks + 1 if seen_stack else 0
    return (lambda name: order[name]), n_blocks + 1


def llrd_param_groups(
    model: nn.Module,
    lr: float,
    decay: float = 0.75,
    *,
    layer_of: Callable[[str], int] | None = None,
    num_layers: int | None = None,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """[`param_groups`][spdecay.param_groups] split by depth with layer-wise learning-rate
    decay (LLRD).

    Layer ``k`` of ``L`` (0: embeddings, ``L``: the top, which holds the head) gets
    ``lr * decay ** (L - k)``. By default the depth comes from the model's largest
    ``nn.ModuleList``: parameters before it are layer 0, block ``i`` is layer ``i + 1``,
    everything after it is the top.

    Args:
        model: the model.
        lr: learning rate of the top layer.
        decay: factor per layer below the top, in (0, 1].
        layer_of: ``layer_of(name) -> int`` in ``[0, num_layers]``, overriding the automatic
            depth assignment (together with ``num_layers``).
        num_layers: ``L``, the index of the top layer (together with ``layer_of``).
        **kwargs: passed to [`param_groups`][spdecay.param_groups] (``head_lr`` is ignored:
            the head is in the top layer).

    Returns:
        The groups of [`param_groups`][spdecay.param_groups], each split per layer, named
            ``"<kind>.layer<k>"`` and with its own ``"lr"``.

    Raises:
        ValueError: ``lr`` is not a positive number, ``decay`` is not in (0, 1], only one of
            ``layer_of`` and ``num_layers`` is given, the model has no ``nn.ModuleList`` (without
            ``layer_of``), ``layer_of`` returns something other than an int in range, or
            [`param_groups`][spdecay.param_groups] raises.
    """
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if not (isinstance(decay, (int, float)) and 0 < decay <= 1):
        raise ValueError(f"decay must be in (0, 1], got {decay!r}")
    if (layer_of is None) != (num_layers is None):
        raise ValueError("llrd_param_groups: pass both layer_of and num_layers, or neither")
    if layer_of is None:
        layer_of, num_layers = _default_layer_of(model)
    assert num_layers is not None
    kwargs.pop("head_lr", None)
    out = []
    for g in param_groups(model, lr=lr, **kwargs):
        by_layer: dict[int, list[int]] = {}
        for i, name in enumerate(g["param_names"]):
            k = layer_of(name)
            if not (isinstance(k, int) and 0 <= k <= num_layers):
                raise ValueError(f"layer_of({name!r}) = {k!r}, expected an int in [0, {num_layers}]")
            by_layer.setdefault(k, []).append(i)
        for k in sorted(by_layer):
            idx = by_layer[k]
            out.append({
                **g,
                "params": [g["params"][i] for i in idx],
                "param_names": [g["param_names"][i] for i in idx],
                "name": f"{g['name']}.layer{k}",
                "lr": float(lr) * float(decay) ** (num_layers - k),
            })
    return out
