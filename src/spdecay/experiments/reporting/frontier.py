"""The ID-OOD frontier and the deviation over training, D(t).

* ``frontier.png``: every grid point of every method (mean over the seeds that ran it) as ID test
  against OOD headline metric (balanced accuracy), marker area growing with the deviation
  ||θ−θ₀||; WiSE-FT's alpha points joined into curves (alpha 0 = the pre-trained model, 1 = its
  AdamW run, where present).
* ``deviation_trace.png``: ||θ−θ₀|| against the training step per method (mean over seeds;
  the chosen setting thick, the other grid points thin).
* ``matched(records)``: OOD at matched ID accuracy and at matched deviation, by linear
  interpolation along each method's grid (points sorted by the matched quantity).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from spdecay.experiments.methods import METHODS, order, strength_text
from spdecay.experiments.methods import color as method_color
from spdecay.experiments.methods import label as method_label
from spdecay.experiments.protocol import select, setting_key
from spdecay.experiments.reporting.figure import _legend_outside, _pyplot, _save, _title


def _headline(records: list[dict]):
    from spdecay.experiments.headline import headline_for

    return headline_for(records)


def _ood(r: dict, key: str) -> float | None:
    if not r["ood"]:
        return None
    return r.get(f"ood_mean_{key}", statistics.fmean(m[key] for m in r["ood"].values()))


def grid_points(records: list[dict]) -> list[dict]:
    """Per grid point (method, strength, lr, alpha): mean ID test, OOD, deviation and ID
    validation over the seeds that ran it."""
    key = _headline(records).key
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if not r.get("diverged"):
            groups.setdefault(setting_key(r), []).append(r)
    out = []
    rank = {n: i for i, n in enumerate(order({k[0] for k in groups}))}  # the method table's order
    for (name, wd, lr, alpha), rs in sorted(groups.items(), key=lambda kv: rank[kv[0][0]]):
        oods = [v for v in (_ood(r, key) for r in rs) if v is not None]
        out.append({"method": name, "weight_decay": wd, "lr": lr, "alpha": alpha, "seeds": len(rs),
                    "id": statistics.fmean(r["test"][key] for r in rs),
                    "val": statistics.fmean(r["val"][key] for r in rs),
                    "ood": statistics.fmean(oods) if oods else math.nan,
                    "deviation": statistics.fmean(r["deviation"]["total"] for r in rs)})
    return out


def _interpolate(points: list[tuple[float, float]], x: float) -> float:
    """y at x by linear interpolation of (x, y) points (nan outside their range)."""
    points = sorted(points)
    if not points or x < points[0][0] - 1e-12 or x > points[-1][0] + 1e-12:
        return math.nan
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[0][1]


def matched(records: list[dict]) -> dict[str, dict]:
    """{"id": {"target", "per_method"}, "deviation": {...}}: OOD of every trained (or derived)
    method interpolated at one common ID test level (the highest ID that every method's grid
    reaches, if the grids overlap) and at one common deviation (the largest deviation inside
    every method's range)."""
    pts = [p for p in grid_points(records) if METHODS.get(p["method"]) and METHODS[p["method"]].kind in ("train", "derived")]
    by: dict[str, list[dict]] = {}
    for p in pts:
        by.setdefault(p["method"], []).append(p)
    by = {n: ps for n, ps in by.items() if len(ps) >= 2}
    out: dict[str, dict] = {}
    for what in ("id", "deviation"):
        if len(by) < 2:
            break
        low = max(min(p[what] for p in ps) for ps in by.values())
        high = min(max(p[what] for p in ps) for ps in by.values())
        if low > high:
            out[what] = {"target": math.nan, "per_method": {}, "overlap": False}
            continue
        target = high  # the highest ID / the largest deviation that every method reaches
        out[what] = {"target": target, "overlap": True,
                     "per_method": {n: _interpolate([(p[what], p["ood"]) for p in ps], target) for n, ps in by.items()}}
    return out


def plot_frontier(records: list[dict], path: Path) -> None:
    plt = _pyplot()
    h = _headline(records)
    pts = grid_points(records)
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    top = max((p["deviation"] for p in pts), default=1.0) or 1.0
    chosen = {(n, c["weight_decay"], c["lr"], c.get("alpha")) for n, c in select(records).items()}
    for name in dict.fromkeys(p["method"] for p in pts):
        mine = [p for p in pts if p["method"] == name]
        xs, ys = [100 * p["id"] for p in mine], [100 * p["ood"] for p in mine]
        sizes = [30 + 250 * p["deviation"] / top for p in mine]
        ax.scatter(xs, ys, s=sizes, color=method_color(name), alpha=0.6, label=method_label(name), edgecolors="none")
        for p in mine:
            if (name, p["weight_decay"], p["lr"], p["alpha"]) in chosen:
                ax.scatter([100 * p["id"]], [100 * p["ood"]], s=30 + 250 * p["deviation"] / top, facecolors="none",
                           edgecolors="black", linewidths=1.2)
        if any(p["alpha"] is not None for p in mine):  # WiSE-FT: one curve per base run
            base = METHODS[name].derived_from
            pre = [p for p in pts if p["method"] == "pretrained"]
            for wd, lr in dict.fromkeys((p["weight_decay"], p["lr"]) for p in mine):
                curve = sorted((p["alpha"], p["id"], p["ood"]) for p in mine if (p["weight_decay"], p["lr"]) == (wd, lr))
                end = [p for p in pts if p["method"] == base and (p["weight_decay"], p["lr"]) == (wd, lr)]
                if end:
                    curve.append((1.0, end[0]["id"], end[0]["ood"]))
                if pre:
                    curve.insert(0, (0.0, pre[0]["id"], pre[0]["ood"]))
                ax.plot([100 * c[1] for c in curve], [100 * c[2] for c in curve], color=method_color(name),
                        lw=0.8, alpha=0.7)
    ax.set_xlabel(f"ID test {h.label} (%)")
    ax.set_ylabel(f"OOD {h.label} (%, mean over OOD sets)")
    _title(ax, f"ID-OOD frontier: every grid point (marker area ∝ ‖θ−θ₀‖, max {top:.2f}; ringed: chosen)", 60)
    _legend_outside(ax)
    ax.grid(alpha=0.3)
    _save(plt, fig, path)


def plot_deviation_trace(records: list[dict], path: Path) -> bool:
    """D(t) per method; False (no file) when no record carries a trace."""
    traced = [r for r in records if r.get("deviation_trace") and not r.get("diverged")]
    if not traced:
        return False
    plt = _pyplot()
    chosen = {(n, c["weight_decay"], c["lr"], c.get("alpha")) for n, c in select(records).items()}
    groups: dict[tuple, list[dict]] = {}
    for r in traced:
        groups.setdefault(setting_key(r), []).append(r)
    fig, ax = plt.subplots(figsize=(7.5, 5))
    labelled: set[str] = set()
    for key, rs in groups.items():
        steps = rs[0]["deviation_trace"]["steps"]
        rows = [r["deviation_trace"]["total"] for r in rs if r["deviation_trace"]["steps"] == steps]
        mean = [statistics.fmean(col) for col in zip(*rows)]
        is_chosen = key in chosen
        name = key[0]
        ax.plot(steps, mean, color=method_color(name), lw=2.2 if is_chosen else 0.8, alpha=1.0 if is_chosen else 0.5,
                label=f"{method_label(name)} ({strength_text(name, key[1])}, lr {key[2]:g})" if is_chosen and name not in labelled
                else None)
        if is_chosen:
            labelled.add(name)
    ax.set_xlabel("training step")
    ax.set_ylabel("‖θ−θ₀‖ (backbone)")
    _title(ax, "Deviation from the pre-trained weights during training (thick: chosen setting)", 60)
    _legend_outside(ax)
    ax.grid(alpha=0.3)
    _save(plt, fig, path)
    return True


def write_frontier_plots(out: Path, records: list[dict]) -> list[Path]:
    records = [r for r in records if not r.get("diverged")]
    if not records:
        return []
    paths = []
    if any(r["ood"] for r in records):
        plot_frontier(records, out / "frontier.png")
        paths.append(out / "frontier.png")
    if plot_deviation_trace(records, out / "deviation_trace.png"):
        paths.append(out / "deviation_trace.png")
    return paths
