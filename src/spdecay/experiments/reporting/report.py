"""report.md: what the run was (preset, protocol, how the model was read), the comparison with
balanced accuracy as the headline (plain accuracy secondary), per-seed paired differences
against AdamW with 95% intervals and one sentence per method, what each method regularises,
and every sweep point for transparency."""

from __future__ import annotations

import math
from pathlib import Path

from spdecay.experiments.config import CompareConfig
from spdecay.experiments.headline import headline_for
from spdecay.experiments.methods import METHODS, SPD_CONDITION_LONG, strength_text
from spdecay.experiments.methods import label as method_label
from spdecay.experiments.protocol import select, setting_key
from spdecay.experiments.reporting.markdown import _fmt, _markdown
from spdecay.experiments.reporting.paired import paired_differences, verdict
from spdecay.experiments.reporting.results_io import atomic_write_text
from spdecay.experiments.training.schedule import describe


def _pp(x: float) -> str:
    return "-" if math.isnan(x) else f"{100 * x:+.1f}"


def seeds_text(seeds: list[int], planned: int) -> str:
    """Which seeds ran, e.g. "1 seed: 0" or "2 of 3 planned seeds ran: 0, 1"."""
    ran = ", ".join(map(str, seeds))
    if len(seeds) >= planned:
        return f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''}: {ran}"
    return f"{len(seeds)} of {planned} planned seeds ran: {ran}"


def comparison_table(records: list[dict]) -> str:
    """Per method's chosen setting: balanced accuracies first, then plain accuracy, deviation,
    SPD statistics and time."""
    best = select(records)
    h = headline_for(records)  # the task's headline metric (balanced accuracy, mIoU, ...)
    ood_names = list(records[0]["ood"]) if records else []
    many = len(ood_names) > 1
    header = ["method", "chosen strength", "lr", "seeds", f"ID val {h.short}", f"ID test {h.short}"]
    header += [f"OOD {n} {h.short}" for n in ood_names] + ([f"OOD mean {h.short}"] if many else [])
    for _, short in h.secondary:
        header += [f"ID test {short}"] + [f"OOD {n} {short}" for n in ood_names]
    header += ["‖θ−θ₀‖", "relative", "SPD fired", "SPD mean r", "time (s)"]
    rows = []
    for name, choice in best.items():
        recs = choice["records"]
        spd = [r.get("spd") for r in recs]
        row = [method_label(name), strength_text(name, choice["weight_decay"])
               + ("" if choice.get("alpha") is None else f", α {choice['alpha']:g}"), f"{choice['lr']:g}", str(len(recs)),
               _fmt([r["val"][h.key] for r in recs]),
               _fmt([r["test"][h.key] for r in recs])]
        row += [_fmt([r["ood"][n][h.key] for r in recs]) for n in ood_names]
        if many:
            row.append(_fmt([r.get(f"ood_mean_{h.key}") for r in recs]))
        for key, _ in h.secondary:
            row.append(_fmt([r["test"].get(key) for r in recs]))
            row += [_fmt([r["ood"][n].get(key) for r in recs]) for n in ood_names]
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
            rows.append([method_label(name), label, _pp(d["mean"]), ci, per_seed])
    table = _markdown(["method", f"{headline_for(records).label} on", "mean difference (points)", "95% interval (paired t)",
                       "per seed"], rows)
    sentences = [verdict(method_label(n), per_metric) for n, per_metric in diffs.items()]
    return table, sentences


def sweep_table(records: list[dict]) -> str:
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault(setting_key(r), []).append(r)  # (method, strength, lr, WiSE-FT alpha or None)
    chosen = {(n, c["weight_decay"], c["lr"], c.get("alpha")) for n, c in select(records).items()}
    h = headline_for(records)
    second, second_short = h.secondary[0] if h.secondary else (h.key, h.short)
    rows = [
        [method_label(name) + (" ✓" if (name, wd, lr, alpha) in chosen else ""),
         strength_text(name, wd) + ("" if alpha is None else f", α {alpha:g}"), f"{lr:g}", str(len(rs)),
         _fmt([r["val"][h.key] for r in rs]), _fmt([r["test"][h.key] for r in rs]),
         _fmt([r.get(f"ood_mean_{h.key}") for r in rs]), _fmt([r["test"].get(second) for r in rs]),
         _fmt([r["deviation"]["total"] for r in rs], 2)]
        for (name, wd, lr, alpha), rs in groups.items()
    ]
    return _markdown(["method (✓ chosen)", "strength", "lr", "seeds", f"ID val {h.short}", f"ID test {h.short}",
                      f"OOD mean {h.short}", f"ID test {second_short}", "‖θ−θ₀‖"], rows)


