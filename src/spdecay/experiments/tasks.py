"""The embedded tasks: their defaults per preset and how to build a task's data and model.

A task is registered by a name in ``spdecay.experiments.config.TASKS``, one
``TaskDefaults`` per preset in ``PRESET_DEFAULTS`` and a builder in ``BUILDERS``
(``builder(config, defaults, device) -> (TaskData, TaskModel)``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from spdecay.experiments.config import BACKBONES, CompareConfig
from spdecay.experiments.data import TaskData
from spdecay.experiments.errors import RunnerError
from spdecay.experiments.models import TaskModel

# One regularisation strength per method unless a preset or --sweep says otherwise: AdamW's usual
# decoupled decay, a mild L2-SP penalty, SPD's full projection (lambda = 1); the probe's and
# LP-FT's are AdamW decays. WiSE-FT always takes AdamW's grid (it interpolates those runs).
SINGLE = {"adamw": [0.01], "l2sp": [0.1], "adamspd": [1.0], "sgdspd": [1.0], "probe": [0.01], "lpft": [0.01]}
# `--preset evidence`: three strengths per method bracketing the usual values.
EVIDENCE_GRIDS = {
    "adamw": [0.01, 0.1, 1.0],
    "l2sp": [0.01, 0.1, 1.0],
    "adamspd": [0.5, 1.0, 2.0],
    "sgdspd": [0.5, 1.0, 2.0],
    "probe": [0.01, 0.1, 1.0],
    "lpft": [0.01, 0.1, 1.0],
}


@dataclass(frozen=True)
class TaskDefaults:
    train: int | None  # training rows (None: all)
    val: int
    test: int
    ood: int | None  # rows per OOD set (None: all)
    batch_size: int
    epochs: float | None
    steps: int | None
    lr_adam: float
    lr_sgd: float
    max_length: int = 64
    image_size: int = 64
    eval_batch_size: int = 256
    checkpoint_every: int = 50
    schedule: str = "linear"  # linear: warm-up then linear decay to zero; cosine: to a floor
    seeds: int = 1
    grids: dict[str, list[float]] = field(default_factory=lambda: dict(SINGLE))
    statement: str = ""  # said at the top of the report


SMOKE = ("This is a smoke-scale run: a handful of steps on small subsets. It checks that the "
         "pipeline works; its numbers say nothing about which method is better.")
FIRST_LOOK = ("A first look: one short epoch with the learning rate decaying to zero, so the model "
              "barely moves from its pre-trained weights; use `--preset evidence` to compare methods.")
EVIDENCE = ("The evidence preset: a small training set for many epochs at a high learning rate "
            "(warm-up, then cosine decay to 10% of the peak), the regime where plain fine-tuning "
            "drifts; three strengths per method, chosen by mean ID-validation balanced accuracy.")

PRESET_DEFAULTS: dict[str, dict[str, TaskDefaults]] = {
    "default": {
        # 2,000 snippets x 1 epoch (62 steps of 32) per run: ~5-10 min on 2 CPU cores.
        "sentiment": TaskDefaults(2000, 500, 1000, 2000, 32, 1.0, None, 1e-4, 2e-2, statement=FIRST_LOOK),
        "digits": TaskDefaults(3500, 500, 1000, None, 32, 1.0, None, 1e-3, 2e-2, image_size=64, statement=FIRST_LOOK),
        "custom": TaskDefaults(None, 0, 0, None, 32, 1.0, None, 5e-5, 1e-2, image_size=224, statement=FIRST_LOOK),
    },
    "quick": {
        "sentiment": TaskDefaults(96, 48, 48, 96, 16, None, 6, 1e-4, 2e-2, max_length=32, checkpoint_every=3, statement=SMOKE),
        "digits": TaskDefaults(128, 48, 48, 96, 16, None, 6, 1e-3, 2e-2, image_size=32, checkpoint_every=3, statement=SMOKE),
        "custom": TaskDefaults(128, 0, 0, 96, 16, None, 6, 5e-5, 1e-2, max_length=32, image_size=64,
                               checkpoint_every=3, statement=SMOKE),
    },
    "evidence": {
        # 480 snippets x 8 epochs = 120 steps of 32 per run at lr 3e-4; eval sets of a few hundred.
        "sentiment": TaskDefaults(480, 300, 500, 500, 32, 8.0, None, 3e-4, 2e-2, schedule="cosine",
                                  checkpoint_every=40, seeds=3, grids=dict(EVIDENCE_GRIDS), statement=EVIDENCE),
        "digits": TaskDefaults(480, 300, 500, 500, 32, 8.0, None, 1e-3, 2e-2, image_size=32, schedule="cosine",
                               checkpoint_every=40, seeds=3, grids=dict(EVIDENCE_GRIDS), statement=EVIDENCE),
        "custom": TaskDefaults(None, 0, 0, None, 32, 8.0, None, 3e-4, 1e-2, image_size=224, schedule="cosine",
                               checkpoint_every=40, seeds=3, grids=dict(EVIDENCE_GRIDS), statement=EVIDENCE),
    },
}


def task_defaults(config: CompareConfig) -> TaskDefaults:
    by_task = PRESET_DEFAULTS[config.preset]
    if config.task not in by_task:
        raise RunnerError(f"--preset {config.preset}: not defined for task {config.task!r}")
    base = by_task[config.task]
    if config.train_size is not None:
        base = replace(base, train=config.train_size)
    return base


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise RunnerError(f"--device {name}: not a torch device (expected cpu, cuda, cuda:N, mps or auto)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RunnerError(f"--device {name}: CUDA is not available on this machine")
    return device


def build_task(config: CompareConfig, device: torch.device) -> tuple[TaskData, TaskModel]:
    """Load the data first (cheap, fails fast on bad files), then the model."""
    if config.task not in BUILDERS:
        raise RunnerError(f"--task {config.task!r}: no builder registered")
    return BUILDERS[config.task](config, task_defaults(config), device)


def _build_sentiment(config: CompareConfig, d: TaskDefaults, device) -> tuple[TaskData, TaskModel]:
    from spdecay.experiments.data_sentiment import load_sentiment
    from spdecay.experiments.models import load_hf_text, minilm_path

    data = load_sentiment(d.train, d.val, d.test, d.ood)
    if config.backbone == "mpnet":
        from spdecay.experiments.split_model import mpnet_path

        path = mpnet_path()
    else:
        path = minilm_path()
    model = load_hf_text(path, len(data.classes), config.max_length or d.max_length, device,
                         config.lora_rank, "model")
    model.name = BACKBONES[config.backbone or "minilm"]
    return data, model


def _build_digits(config: CompareConfig, d: TaskDefaults, device) -> tuple[TaskData, TaskModel]:
    from spdecay.experiments.data_digits import load_digits_task
    from spdecay.experiments.models import load_efficientnet_lite0

    if config.lora_rank:
        raise RunnerError("--lora-rank needs a Hugging Face model (--model PATH); the digits task uses EfficientNet")
    data = load_digits_task(d.train, d.val, d.test, d.ood)
    return data, load_efficientnet_lite0(len(data.classes), config.image_size or d.image_size, device)


def _build_custom(config: CompareConfig, d: TaskDefaults, device) -> tuple[TaskData, TaskModel]:
    from spdecay.experiments.data_custom import load_custom
    from spdecay.experiments.models import load_hf_image, load_hf_text, model_kind

    if config.model is None or config.train is None:
        raise RunnerError("--task custom needs --model PATH and --train FILE (plus optional --val, --test, --ood NAME=PATH)")
    kind = model_kind(config.model)
    image_size = config.image_size
    if kind == "image" and image_size is None:
        import json
        from pathlib import Path

        size = json.loads((Path(config.model) / "preprocessor_config.json").read_text()).get("size", 224)
        image_size = int(size.get("height") or size.get("shortest_edge") or 224) if isinstance(size, dict) else int(size)
    data = load_custom(
        kind, config.train, config.val, config.test, config.ood,
        config.text_column, config.label_column, image_size or 224, d.train,
    )
    if kind == "text":
        model = load_hf_text(config.model, len(data.classes), config.max_length or d.max_length, device, config.lora_rank)
    else:
        model = load_hf_image(config.model, len(data.classes), image_size, device, config.lora_rank)
    return data, model


BUILDERS: dict[str, Callable[[CompareConfig, TaskDefaults, torch.device], tuple[TaskData, TaskModel]]] = {
    "sentiment": _build_sentiment,
    "digits": _build_digits,
    "custom": _build_custom,
}
