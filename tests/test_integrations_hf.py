"""HF Trainer + AdamSPD (and PEFT LoRA): the Trainer's trajectory equals a plain AdamSPD loop on
the same batches, and SPDStatsCallback logs what an independent float64 computation gives."""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))

from spdecay import AdamSPD, param_groups  # noqa: E402

STEPS, LOG_EVERY, N, LR = 6, 3, 16, 5e-3


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def manual_run(model, data, steps, lr=LR):
    """AdamSPD on the full batch, with the SPD condition and deviation computed here per step."""
    batch = {k: torch.stack([row[k] for row in data]) for k in data[0]}
    groups = param_groups(model)
    opt = AdamSPD(groups, lr=lr, weight_decay=1.0)
    spd = [(p, g["anchor"]) for g in groups if g["spd"] for p in g["params"]]
    p0 = {p: p.detach().clone() if anchor == "init" else torch.zeros_like(p) for p, anchor in spd}
    fired, deviation = [], []
    for _ in range(steps):
        opt.zero_grad()
        model(**batch).loss.backward()
        # c < 0 <=> <g, p - p0> > 0. Some gradients are zero up to rounding (the attention key
        # bias: softmax ignores a shift of all scores), so their sign is noise: count as either.
        with torch.no_grad():
            g_norm = math.sqrt(sum(float(p.grad.square().sum()) for p, _ in spd))
            inner = [(float((p.grad * (p - p0[p])).sum()), g_norm * float((p - p0[p]).norm()))
                     for p, _ in spd]
            deviation.append(math.sqrt(sum(float(((p - p0[p]) ** 2).sum()) for p, _ in spd)))
        fired.append((sum(i > 1e-9 * s for i, s in inner) / len(spd),
                      sum(i > -1e-9 * s for i, s in inner) / len(spd)))
        opt.step()
    return fired, deviation


def check_against_manual(make_model, tmp_path, lr=LR):
    hf = importlib.import_module("hf_trainer")
    data = hf.random_dataset(N)
    model = make_model()
    trainer = hf.make_trainer(model, data, str(tmp_path), steps=STEPS, batch_size=N, lr=lr,
                              logging_steps=LOG_EVERY)
    trainer.train()
    twin = make_model()
    fired, deviation = manual_run(twin, data, STEPS, lr)
    trained = dict(model.named_parameters())
    diff = max((trained[n] - p).abs().max().item() for n, p in twin.named_parameters())
    # Full batches: only the row order (Trainer shuffles) and hence rounding differ.
    assert diff < 1e-9, diff
    logs = [row for row in trainer.state.log_history if "spd/mean_ratio" in row]
    assert [row["step"] for row in logs] == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    for row in logs:
        window = slice(row["step"] - LOG_EVERY, row["step"])
        low = sum(lo for lo, _ in fired[window]) / LOG_EVERY
        high = sum(hi for _, hi in fired[window]) / LOG_EVERY
        assert low - 1e-12 <= row["spd/fraction_regularised"] <= high + 1e-12
        # SPDStats keeps float32
        assert row["spd/deviation"] == pytest.approx(deviation[row["step"] - 1], rel=1e-6)
        assert 0.0 <= row["spd/mean_ratio"] <= 1.0
    assert any(lo > 0 for lo, _ in fired)
    return trainer, diff


def test_trainer_with_adam_spd_factory_matches_plain_loop(tmp_path, float64):
    hf = importlib.import_module("hf_trainer")
    trainer, _ = check_against_manual(hf.tiny_bert, tmp_path)
    opt = trainer.optimizer.optimizer
    assert isinstance(opt, AdamSPD)
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["head"]["spd"] is False
    assert set(by_name["head"]["param_names"]) == {"classifier.weight", "classifier.bias"}
    assert by_name["backbone"]["spd"] and by_name["backbone"]["anchor"] == "init"
    # the anchors are the weights the model started from
    init = hf.tiny_bert()
    for name, p in zip(by_name["backbone"]["param_names"], by_name["backbone"]["params"]):
        assert torch.equal(opt.state[p]["anchor"], init.get_parameter(name))


def test_trainer_with_peft_lora_anchors_adapters_at_zero(tmp_path, float64):
    pytest.importorskip("peft")
    lora = importlib.import_module("hf_peft_lora")
    # a larger step: the adapters' condition fires at step 2 (with 5e-3 it never does in 6)
    trainer, _ = check_against_manual(lora.lora_bert, tmp_path, lr=5e-2)
    opt = trainer.optimizer.optimizer
    by_name = {g["name"]: g for g in opt.param_groups}
    peft_names = by_name["peft"]["param_names"]
    assert peft_names and all("lora_" in n for n in peft_names)
    assert by_name["peft"]["anchor"] == "zero"
    assert all("anchor" not in opt.state[p] for p in by_name["peft"]["params"])
    assert all("classifier" in n for n in by_name["head"]["param_names"])
    trained = {id(p) for g in opt.param_groups for p in g["params"]}
    frozen = [n for n, p in trainer.model.named_parameters() if not p.requires_grad]
    assert frozen and all(id(trainer.model.get_parameter(n)) not in trained for n in frozen)


def test_factory_rejects_params():
    from spdecay.integrations.hf import AdamSPDFactory

    with pytest.raises(TypeError, match="params"):
        AdamSPDFactory()(torch.nn.Linear(2, 2), params=[])


def test_callback_without_spd_optimizer_names_the_problem():
    from spdecay.integrations.hf import SPDStatsCallback

    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(TypeError, match="SGD"):
        SPDStatsCallback().on_optimizer_step(None, None, None, optimizer=opt)
