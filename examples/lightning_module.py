"""AdamSPD in a Lightning module: ``configure_optimizers`` returns it with groups from
``spdecay.param_groups``; automatic optimisation drives its closure-based ``step``.

A tiny randomly initialised "pre-trained" MLP with a new head, random data, CPU:

    PYTHONPATH=src python examples/lightning_module.py --steps 20
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from spdecay import AdamSPD, param_groups
from spdecay.integrations.lightning import SPDStatsLogger


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Linear(10, 32), nn.GELU(), nn.LayerNorm(32), nn.Linear(32, 32))
    return nn.ModuleDict({"backbone": backbone, "head": nn.Linear(32, 3)})


def random_data(n: int = 64, seed: int = 1) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=g)
    y = (x[:, :3].argmax(1) + (x[:, 3] > 1).long()) % 3
    return TensorDataset(x, y)


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model["head"](model["backbone"](x)), y)


class FineTune(L.LightningModule):
    def __init__(self, model: nn.Module, lr: float = 1e-2, weight_decay: float = 1.0) -> None:
        super().__init__()
        self.model, self.lr, self.weight_decay = model, lr, weight_decay

    def training_step(self, batch, batch_idx):
        loss = loss_of(self.model, *batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", loss_of(self.model, *batch))

    def configure_optimizers(self):
        # SPD towards the pre-trained backbone, plain decay on the new head.
        groups = param_groups(self.model, head="head", weight_decay=self.weight_decay)
        return AdamSPD(groups, lr=self.lr)


def main(argv: list[str] | None = None) -> FineTune:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    module = FineTune(tiny_model())
    trainer = L.Trainer(max_steps=args.steps, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        callbacks=[SPDStatsLogger()])
    data = random_data()
    trainer.fit(module, DataLoader(data, batch_size=16), DataLoader(data, batch_size=32))
    print({k: round(float(v), 4) for k, v in trainer.callback_metrics.items()})
    return module


if __name__ == "__main__":
    main()
