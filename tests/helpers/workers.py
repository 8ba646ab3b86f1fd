"""A tiny image study (a 1-layer ViT and coloured squares: seconds per run on one thread) and a
per-step hook that kills the process it runs in, for the executor tests. Importable in Ray
worker processes (they start in the driver's working folder, the repository root)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path


def tiny_image_study(folder: Path) -> dict:
    """Write a headless 1-layer ViT and red/blue image folders under ``folder``; returns the
    ``CompareConfig`` fields of a custom-task study on them."""
    import transformers
    from PIL import Image

    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=37, image_size=16, patch_size=8)
    model_dir = folder / "vit"
    transformers.ViTModel(config).save_pretrained(model_dir)
    (model_dir / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"height": 16, "width": 16}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    for split in ("train", "ood"):
        for cls, color in (("red", (200, 20, 20)), ("blue", (20, 20, 200))):
            (folder / split / cls).mkdir(parents=True)
            for i in range(12):
                Image.new("RGB", (20, 20), tuple(max(0, c - 5 * i) for c in color)).save(folder / split / cls / f"{i}.png")
    return {"task": "custom", "model": str(model_dir), "train": str(folder / "train"),
            "ood": {"dark": str(folder / "ood")}}


@dataclass
class ExitAt:
    """``interrupt`` hook of ``run_compare``: ends the process (``os._exit``, as a killed worker)
    when run ``run_id`` reaches ``step``; with ``marker`` only the first time (it records the kill
    there), without one every time."""

    run_id: str
    step: int
    marker: Path | None = None

    def __call__(self, spec, step: int) -> None:
        if spec.run_id != self.run_id or step != self.step:
            return
        if self.marker is not None:
            if self.marker.exists():
                return
            self.marker.write_text(str(os.getpid()))
        os._exit(3)


@dataclass
class Hooks:
    """Several ``interrupt`` hooks in one."""

    hooks: tuple

    def __call__(self, spec, step: int) -> None:
        for hook in self.hooks:
            hook(spec, step)
