"""Flat engine partitions: one 1-D tensor holding segments of several logical tensors.

DeepSpeed ZeRO-1/2 replaces a param group's tensors by one flat fp32 partition per rank. SPD
decides per *logical* tensor, so such a parameter carries a `FlatLayout`: its sums are
computed per segment, scattered to the logical tensor they belong to and all-reduced over the
layout's process group; elements outside every segment (padding) get plain Adam.

An engine that flattens parameters *without* a layout would make SPD decide on a whole flat
buffer (many layers at once): a silent change of the algorithm. The optimizer records each
group's shapes at construction and ``check_params_unchanged`` refuses to step a changed group
whose tensors carry no layout.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

import torch
from torch import Tensor

from spdecay.spd.cache import Memo, to_device
from spdecay.spd.dtensor import is_dtensor


@dataclass(frozen=True)
class FlatLayout:
    """Which logical tensors the segments of a flat 1-D parameter belong to.

    Attributes:
        offsets: start of each segment in the local flat tensor.
        lengths: length of each segment.
        logical_ids: the logical tensor of each segment, in ``range(num_logical)`` (a tensor
            split in two segments has its id twice).
        num_logical: the number of logical tensors described, the same on every rank.
        process_group: the per-logical sums are all-reduced (SUM) over it (None: no reduction).
        names: optional names of the logical tensors (for stats).
    """

    offsets: tuple[int, ...]
    lengths: tuple[int, ...]
    logical_ids: tuple[int, ...]
    num_logical: int
    process_group: Any = None
    names: tuple[str, ...] | None = None

    def signature(self) -> tuple:
        """Everything but the process group (hashable, for caches)."""
        return (self.offsets, self.lengths, self.logical_ids, self.num_logical)


def check_layout(
    param: Tensor, layout: FlatLayout, param_groups: Sequence[dict[str, Any]], owner: str
) -> FlatLayout:
    """Validate ``layout`` for ``param`` (in one of ``param_groups``, 1-D, segments inside it,
    non-overlapping, ids in range); raises TypeError/ValueError naming the problem."""
    if not any(param is q for g in param_groups for q in g["params"]):
        raise ValueError(f"{owner}.set_flat_layout: the tensor is not in any param group")
    if not isinstance(layout, FlatLayout):
        raise TypeError(f"set_flat_layout: expected a FlatLayout, got {type(layout).__name__}")
    if not isinstance(param, Tensor) or is_dtensor(param):
        raise TypeError("set_flat_layout: the parameter must be a plain (non-DTensor) Tensor")
    if param.dim() != 1:
        raise ValueError(
            f"set_flat_layout: the parameter must be 1-D (a flat partition), got shape "
            f"{tuple(param.shape)}"
        )
    if param.is_complex() or not param.is_floating_point():
        raise TypeError(f"set_flat_layout: the parameter must be real floating, got {param.dtype}")
    n = len(layout.offsets)
    if len(layout.lengths) != n or len(layout.logical_ids) != n:
        raise ValueError(
            "FlatLayout: offsets, lengths and logical_ids must have the same length, got "
            f"{n}, {len(layout.lengths)}, {len(layout.logical_ids)}"
        )
    if not isinstance(layout.num_logical, int) or layout.num_logical < 1:
        raise ValueError(f"FlatLayout: num_logical must be an int >= 1, got {layout.num_logical!r}")
    if layout.names is not None and len(layout.names) != layout.num_logical:
        raise ValueError(
            f"FlatLayout: {len(layout.names)} names for {layout.num_logical} logical tensors"
        )
    numel = param.numel()
    end = 0
    for k in sorted(range(n), key=lambda k: layout.offsets[k]):
        off, length, lid = layout.offsets[k], layout.lengths[k], layout.logical_ids[k]
        for name, v in (("offset", off), ("length", length), ("logical id", lid)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"FlatLayout: segment {k}: {name} must be an int >= 0, got {v!r}")
        if lid >= layout.num_logical:
            raise ValueError(
                f"FlatLayout: segment {k}: logical id {lid} not in range({layout.num_logical})"
            )
        if off + length > numel:
            raise ValueError(
                f"FlatLayout: segment {k} [{off}, {off + length}) lies outside the parameter "
                f"({numel} elements)"
            )
        if off < end:
            raise ValueError(f"FlatLayout: segment {k} starting at {off} overlaps the previous one")
        end = off + length
    return layout


_IDS: Memo[Tensor] = Memo()


def segment_ids(layout: FlatLayout, numel: int, device: torch.device) -> Tensor:
    """The logical id of every element (``num_logical`` for padding), int64 on ``device``;
    built once per layout on the host and copied without blocking."""

    def make() -> Tensor:
        host = torch.full((numel,), layout.num_logical, dtype=torch.int64)
        for off, length, lid in zip(layout.offsets, layout.lengths, layout.logical_ids):
            host[off : off + length] = lid
        return to_device(host, device)

    return _IDS.get((layout.signature(), numel, device), make)


def pieces(layout: FlatLayout, numel: int) -> list[tuple[int, int, int]]:
    """(start, length, logical id or -1 for padding) covering ``[0, numel)`` in order."""
    out, pos = [], 0
    for k in sorted(range(len(layout.offsets)), key=lambda k: layout.offsets[k]):
        off, length = layout.offsets[k], layout.lengths[k]
        if off > pos:
            out.append((pos, off - pos, -1))
        if length:
            out.append((off, length, layout.logical_ids[k]))
        pos = off + length
    if pos < numel:
        out.append((pos, numel - pos, -1))
    return out


# ------------------------------------------------------------ engines that flatten parameters
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
