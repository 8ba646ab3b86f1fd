"""param_groups / llrd_param_groups on a tiny Hugging Face BERT and on a PEFT LoRA model."""

from __future__ import annotations

import warnings

import pytest
import torch

from spdecay import AdamSPD, SelectiveProjectionDecay, llrd_param_groups, param_groups

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def tiny_bert(seed=0, layers=2):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16, num_labels=3,
    )
    return transformers.BertForSequenceClassification(cfg)


def tiny_lora(seed=0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = peft.LoraConfig(r=2, target_modules=["query", "value"], modules_to_save=["classifier"])
        return peft.get_peft_model(tiny_bert(seed), cfg)


def by_name(groups):
    return {g["name"]: g for g in groups}


def check_partition(model, groups):
    """Every trainable parameter is in exactly one group, no frozen one is."""
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(ids) == trainable
    for g in groups:
        named = dict(model.named_parameters())
        assert [named[n] for n in g["param_names"]] == g["params"]


def test_bert_defaults_head_gets_plain_decay_backbone_gets_spd():
    model = tiny_bert()
    groups = by_name(param_groups(model, weight_decay=0.7, head_weight_decay=0.02, head_lr=1e-2))
    check_partition(model, list(groups.values()))
    assert set(groups) == {"backbone", "head"}
    assert groups["head"]["param_names"] == ["classifier.weight", "classifier.bias"]
    assert groups["head"]["spd"] is False and groups["head"]["weight_decay"] == 0.02
    assert groups["head"]["lr"] == 1e-2 and "lr" not in groups["backbone"]
    bb = groups["backbone"]
    assert bb["spd"] is True and bb["anchor"] == "init" and bb["weight_decay"] == 0.7
    assert "bert.encoder.layer.1.output.LayerNorm.bias" in bb["param_names"]  # no_decay=None


def test_bert_no_decay_auto_takes_biases_and_layernorm_weights():
    model = tiny_bert()
    groups = by_name(param_groups(model, no_decay="auto"))
    check_partition(model, list(groups.values()))
    nd = set(groups["no_decay"]["param_names"])
    expected = {n for n, _ in model.named_parameters() if n.endswith(".bias") or ".LayerNorm." in n}
    assert nd == expected
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["no_decay"]["spd"] is False
    assert groups["head"]["param_names"] == ["classifier.weight"]


def test_bert_groups_drive_adamspd_head_is_plain_adamw():
    model = tiny_bert()
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = AdamSPD(param_groups(model, head_weight_decay=0.1), lr=1e-2)
    ids = torch.randint(0, 50, (4, 8))
    labels = torch.tensor([0, 1, 2, 1])
    for _ in range(3):
        opt.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
    names = opt.spd_stats().names
    assert "classifier.weight" not in names and "bert.pooler.dense.weight" in names
    # the head got no anchor (nothing to stay close to); the backbone's anchor is its init
    head_w = dict(model.named_parameters())["classifier.weight"]
    assert "anchor" not in opt.state[head_w]
    pooler = dict(model.named_parameters())["bert.pooler.dense.weight"]
    torch.testing.assert_close(opt.state[pooler]["anchor"], init["bert.pooler.dense.weight"])


def test_lora_model_adapters_zero_anchor_frozen_base_skipped_head_from_modules_to_save():
    model = tiny_lora()
    groups = by_name(param_groups(model))
    check_partition(model, list(groups.values()))
    assert set(groups) == {"peft", "head"}
    pg = groups["peft"]
    assert pg["anchor"] == "zero" and pg["spd"] is True
    assert len(pg["params"]) == 8 and all(".lora_A." in n or ".lora_B." in n for n in pg["param_names"])
    assert groups["head"]["param_names"] == [
        "base_model.model.classifier.modules_to_save.default.weight",
        "base_model.model.classifier.modules_to_save.default.bias",
    ]
    opt = AdamSPD(param_groups(model), lr=1e-2)
    model(input_ids=torch.randint(0, 50, (2, 5)), labels=torch.tensor([0, 2])).loss.backward()
    opt.step()
    assert all("anchor" not in opt.state[p] for p in pg["params"])  # zero anchor: nothing stored


def test_lora_peft_false_and_peft_true_on_plain_model():
    model = tiny_lora()
    groups = by_name(param_groups(model, peft=False))
    assert set(groups) == {"backbone", "head"} and groups["backbone"]["anchor"] == "init"
    with pytest.raises(ValueError, match="peft=True but no parameter matches"):
        param_groups(tiny_bert(), peft=True)


def test_for_addon_moves_strength_out_of_the_base_optimizer_decay():
    model = tiny_bert()
    groups = by_name(param_groups(model, weight_decay=0.8, head_weight_decay=0.01, for_addon=True))
    assert groups["backbone"]["weight_decay"] == 0.0
    assert groups["backbone"]["spd_weight_decay"] == 0.8
    assert groups["head"]["weight_decay"] == 0.01 and "spd_weight_decay" not in groups["head"]
    opt = torch.optim.AdamW(list(groups.values()), lr=1e-3)
    spd = SelectiveProjectionDecay(opt)
    model(input_ids=torch.randint(0, 50, (2, 5)), labels=torch.tensor([0, 2])).loss.backward()
    opt.step()
    names = spd.spd_stats().names
    assert "classifier.weight" not in names and len(names) == len(groups["backbone"]["params"])


def test_head_as_module_and_pattern_and_none():
    model = tiny_bert()
    a = by_name(param_groups(model, head=model.classifier))["head"]["param_names"]
    b = by_name(param_groups(model, head="classifier"))["head"]["param_names"]
    c = by_name(param_groups(model, head=["classifier", "bert.pooler"]))["head"]["param_names"]
    assert a == b == ["classifier.weight", "classifier.bias"]
    assert c == ["bert.pooler.dense.weight", "bert.pooler.dense.bias"] + a
    assert "head" not in by_name(param_groups(model, head=None))
    # patterns match whole dotted components: not layer.1.attention.output, nor layer.10...
    d = by_name(param_groups(model, head="layer.1.output"))["head"]["param_names"]
    assert d == [f"bert.encoder.layer.1.output.{x}" for x in
                 ("dense.weight", "dense.bias", "LayerNorm.weight", "LayerNorm.bias")]
    e = by_name(param_groups(model, head="*.pooler.*.bias"))["head"]["param_names"]
    assert e == ["bert.pooler.dense.bias"]


def test_clear_errors_for_patterns_that_match_nothing():
    model = tiny_bert()
    with pytest.raises(ValueError, match="head pattern 'clasifier' matches no parameter"):
        param_groups(model, head="clasifier")
    with pytest.raises(ValueError, match="no_decay pattern 'layernorm' matches no parameter"):
        param_groups(model, no_decay=["bias", "layernorm"])
    with pytest.raises(ValueError, match="peft pattern 'lora_C' matches no parameter"):
        param_groups(model, peft=["lora_C"])
    with pytest.raises(ValueError, match="could not find the task head automatically"):
        param_groups(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="invalid name pattern ''"):
        param_groups(model, head="")
    with pytest.raises(ValueError, match="weight_decay must be a number >= 0, got -1"):
        param_groups(model, weight_decay=-1)
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(model.requires_grad_(False))
    with pytest.raises(ValueError, match="head module has no parameters in this model"):
        param_groups(tiny_bert(), head=torch.nn.Linear(2, 2))


def test_llrd_learning_rates_by_depth():
    model = tiny_bert(layers=3)
    groups = llrd_param_groups(model, lr=1e-3, decay=0.5, no_decay="auto")
    check_partition(model, groups)
    lr_of = {n: g["lr"] for g in groups for n in g["param_names"]}
    top = 4  # embeddings 0, blocks 1..3, pooler + head 4
    assert lr_of["bert.embeddings.word_embeddings.weight"] == pytest.approx(1e-3 * 0.5**top)
    assert lr_of["bert.embeddings.LayerNorm.bias"] == pytest.approx(1e-3 * 0.5**top)
    for i in range(3):
        assert lr_of[f"bert.encoder.layer.{i}.attention.self.query.weight"] == pytest.approx(
            1e-3 * 0.5 ** (top - (i + 1)))
    assert lr_of["bert.pooler.dense.weight"] == lr_of["classifier.weight"] == 1e-3
    kinds = {g["name"].split(".")[0] for g in groups}
    assert kinds == {"backbone", "head", "no_decay"}
    AdamSPD(groups)  # ready for the optimizer as they are


def test_llrd_custom_layer_function_and_errors():
    model = tiny_bert()
    groups = llrd_param_groups(model, lr=1.0, decay=0.1, head=None,
                               layer_of=lambda n: 1 if "encoder" in n else 0, num_layers=1)
    lr_of = {n: g["lr"] for g in groups for n in g["param_names"]}
    assert lr_of["bert.encoder.layer.0.output.dense.weight"] == 1.0
    assert lr_of["classifier.weight"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="decay must be in"):
        llrd_param_groups(model, lr=1.0, decay=1.5)
    with pytest.raises(ValueError, match=r"layer_of\('bert.embeddings.word_embeddings.weight'\) = 7"):
        llrd_param_groups(model, lr=1.0, layer_of=lambda n: 7, num_layers=2)
    with pytest.raises(ValueError, match="no nn.ModuleList"):
        llrd_param_groups(torch.nn.Sequential(torch.nn.Linear(2, 2)), lr=1.0, head=None)
