"""LoRA fine-tuning with AdamSPD under the Hugging Face Trainer (PEFT).

The LoRA adapters are regularised towards zero (their "pre-trained" value: no adaptation), the
classifier head saved with ``modules_to_save`` gets plain decay, and the frozen base weights are
skipped; ``spdecay.param_groups`` recognises all three from PEFT's parameter names. CPU, tiny
randomly initialised BERT (nothing downloaded), or ``--model DIR``: a BERT-like model from a
local folder.

    PYTHONPATH=src python examples/hf_peft_lora.py --steps 20
    PYTHONPATH=src python examples/hf_peft_lora.py --steps 20 --model /path/to/local/bert
"""

from __future__ import annotations

import argparse
import tempfile

from hf_trainer import load_model, make_trainer, random_dataset
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import Trainer


def lora_bert(seed: int = 0, path: str | None = None) -> PeftModel:
    """LoRA on the attention query/value projections (BERT naming)."""
    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8, lora_dropout=0.0,
                        target_modules=["query", "value"])
    return get_peft_model(load_model(path, seed=seed), config)


def main(argv: list[str] | None = None) -> Trainer:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--model", help="local folder of a pre-trained BERT-like model")
    args = parser.parse_args(argv)
    model = lora_bert(path=args.model)
    model.print_trainable_parameters()
    with tempfile.TemporaryDirectory() as out:
        trainer = make_trainer(model, random_dataset(64), out, steps=args.steps, batch_size=16,
                               lr=5e-3)
        trainer.train()
    opt = trainer.optimizer.optimizer  # accelerate's wrapper around the AdamSPD
    for group in opt.param_groups:
        print(group["name"], group.get("anchor"), len(group["params"]), "tensors")
    for row in trainer.state.log_history:
        if "spd/mean_ratio" in row:
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
    return trainer


if __name__ == "__main__":
    main()
