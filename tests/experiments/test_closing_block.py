"""The end of `spdecay compare` on the terminal (issue 22): a table and a verdict that fit in 100
columns, the sampling error a run of this size carries, the report's path; and progress lines
in a log (no terminal): a start line with an estimate and a heartbeat."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest

from spdecay.experiments.reporting.closing import WIDTH, balanced_accuracy_se, closing_block
from tests.experiments.test_report_wording import _record, _study


def test_sampling_error_of_a_balanced_accuracy_matches_simulation():
    np = pytest.importorskip("numpy")
    rng = np.random.default_rng(0)
    counts, recall = [300, 200], 0.75
    hits = rng.binomial(counts, recall, size=(20000, 2))
    simulated = (hits / np.array(counts)).mean(axis=1).std()
    assert balanced_accuracy_se(recall, counts) == pytest.approx(simulated, rel=0.03)
    # about 2 points at 500 balanced examples (shared/design-runner.md)
    assert 100 * balanced_accuracy_se(0.75, [250, 250]) == pytest.approx(1.94, abs=0.01)


def test_closing_block_fits_and_says_what_came_out_and_how_much_one_seed_resolves():
    records = _study(1)
    records += [_record("lpft", 0, 0.01, 0.80, 0.70, 7.0) | {"optimizer": "lpft"}]
    out = Path("runs") / "sentiment-20261203-120000"
    text = closing_block(out, records, seconds=201.4, class_counts={"test": [250, 250], "tweets": [300, 200]})
    lines = text.splitlines()
    assert all(len(line) <= WIDTH for line in lines), max(lines, key=len)
    assert f"Report: {out / 'report.md'}" in lines
    assert "1 seed (0)" in lines[1] and "3 min 21 s" in lines[1]
    table = lines[lines.index(next(line for line in lines if line.startswith("method"))):]
    assert any(line.startswith("AdamSPD") and "λ 1" in line for line in table)
    assert not any(line.startswith(("adamw", "wise_ft")) for line in table)
    joined = " ".join(text.split())  # wrapped lines read as one
    # threshold on ID test: 1.96 * sqrt(2) * SE(0.735 (AdamW), 250/250) = 5.5 points: LP-FT's +6.5 is beyond
    se = balanced_accuracy_se(0.735, [250, 250])
    assert f"{100 * 1.96 * math.sqrt(2) * se:.1f} (ID test)" in joined
    assert "beyond sampling error: LP-FT +6.5" in joined
    assert "within it:" in joined and "linear probe -3.5" in joined
    assert "One seed" in joined and "seed-to-seed" in joined and "±2.0 (ID test)" in joined


def test_closing_block_with_many_ood_sets_and_long_names_still_fits():
    records = []
    for r in _study(2):
        r = dict(r)
        r["ood"] = {f"a_rather_long_corruption_name_{i}": {"accuracy": 0.5, "balanced_accuracy": 0.5} for i in range(5)}
        records.append(r)
    text = closing_block(Path("x" * 40), records, seconds=30.0)
    assert all(len(line) <= WIDTH for line in text.splitlines())
    assert "OOD mean" in text and "not estimated" in text


def test_progress_in_a_log_starts_with_an_estimate_and_beats(monkeypatch):
    from spdecay.experiments.training import progress

    monkeypatch.setattr(progress, "_last_step_s", None)
    now = [0.0]
    stream = io.StringIO()
    bar = progress.LogProgress("AdamW seed 0 (decay 0.01)", 120, stream=stream, clock=lambda: now[0])
    for _ in range(120):
        now[0] += 0.5
        bar.update(1)
        bar.set_postfix(loss="0.400")
    bar.close()
    lines = stream.getvalue().splitlines()
    assert lines[0] == "AdamW seed 0 (decay 0.01): starting, 120 steps; an estimate follows after 3 steps"
    assert lines[1].startswith("AdamW seed 0 (decay 0.01): step 3/120") and "about 58 s of training left" in lines[1]
    beats = [line for line in lines if ": step " in line]
    assert len(beats) == 2  # the estimate at step 3 (1.5 s), then one 30 s later (the run ends at 60 s)
    assert "trained 120 steps in 1 min 00 s" in lines[-1]
    # the next run of the process starts with an estimate from this one's speed
    stream2 = io.StringIO()
    progress.LogProgress("AdamSPD seed 0 (λ 1)", 100, stream=stream2, clock=lambda: now[0])
    assert "about 50 s of training" in stream2.getvalue()


def test_closing_block_names_wise_ft_by_its_alpha_and_counts_one_run_in_the_singular():
    records = [r | {"alpha": 0.5} if r["optimizer"] == "wise_ft" else r for r in _study(1)]
    lines = closing_block(Path("out"), records, seconds=10.0).splitlines()
    wise = next(line for line in lines if line.startswith("WiSE-FT"))
    assert "α 0.5" in wise and "decay" not in wise
    one = closing_block(Path("out"), [_study(1)[0]], seconds=10.0).splitlines()
    assert one[1].endswith(", 1 run in 10 s"), one[1]
