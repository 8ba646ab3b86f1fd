"""``--workers``, ``--ray-address``, ``--gpus-per-run`` (and ``--threads`` per run): checked
here, before anything heavy loads, into a ``RayOptions`` and the Ray executor. No Ray import
unless one of the first two options is given."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable

from spdecay.experiments.errors import RunnerError
from spdecay.experiments.threads import usable_cores
from spdecay.experiments.workers.options import MAX_RETRIES, RAY_EXTRA, RayOptions, check_device


def executor_from_options(*, workers: int | None = None, address: str | None = None,
                          gpus_per_run: float | None = None, threads: int | None = None, device: str | None = None,
                          max_retries: int = MAX_RETRIES, log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)):
    """The Ray executor for these options, or ``None`` (run in this process) when neither
    ``workers`` nor ``address`` is given. Bad options and a missing Ray are one-line errors."""
    if workers is None and address is None:
        if gpus_per_run is not None:
            raise RunnerError("--gpus-per-run declares the GPUs of each run on Ray workers; "
                              "give --workers N or --ray-address too")
        return None
    if workers is not None and (isinstance(workers, bool) or workers < 1):
        raise RunnerError(f"--workers {workers}: must be a positive number of runs at a time")
    if address is not None and not address.strip():
        raise RunnerError("--ray-address: give the cluster's address (HOST:PORT, ray://HOST:PORT) or auto")
    if gpus_per_run is not None and (not math.isfinite(gpus_per_run) or gpus_per_run < 0):
        raise RunnerError(f"--gpus-per-run {gpus_per_run}: must be a non-negative number")
    if threads is not None and threads < 1:
        raise RunnerError(f"--threads {threads}: must be positive")
    if not isinstance(max_retries, int) or max_retries < 0:
        raise RunnerError(f"max_retries {max_retries}: must be a non-negative integer")
    gpus = float(gpus_per_run or 0.0)
    if device is not None:
        check_device(device, gpus)
    try:
        import ray  # noqa: F401
    except ImportError:
        option = "--workers" if address is None else "--ray-address"
        raise RunnerError(f"{option} runs the study on Ray, which is not installed: {RAY_EXTRA}") from None
    if threads is None:  # a local instance shares this machine's cores; a cluster task takes one
        threads = max(1, usable_cores() // workers) if address is None and workers else 1
    from spdecay.experiments.workers.ray_executor import RayExecutor, check_reachable

    if address is not None:
        check_reachable(address.strip())  # before the data and model load

    options = RayOptions(workers=workers, address=address.strip() if address else None, threads=threads,
                         gpus_per_run=gpus, max_retries=max_retries)
    return RayExecutor(options, log=log)
