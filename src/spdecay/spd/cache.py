"""The one small memo of the SPD core: host-built tensors (index maps, strength vectors, reduce
plans) made once per layout, not once per step."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

import torch
from torch import Tensor

V = TypeVar("V")


class Memo(Generic[V]):
    """At most ``size`` entries; the oldest is dropped when a new one would exceed it."""

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self._entries: dict[Hashable, V] = {}

    def get(self, key: Hashable, make: Callable[[], V]) -> V:
        value = self._entries.get(key)
        if value is None:
            value = make()
            self._entries[key] = value
            if len(self._entries) > self.size:
                del self._entries[next(iter(self._entries))]
        return value

    def values(self) -> list[V]:
        return list(self._entries.values())

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


def to_device(host: Tensor, device: torch.device) -> Tensor:
    """A host tensor on ``device`` without blocking (pinned first for CUDA: a blocking copy
    would stall the GPU)."""
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)
