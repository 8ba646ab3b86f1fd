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
sys.path.insert(0, str(Path(__file__).parents[2] / "examples"))

from transformers import TrainerCallback  # noqa: E402

from spdecay import AdamSPD, param_groups  # noqa: E402

STEPS, LOG_EVERY, N, LR = 6, 3, 16, 5e-3


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models: two intra-op threads on a busy 2-core machine make each step ~15x slower.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


class Recorder(TrainerCallback):
    """Stands for a report_to integration (tensorboard, wandb): those are registered when the
    Trainer is built, before add_spd_stats, and read the `logs` dict in on_log."""

    def __init__(self) -> None:
        self.seen: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.seen.append({**logs, "step": state.global_step})


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


def check_against_manual(make_model, tmp_path, lr=LR, ready_groups=False):
    hf = importlib.import_module("hf_trainer")
    data = hf.random_dataset(N)
    model = make_model()
    reporter = Recorder()
    trainer = hf.make_trainer(model, data, str(tmp_path), steps=STEPS, batch_size=N, lr=lr,
                              logging_steps=LOG_EVERY, callbacks=[reporter],
                              groups=param_groups(model) if ready_groups else None)
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
    # what a reporting integration receives: the same values at the same steps
    reported = [{k: v for k, v in row.items() if k.startswith("spd/") or k == "step"}
                for row in reporter.seen if "spd/mean_ratio" in row]
    assert reported == [{k: v for k, v in row.items() if k.startswith("spd/") or k == "step"}
                        for row in logs]
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


def test_trainer_with_ready_param_groups_matches_plain_loop(tmp_path, float64):
    # optimizer_cls_and_kwargs=(AdamSPD, {"params": param_groups(model), ...}): one process
    hf = importlib.import_module("hf_trainer")
    trainer, _ = check_against_manual(hf.tiny_bert, tmp_path, ready_groups=True)
    opt = trainer.optimizer.optimizer
    assert isinstance(opt, AdamSPD)
    assert [g["name"] for g in opt.param_groups] == [g["name"] for g in param_groups(hf.tiny_bert())]
    trained = {id(p) for g in opt.param_groups for p in g["params"]}
    assert trained == {id(p) for p in trainer.model.parameters()}


def test_factory_groups_head_and_no_decay_params():
    from spdecay.integrations.hf import AdamSPDFactory

    hf = importlib.import_module("hf_trainer")
    model = hf.tiny_bert()
    opt = AdamSPDFactory()(model, no_decay="auto", lr=1e-4, head_weight_decay=0.01, eps=1e-7)
    by_name = {g["name"]: g for g in opt.param_groups}
    assert set(by_name) == {"backbone", "no_decay", "head"}
    assert by_name["backbone"]["spd"] and by_name["backbone"]["weight_decay"] == 1.0
    no_decay = by_name["no_decay"]
    assert not no_decay["spd"] and no_decay["weight_decay"] == 0.0
    assert no_decay["param_names"] and all(
        n.endswith(".bias") or "LayerNorm" in n for n in no_decay["param_names"])
    assert set(by_name["head"]["param_names"]) == {"classifier.weight"}  # its bias: no_decay
    assert not by_name["head"]["spd"] and by_name["head"]["weight_decay"] == 0.01
    assert all(g["lr"] == 1e-4 and g["eps"] == 1e-7 for g in opt.param_groups)
    names = [n for g in opt.param_groups for n in g["param_names"]]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())


def test_model_from_a_local_folder(tmp_path):
    hf = importlib.import_module("hf_trainer")
    saved = hf.tiny_bert(seed=3)
    saved.save_pretrained(tmp_path)
    loaded = hf.load_model(str(tmp_path), seed=3)
    assert type(loaded).__name__ == "BertForSequenceClassification"
    want = dict(saved.named_parameters())
    assert all(torch.equal(p, want[n]) for n, p in loaded.named_parameters())
    with pytest.raises(OSError):  # a missing folder is not looked up on the hub
        hf.load_model(str(tmp_path / "missing"))


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
