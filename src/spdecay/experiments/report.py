"""report.md: what the run was (preset, protocol, how the model was read), the comparison with
balanced accuracy as the headline (plain accuracy secondary), per-seed paired differences
against AdamW with 95% intervals and one sentence per method, what each method regularises,
and every sweep point for transparency."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from spdecay.experiments.config import CompareConfig
from spdecay.experiments.paired import REFERENCE, paired_differences, verdict
from spdecay.experiments.protocol import select
from spdecay.experiments.results_io import atomic_write_text

LABELS = {"adamw": "AdamW", "l2sp": "Adam L2-SP", "adamspd": "AdamSPD", "sgdspd": "SGD + SPD",
          "probe": "linear probe", "wise_ft": "WiSE-FT", "lpft": "LP-FT", "pretrained": "the pre-trained model (zero-shot)"}
# What each method regularises (and towards what); "strength" is its swept weight_decay.
REGULARISES = {
    "adamw": ("decoupled weight decay of backbone weight matrices and the head towards **zero** "
              "(biases and norms not decayed)", "decay rate"),
    "l2sp": ("loss-level penalty strength/2 · ‖θ−θ₀‖² on every backbone parameter towards the "
             "**pre-trained** value (LoRA adapters: towards their **initial** values, B = 0 and A "
             "at its random init, so it cannot collapse them); head: decay 0.01", "penalty weight λ"),
    "adamspd": ("selective projection towards the **pre-trained** value of each backbone tensor, "
                "only on steps where ⟨g, θ−θ₀⟩ < 0 and only by the step's growth of ‖θ−θ₀‖ (LoRA "
                "adapters: towards zero, as in the paper); head: decay 0.01", "projection strength λ"),
    "sgdspd": ("SGD with momentum plus the SPD add-on: the same selective projection as AdamSPD",
               "projection strength λ"),
    "probe": ("the backbone is **frozen** (features computed once); only a new linear head trains, "
              "with AdamW decay", "head decay"),
    "wise_ft": ("AdamW's fine-tuned backbone averaged with the **pre-trained** one (alpha 0.5, "
                "`spdecay.interpolate`; LoRA merged first); AdamW's head", "AdamW's decay rate"),
    "lpft": ("head trained alone for the first 25% of steps (`spdecay.LPFT`, backbone frozen), then "
             "AdamW on everything (decay towards zero)", "decay rate"),
}


def _fmt(values: list[float | None], digits: int = 3) -> str:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return "-"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _pp(x: float) -> str:
    return "-" if math.isnan(x) else f"{100 * x:+.1f}"


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def comparison_table(records: list[dict]) -> str:
    """Per method's chosen setting: balanced accuracies first, then plain accuracy, deviation,
    SPD statistics and time."""
    best = select(records)
    ood_names = list(records[0]["ood"]) if records else []
    many = len(ood_names) > 1
    header = ["method", "chosen strength", "lr", "seeds", "ID val bal. acc", "ID test bal. acc"]
    header += [f"OOD {n} bal. acc" for n in ood_names] + (["OOD mean bal. acc"] if many else [])
    header += ["ID test acc"] + [f"OOD {n} acc" for n in ood_names]
    header += ["‖θ−θ₀‖", "relative", "SPD fired", "SPD mean r", "time (s)"]
    rows = []
    for name, choice in best.items():
        recs = choice["records"]
        spd = [r.get("spd") for r in recs]
        row = [name, f"{choice['weight_decay']:g}", f"{choice['lr']:g}", str(len(recs)),
               _fmt([r["val"]["balanced_accuracy"] for r in recs]),
               _fmt([r["test"]["balanced_accuracy"] for r in recs])]
        row += [_fmt([r["ood"][n]["balanced_accuracy"] for r in recs]) for n in ood_names]
        if many:
            row.append(_fmt([r.get("ood_mean_balanced_accuracy") for r in recs]))
        row.append(_fmt([r["test"]["accuracy"] for r in recs]))
        row += [_fmt([r["ood"][n]["accuracy"] for r in recs]) for n in ood_names]
        row += [_fmt([r["deviation"]["total"] for r in recs], 2), _fmt([r["deviation"]["relative"] for r in recs], 4),
                _fmt([s.get("fraction_fired") if s else None for s in spd], 2),
                _fmt([s.get("mean_ratio") if s else None for s in spd], 3),
                _fmt([r["wall_time_s"] for r in recs], 0)]
        rows.append(row)
    return _markdown(header, rows)


def paired_section(records: list[dict]) -> tuple[str, list[str]]:
    """(table of paired differences in points, one sentence per method)."""
    diffs = paired_differences(records)
    if not diffs:
        return "", []
    rows = []
    for name, per_metric in diffs.items():
        for label, d in per_metric.items():
            ci = "-" if math.isnan(d["low"]) else f"[{_pp(d['low'])}, {_pp(d['high'])}]"
            per_seed = ", ".join(f"{s}: {_pp(x)}" for s, x in zip(d["seeds"], d["diffs"]))
            rows.append([name, label, _pp(d["mean"]), ci, per_seed])
    table = _markdown(["method", "balanced accuracy on", "mean difference (points)", "95% interval (paired t)",
                       "per seed"], rows)
    sentences = [verdict(LABELS.get(n, n), per_metric) for n, per_metric in diffs.items()]
    return table, sentences


def sweep_table(records: list[dict]) -> str:
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["optimizer"], r["hparams"]["weight_decay"], r["hparams"]["lr"]), []).append(r)
    chosen = {(n, c["weight_decay"], c["lr"]) for n, c in select(records).items()}
    rows = [
        [name + (" ✓" if (name, wd, lr) in chosen else ""), f"{wd:g}", f"{lr:g}", str(len(rs)),
         _fmt([r["val"]["balanced_accuracy"] for r in rs]), _fmt([r["test"]["balanced_accuracy"] for r in rs]),
         _fmt([r.get("ood_mean_balanced_accuracy") for r in rs]), _fmt([r["test"]["accuracy"] for r in rs]),
         _fmt([r["deviation"]["total"] for r in rs], 2)]
        for (name, wd, lr), rs in groups.items()
    ]
    return _markdown(["method (✓ chosen)", "strength", "lr", "seeds", "ID val bal. acc", "ID test bal. acc",
                      "OOD mean bal. acc", "ID test acc", "‖θ−θ₀‖"], rows)


def regularises_table(names: list[str]) -> str:
    return _markdown(["method", "what is regularised, towards what", "swept strength"],
                     [[n, *REGULARISES[n]] for n in names if n in REGULARISES])


def write_report(out: Path, config: CompareConfig, records: list[dict], data_notes: dict | None = None,
                 statement: str | None = None, note: str | None = None) -> str:
    """Write report.md and return the comparison table (also printed at the end of a run).
    ``data_notes``: run notes (rows skipped per data source, how the model was read, frozen
    unused weights); ``statement``: the preset's sentence on what the run can show; ``note``: a
    paragraph after it (e.g. how a partial study was assembled)."""
    if not records:
        atomic_write_text(out / "report.md", "# spdecay compare\n\nNo finished runs.\n")
        return "no finished runs"
    notes = dict(data_notes or {})
    if statement is None:
        from spdecay.experiments.tasks import task_defaults

        statement = task_defaults(config).statement
    table = comparison_table(records)
    paired, sentences = paired_section(records)
    methods = list(select(records))
    trained = [r for r in records if r["optimizer"] not in ("probe", "wise_ft")] or records
    steps, batch = trained[0]["steps"], trained[0]["batch_size"]
    schedule = trained[0].get("schedule", "linear")
    seeds = sorted({r["seed"] for r in records})
    sched_text = {"linear": "10% warm-up, then linear decay to zero",
                  "cosine": "10% warm-up, then cosine decay to 10% of the peak",
                  "constant": "10% warm-up, then constant"}.get(schedule, schedule)
    lines = [f"# spdecay compare: task `{config.task}`, preset `{config.preset}`", "", statement, ""]
    if note:
        lines += [note, ""]
    lines += [
        "## Protocol", "",
        f"- {steps} steps of batch {batch} per fine-tuning run; learning rate: {sched_text}.",
        f"- Seeds: {', '.join(map(str, seeds))} (of {config.seeds} planned). Every method saw the same data; "
        "a seed fixes the head initialisation, data order and dropout noise, so per-seed differences are paired.",
        "- Per method the strength (grids of equal size) is the one with the best **mean ID-validation balanced "
        "accuracy** over seeds; test and OOD numbers never influence the choice.",
        "- Balanced accuracy (mean recall over the classes) is the headline for validation, ID test and every OOD "
        "set; plain accuracy is a secondary column (OOD sets can be imbalanced).",
    ]
    if notes.get("model_name"):
        lines.append(f"- Model: `{notes['model_name']}`.")
    if notes.get("model_reading"):
        lines.append(f"- The model is read through {notes['model_reading']}.")
    if notes.get("unused_weights"):
        unused = notes["unused_weights"]
        lines.append(f"- {len(unused)} weights the forward pass never uses are frozen (not trained, anchored or "
                     f"counted): {', '.join(f'`{u}`' for u in unused[:6])}{', ...' if len(unused) > 6 else ''}.")
    if notes.get("batch_norm_layers"):
        lines.append(f"- The running statistics of the {notes['batch_norm_layers']} BatchNorm layers are re-estimated on the "
                     "ID training set for every fine-tuned and WiSE-FT model before evaluation (stale statistics "
                     "would otherwise dominate the scores); the probe's frozen backbone keeps the checkpoint's.")
    for source, n in (notes.get("dropped_rows") or {}).items():
        lines.append(f"- {source}: {n} rows with a missing text or label were skipped.")
    lines += ["", "## Comparison (balanced accuracy first; mean ± std over seeds)", "", table, "",
              "‖θ−θ₀‖: distance of the fine-tuned backbone from the pre-trained weights (head and frozen weights "
              "excluded; LoRA: of the adapters from their initial values), \"relative\" divides by ‖θ₀‖; \"SPD "
              "fired\": the mean fraction of tensors whose SPD condition held per step; \"SPD mean r\": the mean "
              "projection ratio.", ""]
    if paired:
        lines += [f"## Paired differences against {LABELS[REFERENCE]} (balanced accuracy, points)", "",
                  paired, "",
                  "Interval: mean ± t(0.975, n−1) · sd / √n over the n seeds. With 2-3 seeds the t quantile is "
                  "12.7 or 4.3, so the interval is wide: only a large, consistent difference can be told apart "
                  "from zero, and an interval containing zero is not evidence of no effect.", ""]
        lines += [f"- {s}" for s in sentences] + [""]
    lines += ["## What each method regularises", "", regularises_table(methods), "",
              "## Every sweep point", "", sweep_table(records), "",
              "## Plots", "",
              "![Paired differences against AdamW](paired_differences.png)", "",
              "![ID vs OOD balanced accuracy](id_vs_ood.png)", "",
              "![Per-layer deviation from the pre-trained weights](layer_deviation.png)", "",
              "![How often SPD fired per layer](spd_fired.png)", ""]
    atomic_write_text(out / "report.md", "\n".join(lines))
    return table
