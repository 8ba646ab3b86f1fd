"""Paired per-seed differences against AdamW, with 95% intervals (paired t).

Every method's chosen setting and AdamW's chosen setting were trained with the same seeds (the
same head initialisation, data order and dropout noise), so the per-seed difference removes the
seed-to-seed variation the methods share. With n seeds the interval is
``mean ± t_{0.975, n-1} * sd / sqrt(n)`` (scipy's t quantile); for n = 2-3 the t quantile is
large (12.7, 4.3), so only a large, consistent difference is distinguishable from zero. The
report's full statistics (bootstrap, Holm, minimum detectable difference) are in
``reporting/inference.py``.
"""

from __future__ import annotations

from spdecay.experiments.reporting.compared import metrics_of, paired_runs

REFERENCE = "adamw"


def interval(values: list[float]) -> tuple[float, float, float]:
    """(mean, low, high) of the paired-t 95% interval (scipy's exact t quantile, see
    ``reporting/inference.py``); low = high = nan for one value."""
    from spdecay.experiments.reporting.inference import t_interval

    return t_interval(values)


def paired_differences(records: list[dict], reference: str = REFERENCE) -> dict[str, dict[str, dict]]:
    """method -> metric label -> {"seeds", "diffs", "mean", "low", "high"} (method minus
    ``reference``, both at their chosen settings, over the seeds both have)."""
    out: dict[str, dict[str, dict]] = {}
    for name, seeds, mine, ref in paired_runs(records, reference):
        out[name] = {}
        for label, get in metrics_of(records):
            diffs = [get(a) - get(b) for a, b in zip(mine, ref)]
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
