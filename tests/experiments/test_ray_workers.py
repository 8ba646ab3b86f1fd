"""`spdecay compare --workers N` / `--ray-address`: the study's units as Ray tasks. The records
are those of the one-process run; a worker that dies is retried, then its run is reported
failed (log, report, exit status) and --resume completes it; Ctrl-C stops the tasks and leaves a
folder --resume continues. Without the options no Ray import. One local Ray instance per module."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

typer_testing = pytest.importorskip("typer.testing")
pytest.importorskip("transformers")
pytest.importorskip("PIL")

from spdecay.cli import app  # noqa: E402
from spdecay.experiments import CompareConfig, run_compare  # noqa: E402
from spdecay.experiments.errors import RunsFailed  # noqa: E402
from spdecay.experiments.reporting.results_io import read_records  # noqa: E402
from tests.helpers.cli import one_line_error  # noqa: E402
from tests.helpers.workers import ExitAt, Hooks, tiny_image_study  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
STUDY = ["--optimizers", "adamw,adamspd,wise_ft", "--seeds", "2", "--steps", "2", "--batch-size", "4",
         "--threads", "1", "--checkpoint-every", "1", "--no-progress"]
runner = typer_testing.CliRunner()


def _without_time(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "wall_time_s"} for r in records]


def _by_id(records: list[dict]) -> list[dict]:
    return sorted(_without_time(records), key=lambda r: r["run_id"])


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The tiny study run in one process by the CLI, in a fresh interpreter (which must never
    import Ray): (its config, its records, its folder)."""
    folder = tmp_path_factory.mktemp("study")
    paths = tiny_image_study(folder)
    out = folder / "sequential"
    code = ("import sys\nfrom spdecay.cli import build_app\n"
            "build_app()(args=sys.argv[1:], prog_name='spdecay', standalone_mode=False)\n"
            "print('ray imported:', 'ray' in sys.modules)\n")
    args = ["compare", "--model", paths["model"], "--train", paths["train"], "--ood", f"dark={paths['ood']['dark']}",
            *STUDY, "--out", str(out)]
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ray imported: False" in done.stdout, done.stdout[-2000:]
    records = read_records(out / "results.jsonl")
    assert len(records) == 6
    return CompareConfig.load(out / "config.json"), records, out


@pytest.fixture(scope="module")
def ray_instance():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


def _executor(**kwargs):
    from spdecay.experiments.workers import executor_from_options

    return executor_from_options(**{"workers": 2, "threads": 1, "log": lambda s: None, **kwargs})


def _predictions(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "predictions").glob("*"))}


@pytest.mark.slow
def test_two_workers_give_the_records_of_one_process(study, ray_instance, tmp_path):
    config, expected, sequential_out = study
    out = tmp_path / "ray"
    run_compare(config, out, progress=False, threads=1, log=lambda s: None, executor=_executor())
    records = read_records(out / "results.jsonl")
    assert _without_time(records) == _without_time(expected)  # the same runs, in the same order
    assert records[0]["threads"] == 1
    assert _predictions(out) == _predictions(sequential_out)
    assert not (out / "checkpoints").exists()


@pytest.mark.slow
def test_a_dying_worker_is_retried_then_reported_failed_and_resume_completes(study, ray_instance, tmp_path):
    config, expected, _ = study
    out = tmp_path / "ray"
    kill = Hooks((ExitAt("adamspd-seed0-wd1-lr5e-05", 1, marker=tmp_path / "killed-once"),  # retry succeeds
                  ExitAt("adamw-seed1-wd0.01-lr5e-05", 2)))  # dies on every try (after its checkpoint)
    logs: list[str] = []
    with pytest.raises(RunsFailed, match=r"2 run\(s\) failed \(adamw-seed1-wd0.01-lr5e-05, wise_ft-seed1"):
        run_compare(config, out, progress=False, threads=1, log=logs.append, interrupt=kill,
                    executor=_executor(max_retries=1))
    assert (tmp_path / "killed-once").is_file()
    records = read_records(out / "results.jsonl")
    failed = {"adamw-seed1-wd0.01-lr5e-05", "wise_ft-seed1-wd0.01-lr5e-05"}
    # Every other run finished (the one killed once, continued from its checkpoint, exactly).
    assert _by_id(records) == _by_id([r for r in expected if r["run_id"] not in failed])
    assert any(line.startswith("FAILED adamw-seed1-wd0.01-lr5e-05, wise_ft-seed1-wd0.01-lr5e-05: its worker died")
               for line in logs), logs
    report = (out / "report.md").read_text()
    assert "Incomplete study: 2 run(s) failed" in report and "- adamw-seed1-wd0.01-lr5e-05, wise_ft-seed1-wd0.01-lr5e-05: its worker died" in report
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["adamw-seed1-wd0.01-lr5e-05.pt"]

    run_compare(config, out, resume=True, progress=False, threads=1, log=lambda s: None)  # one process
    assert _by_id(read_records(out / "results.jsonl")) == _by_id(expected)
    assert "Incomplete study" not in (out / "report.md").read_text()


