"""What every figure of a run shares: matplotlib (Agg backend), the font sizes, wrapped titles,
legends outside the axes, and saving a PNG atomically. Used by ``plots.py`` and ``frontier.py``."""

from __future__ import annotations

import io
from pathlib import Path

from spdecay.experiments.errors import require
from spdecay.experiments.reporting.results_io import atomic_write_bytes


def _pyplot():
    matplotlib = require("matplotlib", "the plots")
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


TICK_PT = 8  # the smallest text in a figure (tick labels, legends)
TITLE_PT = 10


def _title(target, text: str, chars: int, suptitle: bool = False) -> None:
    """A title wrapped to ``chars`` characters a line, so it stays inside the figure."""
    import textwrap

    wrapped = textwrap.fill(text, chars)
    if suptitle:
        target.suptitle(wrapped, fontsize=TITLE_PT)
    else:
        target.set_title(wrapped, fontsize=TITLE_PT)


def _legend_outside(ax) -> None:
    """The legend right of the axes (a figure legend the constrained layout makes room for),
    never over the data."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.figure.legend(handles, labels, fontsize=TICK_PT, loc="outside right upper")


def _save(plt, fig, path: Path) -> None:
    # Constrained layout keeps titles, outside legends and rotated tick labels inside the figure.
    if fig.get_layout_engine() is None:
        fig.set_layout_engine("constrained")
    for ax in fig.axes:
        ax.tick_params(labelsize=max(TICK_PT, 8))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
