"""Per-tensor SPD statistics: which layers were regularised, by how much, how far they drifted.

One type for AdamSPD, the functional form and the add-on (``spd_stats()`` on both)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class SPDStats:
    """The last step's SPD results, one entry per parameter tensor (per logical tensor of a
    flat engine partition).

    Returned by [`AdamSPD.spd_stats`][spdecay.AdamSPD.spd_stats],
    [`SelectiveProjectionDecay.spd_stats`][spdecay.SelectiveProjectionDecay.spd_stats] and the
    functional [`adam_spd`][spdecay.adam_spd]. The tensors stay on the parameters' device, so
    building the object costs no host sync; only [`summary`][spdecay.SPDStats.summary] and
    [`as_dict`][spdecay.SPDStats.as_dict] read the values.

    Attributes:
        names: the parameter names (``param_names`` of the group when the optimizer was built
            from named parameters; ``"<name>[k]"`` or the layout's names for the logical
            tensors of a flat partition).
        fired: bool tensor ``[n]``: the condition c = -<g, p - p0> < 0 held (the layer was a
            projection candidate).
        ratio: float32 tensor ``[n]``: the ratio r applied (0 where it did not fire).
        deviation: float32 tensor ``[n]``: ||p - p0|| before the step.

    Example:
        ```python
        stats = opt.spd_stats()
        stats.summary()     # {'fraction_regularised': 0.4, 'mean_ratio': ..., 'deviation': ...}
        stats.ratio.mean()  # a device tensor: no host sync
        stats.as_dict()["encoder.layer.0.attention.self.query.weight"]  # {'fired': 1.0, ...}
        ```
    """

    names: list[str]
    fired: Tensor
    ratio: Tensor
    deviation: Tensor

    @classmethod
    def from_lists(
        cls, names: list[str], fired: list[Tensor], ratio: list[Tensor], deviation: list[Tensor]
    ) -> SPDStats:
        """Stack per-tensor 0-d tensors (one of each per name) into an ``SPDStats``.

        Args:
            names: the parameter names.
            fired: 0-d bool tensors, one per name.
            ratio: 0-d float tensors, one per name.
            deviation: 0-d float tensors, one per name.

        Returns:
            The stats on the device of ``fired[0]``, with ``ratio`` and ``deviation`` as
            float32 (empty tensors when ``names`` is empty).
        """
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
        """Stats from the driver's decisions, one entry per tensor that was stepped.

        Args:
            names: one name per parameter.
            decisions: per parameter, ``(Decisions, first column, width)`` from the driver, or
                None where the parameter was not stepped (it gets no entry).
            layouts: per parameter, its [`FlatLayout`][spdecay.FlatLayout] or None; a parameter
                with a layout gives one entry per logical tensor (named by the layout's
                ``names``, else ``"<name>[k]"``).

        Returns:
            The stats, as [`from_lists`][spdecay.SPDStats.from_lists] builds them.
        """
        out_names, fired, ratio, deviation = [], [], [], []
        for name, entry, layout in zip(names, decisions, layouts):
            if entry is None:
                continue
            dec, start, width = entry
            for k in range(width):
                if layout is None:
                    out_names.append(name)
                else:
                    given = layout.names[k] if layout.names else None
                    out_names.append(given or f"{name}[{k}]")
                fired.append(dec.fired[start + k])
                ratio.append(dec.ratio[start + k])
                deviation.append(dec.deviation[start + k])
        return cls.from_lists(out_names, fired, ratio, deviation)

    def __len__(self) -> int:
        """The number of entries (tensors)."""
        return len(self.names)

    def summary(self) -> dict[str, float]:
        """Scalar summary with the keys the framework loggers use (reads the values: call it
        outside the hot loop).

        Returns:
            ``fraction_regularised`` (the share of tensors whose condition fired),
            ``mean_ratio`` (the mean ratio r, counting 0 where it did not fire) and
            ``deviation`` (||theta - theta_0|| over all the tensors: the square root of the sum
            of ``deviation**2``); all 0.0 when there are no entries.
        """
        if not self.names:
            return {"fraction_regularised": 0.0, "mean_ratio": 0.0, "deviation": 0.0}
        return {
            "fraction_regularised": self.fired.float().mean().item(),
            "mean_ratio": self.ratio.mean().item(),
            "deviation": self.deviation.square().sum().sqrt().item(),
        }

    def as_dict(self) -> dict[str, dict[str, float]]:
        """Per-tensor values as Python numbers (reads the values).

        Returns:
            ``{name: {"fired": 0.0 or 1.0, "ratio": r, "deviation": ||p - p0||}}``.
        """
        fired, ratio, dev = self.fired.tolist(), self.ratio.tolist(), self.deviation.tolist()
        return {
            n: {"fired": float(f), "ratio": r, "deviation": d}
            for n, f, r, d in zip(self.names, fired, ratio, dev)
        }


def collect_stats(
    param_groups: Sequence[dict[str, Any]],
    last: Mapping[Any, Any],
    layouts: Mapping[Any, Any],
    spd_only: bool = False,
) -> SPDStats:
    """The stats of the last step of every parameter that has one, in param-group order.

    Parameters with a FlatLayout that are in no group right now come last, in the order their
    layouts were set: DeepSpeed ZeRO-3 puts a sub-group's flat partition into the client
    optimizer's group only while it steps it, so walking the groups alone would miss it.

    Args:
        param_groups: the optimizer's param groups (``param_names`` used where present).
        last: per parameter, its latest ``(Decisions, first column, width)``.
        layouts: per parameter, its FlatLayout (if any).
        spd_only: skip groups whose ``spd`` is false (AdamSPD's plain AdamW groups).
    """
    names, entries, kept = [], [], []
    seen: set[int] = set()
    for g, group in enumerate(param_groups):
        if spd_only and not group.get("spd", True):
            continue
        group_names = group.get("param_names")
        for i, p in enumerate(group["params"]):
            if p in last and id(p) not in seen:
                seen.add(id(p))
                names.append(group_names[i] if group_names else f"group{g}.param{i}")
                entries.append(last[p])
                kept.append(layouts.get(p))
    for k, (p, layout) in enumerate(layouts.items()):
        if p in last and id(p) not in seen:
            seen.add(id(p))
            names.append(f"flat{k}")
            entries.append(last[p])
            kept.append(layout)
    return SPDStats.from_decisions(names, entries, kept)