@pytest.mark.slow
def test_ctrl_c_cancels_the_tasks_and_resume_on_workers_completes(study, ray_instance, tmp_path):
    config, expected, _ = study
    out = tmp_path / "ray"
    stopped = []

    def log(line: str) -> None:  # Ctrl-C in the driver as the first result is logged
        if line.startswith("[") and not stopped:
            stopped.append(line)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_compare(config, out, progress=False, threads=1, log=log, executor=_executor())
    partial = read_records(out / "results.jsonl")
    assert 1 <= len(partial) < len(expected)
    assert json.loads((out / "config.json").read_text()) == json.loads(config.to_json())
    deadline = time.monotonic() + 120  # cancelled tasks give their CPUs back
    while ray_instance.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray_instance.available_resources().get("CPU", 0) == 2

    logs: list[str] = []
    run_compare(config, out, resume=True, progress=False, threads=1, log=logs.append, executor=_executor())
    assert sum(line.startswith("[") for line in logs) == len(expected) - len(partial)  # only the rest ran
    assert _by_id(read_records(out / "results.jsonl")) == _by_id(expected)


# -- options (no Ray instance needed) ------------------------------------------------------------

@pytest.mark.parametrize(("args", "fragments"), [
    (["--gpus-per-run", "1"], ("--gpus-per-run", "--workers N or --ray-address")),
    (["--workers", "0"], ("--workers 0", "positive")),
    (["--workers", "2", "--gpus-per-run", "-1"], ("--gpus-per-run -1", "non-negative")),
    (["--workers", "2", "--device", "cpu", "--gpus-per-run", "1"], ("--gpus-per-run 1 with --device cpu",)),
    (["--ray-address", " "], ("--ray-address", "auto")),
])
def test_bad_worker_options_are_one_line_errors(tmp_path, args, fragments):
    result = runner.invoke(app, ["compare", "--quick", "--out", str(tmp_path / "o"), *args])
    one_line_error(result, *fragments)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("device", "gpus", "fragment"), [
    ("cuda:1", 1.0, "each run gets its own GPU"),
    ("cuda", 0.0, "needs --gpus-per-run"),
    ("cpu", 0.5, "--gpus-per-run 0.5 with --device cpu"),
])
def test_devices_ray_cannot_honour_are_refused(device, gpus, fragment):
    from spdecay.experiments.errors import RunnerError
    from spdecay.experiments.workers.options import check_device

    with pytest.raises(RunnerError, match=fragment):
        check_device(device, gpus)
    check_device("auto", gpus)  # auto: the GPU Ray gives the run, or the CPU


def test_workers_without_ray_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if it were not installed
    result = runner.invoke(app, ["compare", "--quick", "--workers", "2", "--out", str(tmp_path / "o")])
    one_line_error(result, "--workers", 'pip install "spdecay[ray]"')


def test_an_address_where_nothing_listens_is_refused_at_once(tmp_path):
    pytest.importorskip("ray")
    import socket

    with socket.socket() as s:  # a port nothing listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        result = runner.invoke(app, ["compare", "--quick", "--ray-address", f"127.0.0.1:{port}",
                                     "--out", str(tmp_path / "o")])
    one_line_error(result, f"--ray-address 127.0.0.1:{port}: no Ray cluster answers there")
    assert not (tmp_path / "o").exists()


def test_failed_runs_exit_with_status_one(tmp_path, monkeypatch):
    import spdecay.experiments.runner as runner_mod

    def fail(config, out, **kwargs):
        raise RunsFailed("1 run(s) failed (adamw-seed0-wd0.01-lr0.0001); retry them")

    monkeypatch.setattr(runner_mod, "run_compare", fail)
    result = runner.invoke(app, ["compare", "--quick", "--out", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert result.stderr.strip() == "spdecay: error: 1 run(s) failed (adamw-seed0-wd0.01-lr0.0001); retry them"


def test_worker_options_may_accompany_resume(tmp_path, monkeypatch):
    import spdecay.experiments.runner as runner_mod

    pytest.importorskip("ray")

    calls = []
    monkeypatch.setattr(runner_mod, "run_compare", lambda config, out, **kwargs: calls.append(kwargs))
    result = runner.invoke(app, ["compare", "--resume", "--out", str(tmp_path), "--workers", "2", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert type(calls[0]["executor"]).__name__ == "RayExecutor"
    assert calls[0]["executor"].options.workers == 2 and calls[0]["executor"].options.threads == 1
