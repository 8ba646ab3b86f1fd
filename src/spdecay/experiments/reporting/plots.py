"""The run's pictures (matplotlib, Agg backend, PNG):

* ``paired_differences.png``: per method, the per-seed differences against AdamW (balanced
  accuracy on ID test and each OOD set) with their mean and 95% interval;
* ``id_vs_ood.png``: ID test balanced accuracy against mean OOD balanced accuracy per method;
* ``layer_deviation.png``: per-layer relative distance from the pre-trained weights;
* ``spd_fired.png``: per layer, the fraction of steps whose SPD condition fired.
"""

from __future__ import annotations

import re
import statistics
from pathlib import Path

from spdecay.experiments.methods import SPD_CONDITION, strength_text
from spdecay.experiments.methods import color as method_color
from spdecay.experiments.methods import label as method_label
from spdecay.experiments.protocol import select
from spdecay.experiments.reporting.figure import (
    TICK_PT,
    TITLE_PT,
    _legend_outside,
    _pyplot,
    _save,
    _title,
)


def short_name(name: str) -> str:
    for pattern, repl in (
        (r"^base_model\.model\.", ""), (r"^(bert|roberta|model|vit|deberta|encoder)\.", ""),
        (r"encoder\.layers?\.(\d+)\.", r"L\1."), (r"attention\.self\.", "att."),
        (r"attention\.output\.", "att.out."), (r"_blocks\.(\d+)\.", r"B\1."), (r"\.default", ""),
        (r"\.weight$", ""),  # the plots show weight matrices only
    ):
        name = re.sub(pattern, repl, name)
    return name


def _matrices(record: dict) -> list[int]:
    """Indices of weight matrices / kernels: biases and norm scales alternate with them and
    would turn the per-layer curves into a saw-tooth (they stay in results.jsonl)."""
    layers = record["layers"]
    return [i for i, d in enumerate(layers.get("ndim", [2] * len(layers["names"]))) if d >= 2]


def _chosen_first_seed(records: list[dict]) -> dict[str, dict]:
    return {name: min(c["records"], key=lambda r: r["seed"]) for name, c in select(records).items()}


def plot_id_vs_ood(records: list[dict], path: Path) -> None:
    from spdecay.experiments.headline import headline_for

    plt = _pyplot()
    h = headline_for(records)  # the task's headline metric
    fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
    for name, choice in select(records).items():
        color = method_color(name)
        every = [r for r in records if r["optimizer"] == name]
        ax.scatter([r["test"][h.key] for r in every],
                   [r.get(f"ood_mean_{h.key}", 0) for r in every], color=color, alpha=0.3, s=18)
        x = [r["test"][h.key] for r in choice["records"]]
        y = [r.get(f"ood_mean_{h.key}", 0) for r in choice["records"]]
        ax.errorbar(statistics.fmean(x), statistics.fmean(y),
                    xerr=statistics.stdev(x) if len(x) > 1 else None,
                    yerr=statistics.stdev(y) if len(y) > 1 else None,
                    fmt="o", ms=9, color=color, capsize=3,
                    label=f"{method_label(name)} ({strength_text(name, choice['weight_decay'])})")
    ax.set_xlabel(f"ID test {h.label}")
    ax.set_ylabel(f"mean OOD {h.label}")
    _title(ax, f"ID vs OOD {h.label} (large: chosen setting, small: every sweep point and seed)", 60)
    ax.grid(alpha=0.3)
    _legend_outside(ax)
    _save(plt, fig, path)


