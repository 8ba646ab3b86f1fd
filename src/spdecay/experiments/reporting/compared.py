"""What a comparison compares: the task's headline metric on ID test and on each OOD set (and
their mean where there are several), as (label, getter) pairs. Used by the paired differences
(``paired.py``) and the report's statistics (``inference.py``)."""

from __future__ import annotations

from spdecay.experiments.headline import headline_for


def _ood_getter(name: str, key: str):
    return lambda r: r["ood"][name][key]


def metrics_of(records: list[dict]) -> list[tuple[str, object]]:
    """(label, getter) of the headline metric compared (the task's: balanced accuracy, mIoU, ...):
    ID test and each OOD set."""
    key = headline_for(records).key
    ood_names = list(records[0]["ood"]) if records else []
    out: list[tuple[str, object]] = [("ID test", lambda r: r["test"][key])]
    out += [(f"OOD {n}", _ood_getter(n, key)) for n in ood_names]
    if len(ood_names) > 1:
        out.append(("OOD mean", lambda r: r[f"ood_mean_{key}"]))
    return out
