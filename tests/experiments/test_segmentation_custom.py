"""Bring-your-own segmentation: image + mask folders and a tiny randomly initialised SegFormer
saved to a temporary folder (no download), through the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest

typer_testing = pytest.importorskip("typer.testing")
pytest.importorskip("transformers")
pytest.importorskip("PIL")

from spdecay.cli import app  # noqa: E402
from tests.helpers.cli import one_line_error  # noqa: E402
from tests.helpers.segformer_tiny import image_mask_folders, save_tiny_segformer, write_png  # noqa: E402

runner = typer_testing.CliRunner()


def _invoke(*args: str):
    return runner.invoke(app, ["compare", "--no-progress", *args])


@pytest.fixture
def data(tmp_path):
    model = save_tiny_segformer(tmp_path / "segformer", backbone_only=True)
    train_img, train_mask = image_mask_folders(tmp_path / "train", 12, seed=0)
    val_img, val_mask = image_mask_folders(tmp_path / "val", 4, seed=1)
    ood_img, ood_mask = image_mask_folders(tmp_path / "ood", 4, seed=2)
    return {"model": str(model), "train": (str(train_img), str(train_mask)), "val": (str(val_img), str(val_mask)),
            "ood": (str(ood_img), str(ood_mask)), "root": tmp_path}


def _args(data, *extra):
    return ["--task", "custom", "--model", data["model"], "--train", data["train"][0], "--masks", data["train"][1],
            "--val", data["val"][0], "--masks", f"val={data['val'][1]}",
            "--ood", f"dark={data['ood'][0]}", "--masks", f"dark={data['ood'][1]}",
            "--steps", "2", "--batch-size", "4", *extra]


def test_custom_segformer_end_to_end(data):
    out = data["root"] / "run"
    # One ignored pixel block in a validation mask: it must count nowhere (and not be a class).
    mask_file = sorted((data["root"] / "val" / "masks").iterdir())[0]
    from PIL import Image

    arr = np.asarray(Image.open(mask_file)).copy()
    arr[:4, :4] = 255
    write_png(mask_file, arr)
    result = _invoke(*_args(data, "--optimizers", "adamw,adamspd,probe", "--out", str(out)))
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["optimizer"] for r in records] == ["adamw", "adamspd", "probe"]
    for r in records:
        assert r["task"] == "segmentation"
        for split in (r["val"], r["test"], r["ood"]["dark"]):
            assert 0.0 <= split["miou"] <= 1.0 and 0.0 <= split["accuracy"] <= 1.0
            assert len(split["class_iou"]) == 3  # classes 0..2 from the training masks; 255 ignored
        assert "ood_mean_miou" in r
        # The decoder is the new head: never in the deviation, never anchored by SPD.
        assert not any(n.startswith("decode_head.") for n in r["layers"]["names"])
        if r["optimizer"] == "adamspd":
            assert r["spd"]["layer_names"] and not any(n.startswith("decode_head.") for n in r["spd"]["layer_names"])
    assert records[2]["deviation"]["total"] == 0.0  # the decoder probe: the backbone is frozen
    report = (out / "report.md").read_text()
    assert "## Comparison (mIoU first" in report and "ID val mIoU" in report and "OOD dark mIoU" in report
    assert "mIoU (per class" in report and "## Per-class IoU" in report
    assert "composed" not in report  # the embedded data's sentence is not said of the user's data
    for png in ("id_vs_ood.png", "paired_differences.png"):
        assert (out / png).is_file()


def test_mismatched_stems_are_one_line(data):
    (data["root"] / "train" / "masks" / "img003.png").rename(data["root"] / "train" / "masks" / "other.png")
    one_line_error(_invoke(*_args(data)), "file stems differ", "img003", "other")


def test_unknown_classes_are_one_line(data):
    mask_file = data["root"] / "val" / "masks" / "img000.png"
    arr = np.zeros((32, 32), dtype=np.uint8)
    arr[0, 0] = 7
    write_png(mask_file, arr)
    one_line_error(_invoke(*_args(data)), "--masks val=", "[7]", "never occur in the training masks")


def test_colour_masks_are_one_line(data):
    mask_file = data["root"] / "train" / "masks" / "img001.png"
    write_png(mask_file, np.zeros((32, 32, 3), dtype=np.uint8))
    one_line_error(_invoke(*_args(data)), "img001.png", "mode RGB", "single-channel")


def test_missing_masks_are_one_line(data):
    args = _args(data)
    i = args.index(f"dark={data['ood'][1]}")
    del args[i - 1 : i + 1]  # the OOD set's --masks
    one_line_error(_invoke(*args), "--ood dark=", "needs its masks")


def test_mask_size_is_one_line(data):
    write_png(data["root"] / "train" / "masks" / "img002.png", np.zeros((16, 16), dtype=np.uint8))
    one_line_error(_invoke(*_args(data)), "img002.png", "16x16", "32x32")


def test_a_classification_model_is_refused(data, tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    folder = tmp_path / "vit"
    ViTForImageClassification(ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                                        intermediate_size=8, image_size=32, patch_size=8)).save_pretrained(folder)
    args = _args(data)
    args[args.index("--model") + 1] = str(folder)
    one_line_error(_invoke(*args), "semantic-segmentation")


def test_masks_need_a_segmentation_task():
    one_line_error(_invoke("--task", "digits", "--masks", "somewhere"), "--masks", "segmentation")


def test_missing_mask_folder_is_refused_before_any_output(data):
    out = data["root"] / "never"
    args = _args(data, "--out", str(out))
    args[args.index(data["train"][1])] = str(data["root"] / "nowhere")
    one_line_error(_invoke(*args), "--masks", "nowhere", "no such mask folder")
    assert not out.exists()
