"""Protocol (sweep parsing, equal budgets, selection by validation), metrics, schedule, report
and atomic result files: fast unit tests with hand-derived expectations."""

from __future__ import annotations

import json
import os

import pytest
import torch

from spdecay.experiments.config import CompareConfig
from spdecay.experiments.errors import RunnerError
from spdecay.experiments.metrics import accuracy_metrics
from spdecay.experiments.protocol import (
    grids,
    parse_lr,
    parse_optimizers,
    parse_sweeps,
    plan,
    select,
)
from spdecay.experiments.reporting.report import comparison_table
from spdecay.experiments.reporting.results_io import atomic_write_text, read_records, write_records
from spdecay.experiments.training.schedule import lr_lambda, total_steps_for

OPTS = ["adamw", "l2sp", "adamspd"]
GRIDS = {"adamw": [0.01, 0.1], "l2sp": [0.1, 1.0], "adamspd": [0.5, 1.0], "sgdspd": [0.5, 1.0]}
LRS = {"adamw": 1e-4, "l2sp": 1e-4, "adamspd": 1e-4, "sgdspd": 0.02}


def test_parse_sweeps_global_and_per_optimizer():
    out = parse_sweeps(["weight_decay=0.5,1,2", "adamw.weight_decay=0,0.01,0.1"], OPTS)
    assert out == {"adamw": {"weight_decay": [0.0, 0.01, 0.1]}, "l2sp": {"weight_decay": [0.5, 1.0, 2.0]},
                   "adamspd": {"weight_decay": [0.5, 1.0, 2.0]}}
    from spdecay.experiments.methods import METHODS

    assert parse_sweeps(["default"], OPTS) == {n: {"weight_decay": list(METHODS[n].grids["sweep"])} for n in OPTS}
    with pytest.raises(RunnerError, match="unknown hyper-parameter 'momentum'"):
        parse_sweeps(["momentum=0.9"], OPTS)
    with pytest.raises(RunnerError, match="'sgdspd' is not among --optimizers"):
        parse_sweeps(["sgdspd.weight_decay=1"], OPTS)
    with pytest.raises(RunnerError, match="'x' is not a number"):
        parse_sweeps(["weight_decay=1,x"], OPTS)
    with pytest.raises(RunnerError, match="expected NAME=V1,V2"):
        parse_sweeps(["weight_decay"], OPTS)


def test_parse_optimizers_and_lr():
    assert parse_optimizers(" AdamW,adamspd ") == ["adamw", "adamspd"]
    with pytest.raises(RunnerError, match="unknown optimizer 'adam'"):
        parse_optimizers("adamw,adam")
    assert parse_lr("3e-5", OPTS) == {n: 3e-5 for n in OPTS}
    assert parse_lr("adamw=1e-4,sgdspd=0.02", OPTS) == {"adamw": 1e-4, "sgdspd": 0.02}
    with pytest.raises(RunnerError, match="must be positive"):
        parse_lr("0", OPTS)


def test_reference_rows_and_presets():
    from spdecay.experiments.cli_config import config_from_options

    opts = dict(task=None, optimizers=None, lr=None, steps=None, epochs=None, batch_size=None, seeds=None,
                sweep=[], quick=False, device="auto", model=None, train=None, val=None, test=None, ood=[],
                text_column="text", label_column="label", lora_rank=0, max_length=None, image_size=None,
                train_size=None, checkpoint_every=None)
    default = config_from_options(**opts)
    assert default.optimizers == ["adamw", "l2sp", "adamspd", "probe", "wise_ft"] and default.seeds == 1
    evidence = config_from_options(**opts | {"preset": "evidence"})
    assert evidence.preset == "evidence" and evidence.seeds == 3
    assert evidence.optimizers == ["adamw", "l2sp", "adamspd", "probe", "wise_ft", "lpft"]
    from spdecay.experiments.runner import plan_for
    from spdecay.experiments.tasks.registry import task_defaults

    d = task_defaults(evidence)
    assert (d.train, d.epochs, d.lr_adam, d.schedule, d.grid) == (480, 8.0, 3e-4, "cosine", "evidence")
    specs = plan_for(evidence)
    strengths = {n: sorted({s.weight_decay for s in specs if s.optimizer == n}) for n in evidence.optimizers}
    assert strengths["adamspd"] == [0.5, 1.0, 2.0]
    assert all(len(v) == 3 for v in strengths.values())
    assert strengths["wise_ft"] == strengths["adamw"]  # WiSE-FT interpolates each AdamW run
    assert config_from_options(**opts | {"quick": True}).preset == "quick"
    with pytest.raises(RunnerError, match="wise_ft is made from AdamW"):
        parse_optimizers("wise_ft,adamspd")
    with pytest.raises(RunnerError, match="--quick is --preset quick"):
        config_from_options(**opts | {"quick": True, "preset": "evidence"})
    with pytest.raises(RunnerError, match="--preset 'big'"):
        config_from_options(**opts | {"preset": "big"})


