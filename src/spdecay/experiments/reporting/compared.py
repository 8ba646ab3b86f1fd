"""What a comparison compares: the task's headline metric on ID test and on each OOD set (and
their mean where there are several), as (label, getter) pairs. Used by the paired differences
(``paired.py``) and the report's statistics (``inference.py``)."""

from __future__ import annotations

from collections.abc import Iterator

from spdecay.experiments.headline import headline_for
from spdecay.experiments.protocol import select


def ood_getter(name: str, key: str):
    """The ``key`` metric of OOD set ``name`` of a record (None where the record lacks it)."""
    return lambda r: r["ood"][name].get(key)


def metrics_of(records: list[dict]) -> list[tuple[str, object]]:
    """(label, getter) of the headline metric compared (the task's: balanced accuracy, mIoU, ...):
    ID test and each OOD set."""
    key = headline_for(records).key
    ood_names = list(records[0]["ood"]) if records else []
    out: list[tuple[str, object]] = [("ID test", lambda r: r["test"][key])]
    out += [(f"OOD {n}", ood_getter(n, key)) for n in ood_names]
    if len(ood_names) > 1:
        out.append(("OOD mean", lambda r: r[f"ood_mean_{key}"]))
    return out


def paired_runs(records: list[dict], reference: str = "adamw") -> Iterator[tuple[str, list[int], list[dict], list[dict]]]:
    """(method, seeds, its records, ``reference``'s records) per method, both at their chosen
    settings, over the seeds both have, in seed order: the pairs every paired statistic uses."""
    best = select(records)
    if reference not in best:
        return
    ref = {r["seed"]: r for r in best[reference]["records"]}
    for name, choice in best.items():
        if name == reference:
            continue
        mine = {r["seed"]: r for r in choice["records"]}
        seeds = sorted(set(mine) & set(ref))
        if seeds:
            yield name, seeds, [mine[s] for s in seeds], [ref[s] for s in seeds]
