"""The driver between backends and the rule: reduce all sums once, decide, project, stats.

A backend's phase 1 applies the Adam update in place and returns a ``PartialStep``: the
local per-column sums ``[<g, p - p0>, ||p - p0||^2, growth]`` (float64, ``[3, n]``) and a
projector. ``finish`` takes the partial steps of all param groups, reduces their sums over
shards in one go, takes the one decision (``spdecay.spd.decision.spd_ratio``) and hands
each projector its coefficients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor

from spdecay.spd.decision import spd_ratio
from spdecay.spd.reduce import reduce_columns


class Projector(Protocol):
    def project(self, coef: Tensor) -> None:
        """Apply ``p <- p - coef[j] (p - p0)`` to the tensors of column ``j`` (float64 ``[n]``,
        on the sums' device; 0 leaves a column as it is)."""


@dataclass
class PartialStep:
    """A step halfway: Adam applied, the decision and projection still to come."""

    sums: Tensor  # [3, n] float64, local (not yet reduced over shards)
    projector: Projector
    sources: list[Any]  # per column: the parameter or FlatLayout (see reduce_columns)
    lam: float | Tensor = 0.0  # SPD strength: one, or per column (set by the caller)
    # Input column of each column of ``sums`` (None: the input order). Input columns are the
    # backend's parameters in order, a parameter with a FlatLayout giving num_logical of them.
    columns: list[int] | None = None


class Decisions(NamedTuple):
    """Per column of one partial step."""

    fired: Tensor  # bool: c = -<g, p - p0> < 0
    ratio: Tensor  # the ratio r applied (0 where it did not fire)
    deviation: Tensor  # ||p - p0|| before the step


def finish(partials: list[PartialStep], found_inf: Tensor | None = None) -> list[Decisions]:
    """Reduce, decide and project every partial step; one ``Decisions`` per partial.

    ``found_inf`` (a fused optimizer's skipped step under GradScaler) masks every projection."""
    out: list[Decisions | None] = [None] * len(partials)
    by_device: dict[torch.device, list[int]] = {}
    for k, part in enumerate(partials):
        by_device.setdefault(part.sums.device, []).append(k)
    for idx in by_device.values():
        parts = [partials[k] for k in idx]
        sums = parts[0].sums if len(parts) == 1 else torch.cat([p.sums for p in parts], dim=1)
        sums = reduce_columns(sums, [s for p in parts for s in p.sources])
        lam = _strengths(parts, sums)
        fired, ratio, coef = spd_ratio(sums[0], sums[1], sums[2], lam)
        if found_inf is not None:
            ok = found_inf.to(fired.device) == 0
            fired, ratio, coef = fired & ok, ratio * ok, coef * ok
        deviation = sums[1].clamp_min(0).sqrt()
        start = 0
        for k, part in zip(idx, parts):
            sl = slice(start, start + part.sums.shape[1])
            part.projector.project(coef[sl])
            out[k] = Decisions(fired[sl], ratio[sl], deviation[sl])
            start = sl.stop
    return out  # type: ignore[return-value]


_LAMS: dict[tuple, Tensor] = {}


def _strengths(parts: list[PartialStep], sums: Tensor) -> float | Tensor:
    lams = [p.lam for p in parts]
    if all(isinstance(x, float) for x in lams):
        if len(set(lams)) == 1:
            return lams[0]  # the common case: a Python float, no host-to-device copy
        # Per-group floats: one vector per layout, built once (no copy per step).
        key = (tuple(lams), tuple(p.sums.shape[1] for p in parts), sums.device)
        if key not in _LAMS:
            if len(_LAMS) > 64:
                _LAMS.clear()
            host = torch.cat([torch.full((p.sums.shape[1],), x, dtype=torch.float64)
                              for p, x in zip(parts, lams)])
            _LAMS[key] = host.to(sums.device)
        return _LAMS[key]
    cols = [
        x.to(sums.device, sums.dtype) if isinstance(x, Tensor)
        else torch.full((p.sums.shape[1],), x, dtype=sums.dtype, device=sums.device)
        for p, x in zip(parts, lams)
    ]
    return torch.cat(cols)
