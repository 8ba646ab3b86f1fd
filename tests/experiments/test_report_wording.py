"""The report's and plots' wording and legibility (issue 22): SPD's condition written once and
the way the code tests it, method names from the method table in every table, strengths named
as the method names them (λ for SPD and L2-SP), which seeds ran, and figures whose titles,
legends and tick labels are inside the figure, outside the data and at least 8 pt."""

from __future__ import annotations

import pytest
import torch

from spdecay.experiments.config import CompareConfig
from spdecay.experiments.methods import METHODS, SPD_CONDITION, SPD_CONDITION_LONG, strength_text
from spdecay.experiments.reporting.report import seeds_text, write_report

LAYERS = [f"encoder.encoder.layer.{i}.{part}.weight" for i in range(6)
          for part in ("attention.self.query", "attention.self.key", "attention.self.value",
                       "attention.output.dense", "intermediate.dense", "output.dense")]


def _record(opt: str, seed: int, wd: float, test: float, ood: float, dev: float) -> dict:
    n = len(LAYERS)
    spd = None
    if opt == "adamspd":
        spd = {"fraction_fired": 0.4, "mean_ratio": 0.02, "layer_names": LAYERS,
               "layer_fired_fraction": [0.3 + 0.01 * i for i in range(n)]}
    frozen = opt == "probe"
    return {
        "run_id": f"{opt}-seed{seed}-wd{wd:g}-lr0.0003", "optimizer": opt, "seed": seed, "task": "sentiment",
        "hparams": {"weight_decay": wd, "lr": 3e-4},
        "val": {"accuracy": test, "balanced_accuracy": test},
        "test": {"accuracy": test, "balanced_accuracy": test},
        "ood": {"tweets": {"accuracy": ood, "balanced_accuracy": ood}},
        "ood_mean_accuracy": ood, "ood_mean_balanced_accuracy": ood,
        "deviation": {"total": 0.0 if frozen else dev, "relative": 0.0 if frozen else dev / 280},
        "spd": spd, "wall_time_s": 50.0, "steps": 120, "batch_size": 32, "schedule": "cosine",
        "layers": ({"names": [], "deviation": [], "relative": [], "ndim": []} if frozen else
                   {"names": LAYERS, "deviation": [dev / n] * n, "relative": [dev / 280 * (1 + i / n) for i in range(n)],
                    "ndim": [2] * n}),
    }


def _study(seeds: int) -> list[dict]:
    out = []
    for s in range(seeds):
        out += [_record("adamw", s, 0.01, 0.735 + 0.01 * s, 0.72, 7.5),
                _record("l2sp", s, 0.1, 0.745, 0.75 + 0.01 * s, 2.5),
                _record("adamspd", s, 1.0, 0.74, 0.73 - 0.01 * s, 6.3),
                _record("probe", s, 0.01, 0.70, 0.75, 0.0),
                _record("wise_ft", s, 0.01, 0.73, 0.74, 3.8)]
    return out


def test_the_condition_is_written_as_the_code_tests_it():
    from spdecay.spd.decision import spd_ratio

    # inner = <g, p - p0>: the code fires where it is positive (c = -inner < 0) ...
    inner = torch.tensor([1.0, -1.0], dtype=torch.float64)
    fired, _, _ = spd_ratio(inner, torch.ones(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64), 1.0)
    assert fired.tolist() == [True, False]
    # ... and every text says so: "⟨g, θ−θ₀⟩ > 0", never "< 0".
    assert SPD_CONDITION == "⟨g, θ−θ₀⟩ > 0"
    assert "c = −⟨g, θ−θ₀⟩ < 0" in SPD_CONDITION_LONG and SPD_CONDITION in SPD_CONDITION_LONG
    for name in ("adamspd",):
        assert SPD_CONDITION in METHODS[name].regularises
    assert all("⟨g, θ−θ₀⟩ <" not in m.regularises for m in METHODS.values())


def test_report_names_methods_by_label_and_says_which_seeds_ran(tmp_path):
    write_report(tmp_path, CompareConfig(preset="evidence", seeds=3), _study(3))
    report = (tmp_path / "report.md").read_text()
    assert "⟨g, θ−θ₀⟩ < 0" not in report.replace(SPD_CONDITION_LONG, "")
    assert SPD_CONDITION_LONG in report
    table_rows = [line for line in report.splitlines() if line.startswith("| ")]
    cells = {line.split("|")[1].strip().rstrip(" ✓") for line in table_rows}
    for code in ("adamw", "l2sp", "adamspd", "probe", "wise_ft"):
        assert code not in cells, code  # a code such as wise_ft is never a table's method name
        assert METHODS[code].label in cells
    assert "| AdamSPD | λ 1 |" in report and "| AdamW | decay 0.01 |" in report
    assert "3 seeds: 0, 1, 2." in report
    assert "(of 3 planned)" not in report


