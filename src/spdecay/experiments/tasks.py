"""The embedded tasks' defaults and how to build a task's data and model from a config."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from spdecay.experiments.config import CompareConfig
from spdecay.experiments.data import TaskData
from spdecay.experiments.errors import RunnerError
from spdecay.experiments.models import TaskModel

# One regularisation strength per optimizer unless --sweep says otherwise: AdamW's usual
# decoupled decay, a mild L2-SP penalty, SPD's full projection (lambda = 1). The 2-point grids
# of `--sweep default` are in protocol.SWEEP_GRIDS.
SINGLE = {"adamw": [0.01], "l2sp": [0.1], "adamspd": [1.0], "sgdspd": [1.0]}


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
    grids: dict[str, list[float]] = field(default_factory=lambda: dict(SINGLE))


TASK_DEFAULTS = {
    # 2,000 snippets x 1 epoch (62 steps of 32) per run: the default's 3 runs take ~5-10 min on 2 CPU cores.
    "sentiment": TaskDefaults(2000, 500, 1000, 2000, 32, 1.0, None, 1e-4, 2e-2),
    "digits": TaskDefaults(3500, 500, 1000, None, 32, 1.0, None, 1e-3, 2e-2, image_size=64),
    "custom": TaskDefaults(None, 0, 0, None, 32, 1.0, None, 5e-5, 1e-2, image_size=224),
}
QUICK = {
    "sentiment": TaskDefaults(96, 48, 48, 96, 16, None, 6, 1e-4, 2e-2, max_length=32, checkpoint_every=3),
    "digits": TaskDefaults(128, 48, 48, 96, 16, None, 6, 1e-3, 2e-2, image_size=32, checkpoint_every=3),
    "custom": TaskDefaults(128, 0, 0, 96, 16, None, 6, 5e-5, 1e-2, max_length=32, image_size=64, checkpoint_every=3),
}


def task_defaults(config: CompareConfig) -> TaskDefaults:
    base = (QUICK if config.quick else TASK_DEFAULTS)[config.task]
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
    d = task_defaults(config)
    max_length = config.max_length or d.max_length
    image_size = config.image_size or d.image_size
    if config.task == "sentiment":
        from spdecay.experiments.data_sentiment import load_sentiment
        from spdecay.experiments.models import load_hf_text, minilm_path

        data = load_sentiment(d.train, d.val, d.test, d.ood)
        model = load_hf_text(minilm_path(), len(data.classes), max_length, device, config.lora_rank, "model")
        return data, model
    if config.task == "digits":
        from spdecay.experiments.data_digits import load_digits_task
        from spdecay.experiments.models import load_efficientnet_lite0

        if config.lora_rank:
            raise RunnerError("--lora-rank needs a Hugging Face model (--model PATH); the digits task uses EfficientNet")
        data = load_digits_task(d.train, d.val, d.test, d.ood)
        return data, load_efficientnet_lite0(len(data.classes), image_size, device)
    return _build_custom(config, d, max_length, device)


def _build_custom(config: CompareConfig, d: TaskDefaults, max_length: int, device) -> tuple[TaskData, TaskModel]:
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
        model = load_hf_text(config.model, len(data.classes), max_length, device, config.lora_rank)
    else:
        model = load_hf_image(config.model, len(data.classes), image_size, device, config.lora_rank)
    return data, model
