"""Statistics that state their resolution: every method against AdamW, paired by seed.

For each compared method and metric (the headline on ID test and every OOD set), over the seeds
both methods measured (the confirmatory seeds under ``--select-seeds``):

* the mean paired difference with a paired-t interval (``scipy.stats.t``) and its p-value
  (``scipy.stats.ttest_rel``);
* a paired bootstrap over seeds **and** examples, from the stored per-example predictions:
  each replicate draws the seeds with replacement and, independently, the examples of every
  evaluation set with replacement (the same examples for both methods and every seed, since
  every run is scored on the same sets), and recomputes the mean difference of balanced
  accuracy. So the interval covers the sampling error of the evaluation sets as well as the
  seed-to-seed variation. Seeded (``BOOTSTRAP_SEED``): the same files give the same interval.
  (``scipy.stats.bootstrap`` resamples one axis; this two-level design needs its own loop.)
* Holm's correction across the compared methods, per metric (``statsmodels`` ``multipletests``);
* the minimum detectable difference: the paired difference a two-sided paired t-test at
  alpha 0.05 detects with 80% power given the measured sd of the differences and the number of
  seeds (``statsmodels`` ``TTestPower``): sd 2.5 points gives 8.2 / 4.2 / 2.5 / 1.7 points for
  3 / 5 / 10 / 20 seeds.

Verdicts follow the MDE: a difference whose interval contains zero is reported with the size of
effect the study could have detected, never as "no effect" or "did not reproduce".
"""

from __future__ import annotations

import math
import statistics
import warnings
from pathlib import Path

import numpy as np

ALPHA = 0.05
POWER = 0.8
BOOTSTRAP_REPLICATES = 2000
BOOTSTRAP_SEED = 0
# The effect sizes the SPD paper reports on its OOD benchmarks, in points: a study whose MDE is
# larger cannot speak to them.
PAPER_EFFECT = (1.0, 2.0)


