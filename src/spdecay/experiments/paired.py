"""Paired per-seed differences against AdamW, with 95% intervals (paired t).

Every method's chosen setting and AdamW's chosen setting were trained with the same seeds (the
same head initialisation, data order and dropout noise), so the per-seed difference removes the
seed-to-seed variation the methods share. With n seeds the interval is
``mean ± t_{0.975, n-1} * sd / sqrt(n)``; for n = 2-3 the t quantile is large (12.7, 4.3), so
only a large, consistent difference is distinguishable from zero.
"""

from __future__ import annotations

import math
import statistics

from spdecay.experiments.protocol import select

REFERENCE = "adamw"
# Two-sided 95% quantiles of Student's t, by degrees of freedom (1..30); beyond: normal.
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
         2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
         2.052, 2.048, 2.045, 2.042]


def t975(df: int) -> float:
    if df < 1:
        raise ValueError("a t interval needs at least 2 paired values")
    return _T975[df - 1] if df <= len(_T975) else 1.960


def interval(values: list[float]) -> tuple[float, float, float]:
    """(mean, low, high) of the paired-t 95% interval; low = high = nan for one value."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = t975(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def _ood_getter(name: str):
    return lambda r: r["ood"][name]["balanced_accuracy"]


def metrics_of(records: list[dict]) -> list[tuple[str, object]]:
    """(label, getter) of the balanced accuracies compared: ID test and each OOD set."""
    ood_names = list(records[0]["ood"]) if records else []
    out: list[tuple[str, object]] = [("ID test", lambda r: r["test"]["balanced_accuracy"])]
    out += [(f"OOD {n}", _ood_getter(n)) for n in ood_names]
    if len(ood_names) > 1:
        out.append(("OOD mean", lambda r: r["ood_mean_balanced_accuracy"]))
    return out


def paired_differences(records: list[dict], reference: str = REFERENCE) -> dict[str, dict[str, dict]]:
    """method -> metric label -> {"seeds", "diffs", "mean", "low", "high"} (method minus
    ``reference``, both at their chosen settings, over the seeds both have)."""
    best = select(records)
    if reference not in best:
        return {}
    ref = {r["seed"]: r for r in best[reference]["records"]}
    out: dict[str, dict[str, dict]] = {}
    for name, choice in best.items():
        if name == reference:
            continue
        mine = {r["seed"]: r for r in choice["records"]}
        seeds = sorted(set(mine) & set(ref))
        if not seeds:
            continue
        out[name] = {}
        for label, get in metrics_of(records):
            diffs = [get(mine[s]) - get(ref[s]) for s in seeds]
            mean, low, high = interval(diffs)
            out[name][label] = {"seeds": seeds, "diffs": diffs, "mean": mean, "low": low, "high": high}
    return out


def verdict(name: str, per_metric: dict[str, dict], reference: str = "AdamW") -> str:
    """One plain sentence: which differences are distinguishable from zero."""
    n = len(next(iter(per_metric.values()))["seeds"])
    if n < 2:
        return (f"**{name}**: one seed, so no interval; nothing about {name} vs {reference} can be "
                "distinguished from seed noise.")
    better = [m for m, d in per_metric.items() if d["low"] > 0]
    worse = [m for m, d in per_metric.items() if d["high"] < 0]
    parts = []
    if better:
        parts.append(f"better than {reference} on {', '.join(better)}")
    if worse:
        parts.append(f"worse than {reference} on {', '.join(worse)}")
    rest = [m for m in per_metric if m not in better and m not in worse]
    if not parts:
        return (f"**{name}**: no difference from {reference} is distinguishable from zero over {n} seeds "
                f"(every 95% interval contains 0).")
    tail = f"; on {', '.join(rest)} the interval contains 0" if rest else ""
    return f"**{name}**: {' and '.join(parts)} (95% interval excludes 0, {n} seeds){tail}."
