"""The executor seam: the runner hands a list of units and "run this unit -> records" to an
executor, which decides where and in which order they run. ``done(unit, records)`` is always
called in the runner's process (it writes results), in any order, once per unit.

A parallel executor (e.g. Ray workers) builds its own ``Worker`` per process from the
configuration; ``Worker`` is picklable until its session is built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from spdecay.experiments.config import CompareConfig
from spdecay.experiments.protocol import RunSpec, RunUnit

Work = Callable[[RunUnit], list[dict]]
Done = Callable[[RunUnit, list[dict]], None]


@dataclass(frozen=True)
class RunFailure:
    """A unit an executor gave up on (e.g. its Ray worker died on every try): no records, and why."""

    unit: RunUnit
    reason: str


# An executor returns the units it could not finish (None or [] when every one finished).
Executor = Callable[[list[RunUnit], Work, Done], "list[RunFailure] | None"]


def sequential(units: list[RunUnit], work: Work, done: Done) -> None:
    """One unit after the other, in plan order, in this process (the default)."""
    for unit in units:
        done(unit, work(unit))


class Worker:
    """``work`` for an executor: builds the task's session on first use (in the process it runs
    in) and runs units there."""

    def __init__(self, config: CompareConfig, checkpoint_dir: Path, device: str | None = None, *,
                 threads: int | None = None, progress: bool = True,
                 interrupt: Callable[[RunSpec, int], None] | None = None) -> None:
        self.config = config
        self.checkpoint_dir = Path(checkpoint_dir)
        self.device = device or config.device
        self.threads = threads
        self.progress = progress
        self.interrupt = interrupt
        self._session = None

    def session(self):
        if self._session is None:
            from spdecay.experiments.tasks.registry import resolve_device
            from spdecay.experiments.threads import set_threads
            from spdecay.experiments.training.session import build_session

            device = resolve_device(self.device)
            self._session = build_session(self.config, device, set_threads(device, self.threads))
        return self._session

    def __call__(self, unit: RunUnit) -> list[dict]:
        from spdecay.experiments.training.session import run_unit

        return run_unit(self.session(), unit, self.checkpoint_dir, progress=self.progress, interrupt=self.interrupt)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_session": None}  # a session never travels between processes
