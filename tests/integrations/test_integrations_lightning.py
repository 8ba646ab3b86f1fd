"""Lightning: AdamSPD from configure_optimizers, stepped by automatic optimisation through its
closure, follows the same trajectory as a plain loop; SPDStatsLogger logs the stats."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

L = pytest.importorskip("lightning")
sys.path.insert(0, str(Path(__file__).parents[2] / "examples"))

from spdecay import AdamSPD, param_groups  # noqa: E402
from spdecay.integrations.lightning import SPDStatsLogger  # noqa: E402

STEPS = 5


def test_fast_dev_run_matches_plain_closure_loop():
    ex = importlib.import_module("lightning_module")
    data = ex.random_data(STEPS * 8)
    data = torch.utils.data.TensorDataset(data.tensors[0].double(), data.tensors[1])
    module = ex.FineTune(ex.tiny_model().double())
    logger = SPDStatsLogger()
    trainer = L.Trainer(fast_dev_run=STEPS, accelerator="cpu", devices=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[logger])
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    trainer.fit(module, loader, loader)
    assert trainer.global_step == STEPS

    twin = ex.tiny_model().double()
    opt = AdamSPD(param_groups(twin, head="head"), lr=module.lr)
    calls = []
    for x, y in loader:

        def closure(x=x, y=y):
            calls.append(1)
            opt.zero_grad()
            loss = ex.loss_of(twin, x, y)
            loss.backward()
            return loss

        opt.step(closure)
    assert len(calls) == STEPS
    diff = max((a - b).abs().max().item()
               for a, b in zip(module.model.parameters(), twin.parameters()))
    assert diff < 1e-12, diff

    # the logged values are those of the last step
    stats = opt.spd_stats()
    logged = trainer.callback_metrics
    assert float(logged["spd/fraction_regularised"]) == pytest.approx(stats.fired.float().mean().item())
    assert float(logged["spd/mean_ratio"]) == pytest.approx(stats.ratio.mean().item(), abs=1e-7)
    assert float(logged["spd/deviation"]) == pytest.approx(
        stats.deviation.square().sum().sqrt().item(), rel=1e-6)
    assert float(logged["spd/deviation"]) > 0


def test_logger_without_spd_optimizer_names_the_problem():
    class Fake:
        optimizers = [torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)]

    with pytest.raises(TypeError, match="SGD"):
        SPDStatsLogger().on_train_batch_end(Fake(), None, None, None, 0)
