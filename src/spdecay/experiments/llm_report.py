"""report.md of the llm task: the runner's usual report and plots, then the llm section:
balanced accuracy on every set, BBC News zero-shot before -> after fine-tuning and the drop
(forgetting), per-seed paired differences against AdamW, and a plain statement of the outcome."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from pathlib import Path

from spdecay.experiments.config import CompareConfig
from spdecay.experiments.llm_data import RETENTION_SET
from spdecay.experiments.results_io import atomic_write_text

ORDER = ("pretrained", "probe", "adamw", "wise_ft", "l2sp", "adamspd", "sgdspd")
NAMES = {"pretrained": "pre-trained (zero-shot)", "probe": "linear probe", "adamw": "AdamW", "wise_ft": "WiSE-FT (AdamW, α=0.5)",
         "l2sp": "Adam L2-SP", "adamspd": "AdamSPD", "sgdspd": "SGD + SPD"}
REGULARISES = {
    "pretrained": "nothing is trained",
    "probe": "only a logistic-regression head on frozen features (C chosen on ID validation); the LM is untouched",
    "adamw": "decoupled decay of every adapter towards zero (lr · wd · θ per step)",
    "wise_ft": "AdamW's result, halfway back to the pre-trained weights (lora_B scaled by α)",
    "l2sp": "loss-level penalty wd/2 ‖θ − θ₀‖² towards each adapter's initial value (lora_B 0, lora_A its random init)",
    "adamspd": "selective projection of each adapter towards zero (anchor=\"zero\"), strength wd",
    "sgdspd": "SGD with the SPD add-on, adapters projected towards zero",
}
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def select_llm(records: list[dict]) -> dict[str, dict]:
    """Per method: the grid point with the best mean ID-validation balanced accuracy over seeds."""
    by_key: dict[tuple, list[dict]] = {}
    for r in records:
        by_key.setdefault((r["optimizer"], r["hparams"]["weight_decay"], r["hparams"]["lr"]), []).append(r)
    best: dict[str, dict] = {}
    for (name, wd, lr), recs in by_key.items():
        score = statistics.fmean(r["val"]["balanced_accuracy"] for r in recs)
        if name not in best or score > best[name]["score"]:
            best[name] = {"weight_decay": wd, "lr": lr, "score": score, "records": sorted(recs, key=lambda r: r["seed"])}
    return {n: best[n] for n in sorted(best, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER))}


def _fmt(values: list[float | None], digits: int = 3) -> str:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
                     + ["| " + " | ".join(r) + " |" for r in rows])


def llm_table(best: dict[str, dict]) -> str:
    header = ["method", "wd", "lr", "seeds", "ID val", "ID test", "tweets", "BBC before → after", "forgetting",
              "‖ΔW‖/‖W‖", "SPD fired", "time (s)"]
    rows = []
    for name, c in best.items():
        recs = c["records"]
        ret = [r["retention"][RETENTION_SET] for r in recs]
        fired = [r["spd"]["fraction_fired"] if r.get("spd") else None for r in recs]
        rows.append([
            NAMES.get(name, name), f"{c['weight_decay']:g}", f"{c['lr']:g}", str(len(recs)),
            _fmt([r["val"]["balanced_accuracy"] for r in recs]), _fmt([r["test"]["balanced_accuracy"] for r in recs]),
            _fmt([r["ood"]["tweets"]["balanced_accuracy"] for r in recs]),
            f"{_fmt([x['before_balanced_accuracy'] for x in ret])} → {_fmt([x['after_balanced_accuracy'] for x in ret])}",
            _fmt([x["forgetting"] for x in ret]),
            _fmt([r["deviation"].get("weight_change_relative") for r in recs], 4),
            _fmt(fired, 2), _fmt([r["wall_time_s"] for r in recs], 0),
        ])
    return _table(header, rows)


def paired(best: dict[str, dict], name: str, metric: Callable[[dict], float]) -> tuple[list[float], float, float | None]:
    """Per-seed differences name - AdamW, their mean and the 95% t half-width (None: 1 seed)."""
    ref = {r["seed"]: metric(r) for r in best["adamw"]["records"]}
    diffs = [metric(r) - ref[r["seed"]] for r in best[name]["records"] if r["seed"] in ref]
    if not diffs:
        return [], float("nan"), None
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return diffs, mean, None
    half = T95.get(len(diffs) - 1, 1.96) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return diffs, mean, half


METRICS = {
    "ID test": lambda r: r["test"]["balanced_accuracy"],
    "tweets": lambda r: r["ood"]["tweets"]["balanced_accuracy"],
    "BBC after": lambda r: r["ood"][RETENTION_SET]["balanced_accuracy"],
}


def paired_section(best: dict[str, dict]) -> tuple[str, list[str]]:
    if "adamw" not in best:
        return "No AdamW runs: no paired differences.", []
    rows, sentences = [], []
    for name in best:
        if name == "adamw":
            continue
        cells, verdicts = [NAMES.get(name, name)], []
        for label, metric in METRICS.items():
            diffs, mean, half = paired(best, name, metric)
            if not diffs:
                cells.append("-")
                continue
            per_seed = ", ".join(f"{d:+.3f}" for d in diffs)
            if half is None:
                cells.append(f"{mean:+.3f} (1 seed, no interval)")
                verdicts.append(f"{label} {mean:+.3f}")
            else:
                lo, hi = mean - half, mean + half
                cells.append(f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}] ({per_seed})")
                verdicts.append(f"{label} {mean:+.3f} ({'distinguishable from zero' if lo > 0 or hi < 0 else 'not distinguishable from zero'})")
        rows.append(cells)
        sentences.append(f"{NAMES.get(name, name)} vs AdamW: " + "; ".join(verdicts) + ".")
    header = ["method − AdamW"] + [f"{k} (bal.)" for k in METRICS]
    return _table(header, rows), sentences


def summary(best: dict[str, dict]) -> str:
    """One plain paragraph: what came out, without over-claiming from few seeds."""
    seeds = max(len(c["records"]) for c in best.values())
    parts = []
    if "pretrained" in best:
        pre = best["pretrained"]["records"][0]
        parts.append(f"The untouched model scores {pre['test']['balanced_accuracy']:.3f} (ID test), "
                     f"{pre['ood']['tweets']['balanced_accuracy']:.3f} (tweets) and "
                     f"{pre['ood'][RETENTION_SET]['balanced_accuracy']:.3f} (BBC News) zero-shot (balanced accuracy).")
    trained = [n for n in ("adamw", "l2sp", "adamspd", "sgdspd", "wise_ft") if n in best]
    if trained:
        def mean_of(n, f):
            return statistics.fmean(f(r) for r in best[n]["records"])

        top_id = max(trained, key=lambda n: mean_of(n, METRICS["ID test"]))
        top_ood = max(trained, key=lambda n: mean_of(n, METRICS["tweets"]))
        least_forget = min(trained, key=lambda n: mean_of(n, lambda r: r["retention"][RETENTION_SET]["forgetting"]))
        parts.append(f"Among the fine-tuned rows, {NAMES[top_id]} is highest on ID test, {NAMES[top_ood]} on the "
                     f"tweets and {NAMES[least_forget]} forgets least BBC News "
                     f"({mean_of(least_forget, lambda r: r['retention'][RETENTION_SET]['forgetting']):+.3f}).")
    if seeds < 2:
        parts.append("With one seed there are no intervals: differences of a few points are within "
                     "seed-to-seed noise and support no claim either way.")
    return " ".join(parts)


def statement(config: CompareConfig) -> str:
    if config.quick:
        return ("Smoke-scale run (`--quick`): a handful of steps and examples; the numbers only show that "
                "everything runs and mean nothing about the methods.")
    return ("LoRA (r=8 on q_proj and v_proj) on SmolLM2-135M-Instruct, trained as instruction following: a chat "
            "prompt with the text and the answer word as the target. Classification compares the log-likelihood "
            "of each label word (no sampling). ID: Rotten Tomatoes; distribution shift: tweets (same question); "
            "capability retention: BBC News topics (5 classes) zero-shot, never trained on, scored before and "
            "after fine-tuning (forgetting = before − after). `pretrained` is the untouched model zero-shot.")


def llm_section(best: dict[str, dict]) -> str:
    main = llm_table(best)
    return f"""## LLM: balanced accuracy and capability retention (BBC News zero-shot)

