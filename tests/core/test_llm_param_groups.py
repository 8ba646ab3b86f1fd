"""param_groups(peft="auto") on a LoRA-wrapped causal LM: no head to find, adapters anchored at
zero (the old code raised "could not find the task head automatically")."""

from __future__ import annotations

import warnings

import pytest
import torch

from spdecay import AdamSPD, param_groups

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from tests.helpers.llm_tiny import tiny_llama  # noqa: E402


def lora_causal_lm(modules_to_save=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                              modules_to_save=modules_to_save)
        return peft.get_peft_model(tiny_llama(64), cfg)


def test_lora_causal_lm_auto_head_means_no_head_and_zero_anchored_adapters():
    model = lora_causal_lm()
    groups = param_groups(model, peft="auto")
    assert [g["name"] for g in groups] == ["peft"]
    (g,) = groups
    assert g["anchor"] == "zero" and g["spd"] is True
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(g["param_names"]) == trainable
    assert len(trainable) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    # The groups drive AdamSPD: one step moves only the adapters.
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = AdamSPD(groups, lr=1e-2)
    model(input_ids=torch.randint(0, 64, (2, 5))).logits.sum().backward()
    opt.step()
    assert all(torch.equal(p, frozen_before[n]) for n, p in model.named_parameters() if not p.requires_grad)


def test_auto_head_still_refuses_trainable_non_adapter_weights_without_a_head():
    # A trainable weight that is neither an adapter nor a recognisable head: it might be a new
    # head, so it must not be silently anchored at its initial value.
    model = lora_causal_lm(modules_to_save=["lm_head"])
    with pytest.raises(ValueError, match="could not find the task head automatically"):
        param_groups(model, peft="auto")
    # peft=False: the adapters are not PEFT parameters for this call, so no head is still an error.
    with pytest.raises(ValueError, match="could not find the task head automatically"):
        param_groups(lora_causal_lm(), peft=False)
    # An explicit choice works as before.
    names = {g["name"] for g in param_groups(model, head="lm_head")}
    assert names == {"peft", "head"}
