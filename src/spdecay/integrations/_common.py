"""Running SPD statistics shared by the framework callbacks."""

from __future__ import annotations

from typing import Any

import torch

from spdecay.stats import SPDStats


def find_stats_source(optimizer: Any) -> Any:
    """The object with SPD stats inside framework wrappers (accelerate's AcceleratedOptimizer,
    Lightning's LightningOptimizer): an AdamSPD or an add-on (both have ``spd_stats``)."""
    seen = 0
    while optimizer is not None and seen < 8:
        if callable(getattr(optimizer, "spd_stats", None)):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
        seen += 1
    return None


def read_stats(source: Any) -> SPDStats:
    return source.spd_stats()


class RunningSPDStats:
    """Averages per-step SPD summaries between two logging events, as device tensors (no host
    sync per step; one when the values are read)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.steps = 0
        self._fired: torch.Tensor | float = 0.0
        self._ratio: torch.Tensor | float = 0.0
        self._deviation: torch.Tensor | None = None

    def update(self, stats: SPDStats) -> None:
        if not len(stats):
            return
        self.steps += 1
        self._fired = self._fired + stats.fired.float().mean()
        self._ratio = self._ratio + stats.ratio.mean()
        self._deviation = stats.deviation.square().sum().sqrt()

    def pop(self, prefix: str = "spd/") -> dict[str, float]:
        """The averages since the last call (empty when no SPD step happened), then reset."""
        if not self.steps:
            return {}
        out = {
            f"{prefix}fraction_regularised": float(self._fired) / self.steps,
            f"{prefix}mean_ratio": float(self._ratio) / self.steps,
            f"{prefix}deviation": float(self._deviation),  # ||theta - theta_0|| at the last step
        }
        self.reset()
        return out
