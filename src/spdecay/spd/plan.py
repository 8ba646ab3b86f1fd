"""Which backend steps each tensor: the one place that decides.

* ``fused=True``: CPU tensors the C kernel covers go to it, CUDA tensors to Triton; the rest of
  the group to the multi-tensor backend (in the same step);
* default (``fused=None``, ``foreach=None``): the same where the C kernel is available (a C
  compiler was found; built when the optimizer is constructed) and, on CUDA, Triton installed;
  otherwise the multi-tensor backend;
* ``foreach=False``: the readable reference backend;
* otherwise: the multi-tensor backend.

``preflight`` raises (missing compiler, missing Triton, unsupported device) before a step
changes anything.
"""

from __future__ import annotations

from types import ModuleType

from spdecay.spd.backends import foreach as multi_tensor
from spdecay.spd.backends import reference
from spdecay.spd.work import TensorLists


def _cpu() -> ModuleType:
    from spdecay.spd.backends import cpu

    return cpu


def _triton() -> ModuleType:
    from spdecay.spd.backends import triton

    return triton


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
        _cpu().library()  # builds or loads the kernel; a missing compiler is reported here
    if "cuda" in devices and not _triton().HAS_TRITON:
        raise RuntimeError(f"{owner}(fused=True) on CUDA needs Triton: pip install triton")


def default_cpu_kernel() -> bool:
    """Whether the CPU default is the C kernel (builds or loads it on the first call)."""
    return _cpu().available()


def plan(lists: TensorLists, *, foreach: bool | None, fused: bool | None,
         spd: bool) -> list[tuple[ModuleType, list[int]]]:
    """(backend module, indices) pairs covering every tensor of ``lists`` once."""
    n = len(lists)
    if foreach is False and not fused:
        return [(reference, list(range(n)))]
    cuda = [p.is_cuda for p in lists.params]
    default = fused is None and not foreach
    use_triton = fused or (default and any(cuda) and _triton().HAS_TRITON)
    use_cpu = fused or (default and not all(cuda) and default_cpu_kernel())
    chosen: dict[ModuleType, list[int]] = {}
    rest = reference if foreach is False else multi_tensor
    for i in range(n):
        backend = rest
        if cuda[i]:
            if use_triton and _triton().covers(lists, i, spd):
                backend = _triton()
        elif use_cpu and lists.params[i].device.type == "cpu" and _cpu().covers(lists, i, spd):
            backend = _cpu()
        chosen.setdefault(backend, []).append(i)
    return list(chosen.items())
