"""Whole-tensor reductions for sharded parameters (DTensor under FSDP2).

SPD decides per *logical* tensor, so partial sums computed on local shards must be summed over
the shard group before the decision. Plain tensors pass through untouched.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:  # DTensor is public from torch 2.4 on
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch built without distributed
    DTensor = None  # type: ignore[assignment,misc]


def is_dtensor(t: object) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def to_local(t: Tensor) -> Tensor:
    """The local shard of a DTensor, or the tensor itself."""
    return t.to_local() if is_dtensor(t) else t


def reduce_partial_sums(sums: Tensor, params: list[Tensor]) -> Tensor:
    """Sum per-tensor partial sums (shape [k, n], one column per param) over the shard group."""
    if not any(is_dtensor(p) for p in params):
        return sums
    return _all_reduce_over_shards(sums, params)


def _all_reduce_over_shards(sums: Tensor, params: list[Tensor]) -> Tensor:
    import torch.distributed as dist
    from torch.distributed.tensor import Shard

    mesh = params[0].device_mesh
    if any(not is_dtensor(p) or p.device_mesh != mesh for p in params):
        raise ValueError("SPD: parameters of one group must all be DTensors on the same device mesh")
    # Only the columns of parameters sharded over a mesh dimension need summing over it; a
    # replicated parameter's local sums are already whole.
    out = sums
    for dim in range(mesh.ndim):
        sharded = torch.tensor(
            [isinstance(p.placements[dim], Shard) for p in params], device=sums.device
        )
        reduced = out.clone()
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM, group=mesh.get_group(dim))
        out = torch.where(sharded, reduced, out)
    return out
