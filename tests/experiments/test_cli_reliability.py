"""Reliability of `spdecay compare` (issue 9): stale state, --out naming a file, options given
with --resume, thread count, skipped CSV rows, the log line without OOD sets, help, and the
command on a library-only install (no typer)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from spdecay.experiments.config import CompareConfig
from spdecay.experiments.errors import RunnerError
from tests.helpers.cli import one_line_error

typer_testing = pytest.importorskip("typer.testing")

from spdecay.cli import app  # noqa: E402

runner = typer_testing.CliRunner()


def test_fresh_run_refuses_a_folder_with_checkpoints_of_another_configuration(tmp_path):
    # A crashed run left config.json and a checkpoint, no results: a fresh run under other
    # settings must not continue from it.
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "adamw-seed0-wd0.01-lr0.0001.pt").write_bytes(b"stale")
    (tmp_path / "config.json").write_text(CompareConfig(quick=True, seeds=1, lr={"adamw": 1e-3}).to_json())
    result = runner.invoke(app, ["compare", "--quick", "--no-progress", "--out", str(tmp_path)])
    one_line_error(result, "--out", "checkpoints of an unfinished run", "other settings")
    assert (tmp_path / "checkpoints" / "adamw-seed0-wd0.01-lr0.0001.pt").read_bytes() == b"stale"


def test_a_checkpoint_of_another_configuration_is_never_loaded(tmp_path):
    pytest.importorskip("transformers")
    from spdecay.experiments.protocol import RunSpec
    from spdecay.experiments.training.loop import train_run

    class Tiny:  # what train_run reads of a TaskModel before it opens the checkpoint
        device = torch.device("cpu")
        head_modules = ["fc"]

        def new_model(self, seed):
            return torch.nn.ModuleDict({"body": torch.nn.Linear(2, 2), "fc": torch.nn.Linear(2, 2)})

        def is_head(self, name):
            return name.startswith("fc")

    spec = RunSpec("adamw", 0, 0.01, 1e-3)
    ckpt = tmp_path / "adamw.pt"
    torch.save({"fingerprint": f"other/{spec.run_id}", "model": {}}, ckpt)
    with pytest.raises(RunnerError, match="written by another configuration"):
        train_run(spec, None, Tiny(), total_steps=2, batch_size=2, eval_batch_size=2, checkpoint_path=ckpt,
                  checkpoint_every=1, progress=False, fingerprint=CompareConfig().fingerprint())


def test_config_fingerprint_changes_with_every_setting():
    base = CompareConfig()
    assert base.fingerprint() == CompareConfig().fingerprint()
    for change in ({"seeds": 2}, {"lr": {"adamw": 1e-3}}, {"preset": "evidence"}, {"schedule": "cosine"},
                   {"train_size": 100}):
        assert CompareConfig(**change).fingerprint() != base.fingerprint(), change


@pytest.mark.parametrize("under", [False, True])
def test_out_naming_a_file_is_aone_line_error(tmp_path, under):
    target = tmp_path / "taken.txt"
    target.write_text("x")
    out = target / "run" if under else target
    result = runner.invoke(app, ["compare", "--quick", "--no-progress", "--out", str(out)])
    one_line_error(result, "--out", "file")


def test_resume_refuses_options_it_would_ignore(tmp_path, monkeypatch):
    import spdecay.experiments.runner as runner_mod

    calls = []
    monkeypatch.setattr(runner_mod, "run_compare", lambda config, out, **kwargs: calls.append(kwargs))
    (tmp_path / "config.json").write_text(CompareConfig(quick=True).to_json())
    result = runner.invoke(app, ["compare", "--resume", "--out", str(tmp_path), "--seeds", "3", "--lr", "1e-3"])
    line = one_line_error(result, "--resume", "--seeds", "--lr", "ignored")
    assert "--out" not in line.split("ignored")[0].split("settings;")[1]
    assert not calls
    # Options that do not change the results are accepted.
    result = runner.invoke(app, ["compare", "--resume", "--out", str(tmp_path), "--no-progress", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert calls and calls[0]["threads"] == 1 and calls[0]["resume"] is True


def test_threads_follow_omp_num_threads_and_the_option(monkeypatch):
    from spdecay.experiments.threads import set_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert set_threads(torch.device("cpu")) == 1
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert set_threads(torch.device("cpu"), threads=1) == 1
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        assert set_threads(torch.device("cpu")) == cores
    finally:
        torch.set_num_threads(before)


def test_threads_option_must_be_positive(tmp_path):
    one_line_error(runner.invoke(app, ["compare", "--threads", "0", "--out", str(tmp_path / "o")]), "--threads")


def test_csv_rows_with_a_missing_text_or_label_are_counted(tmp_path):
    pytest.importorskip("pandas")
    from spdecay.experiments.reporting.report import write_report
    from spdecay.experiments.tasks.custom import load_custom

    rows = ["text,label"] + [f"row {i},{'pos' if i % 2 else 'neg'}" for i in range(40)] + [",pos", "lonely,", "x,neg"]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "ood.csv").write_text("text,label\na,pos\n,neg\nb,neg\n")
    data = load_custom("text", str(tmp_path / "train.csv"), None, None, {"o": str(tmp_path / "ood.csv")})
    assert data.dropped == {f"--train {tmp_path / 'train.csv'}": 2, f"--ood {tmp_path / 'ood.csv'}": 1}
    assert len(data.train) + len(data.val) + len(data.test) == 41
    record = {"run_id": "adamw-0", "optimizer": "adamw", "seed": 0, "hparams": {"weight_decay": 0.01, "lr": 1e-4},
              "val": {"accuracy": 0.5, "balanced_accuracy": 0.5}, "test": {"accuracy": 0.5, "balanced_accuracy": 0.5},
              "ood": {}, "deviation": {"total": 1.0, "relative": 0.1}, "spd": None, "wall_time_s": 1.0,
              "steps": 2, "batch_size": 2}
    write_report(tmp_path, CompareConfig(), [record], data_notes={"dropped_rows": data.dropped}, statement="s")
    report = (tmp_path / "report.md").read_text()
    assert f"--train {tmp_path / 'train.csv'}: 2 rows with a missing text or label were skipped" in report


def test_log_line_without_an_ood_set_has_no_nan():
    from spdecay.experiments.runner import run_summary

    record = {"run_id": "adamw-seed0", "val": {"accuracy": 0.8, "balanced_accuracy": 0.75},
              "test": {"accuracy": 0.7, "balanced_accuracy": 0.65}, "ood": {}, "wall_time_s": 3.0}
    line = run_summary(1, 2, record)
    assert "nan" not in line and "ood" not in line and "val bal 0.750" in line
    record |= {"ood": {"t": {}}, "ood_mean_balanced_accuracy": 0.6}
    assert "ood bal 0.600" in run_summary(1, 2, record)


def test_help_shows_flags_as_flags():
    result = runner.invoke(app, ["compare", "--help"], terminal_width=200)
    assert result.exit_code == 0
    for flag in ("--resume", "--quick", "--debug"):
        line = next(line for line in result.output.splitlines() if f"{flag} " in line)
        assert "<bool>" not in line and "BOOLEAN" not in line, line
    for option in ("--preset", "--threads", "--schedule"):
        assert option in result.output


_NO_TYPER = "import sys; sys.modules['typer'] = None; from spdecay.cli import main; main(sys.argv[1:])"


@pytest.mark.parametrize("args", [[], ["--help"]])
def test_help_works_without_typer(args):
    done = subprocess.run([sys.executable, "-c", _NO_TYPER, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Usage: spdecay" in done.stdout and "compare" in done.stdout


def test_compare_without_typer_names_the_extra():
    done = subprocess.run([sys.executable, "-c", _NO_TYPER, "compare", "--quick"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and 'pip install "spdecay[experiments]"' in lines[0], done.stderr


def test_importing_the_cli_does_not_import_typer():
    code = "import sys; import spdecay.cli; print('typer' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr


def test_stored_config_of_the_old_quick_flag_loads_as_the_quick_preset(tmp_path):
    old = json.loads(CompareConfig().to_json())
    old.pop("preset")
    old["quick"] = True
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert CompareConfig.load(tmp_path / "config.json").preset == "quick"