def test_seeds_text():
    assert seeds_text([0], 1) == "1 seed: 0"
    assert seeds_text([0, 1], 3) == "2 of 3 planned seeds ran: 0, 1"
    assert seeds_text([3, 4, 5], 3) == "3 seeds: 3, 4, 5"


def test_strengths_are_named_as_the_method_names_them():
    assert strength_text("adamspd", 1.0) == "λ 1"
    assert strength_text("l2sp", 0.1) == "λ 0.1"
    assert strength_text("adamw", 0.01) == "decay 0.01"


@pytest.fixture
def figures(monkeypatch):
    """The figures write_plots makes, laid out and drawn as saved (name -> Figure)."""
    pytest.importorskip("matplotlib")
    from spdecay.experiments.reporting import frontier, plots

    made: dict = {}
    real = plots._save

    class KeepOpen:  # pyplot, but the figure stays open (its Agg canvas keeps the renderer)
        def __init__(self, plt):
            self.plt = plt

        def close(self, fig):
            pass

    def save(plt, fig, path):
        real(KeepOpen(plt), fig, path)  # lays out and draws the figure as the PNG has it ...
        fig.canvas.draw()  # ... and again at the figure's own dpi, where the extents are measured
        made[path.name] = fig

    monkeypatch.setattr(plots, "_save", save)
    monkeypatch.setattr(frontier, "_save", save)
    yield made
    import matplotlib.pyplot as plt

    for fig in made.values():
        plt.close(fig)


def _inside(fig, artist) -> bool:
    box = artist.get_window_extent(fig.canvas.get_renderer())
    w, h = fig.bbox.width, fig.bbox.height
    return box.x0 >= -1 and box.y0 >= -1 and box.x1 <= w + 1 and box.y1 <= h + 1


@pytest.mark.parametrize("seeds", [1, 3])
def test_figures_are_legible(tmp_path, figures, seeds):
    from spdecay.experiments.reporting.plots import write_plots

    records = _study(seeds)
    for r in records:  # a D(t) trace, so the deviation plot is drawn too
        r["deviation_trace"] = {"steps": [0, 60, 120], "total": [0.0, r["deviation"]["total"] / 2, r["deviation"]["total"]]}
    write_plots(tmp_path, records)
    for name in ("id_vs_ood.png", "layer_deviation.png", "spd_fired.png", "paired_differences.png", "frontier.png",
                 "deviation_trace.png"):
        fig = figures[name]
        titles = [t for t in [fig._suptitle, *(ax.title for ax in fig.axes)] if t is not None and t.get_text()]
        assert titles, name
        for title in titles:
            assert _inside(fig, title), (name, title.get_text())
        for ax in fig.axes:
            (x0, x1), (y0, y1) = sorted(ax.get_xlim()), sorted(ax.get_ylim())
            labels = [t for t in ax.get_xticklabels() if t.get_text() and x0 <= t.get_position()[0] <= x1]
            labels += [t for t in ax.get_yticklabels() if t.get_text() and y0 <= t.get_position()[1] <= y1]
            labels = [t for t in labels if t.get_visible()]  # the ones drawn (inside the view limits)
            for label in labels:
                assert label.get_fontsize() >= 8, (name, label.get_text(), label.get_fontsize())
                assert _inside(fig, label), (name, label.get_text())
            assert ax.get_legend() is None, f"{name}: a legend inside the axes"
        assert fig.legends or name == "paired_differences.png", name
        for legend in fig.legends:
            renderer = fig.canvas.get_renderer()
            box = legend.get_window_extent(renderer)
            assert all(box.x0 >= ax.get_window_extent(renderer).x1 - 1 for ax in fig.axes), \
                f"{name}: the legend lies over the data"
            assert _inside(fig, legend), name
            texts = [t.get_text() for t in legend.get_texts()]
            assert all(t.get_fontsize() >= 8 for t in legend.get_texts())
            assert not any("wd " in t for t in texts), texts
            for t in texts if name != "frontier.png" else []:  # the frontier: every grid point, one colour
                if t.startswith(("AdamSPD", "Adam L2-SP")):
                    assert "(λ " in t, t
                if t.startswith("AdamW"):
                    assert "(decay " in t, t
    fired = figures["spd_fired.png"].axes[0].title.get_text().replace("\n", " ")
    assert SPD_CONDITION in fired
    paired = figures["paired_differences.png"]
    suptitle = paired._suptitle.get_text().replace("\n", " ")
    if seeds == 1:
        assert "one seed" in suptitle and "no interval" in suptitle
        for ax in paired.axes:  # one dot per method, nothing else
            assert sum(len(c.get_offsets()) for c in ax.collections) == 4
    else:
        assert f"over {seeds} seeds" in suptitle and "95% paired-t interval" in suptitle
