"""The closing block of ``spdecay compare`` on the terminal: a short table that fits in 100
columns (the full one is in report.md), what came out, how much a study of this size can
resolve (from the sampling error of its evaluation sets), and the report's path.

Sampling error: a balanced accuracy is the mean of K per-class recalls, each a proportion over
that class's n_k examples, so its standard error is about sqrt(b (1 - b) * sum_k 1 / n_k) / K
(each recall taken at the balanced accuracy b itself): about 2 points at 500 balanced examples.
Two methods' scores differ beyond sampling error (95%, unpaired: conservative, since both are
measured on the same examples) when they are more than 1.96 * sqrt(SE_a^2 + SE_b^2) apart.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from spdecay.experiments.methods import METHODS, strength_text
from spdecay.experiments.methods import label as method_label
from spdecay.experiments.reporting.compared import ood_getter
from spdecay.experiments.reporting.markdown import count

WIDTH = 100
Z95 = 1.96
# Measured on the sentiment evidence preset (shared/design-runner.md): the seed-to-seed sd of
# the paired AdamSPD - AdamW difference in tweets balanced accuracy, over 3 seeds.
SEED_SD_POINTS = 2.5
REFERENCE = "adamw"


def balanced_accuracy_se(balanced_accuracy: float, class_counts: list[int]) -> float:
    """Standard error of a balanced accuracy measured on ``class_counts`` examples per class."""
    counts = [n for n in class_counts if n > 0]
    if not counts:
        return math.nan
    b = min(max(balanced_accuracy, 0.0), 1.0)
    return math.sqrt(b * (1 - b) * sum(1 / n for n in counts)) / len(counts)


def _mean(values: list[float]) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.fmean(values) if values else math.nan


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _num(x: float, digits: int = 3) -> str:
    return "-" if math.isnan(x) else f"{x:.{digits}f}"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def _splits(records: list[dict]) -> list[tuple[str, str, object]]:
    """(column title, class-count key, getter) of the scores shown: ID test, then each OOD set
    (at most two; beyond that their mean)."""
    from spdecay.experiments.headline import headline_for

    key = headline_for(records).key
    ood = list(records[0].get("ood") or {})
    out: list[tuple[str, str, object]] = [("ID test", "test", lambda r: r["test"].get(key))]
    if len(ood) <= 2:
        out += [(_cut(f"OOD {n}", 14), n, ood_getter(n, key)) for n in ood]
    else:
        out.append(("OOD mean", "", lambda r: r.get(f"ood_mean_{key}")))
    return out


def closing_block(out: Path, records: list[dict], *, seconds: float | None = None, class_counts: dict | None = None,
                  config=None) -> str:
    """The text printed when a run ends (every line at most ``WIDTH`` characters)."""
    from spdecay.experiments.headline import headline_for
    from spdecay.experiments.protocol import select

    report = out / "report.md"
    records = [r for r in records if not r.get("diverged")]
    if not records:
        return f"spdecay compare: no finished runs.\nReport: {report}"
    headline = headline_for(records)
    best = select(records)
    seeds = sorted({r["seed"] for r in records})
    splits = _splits(records)
    rule = "─" * 72
    head = f"spdecay compare: task {records[0].get('task', '?')}"
    if config is not None:
        head += f", preset {config.preset}"
    head += (f", {len(seeds)} seed{'s' if len(seeds) > 1 else ''} ({', '.join(map(str, seeds))}), "
             f"{count(len(records), 'run')}")
    if seconds is not None:
        head += f" in {_duration(seconds)}"
    lines = [rule, _cut(head, WIDTH), ""]

    # The short table: headline metric per split, deviation, time.
    widths = [24, 13] + [max(9, len(t) + 1) for t, _, _ in splits] + [8, 9]
    titles = ["method", "strength"] + [t for t, _, _ in splits] + ["‖θ−θ₀‖", "time (s)"]

    def row(cells: list[str]) -> str:
        text = "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
        return _cut(text.rstrip(), WIDTH)

    lines.append(row(titles))
    means: dict[str, dict[str, float]] = {}
    for name, choice in best.items():
        recs = choice["records"]
        means[name] = {t: _mean([get(r) for r in recs]) for t, _, get in splits}
        deviation = _mean([r["deviation"]["total"] for r in recs])
        alpha = recs[0].get("alpha") if recs else None  # WiSE-FT: its mixing weight is the setting
        strength = f"α {alpha:g}" if alpha is not None else strength_text(name, choice["weight_decay"])
        lines.append(row([_cut(method_label(name), 24), strength,
                          *[_num(means[name][t]) for t, _, _ in splits], _num(deviation, 2),
                          f"{_mean([r['wall_time_s'] for r in recs]):.0f}"]))
    lines.append(_cut(f"({headline.label}, mean over seeds; the full table, paired differences and plots are in "
                      "the report)", WIDTH))

    lines += ["", "What came out:"]
    lines += _wrap(f"- Distance from the pre-trained weights (‖θ−θ₀‖): {_deviation_sentence(best)}.")
    counts = class_counts or {}
    thresholds: dict[str, float] = {}
    if headline.key == "balanced_accuracy":
        for title, key, _ in splits:
            if key in counts:
                ref = means.get(REFERENCE, {}).get(title, _mean([m[title] for m in means.values()]))
                se = balanced_accuracy_se(ref, counts[key])
                thresholds[title] = Z95 * math.sqrt(2) * se
    for title, _, _ in splits:
        lines += _wrap(f"- {title}: {_difference_sentence(means, title, thresholds.get(title))}.")
    lines += ["", "How much this run can resolve:"]
    lines += _wrap(_resolution(splits, counts, means, thresholds, len(seeds), headline.label))
    lines += ["", f"Report: {report}", rule]
    return "\n".join(lines)


def _deviation_sentence(best: dict[str, dict]) -> str:
    dev = {n: _mean([r["deviation"]["total"] for r in c["records"]]) for n, c in best.items()}
    ref = dev.get(REFERENCE)
    parts = []
    for name, d in sorted(dev.items(), key=lambda kv: -kv[1] if not math.isnan(kv[1]) else 0):
        text = f"{method_label(name)} {_num(d, 2)}"
        if METHODS.get(name) is not None and METHODS[name].kind == "probe":
            text += " (frozen backbone)"
        elif ref and name != REFERENCE and not math.isnan(d):
            text += f" ({100 * (d / ref - 1):+.0f}% vs {method_label(REFERENCE)})"
        parts.append(text)
    return ", ".join(parts)


def _difference_sentence(means: dict[str, dict[str, float]], title: str, threshold: float | None) -> str:
    scores = {n: m[title] for n, m in means.items() if not math.isnan(m[title])}
    if not scores:
        return "no scores"
    top = max(scores, key=scores.get)
    low = min(scores, key=scores.get)
    text = (f"best {method_label(top)} {scores[top]:.3f}, lowest {method_label(low)} {scores[low]:.3f} "
            f"(spread {100 * (scores[top] - scores[low]):.1f} points)")
    if REFERENCE not in scores or threshold is None or math.isnan(threshold):
        return text
    diffs = {n: 100 * (s - scores[REFERENCE]) for n, s in scores.items() if n != REFERENCE}
    beyond = [f"{method_label(n)} {d:+.1f}" for n, d in diffs.items() if abs(d) > 100 * threshold]
    within = [f"{method_label(n)} {d:+.1f}" for n, d in diffs.items() if abs(d) <= 100 * threshold]
    text += f"; vs {method_label(REFERENCE)}, beyond sampling error: {', '.join(beyond) or 'none'}"
    if within:
        text += f"; within it: {', '.join(within)}"
    return text


def _resolution(splits, counts: dict, means, thresholds: dict[str, float], n_seeds: int, label: str) -> str:
    if not thresholds:
        return (f"The sampling error of the {label} was not estimated (set sizes unknown, or not a balanced "
                "accuracy); see the report's paired differences.")
    sizes = ", ".join(f"{sum(counts[key])} {title} examples" for title, key, _ in splits if key in counts)
    ses = {t: thresholds[t] / (Z95 * math.sqrt(2)) for t in thresholds}
    se_text = ", ".join(f"±{100 * se:.1f} ({t})" for t, se in ses.items())
    need = ", ".join(f"{100 * x:.1f} ({t})" for t, x in thresholds.items())
    seeds = ("One seed" if n_seeds == 1 else f"{n_seeds} seeds") + f", evaluated on {sizes}."
    text = (f"{seeds} One {label} has a sampling error (one standard error) of about {se_text} points, so two "
            f"methods must differ by about {need} points before the difference exceeds sampling error alone "
            "(95%, unpaired).")
    if n_seeds == 1:
        text += (" One seed also hides seed-to-seed variation: in the sentiment evidence study the paired "
                 f"AdamSPD - AdamW difference on tweets varied by about {SEED_SD_POINTS:g} points (sd) between "
                 "seeds, so a difference inside that range is not a result either. For a verdict: --preset "
                 "evidence (3 seeds, paired intervals) or more seeds.")
    else:
        text += " The report's paired differences add the seed-to-seed variation (intervals over seeds)."
    return text


def _wrap(text: str, width: int = WIDTH) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width=width, subsequent_indent="  ", break_long_words=True) or [""]
