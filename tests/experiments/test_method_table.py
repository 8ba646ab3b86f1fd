"""The method table is the one place a method is described: a new entry is accepted by the
options, planned with its grids and learning rate, trained by the common loop and reported
(the worked example of DEVELOPERS.md)."""

from __future__ import annotations

import pytest
import torch

from spdecay.experiments.methods import METHODS, BuiltOptimizer, Method, build_optimizer, help_text
from tests.experiments.test_runner_safety import tiny_task, train


def build_sgd(model, lr, strength, head=()):
    params = [p for p in model.parameters() if p.requires_grad]
    return BuiltOptimizer(torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=strength), None)


SGD = Method("sgd", "plain SGD", "#17becf", "SGD with momentum, coupled decay of every parameter towards **zero**",
             "decay rate", grids={"single": (0.01,), "sweep": (0.01, 0.1), "evidence": (0.01, 0.1, 1.0)},
             lr="sgd", build=build_sgd)


def test_a_new_method_is_one_entry(monkeypatch, tmp_path):
    from spdecay.experiments.cli_config import config_from_options
    from spdecay.experiments.reporting.report import write_report
    from spdecay.experiments.runner import plan_for

    monkeypatch.setitem(METHODS, "sgd", SGD)
    assert "sgd (plain SGD)" in help_text()
    opts = dict(task="digits", optimizers="adamw,sgd", lr=None, steps=None, epochs=None, batch_size=None, seeds=2,
                sweep=["default"], quick=True, device="cpu", model=None, train=None, val=None, test=None, ood=[],
                text_column="text", label_column="label", lora_rank=0, max_length=None, image_size=None,
                train_size=None, checkpoint_every=None)
    config = config_from_options(**opts)
    specs = [s for s in plan_for(config) if s.optimizer == "sgd"]
    assert [(s.seed, s.weight_decay, s.lr) for s in specs] == [(0, 0.01, 2e-2), (0, 0.1, 2e-2), (1, 0.01, 2e-2),
                                                                 (1, 0.1, 2e-2)]  # the task's SGD rate
    assert isinstance(build_optimizer("sgd", torch.nn.Linear(2, 2), [], 0.1, 0.01).optimizer, torch.optim.SGD)
    data, tm = tiny_task()
    records = [train(s, data, tm, tmp_path / f"{s.run_id}.pt", steps=2) for s in specs]
    write_report(tmp_path, config, records)
    report = (tmp_path / "report.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith(("| sgd |", "| plain SGD |"))]
    assert len(rows) >= 3  # the comparison, what it regularises, the sweep points
    assert any("SGD with momentum, coupled decay of every parameter towards **zero**" in r for r in rows)


def test_every_method_has_a_grid_of_equal_size_per_preset():
    trained = [m for m in METHODS.values() if m.kind in ("train", "probe")]
    for grid in ("single", "sweep", "evidence"):
        assert len({len(m.grids[grid]) for m in trained}) == 1, grid
    with pytest.raises(Exception, match="unknown optimizer 'nope'"):
        build_optimizer("nope", torch.nn.Linear(2, 2), [], 0.1, 0.1)
