"""Whole-tensor reductions for sharded parameters (DTensor under FSDP2, TP, HSDP).

SPD decides per *logical* tensor, so the per-tensor partial sums computed on local shards
(<g, p - p0>, ||p - p0||^2, ||p_adam - p0||^2) must be summed over the ranks that hold the
pieces of each tensor before the decision; otherwise each rank decides on its own shard and the
ranks' copies of one layer follow different rules.

``reduce_partial_sums`` does this with one all-reduce for all columns of a call in the usual
cases (one 1-D mesh, or meshes that span the whole world): a column's local sum enters the
collective with weight 1 on mesh dimensions where its tensor is sharded and only from mesh
coordinate 0 on dimensions where it is replicated, so a single sum over all ranks counts every
element exactly once. Plain tensors (and fully replicated DTensors) already hold the whole tensor
and are not communicated. Everything stays on the device: no ``.item()``, no host sync.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from spdecay.spd.cache import Memo, to_device
from spdecay.spd.dtensor import is_dtensor, to_local
from spdecay.spd.layout import FlatLayout

__all__ = ["is_dtensor", "to_local", "reduce_partial_sums", "reduce_columns", "check_placements"]


def check_placements(params: Sequence[Tensor], owner: str = "SPD") -> None:
    """Raise ValueError unless every DTensor is Shard or Replicate on each mesh dimension (run
    before any state changes: a Partial placement cannot be reduced)."""
    for i, p in enumerate(params):
        if is_dtensor(p):
            for placement in p.placements:
                try:
                    _is_shard(placement)
                except ValueError as e:
                    raise ValueError(f"{owner}: parameter {i}: {e}") from None


def reduce_columns(sums: Tensor, sources: Sequence[Any]) -> Tensor:
    """Whole-tensor sums for the columns of ``sums`` ([k, n], float64).

    ``sources[j]`` says where column ``j`` came from: a Tensor (a plain tensor: already whole; a
    DTensor: reduced over its mesh as ``reduce_partial_sums`` does) or a FlatLayout (a
    logical tensor of a flat engine partition: summed over the layout's process group, one
    all-reduce per group for all its columns)."""
    flat = [j for j, s in enumerate(sources) if isinstance(s, FlatLayout)]
    if not flat:
        return reduce_partial_sums(sums, sources)
    out = sums.clone()
    dense = [j for j, s in enumerate(sources) if not isinstance(s, FlatLayout)]
    if dense:
        idx = _index(dense, sums.device)
        out[:, idx] = reduce_partial_sums(sums[:, idx], [sources[j] for j in dense])
    by_group: dict[int, tuple[Any, list[int]]] = {}
    for j in flat:
        group = sources[j].process_group
        if group is not None:
            by_group.setdefault(id(group), (group, []))[1].append(j)
    if by_group:
        import torch.distributed as dist

        for group, cols in by_group.values():
            idx = _index(cols, sums.device)
            part = out[:, idx].contiguous()
            dist.all_reduce(part, op=dist.ReduceOp.SUM, group=group)
            out[:, idx] = part
    return out


_INDEX: Memo[Tensor] = Memo()


def _index(cols: list[int], device: torch.device) -> Tensor:
    return _INDEX.get((tuple(cols), device),
                      lambda: to_device(torch.tensor(cols, dtype=torch.int64), device))


def reduce_partial_sums(sums: Tensor, params: Sequence[Tensor]) -> Tensor:
    """Sum per-tensor partial sums over the ranks that hold the shards of each tensor.

    ``sums`` has shape ``[k, n]``: column ``j`` holds ``k`` additive quantities (sums of
    elementwise products) computed on the local part of ``params[j]``. Returns a new ``[k, n]``
    tensor in ``sums``' dtype where every DTensor column holds the whole-tensor value (identical on
    all ranks); columns of plain tensors are returned as they are. Every rank of the mesh must
    call this with the same parameters in the same order (SPMD), as FSDP2 guarantees.
    """
    if sums.dim() != 2 or sums.shape[1] != len(params):
        raise ValueError(
            f"reduce_partial_sums: sums must have shape [k, {len(params)}] (one column per "
            f"parameter), got {tuple(sums.shape)}"
        )
    if not any(map(is_dtensor, params)):
        return sums
    plan = _plan(params, sums.device)
    if plan is None:  # only fully replicated DTensors: every rank already has whole sums
        return sums
    return _reduce(sums, plan)


# One collective: (mesh and mesh dimension whose group it runs on, or None for the default group;
# per-column weight [n]; the columns it updates, None for all). The group is looked up at each
# call, never stored: a cached ProcessGroup would outlive destroy_process_group and be freed only
# at interpreter exit, where gloo can abort ("terminate called without an active exception").
_Step = tuple[Any, int, Tensor, Tensor | None]


class _Plan:
    """How to reduce the columns of one layout (cached: the same every step)."""

    __slots__ = ("steps", "local")

    def __init__(self, steps: list[_Step], local: Tensor | None):
        self.steps = steps
        # Columns whose local value is already whole (plain or fully replicated), or None.
        self.local = local


# Keyed by mesh *identity*: DeviceMesh equality ignores the process group, so an equal mesh
# built on another group (DeviceMesh.from_group, or after destroy/init_process_group) must not
# reuse a plan made for the old one. Each entry keeps its meshes alive, so ids are not reused.
_PLAN_CACHE: Memo[tuple[tuple, _Plan | None]] = Memo()


def _plan(params: Sequence[Tensor], device: torch.device) -> _Plan | None:
    layout = tuple((p.device_mesh, p.placements) if is_dtensor(p) else None for p in params)
    key = (device, tuple(None if e is None else (id(e[0]), e[1]) for e in layout))
    return _PLAN_CACHE.get(key, lambda: (layout, _build_plan(layout, device)))[1]


def _is_shard(placement: Any) -> bool:
    from torch.distributed.tensor import Replicate, Shard

    if isinstance(placement, Shard):  # _StridedShard (FSDP2 + TP) is a Shard too
        return True
    if isinstance(placement, Replicate):
        return False
    # Partial: the local values *add up* to the tensor, so sums of products over them are not
    # additive (||a + b||^2 != ||a||^2 + ||b||^2).
    raise ValueError(
        f"SPD: cannot reduce over a DTensor with placement {placement!r}; parameters must be "
        "Shard or Replicate on every mesh dimension"
    )


def _build_plan(layout: tuple, device: torch.device) -> _Plan | None:
    import torch.distributed as dist

    whole = [e is None or not any(map(_is_shard, e[1])) for e in layout]
    if all(whole):
        return None

    def vec(values: list[float] | list[bool]) -> Tensor:
        dtype = torch.bool if isinstance(values[0], bool) else torch.float64
        return torch.tensor(values, dtype=dtype, device=device)  # once per layout, not per step

    meshes = list(dict.fromkeys(e[0] for e, w in zip(layout, whole) if not w))
    steps: list[_Step] = []
    if len(meshes) == 1 and meshes[0].ndim == 1:
        # The common FSDP2 case: one 1-D mesh (its group may be a sub-group of the world).
        if meshes[0].get_coordinate() is not None:
            steps.append((meshes[0], 0, vec([float(not w) for w in whole]), None))
    elif all(m.size() == dist.get_world_size() for m in meshes):
        # Meshes spanning the world (HSDP, FSDP + TP, several meshes): one collective over the
        # default group. A column enters from every rank along its sharded mesh dimensions and
        # from coordinate 0 only along its replicated ones, so each element counts once.
        weight = []
        for e, w in zip(layout, whole):
            coord = None if w else e[0].get_coordinate()
            keep = coord is not None and all(
                _is_shard(pl) or c == 0 for pl, c in zip(e[1], coord)
            )
            weight.append(1.0 if keep else 0.0)
        steps.append((None, 0, vec(weight), None))
    else:
        # Sub-world multi-dimensional meshes (e.g. one per pipeline stage): one collective per
        # mesh dimension that shards something, applied in sequence to the running sums.
        for mesh in meshes:
            coord = mesh.get_coordinate()
            if coord is None:  # this rank holds no part of these tensors
                continue
            mine = [not w and e[0] == mesh for e, w in zip(layout, whole)]
            for dim in range(mesh.ndim):
                if mesh.size(dim) == 1 or not any(m and _is_shard(e[1][dim]) for m, e in zip(mine, layout)):
                    continue
                weight = [
                    float(m and (_is_shard(e[1][dim]) or coord[dim] == 0))
                    for m, e in zip(mine, layout)
                ]
                steps.append((mesh, dim, vec(weight), vec(mine)))
    return _Plan(steps, vec(whole) if any(whole) else None)


def _reduce(sums: Tensor, plan: _Plan) -> Tensor:
    import torch.distributed as dist

    # The collective runs in float64 (gloo and NCCL both support it); every rank receives the
    # same bits, so every rank takes the same decision.
    acc = sums.to(torch.float64)
    out = acc
    for mesh, dim, weight, columns in plan.steps:
        reduced = out * weight
        group = None if mesh is None else mesh.get_group(dim)
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM, group=group)
        out = reduced if columns is None else torch.where(columns, reduced, out)
    if plan.local is not None:
        out = torch.where(plan.local, acc, out)
    return out.to(sums.dtype)
