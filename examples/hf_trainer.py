"""Fine-tune with AdamSPD under the Hugging Face Trainer, SPD statistics in the logs.

Without ``--model`` it runs on CPU in seconds with a tiny randomly initialised BERT built from a
config (nothing is downloaded). ``--model DIR`` loads a pre-trained model from a local folder
(``save_pretrained`` output, or a hub snapshot already on disk) with a new 2-class head. The
backbone is regularised towards its initial (pre-trained) weights, the new ``classifier`` head
gets plain decoupled decay (see ``spdecay.param_groups``). The data are random token sequences.

    PYTHONPATH=src python examples/hf_trainer.py --steps 20
    PYTHONPATH=src python examples/hf_trainer.py --steps 20 --model /path/to/local/bert

Two ways to hand AdamSPD to the Trainer (both are tested):

* ``optimizer_cls_and_kwargs=(AdamSPDFactory, {...})``: the groups are built from the model the
  Trainer is about to train (after accelerate/FSDP2 sharding): the safe choice everywhere;
* ``optimizer_cls_and_kwargs=(AdamSPD, {"params": param_groups(model), ...})``: ready groups;
  one process or DDP only (FSDP2 replaces the parameters after the groups were made).
"""

from __future__ import annotations

import argparse
import tempfile
from typing import Any

import torch
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    PreTrainedModel,
    Trainer,
    TrainingArguments,
)

from spdecay import AdamSPD
from spdecay.integrations.hf import AdamSPDFactory, add_spd_stats

VOCAB, SEQ = 64, 12


def tiny_bert(num_labels: int = 2, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=SEQ, num_labels=num_labels,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,  # deterministic for the tests
    )
    return BertForSequenceClassification(config)


def load_model(path: str | None, num_labels: int = 2, seed: int = 0) -> PreTrainedModel:
    """A local pre-trained folder (never downloads), or the tiny random BERT when ``path`` is None."""
    if path is None:
        return tiny_bert(num_labels, seed)
    torch.manual_seed(seed)  # the new head's initialisation
    return AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=num_labels, local_files_only=True
    )


def random_dataset(n: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """Token sequences labelled by whether token 7 occurs: learnable, and tiny. Token ids stay
    below 64, valid for any BERT-like vocabulary."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, SEQ), generator=g)
    labels = (ids == 7).any(1).long() ^ (ids[:, 0] % 2)
    return [
        {"input_ids": ids[i], "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": labels[i]}
        for i in range(n)
    ]


def make_trainer(model: torch.nn.Module, data: list, out_dir: str, *, steps: int, batch_size: int,
                 lr: float = 1e-3, logging_steps: int = 5, groups: list | None = None,
                 callbacks: list | None = None, **optim: Any) -> Trainer:
    """A Trainer with AdamSPD; ``groups`` (ready param groups) selects the ``params`` route."""
    args = TrainingArguments(
        output_dir=out_dir, max_steps=steps, per_device_train_batch_size=batch_size,
        logging_steps=logging_steps, lr_scheduler_type="constant", max_grad_norm=0.0,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
    )
    kwargs = {"lr": lr, "weight_decay": 1.0, **optim}
    if groups is None:
        # Groups from spdecay.param_groups, built when the Trainer creates its optimizer.
        cls_and_kwargs: tuple = (AdamSPDFactory, kwargs)
    else:
        cls_and_kwargs = (AdamSPD, {"params": groups, **kwargs})
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks,
                      optimizer_cls_and_kwargs=cls_and_kwargs)
    # spd/fraction_regularised, spd/mean_ratio, spd/deviation, ahead of the report_to callbacks
    add_spd_stats(trainer)
    return trainer


def main(argv: list[str] | None = None) -> Trainer:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--model", help="local folder of a pre-trained model (default: tiny random BERT)")
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as out:
        trainer = make_trainer(load_model(args.model), random_dataset(64), out, steps=args.steps,
                               batch_size=16, lr=args.lr)
        trainer.train()
    for row in trainer.state.log_history:
        if "spd/mean_ratio" in row:
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
    return trainer


if __name__ == "__main__":
    main()