def test_plan_gives_every_method_the_same_budget():
    config = CompareConfig(optimizers=OPTS, seeds=2, sweep=parse_sweeps(["lr=1e-4,3e-4"], OPTS))
    specs = plan(config, GRIDS, LRS)
    assert len(specs) == 2 * 3 * 2 * 2  # seeds x optimizers x weight decays x lrs
    for name in OPTS:
        points = {(s.weight_decay, s.lr) for s in specs if s.optimizer == name}
        assert points == {(wd, lr) for wd in GRIDS[name] for lr in (1e-4, 3e-4)}
    assert len({s.run_id for s in specs}) == len(specs)
    unequal = CompareConfig(optimizers=OPTS, sweep=parse_sweeps(["adamspd.weight_decay=0.5,1,2"], OPTS))
    with pytest.raises(RunnerError, match="same number of settings"):
        grids(unequal, GRIDS, LRS)


def _record(opt, seed, wd, val, test=0.5, ood=0.5, dev=1.0, fired=None):
    return {"run_id": f"{opt}-{seed}-{wd}", "optimizer": opt, "seed": seed, "hparams": {"weight_decay": wd, "lr": 1e-4},
            "val": {"accuracy": val, "balanced_accuracy": val}, "test": {"accuracy": test, "balanced_accuracy": test},
            "ood": {"o": {"accuracy": ood, "balanced_accuracy": ood}}, "ood_mean_accuracy": ood,
            "ood_mean_balanced_accuracy": ood, "deviation": {"total": dev, "relative": dev / 10},
            "spd": None if fired is None else {"fraction_fired": fired}, "wall_time_s": 10.0}


def test_select_uses_mean_validation_balanced_accuracy_over_seeds():
    records = [
        _record("adamspd", 0, 0.5, 0.80), _record("adamspd", 1, 0.5, 0.70),  # mean 0.75
        _record("adamspd", 0, 1.0, 0.76), _record("adamspd", 1, 1.0, 0.76),  # mean 0.76: wins
        _record("adamw", 0, 0.01, 0.7), _record("adamw", 0, 0.1, 0.7),  # tie: first grid point
    ]
    best = select(records)
    assert best["adamspd"]["weight_decay"] == 1.0 and len(best["adamspd"]["records"]) == 2
    assert best["adamw"]["weight_decay"] == 0.01


def test_comparison_table_mean_and_std():
    records = [_record("adamspd", 0, 1.0, 0.8, test=0.70, dev=2.0, fired=0.25),
               _record("adamspd", 1, 1.0, 0.8, test=0.80, dev=4.0, fired=0.75)]
    row = comparison_table(records).splitlines()[2].split(" | ")
    # mean 0.75, sample std of (0.70, 0.80) = 0.0707
    assert "0.750 ± 0.071" in row and "3.00 ± 1.41" in row and "0.50 ± 0.35" in row


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_accuracy_and_balanced_accuracy_match_sklearn():
    metrics_mod = pytest.importorskip("sklearn.metrics")
    gen = torch.Generator().manual_seed(0)
    labels = torch.cat([torch.zeros(70, dtype=torch.long), torch.ones(20, dtype=torch.long), torch.full((10,), 3)])
    pred = torch.randint(0, 4, (100,), generator=gen)
    got = accuracy_metrics(pred, labels, 4)
    assert got["accuracy"] == pytest.approx(metrics_mod.accuracy_score(labels, pred))
    assert got["balanced_accuracy"] == pytest.approx(metrics_mod.balanced_accuracy_score(labels, pred))
    # a majority guess: accuracy 0.7, balanced accuracy 1/3 (three classes present)
    assert accuracy_metrics(torch.zeros(100, dtype=torch.long), labels, 4) == pytest.approx(
        {"accuracy": 0.7, "balanced_accuracy": 1 / 3})


def test_schedule_and_step_count():
    f = lr_lambda(20)  # warm-up 2 steps, then linear decay to 0 at step 20
    assert [f(0), f(1), f(2), f(11), f(20)] == pytest.approx([0.5, 1.0, 1.0, 0.5, 0.0])
    c = lr_lambda(20, "cosine")  # same warm-up, then cosine from 1 to the floor 0.1
    assert [c(0), c(1), c(2), c(11), c(20)] == pytest.approx([0.5, 1.0, 1.0, 0.1 + 0.9 * 0.5, 0.1])
    assert all(c(i) >= c(i + 1) for i in range(2, 30)) and c(1000) == pytest.approx(0.1)
    k = lr_lambda(20, "constant")
    assert [k(0), k(1), k(2), k(19)] == pytest.approx([0.5, 1.0, 1.0, 1.0])
    assert total_steps_for(2000, 32, None, 1.0) == 62
    assert total_steps_for(2000, 32, None, 1.5) == 93
    assert total_steps_for(10, 32, None, 1.0) == 1
    assert total_steps_for(2000, 32, 7, None) == 7


def test_results_files_are_replaced_atomically(tmp_path, monkeypatch):
    records = [_record("adamw", 0, 0.01, 0.8) | {"layers": {"names": ["a"], "deviation": [1.0]}}]
    write_records(tmp_path, records)
    assert read_records(tmp_path / "results.jsonl") == records
    header = (tmp_path / "results.csv").read_text().splitlines()[0].split(",")
    assert "val.accuracy" in header and "ood.o.balanced_accuracy" in header and "layers.names" not in header
    # A crash in the middle of a write leaves the previous complete file and no temporary.
    before = (tmp_path / "results.jsonl").read_bytes()

    def boom(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_text(tmp_path / "results.jsonl", "partial")
    assert (tmp_path / "results.jsonl").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv", "results.jsonl"]
    json.loads(before.decode().splitlines()[0])
