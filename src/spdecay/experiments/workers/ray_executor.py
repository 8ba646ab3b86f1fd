"""The Ray executor: every unit of a study (a run and the rows derived from it) is one Ray task
with its resources declared (``num_cpus`` = threads per run, ``num_gpus`` = GPUs per run), on a
local Ray instance (``--workers N``) or an existing cluster (``--ray-address``).

The driver (the runner's process) stays the only writer: a task returns its unit's records and
the runner's ``done`` writes them atomically, as in one process. Tasks write only their own
run's checkpoint (``--out/checkpoints``, which must be shared storage on a cluster). A worker
that dies is restarted by Ray up to ``max_retries`` times (continuing from the run's last
checkpoint); a run that still has no records, or that raised, is returned as a ``RunFailure``
(named in the log and the report; the runner exits non-zero). Ctrl-C cancels every outstanding
task and leaves a folder that ``--resume`` continues.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from spdecay.experiments.errors import RunnerError
from spdecay.experiments.executors import Done, RunFailure, Work, Worker
from spdecay.experiments.protocol import RunUnit
from spdecay.experiments.workers.options import RayOptions, check_device

# Environment a cluster's workers need from the driver (a local instance inherits it anyway).
PASS_ENV = ("SPDECAY_CACHE_DIR", "XDG_CACHE_HOME", "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
WAIT_S = 2.0  # how often the bar and the cluster's capacity are refreshed while runs go on

# One Worker (data + model: the task's session) per worker process, reused by every unit of the
# same study that lands there (a task's arguments are unpickled afresh each time).
_WORKERS: dict[tuple, Worker] = {}


def run_unit_task(work: Work, unit: RunUnit, cwd: str) -> list[dict]:
    """The body of one Ray task (runs in a worker process): the unit's records."""
    if os.path.isdir(cwd) and os.getcwd() != cwd:  # relative --train/--model paths mean what they did
        os.chdir(cwd)
    if isinstance(work, Worker):
        key = (work.config.fingerprint(), str(work.checkpoint_dir), work.device, work.threads)
        if key not in _WORKERS:
            _WORKERS.clear()
            _WORKERS[key] = work
        work = _WORKERS[key]
    return work(unit)


def check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """Ray keeps retrying an address where nothing listens (for minutes): try the port first.
    ``auto`` is Ray's to resolve (it fails at once when this machine is in no cluster)."""
    import socket

    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if address == "auto" or not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise RunnerError(f"--ray-address {address}: no Ray cluster answers there ({exc.strerror or exc}); "
                          "start one with `ray start --head` or check the address") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300]}" if text else type(exc).__name__


