"""Progress of a training run: a tqdm bar on a terminal; in a log (stderr is not a terminal) a
line when the run starts, with an estimate of its training time, and a heartbeat line every
``HEARTBEAT_S`` seconds, so a log is never silent for long."""

from __future__ import annotations

import sys
import time
from typing import TextIO

HEARTBEAT_S = 30.0
ESTIMATE_AFTER = 3  # steps measured before the first run of a process gives its estimate

# Seconds per training step of the last run in this process (the next run's estimate).
_last_step_s: float | None = None


def _seconds(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 60} min {s % 60:02d} s" if s >= 60 else f"{s} s"


class LogProgress:
    """The tqdm calls the loop makes (``update``, ``set_postfix``, ``close``), written as log lines."""

    def __init__(self, desc: str, total: int, initial: int = 0, stream: TextIO | None = None,
                 clock=time.perf_counter, heartbeat_s: float = HEARTBEAT_S) -> None:
        self.desc, self.total, self.n, self.start = desc, total, initial, initial
        self.stream = stream if stream is not None else sys.stderr
        self.clock, self.heartbeat_s = clock, heartbeat_s
        self.t0 = self.last = clock()
        self.postfix = ""
        self.estimated = _last_step_s is not None
        left = total - initial
        if _last_step_s is not None:
            when = f"about {_seconds(left * _last_step_s)} of training (from the previous run's speed)"
        else:
            when = f"an estimate follows after {ESTIMATE_AFTER} steps"
        resumed = f", resumed at step {initial}" if initial else ""
        self._say(f"{desc}: starting, {left} steps{resumed}; {when}")

    def _say(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def _rate(self) -> float | None:
        done = self.n - self.start
        return (self.clock() - self.t0) / done if done > 0 else None

    def update(self, k: int = 1) -> None:
        self.n += k
        now = self.clock()
        first = not self.estimated and self.n - self.start >= ESTIMATE_AFTER
        if first or now - self.last >= self.heartbeat_s:
            rate = self._rate()
            left = f"about {_seconds(rate * (self.total - self.n))} of training left" if rate else ""
            parts = [f"step {self.n}/{self.total}", self.postfix, left]
            self._say(f"{self.desc}: " + ", ".join(p for p in parts if p))
            self.last, self.estimated = now, True

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def close(self) -> None:
        global _last_step_s
        rate = self._rate()
        if rate is not None:
            _last_step_s = rate
            self._say(f"{self.desc}: trained {self.n - self.start} steps in {_seconds(self.clock() - self.t0)}; "
                      "evaluating")


def progress_bar(desc: str, total: int, initial: int, enabled: bool):
    """A tqdm bar on a terminal, log lines otherwise, nothing when ``enabled`` is False."""
    if not enabled:
        return None
    if not sys.stderr.isatty():
        return LogProgress(desc, total, initial)
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True)
