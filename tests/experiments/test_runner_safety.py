"""The runner's safety (issue 17): checkpoints hold tensors and plain data only, no code from a
model folder, one process per output folder, merges of one study only, damaged files named,
diverged runs never averaged, non-finite options refused, huge texts cut before tokenising."""

from __future__ import annotations

import json
import math
import os
import tempfile

import pytest
import torch
from torch import nn

from spdecay.experiments.config import CompareConfig
from spdecay.experiments.data import Split, TaskData
from spdecay.experiments.errors import RunnerError
from spdecay.experiments.models import ImageModel, TextModel
from spdecay.experiments.protocol import RunSpec
from spdecay.experiments.reporting.results_io import write_records
from tests.helpers.cli import one_line_error

typer_testing = pytest.importorskip("typer.testing")

from spdecay.cli import app  # noqa: E402

runner = typer_testing.CliRunner()


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))


def tiny_task(n: int = 32) -> tuple[TaskData, ImageModel]:
    gen = torch.Generator().manual_seed(0)

    def split(name, k):
        return Split(name, torch.rand(k, 3, 8, 8, generator=gen), torch.randint(0, 3, (k,), generator=gen))

    data = TaskData("image", ["a", "b", "c"], split("train", n), split("val", 12), split("test", 12),
                    {"shift": split("shift", 12)})
    torch.manual_seed(0)
    return data, ImageModel(Net(), 8, [0.5] * 3, [0.25] * 3, ["head"], torch.device("cpu"), hf=False)


def train(spec, data, tm, ckpt, steps=4, **kw):
    from spdecay.experiments.training.loop import train_run

    return train_run(spec, data, tm, total_steps=steps, batch_size=8, eval_batch_size=16, checkpoint_path=ckpt,
                     checkpoint_every=2, progress=False, fingerprint="fp", **kw)


def _results(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "wall_time_s" and not k.startswith("_")}  # _: in-memory only


# -- checkpoints ------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["adamw", "l2sp", "adamspd", "sgdspd", "lpft"])
def test_every_methods_checkpoint_loads_as_tensors_and_plain_data(tmp_path, method):
    """An interrupted run continues from its checkpoint (loaded with weights_only=True) to the
    uninterrupted result."""
    data, tm = tiny_task()
    spec = RunSpec(method, 0, 0.1, 1e-2)
    full = train(spec, data, tm, tmp_path / "full.pt")

    def stop(_spec, step):
        if step == 3:
            raise KeyboardInterrupt

    ckpt = tmp_path / "part.pt"
    with pytest.raises(KeyboardInterrupt):
        train(spec, data, tm, ckpt, interrupt=stop)
    torch.load(ckpt, weights_only=True)  # tensors and plain data only
    assert _results(train(spec, data, tm, ckpt)) == _results(full)