class RayExecutor:
    """An ``Executor`` (``spdecay.experiments.executors``) running units as Ray tasks."""

    driver_device = "cpu"  # the runner's own session only logs and fills the caches: keep GPUs for the runs

    def __init__(self, options: RayOptions, log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> None:
        self.options = options
        self.log = log

    def __call__(self, units: list[RunUnit], work: Work, done: Done) -> list[RunFailure]:
        if isinstance(work, Worker):
            check_device(work.config.device, self.options.gpus_per_run)
        if not units:
            return []
        import ray

        started = self._connect(ray)
        try:
            self._check_feasible(ray)
            return self._run(ray, units, work, done)
        finally:
            if started:
                ray.shutdown()

    # -- connecting ---------------------------------------------------------------------------

    def _connect(self, ray) -> bool:
        """Start (local) or join (cluster) Ray; False if this process already had it running
        (tests, a program embedding the runner), which is then used as it is and left running."""
        o = self.options
        if ray.is_initialized():
            self.log("ray: using this process's Ray instance")
            return False
        quiet = {"logging_level": logging.WARNING, "include_dashboard": False}
        if o.local:
            # Ray's memory monitor kills a worker when the node runs short (whoever uses the memory)
            # and by default retries such a task forever: bound it like any other death.
            ray.init(num_cpus=o.workers * o.threads, _system_config={"task_oom_retries": o.max_retries}, **quiet)
            gpus = f", {o.gpus_per_run:g} GPU(s)" if o.gpus_per_run else ""
            self.log(f"ray: local instance, {o.workers} runs at a time, {o.threads} thread(s){gpus} each")
            return True
        check_reachable(o.address)
        env = {k: os.environ[k] for k in PASS_ENV if k in os.environ}
        try:
            ray.init(address=o.address, runtime_env={"env_vars": env} if env else None, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise RunnerError(f"--ray-address {o.address}: cannot connect to a Ray cluster there ({_first_line(exc)})") from None
        res = ray.cluster_resources()
        self.log(f"ray: cluster {o.address}: {res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs; "
                 f"each run takes {o.threads} thread(s)" + (f" and {o.gpus_per_run:g} GPU(s)" if o.gpus_per_run else ""))
        return True

    def _check_feasible(self, ray) -> None:
        """A task no node can hold would wait forever: refuse it up front."""
        o = self.options
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        if not any(r.get("CPU", 0) >= o.threads and r.get("GPU", 0) >= o.gpus_per_run for r in nodes):
            most = max(((r.get("CPU", 0), r.get("GPU", 0)) for r in nodes), default=(0, 0))
            raise RunnerError(f"no Ray node has {o.threads} CPU(s)" + (f" and {o.gpus_per_run:g} GPU(s)" if o.gpus_per_run else "")
                              + f" for one run (the largest has {most[0]:g} CPUs, {most[1]:g} GPUs); "
                              "lower --threads or --gpus-per-run")

    def _capacity(self, ray) -> int:
        """Runs to keep in flight: --workers locally; on a cluster what its resources hold now
        (read again as nodes come and go), capped by --workers if given."""
        o = self.options
        if o.local:
            return o.workers
        res = ray.cluster_resources()
        cap = int(res.get("CPU", 0) // o.threads)
        if o.gpus_per_run:
            cap = min(cap, int(res.get("GPU", 0) // o.gpus_per_run))
        if o.workers:
            cap = min(cap, o.workers)
        return max(1, cap)

    # -- running ------------------------------------------------------------------------------

    def _task_work(self, work: Work) -> Work:
        """What travels to the workers: a fresh Worker with the per-run threads, the study's own
        device, no per-step bars and an absolute checkpoint folder."""
        if not isinstance(work, Worker):
            return work
        return Worker(work.config, Path(work.checkpoint_dir).resolve(), work.config.device,
                      threads=self.options.threads, progress=False, interrupt=work.interrupt)

    def _run(self, ray, units: list[RunUnit], work: Work, done: Done) -> list[RunFailure]:
        o = self.options
        remote = ray.remote(
            num_cpus=o.threads, num_gpus=o.gpus_per_run, max_retries=o.max_retries, retry_exceptions=False,
            # CPU runs share one process (and its loaded model) per worker; a GPU run gets a fresh
            # process, so that the GPU Ray assigns it is the one CUDA uses (Ray's default for GPUs)
            **({} if o.gpus_per_run else {"max_calls": 0}),
        )(run_unit_task)
        work_ref = ray.put(self._task_work(work))
        cwd = os.getcwd()
        pending = list(units)
        inflight: dict = {}  # ObjectRef -> unit
        failures: list[RunFailure] = []
        bar = _bar(sum(len(u.run_ids) for u in units), getattr(work, "progress", True))
        try:
            while pending or inflight:
                capacity = self._capacity(ray)
                while pending and len(inflight) < capacity:
                    unit = pending.pop(0)
                    inflight[remote.options(name=unit.spec.run_id).remote(work_ref, unit, cwd)] = unit
                if bar is not None:
                    bar.set_postfix_str("running: " + ", ".join(u.spec.run_id for u in inflight.values()), refresh=True)
                ready, _ = ray.wait(list(inflight), num_returns=1, timeout=WAIT_S)
                for ref in ready:
                    self._finish(ray, ref, inflight.pop(ref), done, failures, bar)
        except KeyboardInterrupt:
            try:  # keep what finished in the meantime, then stop the rest
                ready, _ = ray.wait(list(inflight), num_returns=len(inflight), timeout=0) if inflight else ([], [])
                for ref in ready:
                    self._finish(ray, ref, inflight.pop(ref), done, failures, bar)
            finally:
                self._cancel(ray, inflight)
            raise
        except BaseException:
            self._cancel(ray, inflight)
            raise
        finally:
            if bar is not None:
                bar.close()
        return failures

    def _finish(self, ray, ref, unit: RunUnit, done: Done, failures: list[RunFailure], bar) -> None:
        try:
            records = ray.get(ref)
        except ray.exceptions.RayTaskError as exc:  # the run raised (not retried: it would again)
            cause = getattr(exc, "cause", None) or exc
            failures.append(RunFailure(unit, _first_line(cause)))
            return
        except ray.exceptions.RayError as exc:  # its worker or node died on every try
            tries = self.options.max_retries + 1
            failures.append(RunFailure(unit, f"its worker died ({type(exc).__name__}) on all {tries} tries"))
            return
        if bar is None:
            done(unit, records)
            return
        with bar.external_write_mode():  # log lines above the bar
            done(unit, records)
        bar.update(len(records))

    @staticmethod
    def _cancel(ray, inflight: dict) -> None:
        for ref in inflight:
            try:
                ray.cancel(ref, force=True)  # a cancelled task is never retried
            except Exception:  # noqa: BLE001 - already finished or gone: nothing to stop
                pass
        inflight.clear()


def _bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="runs", unit="run", dynamic_ncols=True, disable=None)  # None: no bar off a TTY
