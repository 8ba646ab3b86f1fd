"""`spdecay compare --task llm`: LoRA on SmolLM2-135M-Instruct, the paper's PEFT setting.

Rotten Tomatoes (ID) -> tweets (the same question on shifted texts), and BBC News topics
zero-shot before and after fine-tuning (capability retention: forgetting). It runs through the
common runner, loop, selection and report; what is particular to it lives in this package:
``data`` (splits and prompts), ``model`` (the GGUF checkpoint de-quantised once into a cache,
LoRA), ``scoring`` (label-word log-likelihoods, the answer loss), ``task`` (the ``TaskModel``
adapter: probe, WiSE-FT, zero-shot, retention) and ``report`` (the forgetting section).

Methods: ``pretrained`` (the untouched model zero-shot; a reference row of every plan), adamw,
l2sp (anchored at the adapters' initial values), adamspd (anchor zero), sgdspd, wise_ft and
probe. LP-FT needs a new head and is not available.
"""

from __future__ import annotations

import sys
from dataclasses import replace

from spdecay.experiments.config import CompareConfig
from spdecay.experiments.tasks.llm.report import METHOD_NOTES, llm_section, statement
from spdecay.experiments.tasks.registry import Task, TaskDefaults, register

# Sized for one seed of every method in <= 30 min on 2 shared CPU cores (see the README's table).
DEFAULT = TaskDefaults(2000, 64, 160, 160, 8, None, 32, 1e-3, 1e-2, max_length=64, eval_batch_size=16,
                       checkpoint_every=50, schedule="cosine",
                       extra={"bbc_per_class": 8, "lora_rank": 8, "probe_train": 128})
QUICK = TaskDefaults(32, 8, 8, 8, 4, None, 3, 1e-3, 1e-2, max_length=48, eval_batch_size=16,
                     checkpoint_every=50, schedule="cosine",
                     extra={"bbc_per_class": 1, "lora_rank": 8, "probe_train": 16})


def adjust(config: CompareConfig, d: TaskDefaults) -> TaskDefaults:
    d = replace(d, max_length=config.max_length or d.max_length)
    if config.lora_rank:
        d = replace(d, extra={**d.extra, "lora_rank": config.lora_rank})
    return d


def build(config: CompareConfig, d: TaskDefaults, device):
    from spdecay.experiments.tasks.llm import data as llm_data
    from spdecay.experiments.tasks.llm import model as llm_model
    from spdecay.experiments.tasks.llm.task import LLMModel

    data = llm_data.load_llm_data(d.train, d.val, d.test, d.ood, d.extra["bbc_per_class"])
    base, tokenizer, _ = llm_model.load_causal_lm(llm_model.smollm2_gguf(), log=lambda s: print(s, file=sys.stderr))
    model = LLMModel(base, tokenizer, data, max_length=d.max_length, lora_rank=d.extra["lora_rank"],
                     probe_train=d.extra["probe_train"], device=device)
    model.eval_batch_size = d.eval_batch_size
    return data, model


TASK = register(Task(
    "llm", "LoRA on SmolLM2-135M-Instruct: Rotten Tomatoes -> tweets, BBC News zero-shot forgetting",
    presets={"default": DEFAULT, "quick": QUICK},
    build=build, has_head=False, references=("pretrained",), defaults=adjust,
    report_section=llm_section, statement=statement, method_notes=METHOD_NOTES,
))
