"""The driver: plan each group's step, run the backends, then reduce, decide and project.

``step_groups`` is what ``AdamSPD.step`` calls with every param group of a step: everything
that can fail is checked first (``validate``), each backend applies the Adam update and returns
its local sums (``PartialStep``), and ``finish`` reduces the sums of all groups over shards in
one go, takes the one decision (``spdecay.spd.decision.spd_ratio``) with each group's strength
and hands each projector its coefficients. The strength ``lam`` lives here, never in a backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from spdecay.spd.cache import Memo, to_device
from spdecay.spd.decision import spd_ratio
from spdecay.spd.interface import AdamHyper, Decisions, PartialStep, TensorLists
from spdecay.spd.plan import plan, preflight
from spdecay.spd.reduce import check_placements, reduce_columns


@dataclass
class GroupStep:
    """One param group's step: its tensors, Adam hyper-parameters, SPD strength (used where
    ``hyper.with_sums``) and path options."""

    lists: TensorLists
    hyper: AdamHyper
    lam: float = 0.0
    foreach: bool | None = None
    fused: bool | None = None


class Pending(NamedTuple):
    """A partial step waiting for ``finish``: its sums' sources (per column, the parameter or
    its FlatLayout) and its strength (one, or one per column)."""

    part: PartialStep
    sources: list[Any]
    lam: float | Sequence[float]


# Per parameter: (decisions, first column in them, number of columns).
ParamDecisions = tuple[Decisions, int, int]


def validate(groups: list[GroupStep], owner: str) -> None:
    """Everything that can fail, checked before any tensor changes."""
    for g in groups:
        check_placements(g.lists.params, owner)
        preflight({p.device.type for p in g.lists.params}, fused=g.fused, owner=owner)


def step_groups(groups: list[GroupStep], owner: str = "AdamSPD",
                found_inf: Tensor | None = None) -> list[list[ParamDecisions] | None]:
    """Step every group; per group (None without sums) the decisions of each parameter."""
    validate(groups, owner)
    runs: list[tuple[int, list[int], Pending]] = []
    for k, g in enumerate(groups):
        for backend, idx in plan(g.lists, foreach=g.foreach, fused=g.fused):
            lists = g.lists.pick(idx)
            part = backend.adam_and_sums(lists, g.hyper)
            if part is not None:
                runs.append((k, idx, Pending(part, lists.sources(), g.lam)))
    decisions = finish([r[2] for r in runs], found_inf) if runs else []
    out: list[list[ParamDecisions] | None] = [
        [None] * len(g.lists) if g.hyper.with_sums else None  # type: ignore[list-item]
        for g in groups
    ]
    for (k, idx, _), dec in zip(runs, decisions):
        lists, result, col = groups[k].lists, out[k], 0
        for i in idx:  # a part's columns are its parameters' columns, in input order
            width = lists.width(i)
            result[i] = (dec, col, width)  # type: ignore[index]
            col += width
    return out


def finish(pending: list[Pending], found_inf: Tensor | None = None) -> list[Decisions]:
    """Reduce, decide and project every pending step; one ``Decisions`` per entry.

    ``found_inf`` (a fused optimizer's skipped step under GradScaler) masks every projection."""
    out: list[Decisions | None] = [None] * len(pending)
    by_device: dict[torch.device, list[int]] = {}
    for k, p in enumerate(pending):
        by_device.setdefault(p.part.sums.device, []).append(k)
    for idx in by_device.values():
        todo = [pending[k] for k in idx]
        sums = (todo[0].part.sums if len(todo) == 1
                else torch.cat([p.part.sums for p in todo], dim=1))
        sums = reduce_columns(sums, [s for p in todo for s in p.sources])
        lam = _strengths(todo, sums.device)
        fired, ratio, coef = spd_ratio(sums[0], sums[1], sums[2], lam)
        if found_inf is not None:
            ok = found_inf.to(fired.device) == 0
            fired, ratio, coef = fired & ok, ratio * ok, coef * ok
        deviation = sums[1].clamp_min(0).sqrt()
        start = 0
        for k, p in zip(idx, todo):
            sl = slice(start, start + p.part.sums.shape[1])
            p.part.projector.project(coef[sl])
            out[k] = Decisions(fired[sl], ratio[sl], deviation[sl])
            start = sl.stop
    return out  # type: ignore[return-value]


_LAMS: Memo[Tensor] = Memo()


def _strengths(todo: list[Pending], device: torch.device) -> float | Tensor:
    """One Python float where every column has the same strength (no host-to-device copy),
    else a float64 vector per column, built once per layout."""
    first = todo[0].lam
    if isinstance(first, float) and all(p.lam == first for p in todo):
        return first  # the common case (``==`` is False for any sequence)
    per_column = [[p.lam] * p.part.sums.shape[1] if isinstance(p.lam, float) else list(p.lam)
                  for p in todo]
    flat = [x for xs in per_column for x in xs]
    if len(set(flat)) <= 1:
        return flat[0] if flat else 0.0
    key = (tuple(flat), device)
    return _LAMS.get(key, lambda: to_device(torch.tensor(flat, dtype=torch.float64), device))