def _layer_axis(ax, names: list[str]) -> None:
    step = max(1, len(names) // 14)
    ticks = list(range(0, len(names), step))
    if names and ticks[-1] != len(names) - 1:
        ticks.append(len(names) - 1)  # label the last layer too (e.g. BERT's pooler, next to the head)
    ax.set_xticks(ticks)
    ax.set_xticklabels([short_name(names[i]) for i in ticks], rotation=60, ha="right", fontsize=TICK_PT)
    ax.set_xlim(-0.5, len(names) - 0.5)


def plot_layer_deviation(records: list[dict], path: Path) -> None:
    plt = _pyplot()
    chosen = _chosen_first_seed(records)
    fig, ax = plt.subplots(figsize=(11, 5), layout="constrained")
    names: list[str] = []
    for name, r in chosen.items():
        if not r["layers"]["names"]:
            continue  # the probe: nothing moved
        keep = _matrices(r)
        names = [r["layers"]["names"][i] for i in keep] or names
        relative = [r["layers"]["relative"][i] for i in keep]
        emphasis = name in ("adamw", "adamspd")
        ax.plot(range(len(relative)), relative, color=method_color(name),
                lw=1.4 if emphasis else 0.9, alpha=1.0 if emphasis else 0.6,
                label=f"{method_label(name)} ({strength_text(name, r['hparams']['weight_decay'])}): "
                      f"total ‖θ−θ₀‖ = {r['deviation']['total']:.2f}")
    ax.set_yscale("log")
    ax.set_ylabel("‖θ−θ₀‖ / ‖θ₀‖ per weight matrix")
    _title(ax, "Distance of each layer from the pre-trained weights (chosen setting, first seed)", 80)
    _layer_axis(ax, names)
    ax.grid(alpha=0.3, which="both")
    _legend_outside(ax)
    _save(plt, fig, path)


def plot_spd_fired(records: list[dict], path: Path) -> None:
    plt = _pyplot()
    chosen = {n: r for n, r in _chosen_first_seed(records).items() if r.get("spd")}
    fig, ax = plt.subplots(figsize=(11, 5), layout="constrained")
    if not chosen:
        ax.text(0.5, 0.5, "no SPD optimizer in this run", ha="center", va="center")
        ax.set_axis_off()
    names: list[str] = []
    width = 0.8 / max(1, len(chosen))
    for k, (name, r) in enumerate(chosen.items()):
        ndim = dict(zip(r["layers"]["names"], r["layers"]["ndim"]))
        keep = [i for i, n in enumerate(r["spd"]["layer_names"]) if ndim.get(n, 2) >= 2]
        names = [r["spd"]["layer_names"][i] for i in keep]
        frac = [r["spd"]["layer_fired_fraction"][i] for i in keep]
        ax.bar([i + k * width for i in range(len(frac))], frac, width=width, color=method_color(name),
               label=f"{method_label(name)} ({strength_text(name, r['hparams']['weight_decay'])}): "
                     f"mean {r['spd']['fraction_fired']:.2f}")
    if chosen:
        ax.set_ylim(0, 1)
        ax.set_ylabel("fraction of steps SPD fired")
        _title(ax, f"Selective: how often SPD's condition {SPD_CONDITION} held, per weight matrix "
                   "(chosen setting, first seed)", 80)
        _layer_axis(ax, names)
        ax.grid(alpha=0.3, axis="y")
        _legend_outside(ax)
    _save(plt, fig, path)


def plot_paired_differences(records: list[dict], path: Path) -> None:
    from spdecay.experiments.reporting.paired import paired_differences

    plt = _pyplot()
    diffs = paired_differences(records)
    labels = list(next(iter(diffs.values()))) if diffs else []
    fig, axes = plt.subplots(1, max(1, len(labels)), figsize=(3.2 * max(1, len(labels)) + 1, 4.5), squeeze=False,
                             layout="constrained")
    if not diffs:
        axes[0][0].text(0.5, 0.5, "no AdamW reference or no other method", ha="center", va="center")
        axes[0][0].set_axis_off()
    for ax, label in zip(axes[0], labels):
        for k, (name, per_metric) in enumerate(diffs.items()):
            d = per_metric[label]
            color = method_color(name)
            if len(d["diffs"]) == 1:  # one seed: its difference is the only dot (no interval)
                ax.scatter([k], [100 * d["diffs"][0]], color=color, marker="o", s=36)
                continue
            ax.scatter([k] * len(d["diffs"]), [100 * x for x in d["diffs"]], color=color, alpha=0.45, s=16)
            if d["low"] == d["low"]:  # not nan: an interval exists
                ax.errorbar(k + 0.15, 100 * d["mean"], yerr=[[100 * (d["mean"] - d["low"])], [100 * (d["high"] - d["mean"])]],
                            fmt="o", color=color, capsize=3, ms=6)
            else:
                ax.scatter([k + 0.15], [100 * d["mean"]], color=color, marker="o", s=36)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(range(len(diffs)))
        ax.set_xticklabels([method_label(n) for n in diffs], rotation=40, ha="right", fontsize=8)
        ax.set_title(label, fontsize=TITLE_PT)
        ax.grid(alpha=0.3, axis="y")
    from spdecay.experiments.headline import headline_for

    axes[0][0].set_ylabel(f"{headline_for(records).label} minus AdamW's (points)")
    n_seeds = max((len(d["diffs"]) for per_metric in diffs.values() for d in per_metric.values()), default=0)
    if n_seeds > 1:
        what = (f"Paired per-seed differences against AdamW over {n_seeds} seeds (small dots: seeds; "
                "large dot and bar: mean and 95% paired-t interval)")
    else:
        what = ("Paired differences against AdamW, one seed: each dot is that seed's difference; no interval "
                "(it needs two or more seeds)")
    _title(fig, what, int(11 * (3.2 * max(1, len(labels)) + 1)), suptitle=True)
    _save(plt, fig, path)


def write_plots(out: Path, records: list[dict]) -> list[Path]:
    records = [r for r in records if not r.get("diverged")]  # no result to draw
    if not records:
        return []
    paths = [out / "id_vs_ood.png", out / "layer_deviation.png", out / "spd_fired.png", out / "paired_differences.png"]
    plot_id_vs_ood(records, paths[0])
    plot_layer_deviation(records, paths[1])
    plot_spd_fired(records, paths[2])
    plot_paired_differences(records, paths[3])
    from spdecay.experiments.reporting.frontier import write_frontier_plots

    paths += write_frontier_plots(out, records)  # frontier.png, deviation_trace.png
    return paths