# -- the pieces --------------------------------------------------------------------------------
def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) of the paired-t interval (exact t quantile, any number of values);
    low = high = nan for fewer than two values."""
    from scipy import stats

    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + level / 2, len(values) - 1)) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def paired_p(mine: list[float], ref: list[float]) -> float:
    """Two-sided p-value of the paired t-test (``scipy.stats.ttest_rel``); nan for < 2 pairs
    or differences without spread."""
    from scipy import stats

    if len(mine) < 2:
        return math.nan
    diffs = [a - b for a, b in zip(mine, ref)]
    if statistics.pstdev(diffs) == 0:
        return 0.0 if statistics.fmean(diffs) != 0 else 1.0
    return float(stats.ttest_rel(mine, ref).pvalue)


def mde(sd: float, n: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """The minimum detectable paired difference (same unit as ``sd``): the true mean difference
    a two-sided paired t-test at ``alpha`` detects with probability ``power`` over ``n`` pairs."""
    from statsmodels.stats.power import TTestPower

    if n < 2 or not math.isfinite(sd):
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = TTestPower().solve_power(effect_size=None, nobs=n, alpha=alpha, power=power, alternative="two-sided")
    return float(np.asarray(d).item()) * sd


def holm(pvalues: list[float], alpha: float = ALPHA) -> list[float]:
    """Holm-adjusted p-values (``statsmodels.stats.multitest.multipletests``); nan stays nan."""
    from statsmodels.stats.multitest import multipletests

    index = [i for i, p in enumerate(pvalues) if not math.isnan(p)]
    out = [math.nan] * len(pvalues)
    if index:
        adjusted = multipletests([pvalues[i] for i in index], alpha=alpha, method="holm")[1]
        for i, p in zip(index, adjusted):
            out[i] = float(p)
    return out


def bootstrap_balanced(mine: list[np.ndarray], ref: list[np.ndarray], labels: np.ndarray,
                       replicates: int = BOOTSTRAP_REPLICATES, seed: int = BOOTSTRAP_SEED,
                       rng: np.random.Generator | None = None) -> np.ndarray:
    """Bootstrap replicates of the mean (over seeds) paired difference of balanced accuracy on
    one evaluation set. ``mine[s]`` / ``ref[s]``: per-example correctness (bool, N) of the two
    methods under seed s; ``labels``: the N true classes. Each replicate resamples the seeds
    and the examples (one draw of examples shared by both methods and all seeds)."""
    rng = rng or np.random.default_rng(seed)
    d = np.asarray(mine, dtype=np.float64) - np.asarray(ref, dtype=np.float64)  # S x N in {-1, 0, 1}
    n_seeds, n = d.shape
    classes = np.unique(labels)
    masks = np.stack([labels == k for k in classes]).astype(np.float64)  # K x N
    out = np.empty(replicates)
    chunk = max(1, min(replicates, 2_000_000 // max(1, n)))
    for start in range(0, replicates, chunk):
        b = min(chunk, replicates - start)
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=b).astype(np.float64)  # b x N
        per_seed = np.zeros((b, n_seeds))
        present = np.zeros(b)
        for mask in masks:
            w = counts * mask  # b x N: the drawn examples of class k
            size = w.sum(1)
            ok = size > 0
            per_seed[ok] += (w[ok] @ d.T) / size[ok, None]
            present += ok
        per_seed /= present[:, None]  # the mean recall difference over the classes drawn
        pick = rng.integers(0, n_seeds, size=(b, n_seeds))
        out[start : start + b] = np.take_along_axis(per_seed, pick, 1).mean(1)
    return out


# -- one study ---------------------------------------------------------------------------------
def _splits_of(label: str, records: list[dict]) -> list[str]:
    """The prediction keys a metric label is computed from (``OOD mean``: every OOD set)."""
    if label == "ID test":
        return ["test"]
    if label == "OOD mean":
        return [f"ood.{n}" for n in records[0]["ood"]]
    return [f"ood.{label.removeprefix('OOD ')}"]


def _bootstrap_interval(out: Path, label: str, records: list[dict], mine: list[dict], ref: list[dict],
                        level: float = 0.95) -> tuple[float, float] | None:
    """The percentile interval of the paired bootstrap over seeds and examples; None when a
    run's predictions are missing (or the headline is not balanced accuracy)."""
    from spdecay.experiments.training.predictions import correct, load

    loaded = [(load(out, a["run_id"]), load(out, b["run_id"])) for a, b in zip(mine, ref)]
    if any(a is None or b is None for a, b in loaded):
        return None
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    total = None
    splits = _splits_of(label, records)
    for split in splits:
        if any(f"{split}.scores" not in a or f"{split}.scores" not in b for a, b in loaded):
            return None
        ca = [correct(a, split)[0] for a, _ in loaded]
        cb = [correct(b, split)[0] for _, b in loaded]
        labels = loaded[0][0][f"{split}.labels"]
        reps = bootstrap_balanced(ca, cb, labels, rng=rng)
        total = reps if total is None else total + reps
    total = total / len(splits)
    tail = 100 * (1 - level) / 2
    return float(np.percentile(total, tail)), float(np.percentile(total, 100 - tail))


def compare(records: list[dict], out: Path | None = None, reference: str = "adamw") -> dict[str, dict[str, dict]]:
    """method -> metric label -> {"seeds", "diffs", "mean", "low", "high", "sd", "p", "p_holm",
    "mde", "boot_low", "boot_high"} (method minus ``reference``, both at their chosen settings,
    over the seeds both measured; fractions, not points). The bootstrap needs ``out`` (the
    stored predictions) and a balanced-accuracy headline; otherwise its bounds are nan."""
    from spdecay.experiments.headline import headline_for
    from spdecay.experiments.reporting.compared import metrics_of, paired_runs

    key = headline_for(records).key
    result: dict[str, dict[str, dict]] = {}
    for name, seeds, mine, ref in paired_runs(records, reference):
        result[name] = {}
        for label, get in metrics_of(records):
            a, b = [get(r) for r in mine], [get(r) for r in ref]
            diffs = [x - y for x, y in zip(a, b)]
            mean, low, high = t_interval(diffs)
            sd = statistics.stdev(diffs) if len(diffs) > 1 else math.nan
            entry = {"seeds": seeds, "diffs": diffs, "mean": mean, "low": low, "high": high, "sd": sd,
                     "p": paired_p(a, b), "mde": mde(sd, len(seeds)), "boot_low": math.nan, "boot_high": math.nan}
            if out is not None and key == "balanced_accuracy":
                boot = _bootstrap_interval(Path(out), label, records, mine, ref)
                if boot is not None:
                    entry["boot_low"], entry["boot_high"] = boot
            result[name][label] = entry
    labels = {label for per in result.values() for label in per}
    for label in labels:  # Holm across the compared methods, per metric
        names = [n for n in result if label in result[n]]
        for n, p in zip(names, holm([result[n][label]["p"] for n in names])):
            result[n][label]["p_holm"] = p
    return result


