"""report.md: the comparison table (chosen hyper-parameters per method, mean +- std over seeds),
a balanced-accuracy table, and every sweep point for transparency."""

from __future__ import annotations

import statistics
from pathlib import Path

from spdecay.experiments.config import CompareConfig
from spdecay.experiments.protocol import select
from spdecay.experiments.results_io import atomic_write_text


def _fmt(values: list[float], digits: int = 3) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def comparison_tables(records: list[dict]) -> tuple[str, str]:
    """(main table, balanced-accuracy table) over each method's chosen setting."""
    best = select(records)
    ood_names = list(records[0]["ood"]) if records else []
    header = ["optimizer", "chosen wd", "lr", "seeds", "ID val acc", "ID test acc"]
    header += [f"OOD {n} acc" for n in ood_names] + ["OOD mean acc", "‖θ−θ₀‖", "relative", "SPD fired", "time (s)"]
    bal_header = ["optimizer", "ID test bal. acc"] + [f"OOD {n} bal. acc" for n in ood_names] + ["OOD mean bal. acc"]
    rows, bal_rows = [], []
    for name, choice in best.items():
        recs = choice["records"]
        fired = [r["spd"]["fraction_fired"] if r.get("spd") else None for r in recs]
        rows.append(
            [name, f"{choice['weight_decay']:g}", f"{choice['lr']:g}", str(len(recs)),
             _fmt([r["val"]["accuracy"] for r in recs]), _fmt([r["test"]["accuracy"] for r in recs])]
            + [_fmt([r["ood"][n]["accuracy"] for r in recs]) for n in ood_names]
            + [_fmt([r.get("ood_mean_accuracy") for r in recs]),
               _fmt([r["deviation"]["total"] for r in recs], 2),
               _fmt([r["deviation"]["relative"] for r in recs], 4),
               _fmt(fired, 2), _fmt([r["wall_time_s"] for r in recs], 0)]
        )
        bal_rows.append(
            [name, _fmt([r["test"]["balanced_accuracy"] for r in recs])]
            + [_fmt([r["ood"][n]["balanced_accuracy"] for r in recs]) for n in ood_names]
            + [_fmt([r.get("ood_mean_balanced_accuracy") for r in recs])]
        )
    return _markdown(header, rows), _markdown(bal_header, bal_rows)


def sweep_table(records: list[dict]) -> str:
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["optimizer"], r["hparams"]["weight_decay"], r["hparams"]["lr"]), []).append(r)
    rows = [
        [name, f"{wd:g}", f"{lr:g}", str(len(rs)), _fmt([r["val"]["accuracy"] for r in rs]),
         _fmt([r["test"]["accuracy"] for r in rs]), _fmt([r.get("ood_mean_accuracy") for r in rs]),
         _fmt([r["deviation"]["total"] for r in rs], 2)]
        for (name, wd, lr), rs in groups.items()
    ]
    return _markdown(["optimizer", "wd", "lr", "seeds", "ID val acc", "ID test acc", "OOD mean acc", "‖θ−θ₀‖"], rows)


def write_report(out: Path, config: CompareConfig, records: list[dict]) -> str:
    """Write report.md and return the main table (also printed at the end of a run)."""
    if not records:
        atomic_write_text(out / "report.md", "# spdecay compare\n\nNo finished runs.\n")
        return "no finished runs"
    main, balanced = comparison_tables(records)
    steps, batch = records[0]["steps"], records[0]["batch_size"]
    text = f"""# spdecay compare: task `{config.task}`

{steps} steps of batch {batch} per run; seeds: {config.seeds}. Per optimizer the regularisation
strength (`weight_decay`: AdamW's decoupled decay, L2-SP's penalty weight, SPD's projection
strength) is the sweep point with the best mean ID validation accuracy; every optimizer had the
same number of sweep points. Numbers are mean ± std over seeds. ‖θ−θ₀‖ is the distance of the
fine-tuned backbone from the pre-trained weights (head excluded), "relative" divides by ‖θ₀‖;
"SPD fired" is the mean fraction of layers whose SPD condition held per step.

## Comparison

{main}

## Balanced accuracy (mean recall over classes; OOD sets can be imbalanced)

{balanced}

## Every sweep point

{sweep_table(records)}

## Plots

![ID vs OOD accuracy](id_vs_ood.png)

![Per-layer deviation from the pre-trained weights](layer_deviation.png)

![How often SPD fired per layer](spd_fired.png)
"""
    atomic_write_text(out / "report.md", text)
    return main
