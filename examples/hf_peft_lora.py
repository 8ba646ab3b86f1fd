"""LoRA fine-tuning with AdamSPD under the Hugging Face Trainer (PEFT).

The LoRA adapters are regularised towards zero (their "pre-trained" value: no adaptation), the
classifier head saved with ``modules_to_save`` gets plain decay, and the frozen base weights are
skipped; ``spdecay.param_groups`` recognises all three from PEFT's parameter names. CPU, tiny
randomly initialised BERT, nothing downloaded.

    PYTHONPATH=src python examples/hf_peft_lora.py --steps 20
"""

from __future__ import annotations

import argparse
import tempfile

from hf_trainer import make_trainer, random_dataset, tiny_bert
from peft import LoraConfig, TaskType, get_peft_model
from transformers import Trainer


def lora_bert(seed: int = 0):
    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8, lora_dropout=0.0,
                        target_modules=["query", "value"])
    return get_peft_model(tiny_bert(seed=seed), config)


def main(argv: list[str] | None = None) -> Trainer:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    model = lora_bert()
    model.print_trainable_parameters()
    with tempfile.TemporaryDirectory() as out:
        trainer = make_trainer(model, random_dataset(64), out, steps=args.steps, batch_size=16,
                               lr=5e-3)
        trainer.train()
    opt = trainer.optimizer.optimizer  # accelerate's wrapper around the AdamSPD
    for group in opt.param_groups:
        print(group["name"], group.get("anchor"), len(group["params"]), "tensors")
    return trainer


if __name__ == "__main__":
    main()
