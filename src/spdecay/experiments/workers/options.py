"""What ``--workers``, ``--ray-address``, ``--gpus-per-run`` and ``--threads`` mean on Ray: the
``RayOptions`` record and the device check. ``workers/factory.py`` checks the options, before
anything heavy loads, into the Ray executor."""

from __future__ import annotations

from dataclasses import dataclass

from spdecay.experiments.errors import RunnerError

RAY_EXTRA = 'pip install "spdecay[ray]"'
MAX_RETRIES = 2  # a run whose worker dies is started again at most this often, then reported failed


@dataclass(frozen=True)
class RayOptions:
    """Where and how the runs of a study execute on Ray.

    ``workers``: runs at a time (a local Ray instance of that size, or a cap on a cluster);
    ``address``: an existing cluster (``auto``, ``HOST:PORT`` or ``ray://HOST:PORT``);
    ``threads``: CPU threads per run (each task's ``num_cpus``); ``gpus_per_run``: each task's
    ``num_gpus``; ``max_retries``: restarts of a run whose worker died before it is reported failed.
    """

    workers: int | None = None
    address: str | None = None
    threads: int = 1
    gpus_per_run: float = 0.0
    max_retries: int = MAX_RETRIES

    @property
    def local(self) -> bool:
        return self.address is None


def check_device(device: str, gpus_per_run: float) -> None:
    """Ray gives each task the GPUs it declares (and hides the others): a run on CUDA needs
    ``--gpus-per-run``, and its device is that GPU, never ``cuda:N``."""
    if device.startswith("cuda:"):
        raise RunnerError(f"--device {device}: on Ray workers each run gets its own GPU; use --device cuda "
                          "(or auto) with --gpus-per-run")
    if device == "cuda" and not gpus_per_run:
        raise RunnerError("--device cuda on Ray workers needs --gpus-per-run (GPUs each run may use, e.g. 1)")
    if device == "cpu" and gpus_per_run:
        raise RunnerError(f"--gpus-per-run {gpus_per_run:g} with --device cpu: the runs would hold GPUs they never use")
