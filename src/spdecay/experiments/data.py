"""Containers for a task's labelled data and deterministic splitting."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from spdecay.experiments.errors import RunnerError

# Splits never depend on the run's seed: every optimizer and seed sees the same data.
DATA_SEED = 0
# --resample-train: seed s draws its training subset with permutation seed RESAMPLE_SEED + s.
RESAMPLE_SEED = 1_000_000
# Texts are cut to this many characters per token of the limit before tokenisation: a token
# spans far fewer characters on real text, so nothing that fits is lost, and one huge line
# (a 100 MB row) costs kilobytes instead of gigabytes.
CHARS_PER_TOKEN = 64


def clip_texts(texts, max_tokens: int) -> list[str]:
    """Each text cut to ``CHARS_PER_TOKEN * max_tokens`` characters (before tokenising)."""
    budget = CHARS_PER_TOKEN * max(1, max_tokens)
    return [t[:budget] for t in texts]


@dataclass
class Split:
    """One labelled split. ``inputs``: a list of strings (text) or an N x C x H x W float tensor
    in [0, 1] (images); ``labels``: int64 class indices into the task's ``classes``."""

    name: str
    inputs: Any
    labels: Tensor
    cache: dict[str, Any] = field(default_factory=dict, repr=False)  # e.g. token ids, built once

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: Tensor | Sequence[int], name: str | None = None) -> Split:
        index = torch.as_tensor(index, dtype=torch.long)
        if isinstance(self.inputs, Tensor):
            inputs = self.inputs[index]
        else:
            inputs = [self.inputs[i] for i in index.tolist()]
        return Split(name or self.name, inputs, self.labels[index])


@dataclass
class TaskData:
    kind: str  # "text" or "image"
    classes: list[str]
    train: Split
    val: Split
    test: Split
    ood: dict[str, Split]
    # Per source (e.g. "--train train.csv"): rows skipped for a missing text or label.
    dropped: dict[str, int] = field(default_factory=dict)
    # --resample-train: the rows each seed draws its own training subset (of len(train)) from.
    train_pool: Split | None = None
    _per_seed: dict[int, TaskData] = field(default_factory=dict, repr=False)

    def for_seed(self, seed: int) -> TaskData:
        """This data with the training subset of ``seed`` (drawn from ``train_pool``, the same
        for every method of that seed; built once per seed and process)."""
        if self.train_pool is None:
            raise RunnerError("--resample-train: this task's data has no training pool to draw from")
        if seed not in self._per_seed:
            index = permutation(len(self.train_pool), RESAMPLE_SEED + seed)[: len(self.train)]
            train = self.train_pool.subset(index, "train")
            self._per_seed[seed] = TaskData(self.kind, self.classes, train, self.val, self.test, self.ood,
                                            self.dropped)
        return self._per_seed[seed]

    def check(self) -> None:
        """Every split non-empty and every label a known class index."""
        for split in (self.train, self.val, self.test, *self.ood.values()):
            if len(split) == 0:
                raise RunnerError(f"data split '{split.name}' is empty")
            if int(split.labels.min()) < 0 or int(split.labels.max()) >= len(self.classes):
                raise RunnerError(f"data split '{split.name}' has labels outside {self.classes}")


def permutation(n: int, seed: int = DATA_SEED) -> Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def take(split: Split, n: int | None, seed: int = DATA_SEED, name: str | None = None) -> Split:
    """A deterministic random subset of ``n`` rows (all rows, shuffled, when n is None or larger)."""
    perm = permutation(len(split), seed)
    if n is not None:
        perm = perm[:n]
    return split.subset(perm, name)


def split_three(
    full: Split, sizes: tuple[int | None, int, int], seed: int = DATA_SEED
) -> tuple[Split, Split, Split]:
    """Deterministic disjoint train/val/test subsets: val and test first, train from the rest."""
    train_n, val_n, test_n = sizes
    if val_n + test_n >= len(full):
        raise RunnerError(
            f"data set '{full.name}' has {len(full)} rows, too few for {val_n} validation "
            f"and {test_n} test rows"
        )
    perm = permutation(len(full), seed)
    val = full.subset(perm[:val_n], "val")
    test = full.subset(perm[val_n : val_n + test_n], "test")
    rest = perm[val_n + test_n :]
    if train_n is not None:
        rest = rest[:train_n]
    return full.subset(rest, "train"), val, test


def class_counts(split: Split, n_classes: int) -> list[int]:
    return torch.bincount(split.labels, minlength=n_classes).tolist()
