"""The report's statistics (paired per-seed differences against AdamW, paired-t intervals, one
sentence per method), its balanced-accuracy headline, the regularisation table and the plots,
on synthetic records with hand-derived expectations."""

from __future__ import annotations

import math
import statistics

import pytest

from spdecay.experiments.config import CompareConfig
from spdecay.experiments.reporting.paired import interval, paired_differences, verdict
from spdecay.experiments.reporting.report import comparison_table, write_report


def _record(opt, seed, wd, val, test, ood, *, acc=None):
    return {"run_id": f"{opt}-seed{seed}-wd{wd:g}", "optimizer": opt, "seed": seed,
            "hparams": {"weight_decay": wd, "lr": 1e-4},
            "val": {"accuracy": acc if acc is not None else val, "balanced_accuracy": val},
            "test": {"accuracy": acc if acc is not None else test, "balanced_accuracy": test},
            "ood": {"tweets": {"accuracy": acc if acc is not None else ood, "balanced_accuracy": ood}},
            "ood_mean_accuracy": ood, "ood_mean_balanced_accuracy": ood,
            "deviation": {"total": 1.0, "relative": 0.1}, "spd": None, "wall_time_s": 5.0,
            "steps": 10, "batch_size": 4, "schedule": "cosine",
            "layers": {"names": ["w"], "deviation": [1.0], "relative": [0.1], "ndim": [2]}}


def _study():
    adamw = [(0.70, 0.60), (0.72, 0.61), (0.74, 0.65)]
    spd = [(0.72, 0.66), (0.73, 0.66), (0.77, 0.71)]  # OOD +6, +5, +6 points; ID +2, +1, +3
    records = []
    for seed in range(3):
        records.append(_record("adamw", seed, 0.01, 0.8, *adamw[seed]))
        records.append(_record("adamw", seed, 0.1, 0.7, 0.99, 0.99))  # worse on val: never chosen
        records.append(_record("adamspd", seed, 1.0, 0.8, *spd[seed]))
        records.append(_record("adamspd", seed, 2.0, 0.79, 0.0, 0.0))
    return records


def test_paired_t_interval_uses_the_exact_t_quantile_beyond_30_seeds():
    # The old hand table fell back to 1.96 beyond 30 degrees of freedom (anti-conservative).
    stats = pytest.importorskip("scipy.stats")
    values = [0.01 * ((7 * i) % 11 - 5) for i in range(41)]  # 40 degrees of freedom
    mean, low, high = interval(values)
    half = stats.t.ppf(0.975, 40) * statistics.stdev(values) / math.sqrt(41)
    assert (low, high) == pytest.approx((mean - half, mean + half), rel=1e-12)
    assert stats.t.ppf(0.975, 40) > 2.02  # noticeably wider than the normal quantile 1.96


def test_paired_differences_use_the_chosen_settings_and_a_paired_t_interval():
    diffs = paired_differences(_study())
    assert list(diffs) == ["adamspd"]
    ood = diffs["adamspd"]["OOD tweets"]
    assert ood["seeds"] == [0, 1, 2]
    assert ood["diffs"] == pytest.approx([0.06, 0.05, 0.06])
    half = 4.303 * statistics.stdev([0.06, 0.05, 0.06]) / math.sqrt(3)
    assert ood["mean"] == pytest.approx(0.17 / 3)
    assert (ood["low"], ood["high"]) == pytest.approx((0.17 / 3 - half, 0.17 / 3 + half), abs=1e-4)
    assert diffs["adamspd"]["ID test"]["diffs"] == pytest.approx([0.02, 0.01, 0.03])


def test_verdicts_say_plainly_what_is_distinguishable():
    diffs = paired_differences(_study())["adamspd"]
    sentence = verdict("AdamSPD", diffs)
    # OOD: +5.7 ± 1.4 points excludes 0; ID: +2 ± 2.5 (sd 1 point, t = 4.303) does not.
    assert "better than AdamW on OOD tweets" in sentence and "3 seeds" in sentence
    assert "on ID test the interval contains 0" in sentence
    noisy = {"ID test": {"seeds": [0, 1], "diffs": [0.05, -0.04], **dict(zip(("mean", "low", "high"),
                                                                             interval([0.05, -0.04])))}}
    assert "no difference from AdamW is distinguishable from zero" in verdict("L2-SP", noisy)
    one = {"ID test": {"seeds": [0], "diffs": [0.05], "mean": 0.05, "low": math.nan, "high": math.nan}}
    assert "one seed" in verdict("L2-SP", one)