{main}

Balanced accuracy, mean ± std over seeds at each method's chosen strength. "BBC before → after": the
pre-trained model's zero-shot score and the fine-tuned model's; forgetting = before − after (the
probe leaves the LM untouched, so it forgets nothing by construction). ‖ΔW‖/‖W‖: the adapters' weight
change s·B·A relative to the weights it modifies.

### What came out

{summary(best)}
"""


def write_llm_report(out: Path, config: CompareConfig, records: list[dict], *, log=print,
                     total_s: float | None = None, notes: dict | None = None, note: str | None = None) -> str:
    """The runner's report (protocol, comparison, paired differences, plots) with the llm
    section (forgetting) after its comparison; a complete llm-only report if the common one
    cannot take these records."""
    best = select_llm(records)
    timing = f"\nWall time of this invocation: {total_s / 60:.1f} min.\n" if total_s else ""
    section = llm_section(best) + timing + "\n"
    # The common report reads steps and schedule off its first trained record: trained runs first.
    common = sorted(records, key=lambda r: r["optimizer"] in ("pretrained", "probe", "wise_ft"))
    try:
        from spdecay.experiments.report import write_report

        write_report(out, config, common, data_notes=notes, statement=statement(config), note=note)
        base = (out / "report.md").read_text()
        marker = "## Paired differences"
        at = base.find(marker)
        text = (base[:at] + section + "\n" + base[at:]) if at >= 0 else base + "\n" + section
    except Exception as exc:  # noqa: BLE001 - the llm-only report below is complete on its own
        log(f"llm: the common report did not accept the llm records ({type(exc).__name__}: {exc}); "
            "writing the llm report alone")
        paired_table, sentences = paired_section(best)
        regs = _table(["method", "what it regularises"], [[NAMES.get(n, n), REGULARISES.get(n, "-")] for n in best])
        text = (f"# spdecay compare: task `llm`\n\n{statement(config)}\n\n" + (f"{note}\n\n" if note else "") + f"{section}\n"
                f"## Paired differences against AdamW (per seed; mean [95% t-interval] when ≥ 2 seeds)\n\n"
                f"{paired_table}\n\n" + "\n".join("- " + x for x in sentences)
                + f"\n\n## What each method regularises\n\n{regs}\n")
    try:
        from spdecay.experiments.plots import write_plots

        write_plots(out, common)
    except Exception as exc:  # noqa: BLE001 - plots are optional (matplotlib may be missing)
        log(f"plots skipped: {type(exc).__name__}: {exc}")
    atomic_write_text(out / "report.md", text)
    return llm_table(best)
