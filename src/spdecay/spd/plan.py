"""Which backend steps each tensor: the one place that decides.

* ``fused=True``: CPU tensors the C kernel covers go to it, CUDA tensors to Triton; the rest of
  the group to the multi-tensor backend (in the same step);
* default (``fused=None``, ``foreach=None``): the same where the C kernel is available (built
  or loaded from the private cache when the optimizer is constructed; see
  ``backends.fused_c``) and, on CUDA, Triton installed; otherwise the multi-tensor backend;
* ``foreach=False``: the readable single-tensor backend;
* otherwise: the multi-tensor backend.

``preflight`` raises (missing compiler, missing Triton, unsupported device) before a step
changes anything.
"""

from __future__ import annotations

from types import ModuleType

from spdecay.spd.backends import multi_tensor, single_tensor
from spdecay.spd.interface import TensorLists


def _fused_c() -> ModuleType:
    from spdecay.spd.backends import fused_c

    return fused_c


def _fused_triton() -> ModuleType:
    from spdecay.spd.backends import fused_triton

    return fused_triton


def preflight(devices: set[str], *, fused: bool | None, owner: str) -> None:
    """Raise now what choosing the fused backends for these device types would raise later."""
    if not fused:
        return
    unsupported = devices - {"cpu", "cuda"}
    if unsupported:
        raise ValueError(
            f"{owner}(fused=True) supports CPU (C kernel) and CUDA (Triton) tensors, got "
            f"{sorted(unsupported)}; use foreach=True there"
        )
    if "cpu" in devices:
        _fused_c().library()  # builds or loads the kernel; why it cannot is reported here
    if "cuda" in devices and not _fused_triton().HAS_TRITON:
        raise RuntimeError(f"{owner}(fused=True) on CUDA needs Triton: pip install triton")


def default_cpu_kernel() -> bool:
    """Whether the CPU default is the C kernel (builds or loads it on the first call)."""
    return _fused_c().available()


def plan(lists: TensorLists, *, foreach: bool | None,
         fused: bool | None) -> list[tuple[ModuleType, list[int]]]:
    """(backend module, indices) pairs covering every tensor of ``lists`` once."""
    n = len(lists)
    if foreach is False and not fused:
        return [(single_tensor, list(range(n)))]
    cuda = [p.is_cuda for p in lists.params]
    default = fused is None and not foreach
    use_triton = fused or (default and any(cuda) and _fused_triton().HAS_TRITON)
    use_cpu = fused or (default and not all(cuda) and default_cpu_kernel())
    chosen: dict[ModuleType, list[int]] = {}
    rest = single_tensor if foreach is False else multi_tensor
    for i in range(n):
        backend = rest
        if cuda[i]:
            if use_triton and _fused_triton().covers(lists, i):
                backend = _fused_triton()
        elif use_cpu and lists.params[i].device.type == "cpu" and _fused_c().covers(lists, i):
            backend = _fused_c()
        chosen.setdefault(backend, []).append(i)
    return list(chosen.items())
