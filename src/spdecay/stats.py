"""Per-tensor SPD statistics: which layers were regularised, by how much, how far they drifted."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SPDStats:
    """The last step's SPD results, one entry per parameter tensor.

    ``fired``: the condition c = -<g, p - p0> < 0 held (the layer was a projection candidate);
    ``ratio``: the ratio r applied (0 where it did not fire); ``deviation``: ||p - p0|| before the
    step. Tensors stay on the parameters' device until you read them.
    """

    names: list[str]
    fired: Tensor
    ratio: Tensor
    deviation: Tensor

    @classmethod
    def from_lists(
        cls, names: list[str], fired: list[Tensor], ratio: list[Tensor], deviation: list[Tensor]
    ) -> SPDStats:
        if not names:
            empty = torch.zeros(0)
            return cls([], empty.bool(), empty, empty)
        device = fired[0].device
        return cls(
            names,
            torch.stack([f.to(device) for f in fired]),
            torch.stack([r.to(device, torch.float32) for r in ratio]),
            torch.stack([d.to(device, torch.float32) for d in deviation]),
        )

    def __len__(self) -> int:
        return len(self.names)

    def summary(self) -> dict[str, float]:
        """Scalar summary (reads the values: call it outside the hot loop)."""
        if not self.names:
            return {"fraction_fired": 0.0, "mean_ratio": 0.0, "total_deviation": 0.0}
        return {
            "fraction_fired": self.fired.float().mean().item(),
            "mean_ratio": self.ratio.mean().item(),
            "total_deviation": self.deviation.square().sum().sqrt().item(),
        }

    def as_dict(self) -> dict[str, dict[str, float]]:
        """{name: {"fired", "ratio", "deviation"}} as Python numbers."""
        fired, ratio, dev = self.fired.tolist(), self.ratio.tolist(), self.deviation.tolist()
        return {
            n: {"fired": float(f), "ratio": r, "deviation": d}
            for n, f, r, d in zip(self.names, fired, ratio, dev)
        }
