"""The learning-rate schedule, the number of steps of a run and the order of the training
examples in each epoch (one place for every task)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

WARMUP_FRACTION = 0.1
COSINE_FLOOR = 0.1  # cosine decays to 10% of the peak rate, not to zero: late steps still move
SCHEDULES = ("linear", "cosine", "constant")


def lr_lambda(total_steps: int, schedule: str = "linear") -> Callable[[int], float]:
    """Linear warm-up over the first 10% of steps, then ``linear`` decay to zero (BERT-style),
    ``cosine`` decay to ``COSINE_FLOOR`` of the peak, or a ``constant`` rate."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}")
    warmup = max(1, int(WARMUP_FRACTION * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if schedule == "cosine":
            return COSINE_FLOOR + (1 - COSINE_FLOOR) * 0.5 * (1 + math.cos(math.pi * progress))
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor


def total_steps_for(n_train: int, batch_size: int, steps: int | None, epochs: float | None) -> int:
    if steps is not None:
        return steps
    per_epoch = max(1, n_train // batch_size)
    return max(1, math.ceil((epochs or 1.0) * per_epoch))


def describe(schedule: str) -> str:
    return {"linear": "10% warm-up, then linear decay to zero",
            "cosine": "10% warm-up, then cosine decay to 10% of the peak",
            "constant": "10% warm-up, then constant"}.get(schedule, schedule)


def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(1_000_003 * seed + epoch))