# -- words -------------------------------------------------------------------------------------
def _pp(x: float, sign: bool = True) -> str:
    return "-" if x is None or math.isnan(x) else (f"{100 * x:+.1f}" if sign else f"{100 * x:.1f}")


def _p(x: float) -> str:
    return "-" if math.isnan(x) else ("<0.001" if x < 0.001 else f"{x:.3f}")


def sentence(name: str, label: str, d: dict, reference: str = "AdamW") -> str:
    """One comparison in words, its resolution included:
    "AdamSPD - AdamW on OOD tweets = +0.8 [-0.4, +2.0] points ...; differences of >= 1.6 points
    would have been detected"."""
    n = len(d["seeds"])
    head = f"**{name} − {reference}** on {label} = {_pp(d['mean'])}"
    if n < 2:
        return (f"{head} points from one seed: no interval and no resolution; nothing about {name} vs "
                f"{reference} can be told from seed noise.")
    boot = "" if math.isnan(d.get("boot_low", math.nan)) else \
        f"; bootstrap over seeds and examples [{_pp(d['boot_low'])}, {_pp(d['boot_high'])}]"
    text = f"{head} [{_pp(d['low'])}, {_pp(d['high'])}] points (95% paired t over {n} seeds{boot})"
    p = d.get("p_holm", d.get("p", math.nan))
    if not math.isnan(p) and p < ALPHA:
        direction = "better" if d["mean"] > 0 else "worse"
        text += f": {direction} than {reference} (Holm-adjusted p = {_p(p)})"
    else:
        text += f": not distinguishable from zero (Holm-adjusted p = {_p(p)})"
    m = d.get("mde", math.nan)
    if not math.isnan(m):
        text += f"; differences of ≥ {_pp(m, sign=False)} points would have been detected (80% power, α = 0.05)"
        if 100 * m > max(PAPER_EFFECT) and (math.isnan(p) or p >= ALPHA):
            text += (f". This study cannot resolve effects of the size the SPD paper reports "
                     f"({PAPER_EFFECT[0]:g}-{PAPER_EFFECT[1]:g} points): their absence here is not evidence "
                     "against them")
    return text + "."


def section(records: list[dict], out: Path | None, reference: str = "adamw") -> str:
    """The report's statistics section (markdown); empty without a reference method."""
    from spdecay.experiments.methods import label as method_label
    from spdecay.experiments.reporting.markdown import _markdown

    result = compare(records, out, reference)
    if not result:
        return ""
    rows, words = [], []
    for name, per in result.items():
        for label, d in per.items():
            boot = "-" if math.isnan(d["boot_low"]) else f"[{_pp(d['boot_low'])}, {_pp(d['boot_high'])}]"
            ci = "-" if math.isnan(d["low"]) else f"[{_pp(d['low'])}, {_pp(d['high'])}]"
            rows.append([method_label(name), label, str(len(d["seeds"])), _pp(d["mean"]), ci, boot, _p(d["p"]),
                         _p(d.get("p_holm", math.nan)), _pp(d["sd"], sign=False), _pp(d["mde"], sign=False)])
            words.append(sentence(method_label(name), label, d, method_label(reference)))
    table = _markdown(["method", "on", "seeds", "mean difference", "95% interval (paired t)",
                       "95% bootstrap (seeds × examples)", "p (paired t)", "p (Holm)", "sd of differences", "MDE (80% power)"], rows)
    seeds = sorted({s for per in result.values() for d in per.values() for s in d["seeds"]})
    return "\n".join([
        f"## Paired differences against {method_label(reference)} (points)", "",
        f"Method minus {method_label(reference)}, both at their chosen settings, paired by seed over the seeds both "
        f"measured ({', '.join(map(str, seeds))}). Intervals: 95% paired t (exact t quantile) and a paired bootstrap "
        f"that resamples seeds and the evaluation examples ({BOOTSTRAP_REPLICATES} replicates, seeded, from the stored "
        "per-example predictions). p: two-sided paired t-test; Holm: corrected across the compared methods, per "
        "metric. MDE: the smallest true difference this design detects with 80% power at α = 0.05, from the measured "
        "sd of the paired differences.", "", table, "", *[f"- {w}" for w in words], ""])
