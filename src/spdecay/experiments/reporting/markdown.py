"""Text pieces every report section uses: a table, a mean ± sd cell, a counted noun."""

from __future__ import annotations

import math
import statistics


def _fmt(values: list[float | None], digits: int = 3) -> str:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return "-"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def count(n: int, noun: str) -> str:
    """'1 run', '16 runs'."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
