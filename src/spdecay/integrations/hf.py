"""Hugging Face ``Trainer`` integration.

Train with AdamSPD, grouped by [`param_groups`][spdecay.param_groups] (SPD on the pre-trained backbone,
zero anchors for PEFT/LoRA weights, plain decay on the new head)::

    from transformers import Trainer
    from spdecay.integrations.hf import AdamSPDFactory, add_spd_stats

    trainer = Trainer(
        model=model, args=args, train_dataset=ds,
        optimizer_cls_and_kwargs=(AdamSPDFactory, {"lr": 2e-5, "weight_decay": 1.0}),
    )
    add_spd_stats(trainer)  # spd/fraction_regularised, spd/mean_ratio, spd/deviation in the logs
    trainer.train()

The factory builds the groups when the Trainer creates its optimizer, i.e. from the model it is
about to train (after FSDP2 / accelerate have wrapped and sharded it), so the groups never refer
to parameters that were swapped out. Keys of [`param_groups`][spdecay.param_groups] (``head``,
``no_decay``, ``peft``, ``weight_decay``, ``head_weight_decay``, ``lr``, ``head_lr``) go to the
grouping; everything else to [`AdamSPD`][spdecay.AdamSPD]. The anchors are captured at each
parameter's first step (the pre-trained weights; after any sharding).

The factory needs a transformers whose Trainer accepts optimizer factories (tested with 5.24).
Passing ready groups also works, on one process or DDP only (FSDP2 replaces the parameters):
``Trainer(..., optimizer_cls_and_kwargs=(AdamSPD, {"params": param_groups(model), "lr": 2e-5}))``.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import TrainerCallback

from spdecay.adam_spd import AdamSPD
from spdecay.integrations._common import RunningSPDStats, find_stats_source, read_stats
from spdecay.param_groups import param_groups

__all__ = ["AdamSPDFactory", "SPDStatsCallback", "add_spd_stats", "GROUPING_KEYS"]

GROUPING_KEYS = ("head", "no_decay", "peft", "weight_decay", "head_weight_decay", "lr", "head_lr")


class AdamSPDFactory:
    """An optimizer factory for ``Trainer(optimizer_cls_and_kwargs=(AdamSPDFactory, kwargs))``.

    transformers instantiates it without arguments and calls it with the model being trained and
    ``kwargs``. ``lr`` and ``weight_decay`` serve both the grouping and the optimizer defaults.
    """

    def __call__(self, model: torch.nn.Module, **kwargs: Any) -> AdamSPD:
        grouping = {k: kwargs.pop(k) for k in GROUPING_KEYS if k in kwargs}
        if "params" in kwargs:
            raise TypeError(
                "AdamSPDFactory builds the param groups itself; pass grouping options "
                f"({', '.join(GROUPING_KEYS)}), not 'params'"
            )
        for key in ("lr", "weight_decay"):
            if key in grouping:
                kwargs[key] = grouping[key]
        return AdamSPD(param_groups(model, **grouping), **kwargs)


class SPDStatsCallback(TrainerCallback):
    """Logs SPD statistics with the Trainer's other metrics (console, ``log_history`` and the
    ``report_to`` integrations: tensorboard, wandb, ...).

    Per logging interval, averaged over its optimizer steps: ``spd/fraction_regularised`` (the
    share of SPD tensors whose condition fired), ``spd/mean_ratio`` (the mean projection ratio,
    0 where it did not fire) and, at the last step, ``spd/deviation`` (||theta - theta_0|| over
    all SPD tensors).

    Args:
        source: where to read the stats; default: the Trainer's optimizer (an AdamSPD, found
            inside accelerate's wrapper). Pass a
            [`SelectiveProjectionDecay`][spdecay.SelectiveProjectionDecay] when SPD is an add-on
            around another optimizer.
        prefix: prefix of the logged keys.

    Reporting callbacks run in list order and user callbacks come after them, so register it
    with [`add_spd_stats`][spdecay.integrations.hf.add_spd_stats] (which puts it first) for
    tensorboard/wandb to see the values.

    Raises:
        TypeError: at an optimizer step, when no ``source`` was given and the Trainer's
            optimizer has no SPD statistics (it is not an AdamSPD).
    """

    def __init__(self, source: Any = None, prefix: str = "spd/") -> None:
        self.source = source
        self.prefix = prefix
        self.running = RunningSPDStats()

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):  # noqa: D102
        source = self.source if self.source is not None else find_stats_source(optimizer)
        if source is None:
            raise TypeError(
                "SPDStatsCallback: the Trainer's optimizer has no SPD statistics (not an "
                f"AdamSPD: {type(optimizer).__name__}); pass source=<SelectiveProjectionDecay>"
            )
        self.running.update(read_stats(source))

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: D102
        values = self.running.pop(self.prefix)
        if not values or logs is None:
            return
        logs.update(values)
        # Trainer.log appended a copy of `logs` to log_history just before this event.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)


def add_spd_stats(trainer: Any, callback: SPDStatsCallback | None = None) -> SPDStatsCallback:
    """Register an SPD statistics callback ahead of the Trainer's reporting callbacks.

    Args:
        trainer: a ``transformers.Trainer``.
        callback: the callback to register; default: a new
            [`SPDStatsCallback`][spdecay.integrations.hf.SPDStatsCallback].

    Returns:
        The registered callback.

    Raises:
        TypeError: ``callback`` is not an ``SPDStatsCallback``.
    """
    callback = callback if callback is not None else SPDStatsCallback()
    if not isinstance(callback, SPDStatsCallback):
        raise TypeError(f"add_spd_stats: expected an SPDStatsCallback, got {type(callback).__name__}")
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback
