"""DTensor detection (torch may be built without distributed)."""

from __future__ import annotations

from torch import Tensor

try:  # DTensor is public from torch 2.4 on
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch built without distributed
    DTensor = None  # type: ignore[assignment,misc]


def is_dtensor(t: object) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def to_local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (possibly empty, possibly uneven), or the tensor itself."""
    return t.to_local() if is_dtensor(t) else t