class _MakeDir:
    """A pickle payload: unpickling it creates a folder (it could run anything)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_a_pickle_payload_in_a_checkpoint_is_refused_and_runs_nothing(tmp_path):
    data, tm = tiny_task()
    spec = RunSpec("adamw", 0, 0.01, 1e-3)
    ckpt = tmp_path / f"{spec.run_id}.pt"
    marker = tmp_path / "payload-ran"
    torch.save({"fingerprint": f"fp/{spec.run_id}", "payload": _MakeDir(marker)}, ckpt)
    with pytest.raises(RunnerError, match="refused to load it"):
        train(spec, data, tm, ckpt)
    assert not marker.exists()


# -- model folders ----------------------------------------------------------------------------
def test_a_model_folder_with_custom_code_is_refused_without_running_it(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("pandas")
    model = tmp_path / "evil"
    model.mkdir()
    marker = tmp_path / "code-ran"
    (model / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    (model / "config.json").write_text(json.dumps({
        "model_type": "evil", "auto_map": {"AutoConfig": "evil.EvilConfig",
                                           "AutoModelForSequenceClassification": "evil.EvilModel"}}))
    (model / "vocab.txt").write_text("[PAD]\n[UNK]\ngood\nbad\n")
    rows = "text,label\n" + "".join(f"good {i},pos\nbad {i},neg\n" for i in range(20))
    (tmp_path / "train.csv").write_text(rows)
    result = runner.invoke(app, ["compare", "--model", str(model), "--train", str(tmp_path / "train.csv"),
                                 "--quick", "--no-progress", "--out", str(tmp_path / "out")], input="y\ny\n")
    one_line_error(result, "--model", "auto_map", "trust_remote_code=False")
    assert not marker.exists()


# -- the output folder ------------------------------------------------------------------------
def test_a_second_process_into_a_busy_out_is_refused(tmp_path):
    from spdecay.experiments.outdir import out_lock

    out = tmp_path / "busy"
    with out_lock(out):  # another run holds the folder
        result = runner.invoke(app, ["compare", "--quick", "--no-progress", "--out", str(out)])
    one_line_error(result, "--out", "another spdecay compare", str(os.getpid()))
    assert not (out / "config.json").exists()


def test_an_unwritable_out_is_named_by_its_option(tmp_path, monkeypatch):
    def denied(*args, dir=None, **kwargs):
        raise PermissionError(13, "Permission denied", os.path.join(str(dir), ".config.json.x.tmp"))

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    result = runner.invoke(app, ["compare", "--quick", "--no-progress", "--out", str(tmp_path / "ro")])
    line = one_line_error(result, f"--out {tmp_path / 'ro'}", "Permission denied")
    assert ".tmp" not in line


def _folder(path, config: CompareConfig, records=()):
    path.mkdir()
    (path / "config.json").write_text(config.to_json())
    write_records(path, list(records))
    return path


def test_merge_refuses_folders_of_different_studies_naming_the_difference(tmp_path):
    from spdecay.experiments import merge_runs

    a = _folder(tmp_path / "a", CompareConfig(optimizers=["adamw", "adamspd"], sweep={"adamw": {"weight_decay": [0.01, 0.1]},
                                                                                      "adamspd": {"weight_decay": [1.0, 2.0]}}))
    b = _folder(tmp_path / "b", CompareConfig(optimizers=["adamw", "adamspd"], first_seed=1,
                                              sweep={"adamw": {"weight_decay": [0.01]}, "adamspd": {"weight_decay": [1.0]}}))
    with pytest.raises(RunnerError, match=r"b was made with other settings than .*a: sweep"):
        merge_runs([a, b], tmp_path / "ab")
    # Other methods in another folder, but unequal tuning budgets once merged.
    c = _folder(tmp_path / "c", CompareConfig(optimizers=["l2sp"]))
    with pytest.raises(RunnerError, match="same number of settings"):
        merge_runs([a, c], tmp_path / "ac")
    assert not (tmp_path / "ab").exists() and not (tmp_path / "ac").exists()


def test_damaged_result_files_are_named(tmp_path):
    from spdecay.experiments import merge_runs
    from spdecay.experiments.reporting.results_io import read_records

    folder = _folder(tmp_path / "run", CompareConfig(quick=True))
    results = folder / "results.jsonl"
    results.write_text('{"run_id": "adamw-seed0-wd0.01-lr0.0001", "optimizer": "adamw"}\n{"run_id": "adamspd-se')
    with pytest.raises(RunnerError, match=f"{results}: line 2 is not a complete JSON record"):
        read_records(results)
    with pytest.raises(RunnerError, match=str(results)):
        merge_runs([folder], tmp_path / "merged")
    result = runner.invoke(app, ["compare", "--resume", "--out", str(folder)])
    one_line_error(result, str(results), "truncated or corrupt")
    (folder / "config.json").write_text('{"task": "sentim')
    result = runner.invoke(app, ["compare", "--resume", "--out", str(folder)])
    one_line_error(result, str(folder / "config.json"), "truncated or corrupt")


# -- diverged runs ----------------------------------------------------------------------------
def test_a_diverged_run_is_recorded_as_diverged_not_as_a_result(tmp_path):
    data, tm = tiny_task()
    record = train(RunSpec("adamw", 0, 0.01, math.inf), data, tm, tmp_path / "x.pt")
    assert record["diverged"]["step"] == 1 and record["diverged"]["loss"] == "nan"
    assert math.isnan(record["test"]["balanced_accuracy"]) and math.isnan(record["ood"]["shift"]["accuracy"])
    from spdecay.experiments.runner import run_summary

    assert "DIVERGED" in run_summary(1, 2, record) and "excluded" in run_summary(1, 2, record)


def test_diverged_runs_are_left_out_of_every_mean_with_a_visible_note(tmp_path):
    from spdecay.experiments.reporting.report import write_report
    from spdecay.experiments.training.loop import diverged_record

    def record(opt, seed, val, test):
        m = {"accuracy": test, "balanced_accuracy": test}
        return {"run_id": f"{opt}-seed{seed}", "optimizer": opt, "seed": seed, "hparams": {"weight_decay": 0.01, "lr": 1e-4},
                "val": {"accuracy": val, "balanced_accuracy": val}, "test": m, "ood": {"shift": m},
                "ood_mean_accuracy": test, "ood_mean_balanced_accuracy": test, "deviation": {"total": 1.0, "relative": 0.1},
                "spd": None, "wall_time_s": 1.0, "steps": 4, "batch_size": 8,
                "layers": {"names": [], "deviation": [], "relative": [], "ndim": []}}

    data, _ = tiny_task()
    bad = diverged_record(RunSpec("adamspd", 1, 0.01, 1e-4), data, 3, math.nan, 4, 8)
    records = [record("adamw", 0, 0.8, 0.7), record("adamw", 1, 0.8, 0.9), record("adamspd", 0, 0.8, 0.8), bad]
    write_report(tmp_path, CompareConfig(quick=True, optimizers=["adamw", "adamspd"], seeds=2), records)
    report = (tmp_path / "report.md").read_text()
    assert "## Diverged runs (1)" in report and f"`{bad['run_id']}`: loss nan at step 3" in report
    row = next(line for line in report.splitlines() if line.startswith(("| adamspd |", "| AdamSPD |")))
    assert row.split(" | ")[3] == "1"  # one seed counted, the diverged one left out
    assert "0.500" not in report and "nan" not in row


# -- options ----------------------------------------------------------------------------------
@pytest.mark.parametrize("option", [["--lr", "nan"], ["--lr", "inf"], ["--lr", "adamw=1e999"], ["--epochs", "nan"],
                                    ["--epochs", "inf"], ["--sweep", "weight_decay=0.1,nan"]])
def test_non_finite_option_values_are_refused_up_front(tmp_path, option):
    result = runner.invoke(app, ["compare", "--quick", "--no-progress", "--out", str(tmp_path / "o"), *option])
    one_line_error(result, option[0], "finite")
    assert not (tmp_path / "o").exists()


# -- texts ------------------------------------------------------------------------------------
class _Recording:
    """A tokenizer that remembers how long the texts it was given were."""

    pad_token_id = 0

    def __init__(self):
        self.lengths: list[int] = []

    def __call__(self, texts, truncation=False, max_length=None, **kwargs):
        self.lengths += [len(t) for t in texts]
        return {"input_ids": [[1] * min(len(t.split()), max_length or 10**9) for t in texts]}


def test_a_huge_text_is_cut_before_it_is_tokenised():
    from spdecay.experiments.data import CHARS_PER_TOKEN

    tok = _Recording()
    tm = TextModel(nn.Linear(2, 2), tok, 16, ["x"], torch.device("cpu"))
    huge = "word " * 2_000_000  # 10 MB on one line
    ids = tm.token_ids(Split("train", [huge, "a short text"], torch.tensor([0, 1])))
    assert max(tok.lengths) <= CHARS_PER_TOKEN * 16
    assert ids == [[1] * 16, [1] * 3]  # what fits the token limit is unchanged


def test_a_huge_text_is_cut_before_the_llm_prompt_tokenises_it():
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from spdecay.experiments.tasks.llm.data import SENTIMENT_PROMPT
    from spdecay.experiments.tasks.llm.scoring import PromptEncoder
    from tests.helpers.llm_tiny import tiny_tokenizer

    real = tiny_tokenizer()
    lengths: list[int] = []

    class Wrapped:
        def __getattr__(self, name):
            return getattr(real, name)

        def __call__(self, texts, **kwargs):
            lengths.extend(len(t) for t in ([texts] if isinstance(texts, str) else texts))
            return real(texts, **kwargs)

    enc = PromptEncoder(Wrapped(), SENTIMENT_PROMPT, 160)
    short = "a great film " * 3
    body = list(real(short, add_special_tokens=False)["input_ids"])[: enc.text_budget]
    assert enc.encode_all([short]) == [enc.prefix + body + enc.suffix]  # what fits is unchanged
    enc.encode_all(["a great film " * 500_000, short])
    assert max(lengths) <= 64 * 160
