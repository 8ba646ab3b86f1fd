"""How many CPU threads a run uses: ``--threads``, else ``OMP_NUM_THREADS``, else the cores this
process may use."""

from __future__ import annotations

import os

import torch


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def thread_count(threads: int | None = None) -> int:
    """--threads, else OMP_NUM_THREADS, else the cores this process may use."""
    if threads is not None:
        return threads
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env:
        try:
            if int(env) > 0:
                return int(env)
        except ValueError:
            pass
    return usable_cores()


def set_threads(device: torch.device, threads: int | None = None) -> int:
    n = thread_count(threads)
    if device.type == "cpu" or threads is not None:
        torch.set_num_threads(max(1, n))
    return torch.get_num_threads()