def test_headline_is_balanced_accuracy_and_accuracy_is_secondary():
    records = [_record("adamw", 0, 0.01, 0.6, 0.55, 0.52, acc=0.9)]
    header = comparison_table(records).splitlines()[0].split(" | ")
    assert header[4:7] == ["ID val bal. acc", "ID test bal. acc", "OOD tweets bal. acc"]
    assert header.index("ID test acc") > header.index("OOD tweets bal. acc")


def test_selection_is_on_validation_balanced_accuracy():
    from spdecay.experiments.protocol import select

    records = [_record("adamw", 0, 0.01, 0.70, 0.5, 0.5, acc=0.95), _record("adamw", 0, 0.1, 0.75, 0.5, 0.5, acc=0.6)]
    assert select(records)["adamw"]["weight_decay"] == 0.1  # higher balanced, lower plain accuracy


def test_report_has_protocol_statement_paired_section_and_regularisation_table(tmp_path):
    config = CompareConfig(preset="evidence", seeds=3, optimizers=["adamw", "adamspd"])
    write_report(tmp_path, config, _study(),
                 data_notes={"model_reading": "mean pooling", "unused_weights": ["pooler.dense.weight"]})
    report = (tmp_path / "report.md").read_text()
    assert "The evidence preset" in report
    assert "mean ID-validation balanced" in report and "The model is read through mean pooling" in report
    assert "`pooler.dense.weight`" in report
    assert "## Paired differences against AdamW" in report and "| AdamSPD | OOD tweets | 3 | +5.7 |" in report
    assert "**AdamSPD − AdamW** on OOD tweets = +5.7 [+4.2, +7.1] points" in report
    assert "better than AdamW (Holm-adjusted p = 0.003)" in report
    # ID: the interval contains 0 and the MDE (3.3 points) exceeds the paper's effects: said so
    assert "differences of ≥ 3.3 points would have been detected" in report
    assert "cannot resolve effects of the size the SPD paper reports" in report
    assert "did not reproduce" not in report
    assert "## What each method regularises" in report and "selective projection" in report


def test_quick_report_says_it_is_smoke_scale(tmp_path):
    write_report(tmp_path, CompareConfig(quick=True), _study())
    assert "smoke-scale run" in (tmp_path / "report.md").read_text()


def test_plots_include_the_paired_differences(tmp_path):
    pytest.importorskip("matplotlib")
    from spdecay.experiments.reporting.plots import write_plots

    records = _study() + [_record("probe", s, 0.01, 0.7, 0.6, 0.6) | {"layers": {"names": [], "deviation": [],
                                                                                 "relative": [], "ndim": []}}
                          for s in range(3)]
    paths = write_plots(tmp_path, records)
    assert tmp_path / "paired_differences.png" in paths
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_merge_runs_combines_a_study_split_over_processes(tmp_path):
    from spdecay.experiments import merge_runs
    from spdecay.experiments.reporting.results_io import read_records, write_records

    records = _study()
    parts = {"a": [r for r in records if r["seed"] == 0], "b": [r for r in records if r["seed"] > 0]}
    for name, recs in parts.items():
        folder = tmp_path / name
        folder.mkdir()
        first = min(r["seed"] for r in recs)
        seeds = len({r["seed"] for r in recs})
        config = CompareConfig(preset="evidence", optimizers=["adamw", "adamspd"], first_seed=first, seeds=seeds)
        (folder / "config.json").write_text(config.to_json())
        write_records(folder, recs + parts["a"][:1] if name == "b" else recs)  # one run in both: kept once
    out = merge_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "all")
    merged = read_records(out / "results.jsonl")
    assert sorted(r["run_id"] for r in merged) == sorted(r["run_id"] for r in records)
    assert CompareConfig.load(out / "config.json").seeds == 3
    assert "| AdamSPD | OOD tweets | 3 | +5.7 |" in (out / "report.md").read_text()
    other = tmp_path / "c"
    other.mkdir()
    (other / "config.json").write_text(CompareConfig(preset="quick").to_json())
    from spdecay.experiments.errors import RunnerError

    with pytest.raises(RunnerError, match="other settings"):
        merge_runs([tmp_path / "a", other], tmp_path / "bad")
