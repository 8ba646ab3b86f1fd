"""Engines that rewrite an optimizer's parameters behind its back.

DeepSpeed ZeRO-1/2 replaces each group's tensors by flat partitions after the optimizer was
built. SPD would then take every decision on a whole flat buffer (many layers at once): a
silent change of the algorithm. The optimizer records each group's shapes at construction and
refuses to step a changed group whose tensors carry no ``spdecay.spd.FlatLayout``.
"""

from __future__ import annotations

from collections.abc import Mapping
from operator import attrgetter
from typing import Any

from torch import Tensor

from spdecay.spd.dtensor import is_dtensor

_shape = attrgetter("shape")


def group_shapes(group: dict[str, Any]) -> tuple:
    return tuple(map(_shape, group["params"]))


def check_params_unchanged(
    owner: str, groups: list[dict[str, Any]], recorded: list[tuple], layouts: Mapping[Tensor, Any]
) -> None:
    """Raise RuntimeError (before any state changes) where a group's parameters no longer match
    the shapes recorded at construction and a parameter has neither a layout nor a DTensor."""
    for g, group in enumerate(groups):
        if g >= len(recorded):  # added after construction (add_param_group): the user's own
            recorded.append(group_shapes(group))
            continue
        if group_shapes(group) == recorded[g]:
            continue
        for p in group["params"]:
            if p not in layouts and not is_dtensor(p):
                raise RuntimeError(
                    f"{owner}: the parameters of param group {g} were replaced after the optimizer "
                    f"was built ({len(recorded[g])} tensors then, "
                    f"{len(group['params'])} of shapes {[tuple(q.shape) for q in group['params']][:4]}"
                    " now). SPD decides per layer, so it cannot step flat buffers of several layers: "
                    "DeepSpeed ZeRO flattens parameters into one partition per group; call "
                    "spdecay.integrations.deepspeed.attach(engine) after deepspeed.initialize "
                    "(it attaches a FlatLayout to each flat partition with set_flat_layout)."
                )
