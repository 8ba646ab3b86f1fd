"""Per-tensor SPD statistics: which layers were regularised, by how much, how far they drifted.

One type for AdamSPD, the functional form and the add-on (``spd_stats()`` on both)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class SPDStats:
    """The last step's SPD results, one entry per parameter tensor (per logical tensor of a
    flat engine partition).

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

    @classmethod
    def from_decisions(
        cls, names: list[str], decisions: Sequence[Any], layouts: Sequence[Any]
    ) -> SPDStats:
        """From the driver's per-parameter ``(Decisions, first column, width)`` (None: not
        stepped); a parameter with a FlatLayout gives one entry per logical tensor."""
        out_names, fired, ratio, deviation = [], [], [], []
        for name, entry, layout in zip(names, decisions, layouts):
            if entry is None:
                continue
            dec, start, width = entry
            for k in range(width):
                if layout is None:
                    out_names.append(name)
                else:
                    out_names.append(layout.names[k] if layout.names else f"{name}[{k}]")
                fired.append(dec.fired[start + k])
                ratio.append(dec.ratio[start + k])
                deviation.append(dec.deviation[start + k])
        return cls.from_lists(out_names, fired, ratio, deviation)

    def __len__(self) -> int:
        return len(self.names)

    def summary(self) -> dict[str, float]:
        """Scalar summary with the keys the framework loggers use (reads the values: call it
        outside the hot loop): fraction_regularised, mean_ratio, deviation (||theta - theta_0||
        over all tensors)."""
        if not self.names:
            return {"fraction_regularised": 0.0, "mean_ratio": 0.0, "deviation": 0.0}
        return {
            "fraction_regularised": self.fired.float().mean().item(),
            "mean_ratio": self.ratio.mean().item(),
            "deviation": self.deviation.square().sum().sqrt().item(),
        }

    def as_dict(self) -> dict[str, dict[str, float]]:
        """{name: {"fired", "ratio", "deviation"}} as Python numbers."""
        fired, ratio, dev = self.fired.tolist(), self.ratio.tolist(), self.deviation.tolist()
        return {
            n: {"fired": float(f), "ratio": r, "deviation": d}
            for n, f, r, d in zip(self.names, fired, ratio, dev)
        }


SPDStepStats = SPDStats  # deprecated name of the functional form's result
