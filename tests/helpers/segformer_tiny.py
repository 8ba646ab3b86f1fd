"""A tiny randomly initialised SegFormer (no download) and image + mask folders for tests."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_config(num_labels: int = 3):
    from transformers import SegformerConfig

    return SegformerConfig(
        num_channels=3, num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16],
        patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 1], mlp_ratios=[2, 2],
        decoder_hidden_size=16, num_labels=num_labels, semantic_loss_ignore_index=255,
    )


def tiny_segformer(num_labels: int = 3):
    from transformers import SegformerForSemanticSegmentation

    torch.manual_seed(0)
    return SegformerForSemanticSegmentation(tiny_config(num_labels))


def save_tiny_segformer(folder: Path, num_labels: int = 3, backbone_only: bool = False, size: int = 32) -> Path:
    """A local model folder: the whole segmentation model, or (``backbone_only``) the encoder
    alone (as a pre-trained backbone checkpoint: the decoder is then new when loaded)."""
    from transformers import SegformerImageProcessor, SegformerModel

    torch.manual_seed(0)
    model = SegformerModel(tiny_config(num_labels)) if backbone_only else tiny_segformer(num_labels)
    model.save_pretrained(folder)
    SegformerImageProcessor(size={"height": size, "width": size}).save_pretrained(folder)
    return folder


def write_png(path: Path, array, mode: str | None = None) -> None:
    from PIL import Image

    Image.fromarray(array, mode=mode).save(path)


def image_mask_folders(root: Path, n: int, size: int = 32, classes: int = 3, seed: int = 0,
                       names: list[str] | None = None) -> tuple[Path, Path]:
    """``root/images`` (RGB PNGs) and ``root/masks`` (class-index PNGs, mode L, same stems):
    a bright square of class 1 or 2 on a dark background (class 0)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        stem = names[i] if names else f"img{i:03d}"
        img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
        mask = np.zeros((size, size), dtype=np.uint8)
        c = 1 + i % (classes - 1)
        y, x = rng.integers(0, size // 2, 2)
        img[y : y + size // 2, x : x + size // 2] = (200, 40, 40) if c == 1 else (40, 200, 40)
        mask[y : y + size // 2, x : x + size // 2] = c
        write_png(images / f"{stem}.png", img)
        write_png(masks / f"{stem}.png", mask)
    return images, masks
