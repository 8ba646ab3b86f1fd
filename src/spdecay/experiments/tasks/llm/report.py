"""The llm task's report section (a hook of the common report, placed after the comparison):
balanced accuracy on every set, BBC News zero-shot before -> after fine-tuning and the drop
(forgetting), and a plain statement of the outcome."""

from __future__ import annotations

import statistics

from spdecay.experiments.config import CompareConfig
from spdecay.experiments.methods import METHODS, label, order
from spdecay.experiments.reporting.markdown import _fmt

RETENTION_SET = "bbc_news"  # (tasks.llm.data.RETENTION_SET; not imported: this module stays light)

METHOD_NOTES = {
    "pretrained": "nothing is trained",
    "probe": "only a logistic-regression head on frozen features (C chosen on ID validation); the LM is untouched",
    "adamw": "decoupled decay of every adapter towards zero (lr · wd · θ per step)",
    "wise_ft": "AdamW's result, halfway back to the pre-trained weights (lora_B scaled by α = 0.5)",
    "l2sp": "loss-level penalty wd/2 ‖θ − θ₀‖² towards each adapter's initial value (lora_B 0, lora_A its random init)",
    "adamspd": "selective projection of each adapter towards zero (anchor=\"zero\"), strength wd",
    "sgdspd": "SGD with the SPD add-on, adapters projected towards zero",
}


def statement(config: CompareConfig, defaults) -> str:
    if config.preset == "quick":
        return ("Smoke-scale run (`--quick`): a handful of steps and examples; the numbers only show that "
                "everything runs and mean nothing about the methods.")
    return (f"LoRA (r={defaults.extra['lora_rank']} on q_proj and v_proj) on SmolLM2-135M-Instruct, trained as "
            "instruction following: a chat prompt with the text and the answer word as the target. Classification "
            "compares the log-likelihood of each label word (no sampling). ID: Rotten Tomatoes; distribution "
            "shift: tweets (same question); capability retention: BBC News topics (5 classes) zero-shot, never "
            "trained on, scored before and after fine-tuning (forgetting = before − after). `pretrained` is the "
            "untouched model zero-shot.")


def _table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
                     + ["| " + " | ".join(r) + " |" for r in rows])


def _chosen(records: list[dict]) -> dict[str, dict]:
    from spdecay.experiments.protocol import select

    best = select(records)
    return {n: best[n] for n in order(best)}


def llm_table(best: dict[str, dict]) -> str:
    header = ["method", "wd", "lr", "seeds", "ID val", "ID test", "tweets", "BBC before → after", "forgetting",
              "‖ΔW‖/‖W‖", "SPD fired"]
    rows = []
    for name, c in best.items():
        recs = c["records"]
        ret = [r["retention"][RETENTION_SET] for r in recs]
        fired = [r["spd"]["fraction_fired"] if r.get("spd") else None for r in recs]
        rows.append([
            label(name), f"{c['weight_decay']:g}", f"{c['lr']:g}", str(len(recs)),
            _fmt([r["val"]["balanced_accuracy"] for r in recs]), _fmt([r["test"]["balanced_accuracy"] for r in recs]),
            _fmt([r["ood"]["tweets"]["balanced_accuracy"] for r in recs]),
            f"{_fmt([x['before_balanced_accuracy'] for x in ret])} → {_fmt([x['after_balanced_accuracy'] for x in ret])}",
            _fmt([x["forgetting"] for x in ret]),
            _fmt([r["deviation"].get("weight_change_relative") for r in recs], 4),
            _fmt(fired, 2),
        ])
    return _table(header, rows)


def summary(best: dict[str, dict]) -> str:
    """One plain paragraph: what came out, without over-claiming from few seeds."""
    seeds = max(len(c["records"]) for c in best.values())
    parts = []
    if "pretrained" in best:
        pre = best["pretrained"]["records"][0]
        parts.append(f"The untouched model scores {pre['test']['balanced_accuracy']:.3f} (ID test), "
                     f"{pre['ood']['tweets']['balanced_accuracy']:.3f} (tweets) and "
                     f"{pre['ood'][RETENTION_SET]['balanced_accuracy']:.3f} (BBC News) zero-shot (balanced accuracy).")
    trained = [n for n in best if METHODS.get(n) is not None and METHODS[n].kind in ("train", "derived")]
    if trained:
        def mean_of(n, f):
            return statistics.fmean(f(r) for r in best[n]["records"])

        def forgetting(r):
            return r["retention"][RETENTION_SET]["forgetting"]

        top_id = max(trained, key=lambda n: mean_of(n, lambda r: r["test"]["balanced_accuracy"]))
        top_ood = max(trained, key=lambda n: mean_of(n, lambda r: r["ood"]["tweets"]["balanced_accuracy"]))
        least = min(trained, key=lambda n: mean_of(n, forgetting))
        parts.append(f"Among the fine-tuned rows, {label(top_id)} is highest on ID test, {label(top_ood)} on the "
                     f"tweets and {label(least)} forgets least BBC News ({mean_of(least, forgetting):+.3f}).")
    if seeds < 2:
        parts.append("With one seed there are no intervals: differences of a few points are within "
                     "seed-to-seed noise and support no claim either way.")
    return " ".join(parts)


def llm_section(config: CompareConfig, records: list[dict]) -> str:
    best = _chosen(records)
    return f"""## LLM: balanced accuracy and capability retention (BBC News zero-shot)

{llm_table(best)}

Balanced accuracy, mean ± std over seeds at each method's chosen strength. "BBC before → after": the
pre-trained model's zero-shot score and the fine-tuned model's; forgetting = before − after (the
probe leaves the LM untouched, so it forgets nothing by construction). ‖ΔW‖/‖W‖: the adapters' weight
change s·B·A relative to the weights it modifies.

### What came out

{summary(best)}
"""
