"""Lightning integration: log SPD statistics from a ``LightningModule``'s AdamSPD.

AdamSPD needs nothing special under Lightning: return it from ``configure_optimizers`` (its
``step(closure)`` is what automatic optimisation calls). This callback adds the statistics::

    trainer = lightning.Trainer(callbacks=[SPDStatsLogger()])
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import Callback

from spdecay.integrations._common import find_stats_source, read_stats

__all__ = ["SPDStatsLogger"]


class SPDStatsLogger(Callback):
    """After every training batch, log ``spd/fraction_regularised``, ``spd/mean_ratio`` and
    ``spd/deviation`` (||theta - theta_0|| over SPD tensors before the step) with
    ``pl_module.log_dict`` (as tensors: no host sync here; loggers read them when they write).

    Args:
        source: an [`AdamSPD`][spdecay.AdamSPD] or
            [`SelectiveProjectionDecay`][spdecay.SelectiveProjectionDecay]; default: the first
            of the trainer's optimizers that has SPD statistics.
        prefix: prefix of the logged keys.

    Raises:
        TypeError: at the end of a training batch, when no ``source`` was given and none of
            the trainer's optimizers has SPD statistics.
    """

    def __init__(self, source: Any = None, prefix: str = "spd/") -> None:
        self.source = source
        self.prefix = prefix

    def _source(self, trainer: Any) -> Any:
        if self.source is not None:
            return self.source
        for opt in trainer.optimizers:
            found = find_stats_source(opt)
            if found is not None:
                return found
        names = [type(o).__name__ for o in trainer.optimizers]
        raise TypeError(
            f"SPDStatsLogger: none of the optimizers {names} has SPD statistics; pass source=..."
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: D102
        stats = read_stats(self._source(trainer))
        if not len(stats):
            return
        pl_module.log_dict(
            {
                f"{self.prefix}fraction_regularised": stats.fired.float().mean(),
                f"{self.prefix}mean_ratio": stats.ratio.mean(),
                f"{self.prefix}deviation": stats.deviation.square().sum().sqrt(),
            },
            on_step=True,
            on_epoch=False,
        )
