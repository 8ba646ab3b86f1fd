"""The report's evidence sections (issue 18): which seeds chose and which measured, how the
training data was drawn, AUROC beside balanced accuracy, what each method's grid spans, OOD at
matched ID accuracy and matched deviation, and the frontier / D(t) plots. The paired
statistics are ``reporting/inference.py``'s."""

from __future__ import annotations

import math
from pathlib import Path

from spdecay.experiments.config import CompareConfig
from spdecay.experiments.methods import METHODS
from spdecay.experiments.methods import label as method_label
from spdecay.experiments.protocol import select


def _seeds(seeds) -> str:
    seeds = sorted(seeds)
    if len(seeds) > 3 and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}-{seeds[-1]}"
    return ", ".join(map(str, seeds)) or "none"


def protocol_lines(config: CompareConfig, records: list[dict]) -> list[str]:
    """Protocol bullets: the selection / confirmation split of the seeds and the training draw."""
    lines = []
    if getattr(config, "select_seeds", 0):
        chose = {r["seed"] for r in records if r.get("role") == "selection"}
        measured = {r["seed"] for r in records if r.get("role") == "confirmation"}
        lines.append(f"- **Selection separated from measurement** (`--select-seeds {config.select_seeds}`): seeds "
                     f"{_seeds(chose)} ran every grid point and chose each method's setting on ID validation; seeds "
                     f"{_seeds(measured)} ran only the chosen settings and are the only ones in the comparison, the "
                     "paired differences and their statistics."
                     + ("" if measured else " No confirmatory seed has finished yet: the numbers below are the "
                        "selection seeds' own (optimistic: chosen and measured on the same seeds)."))
    if getattr(config, "resample_train", False):
        lines.append("- `--resample-train`: each seed drew its own training subset from the pool of every "
                     "row outside validation and test (the same subset for every method of that seed), so the "
                     "seed-to-seed spread includes the draw of the training data.")
    return lines


def auroc_table(records: list[dict]) -> str:
    """AUROC of every chosen setting (binary tasks), mean ± sd over the reported seeds."""
    from spdecay.experiments.reporting.markdown import _fmt, _markdown

    if not any("auroc" in r["test"] for r in records):
        return ""
    ood_names = list(records[0]["ood"])
    rows = []
    for name, choice in select(records).items():
        rs = choice["records"]
        rows.append([method_label(name), _fmt([r["test"].get("auroc") for r in rs])]
                    + [_fmt([r["ood"][n].get("auroc") for r in rs]) for n in ood_names])
    return _markdown(["method", "ID test AUROC"] + [f"OOD {n} AUROC" for n in ood_names], rows)


def _span(points: list[dict], key: str, scale: float = 100.0, digits: int = 1) -> str:
    vals = [p[key] for p in points if not math.isnan(p[key])]
    return "-" if not vals else f"{scale * min(vals):.{digits}f} – {scale * max(vals):.{digits}f}"


def grid_span_table(records: list[dict]) -> str:
    """Per method: its grid and what it spans (deviation, ID test, OOD) over the grid points."""
    from spdecay.experiments.reporting.frontier import grid_points
    from spdecay.experiments.reporting.markdown import _markdown

    pts = grid_points(records)
    rows = []
    for name in dict.fromkeys(p["method"] for p in pts):
        mine = [p for p in pts if p["method"] == name]
        if METHODS.get(name) and METHODS[name].kind == "reference":
            continue
        settings = ", ".join(
            f"{p['weight_decay']:g}/{p['lr']:g}" + ("" if p["alpha"] is None else f"/α{p['alpha']:g}") for p in mine)

        rows.append([method_label(name), str(len(mine)), settings, _span(mine, "deviation", 1.0, 2), _span(mine, "id"),
                     _span(mine, "ood")])
    return _markdown(["method", "points", "strength/lr(/alpha)", "‖θ−θ₀‖ range", "ID test range (%)",
                      "OOD range (%)"], rows)


def matched_text(records: list[dict]) -> str:
    from spdecay.experiments.reporting.frontier import matched
    from spdecay.experiments.reporting.markdown import _markdown

    m = matched(records)
    if not m:
        return ""
    parts = []
    for what, words in (("id", "matched ID test accuracy"), ("deviation", "matched deviation")):
        if what not in m:
            continue
        entry = m[what]
        if not entry["overlap"]:
            parts.append(f"- At {words}: the methods' grids do not overlap in this quantity, so no common level "
                         "exists; see the frontier plot.")
            continue
        target = f"{100 * entry['target']:.1f}%" if what == "id" else f"‖θ−θ₀‖ = {entry['target']:.2f}"
        rows = [[method_label(n), "-" if math.isnan(v) else f"{100 * v:.1f}"] for n, v in entry["per_method"].items()]
        parts += [f"OOD at {words} ({target}: the highest level every method's grid reaches; each method's OOD "
                  "is linearly interpolated between its two neighbouring grid points, means over seeds):", "",
                  _markdown(["method", "OOD (%)"], rows), ""]
    return "\n".join(parts)


def sections(out: Path, config: CompareConfig, records: list[dict]) -> list[str]:
    """The statistics and evidence sections, in report order (markdown lines)."""
    from spdecay.experiments.reporting.inference import section

    lines: list[str] = []
    stats = section(records, out)
    if stats:
        lines += [stats, ""]
    aur = auroc_table(records)
    if aur:
        lines += ["## AUROC (binary task; chosen settings, mean ± std over seeds)", "", aur, ""]
    if len({(r["hparams"]["weight_decay"], r["hparams"]["lr"], r["hparams"].get("alpha")) for r in records}) > 1:
        lines += ["## What each grid spans", "",
                  "Every grid point's mean over the seeds that ran it: tuning is comparable when the methods' grids "
                  "span similar ranges of deviation and ID accuracy.", "", grid_span_table(records), ""]
        text = matched_text(records)
        if text:
            lines += ["## OOD at matched ID accuracy and matched deviation", "", text, ""]
    return lines


def plot_lines(records: list[dict]) -> list[str]:
    """The frontier and D(t) plots (written after the report by ``write_plots``)."""
    records = [r for r in records if not r.get("diverged")]
    lines = []
    if any(r["ood"] for r in records):
        lines += ["![ID-OOD frontier: every grid point](frontier.png)", ""]
    if any(r.get("deviation_trace") for r in records):
        lines += ["![Deviation during training, D(t)](deviation_trace.png)", ""]
    return lines
