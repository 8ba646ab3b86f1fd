"""The segmentation report section: per-class IoU of every method's chosen setting (ID test and
the mean over the OOD sets), mean over seeds."""

from __future__ import annotations

import statistics


def _mean(values: list) -> str:
    values = [v for v in values if v is not None and v == v]
    return f"{statistics.fmean(values):.3f}" if values else "-"


def per_class_section(records: list[dict], classes: list[str] | None = None) -> str:
    from spdecay.experiments.methods import label
    from spdecay.experiments.protocol import select

    best = select(records)
    if not best:
        return ""
    first = next(iter(best.values()))["records"][0]
    n = len(first["test"].get("class_iou") or [])
    if n == 0:
        return ""
    names = classes if classes is not None and len(classes) == n else [f"class {i}" for i in range(n)]
    header = ["method", "set"] + list(names)
    lines = ["## Per-class IoU (chosen setting, mean over seeds)", "",
             "Per class, IoU over every pixel of the split; \"-\": the class occurs in neither the labels nor "
             "the predictions of that set. \"OOD mean\" averages the OOD sets' per-class IoU.", "",
             "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for name, choice in best.items():
        recs = choice["records"]
        test = [_mean([r["test"]["class_iou"][c] for r in recs]) for c in range(n)]
        ood = [_mean([o["class_iou"][c] for r in recs for o in r["ood"].values()]) for c in range(n)]
        lines.append("| " + " | ".join([label(name), "ID test", *test]) + " |")
        if first["ood"]:
            lines.append("| " + " | ".join([label(name), "OOD mean", *ood]) + " |")
    return "\n".join(lines)