def diverged_section(diverged: list[dict]) -> str:
    """The runs whose loss became non-finite: named, and said to be left out of every number."""
    rows = [f"- `{r['run_id']}`: loss {r['diverged']['loss']} at step {r['diverged']['step']}" for r in diverged]
    return "\n".join([f"## Diverged runs ({len(diverged)})", "",
                      "These runs' training loss became non-finite; they are left out of every mean, "
                      "selection, paired difference and plot above (a diverged model is no result):", "", *rows])


def regularises_table(names: list[str], notes: dict[str, str] | None = None) -> str:
    """What each method regularises (the method table's words, or the task's ``notes``)."""
    notes = notes or {}
    return _markdown(["method", "what is regularised, towards what", "swept strength"],
                     [[method_label(n), notes.get(n, METHODS[n].regularises), METHODS[n].strength]
                      for n in names if n in METHODS])


def write_report(out: Path, config: CompareConfig, records: list[dict], data_notes: dict | None = None,
                 statement: str | None = None, note: str | None = None) -> str:
    """Write report.md and return the comparison table (also printed at the end of a run).
    ``data_notes``: run notes (rows skipped per data source, how the model was read, frozen
    unused weights); ``statement``: the preset's sentence on what the run can show; ``note``: a
    paragraph after it (e.g. how a partial study was assembled)."""
    diverged = [r for r in records if r.get("diverged")]
    records = [r for r in records if not r.get("diverged")]
    if not records:
        text = "# spdecay compare\n\nNo finished runs.\n" + (f"\n{diverged_section(diverged)}" if diverged else "")
        atomic_write_text(out / "report.md", text)
        return "no finished runs" + (f" ({len(diverged)} diverged)" if diverged else "")
    from spdecay.experiments.tasks.registry import get_task, task_defaults

    notes = dict(data_notes or {})
    task = get_task(config.task)
    if statement is None:
        d = task_defaults(config)
        statement = task.statement(config, d) if task.statement is not None else d.statement
    table = comparison_table(records)
    methods = list(select(records))
    trained = [r for r in records if METHODS.get(r["optimizer"]) and METHODS[r["optimizer"]].kind == "train"] or records
    steps, batch = trained[0]["steps"], trained[0]["batch_size"]
    schedule = trained[0].get("schedule", "linear")
    seeds = sorted({r["seed"] for r in records})
    settings: dict[str, set] = {}
    for r in records:
        if METHODS.get(r["optimizer"]) is None or METHODS[r["optimizer"]].kind != "reference":
            settings.setdefault(r["optimizer"], set()).add((r["hparams"]["weight_decay"], r["hparams"]["lr"]))
    grid = max((len(v) for v in settings.values()), default=1)
    h = task.headline
    choice = ("- Per method the strength (grids of equal size) is the one with the best **mean ID-validation "
              f"{h.label}** over seeds; test and OOD numbers never influence the choice." if grid > 1 else
              "- One setting per method (its default strength and learning rate): nothing was selected.")
    lines = [f"# spdecay compare: task `{config.task}`, preset `{config.preset}`", "", statement, ""]
    if note:
        lines += [note, ""]
    lines += [
        "## Protocol", "",
        f"- {steps} steps of batch {batch} per fine-tuning run; learning rate: {describe(schedule)}.",
        f"- {seeds_text(seeds, config.seeds)}. Every method saw the same data; "
        "a seed fixes the head initialisation, data order and dropout noise, so per-seed differences are paired.",
        choice,
        f"- {h.definition}",
    ]
    from spdecay.experiments.reporting.evidence import protocol_lines

    lines += protocol_lines(config, records)  # --select-seeds, --resample-train
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
    lines += ["", f"## Comparison ({h.label} first; mean ± std over seeds)", "", table, "",
              "‖θ−θ₀‖: distance of the fine-tuned backbone from the pre-trained weights (head and frozen weights "
              "excluded; LoRA: of the adapters from their initial values), \"relative\" divides by ‖θ₀‖; \"SPD "
              f"fired\": the mean fraction of tensors whose SPD condition ({SPD_CONDITION_LONG}) held per step; "
              "\"SPD mean r\": the mean "
              "projection ratio.", ""]
    if diverged:
        lines += [diverged_section(diverged), ""]
    if task.report_section is not None:
        lines += [task.report_section(config, records), ""]
    from spdecay.experiments.reporting.evidence import plot_lines, sections

    lines += sections(out, config, records)  # paired statistics with their resolution, AUROC, grid spans
    lines += ["## What each method regularises", "", regularises_table(methods, task.method_notes), "",
              "## Every sweep point", "", sweep_table(records), "",
              "## Plots", "",
              "![Paired differences against AdamW](paired_differences.png)", "",
              f"![ID vs OOD {h.label}](id_vs_ood.png)", "",
              "![Per-layer deviation from the pre-trained weights](layer_deviation.png)", "",
              "![How often SPD fired per layer](spd_fired.png)", "", *plot_lines(records)]
    atomic_write_text(out / "report.md", "\n".join(lines))
    return table
