"""The method table: every ``--optimizers`` name is one ``Method`` record here.

A record says what the method is (label, colour, what it regularises and towards what), which
strengths it tries under each grid (``single``: one value; ``sweep``: ``--sweep default``;
``evidence``: the evidence preset), its default learning rate and how its optimizer is built.
Reports, plots, the CLI help and the protocol read this table; adding a method is one entry.

Optimizers are built with the same parameter grouping for every anchored method
(``spdecay.param_groups``; each group carries ``param_names`` so SPD statistics are per layer):

* backbone weights with a pre-trained value: regularised by the method (AdamW decay, L2-SP
  penalty towards the pre-trained value, SPD projection towards it);
* backbone biases and normalisation parameters: SPD and L2-SP regularise them too (their anchor
  is the pre-trained value, as in the paper), AdamW does not decay them (the usual practice);
* the new classification head: never anchored (it has no pre-trained value), plain decay
  ``HEAD_WEIGHT_DECAY`` for the anchored methods, the swept decay for AdamW;
* LoRA adapters (``--lora-rank``, the llm task): SPD anchors them at zero, as in the paper's
  PEFT experiments (its projection is selective and bounded by the step, so it cannot pull a
  randomly initialised ``lora_A`` to zero); L2-SP anchors them at their initial values
  (``lora_B`` at zero, ``lora_A`` at its random init): a plain pull of ``lora_A`` to zero
  would collapse the adapters (and the model to the majority class).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from spdecay.experiments.errors import RunnerError

HEAD_WEIGHT_DECAY = 0.01
SGD_MOMENTUM = 0.9
PROBE_LR = 1e-3  # the probe trains a linear head on fixed features: a larger rate than fine-tuning

# Kinds of method: ``train`` (an optimizer fine-tunes the model), ``probe`` (frozen features, a
# new head only), ``derived`` (made from another method's trained model: WiSE-FT), ``reference``
# (the untouched model, one row per seed; added by the tasks that ask for it).
KINDS = ("train", "probe", "derived", "reference")

# SPD's condition, written once for every report, plot and table: the SPD core
# (``spdecay.spd.decision.spd_ratio``) projects a tensor where c = -<g, p - p0> < 0, i.e. where
# inner = <g, p - p0> > 0 (the descent direction -g points back towards the pre-trained value).
SPD_CONDITION = "⟨g, θ−θ₀⟩ > 0"
SPD_CONDITION_LONG = ("c = −⟨g, θ−θ₀⟩ < 0, i.e. ⟨g, θ−θ₀⟩ > 0 (the descent direction −g points back "
                      "towards θ₀)")


@dataclass
class BuiltOptimizer:
    optimizer: Any  # torch.optim.Optimizer
    stats: Callable[[], object] | None  # -> SPDStats (names, fired, ratio, deviation) or None
    addon: object | None = None  # SelectiveProjectionDecay (its anchors live in optimizer.state)


Build = Callable[..., BuiltOptimizer]  # build(model, lr, strength, head=()) -> BuiltOptimizer


@dataclass(frozen=True)
class Method:
    """One row of the method table.

    ``grids`` maps a grid name (``single``, ``sweep``, ``evidence``) to the strengths
    (``weight_decay``) tried; every trained method's grids have the same sizes (equal tuning
    budget). ``lr``: ``"adam"`` or ``"sgd"`` (the task's default rate of that family) or a number.
    ``loop_hook(model, task_model, total_steps)``: an object with ``step()``, ``state_dict()``
    and ``load_state_dict()`` the training loop calls after every optimizer step (LP-FT).
    """

    name: str
    label: str
    color: str
    regularises: str
    strength: str  # what the swept weight_decay means for this method
    kind: str = "train"
    grids: dict[str, tuple[float, ...]] = field(default_factory=dict)
    lr: str | float = "adam"
    build: Build | None = None
    derived_from: str | None = None  # derived: the method whose trained model it reuses
    loop_hook: Callable[..., Any] | None = None
    needs_head: bool = False  # only for tasks that train a new classification head
    # Per grid name: learning rates swept by default (a method whose strength is inert sweeps its
    # rate instead; the grid size is strengths x rates) ...
    lr_grids: dict[str, tuple[float, ...]] = field(default_factory=dict)
    # ... and, for a derived method, values swept at evaluation only (WiSE-FT's alpha).
    eval_grids: dict[str, tuple[float, ...]] = field(default_factory=dict)
    # prepare(model, task_model, data, spec, batch_size, eval_batch_size) -> dict of record fields:
    # run once on a fresh model before its first step (LP-FT's linear-probe phase).
    prepare: Callable[..., dict] | None = None
    default: bool = False  # in the default --optimizers
    evidence: bool = False  # in the evidence preset's --optimizers

    def grid(self, name: str) -> list[float]:
        if name not in self.grids:
            raise RunnerError(f"method {self.name!r} has no {name!r} grid")
        return list(self.grids[name])


# -- optimizer builders ----------------------------------------------------------------------
def _split_params(model, head: Sequence[str]):
    """AdamW's groups (the anchored methods use ``spdecay.param_groups``)."""
    heads, decay, no_decay, lora = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if any(f".{h}." in f".{name}." for h in head):
            heads.append((name, p))
        elif "lora_" in name:
            lora.append((name, p))
        elif p.ndim < 2:
            no_decay.append((name, p))
        else:
            decay.append((name, p))
    return heads, decay, no_decay, lora


def _group(named, **options) -> dict:
    return {"params": [p for _, p in named], "param_names": [n for n, _ in named], **options}


def build_adamw(model, lr: float, strength: float, head: Sequence[str] = ()) -> BuiltOptimizer:
    import torch

    heads, decay, no_decay, lora = _split_params(model, head)
    groups = [_group(decay + lora, weight_decay=strength), _group(no_decay, weight_decay=0.0),
              _group(heads, weight_decay=strength)]
    # foreach: the multi-tensor path, as AdamSPD uses by default on one device (a fair timing).
    return BuiltOptimizer(torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, foreach=True), None)


def _anchored_groups(model, strength: float, head: Sequence[str], for_addon: bool = False) -> list[dict]:
    import spdecay

    return spdecay.param_groups(model, head=list(head) or None, no_decay=None, peft="auto", weight_decay=strength,
                                head_weight_decay=HEAD_WEIGHT_DECAY, for_addon=for_addon)


def build_adamspd(model, lr: float, strength: float, head: Sequence[str] = ()) -> BuiltOptimizer:
    import spdecay

    opt = spdecay.AdamSPD(_anchored_groups(model, strength, head), lr=lr, weight_decay=strength)
    return BuiltOptimizer(opt, opt.spd_stats)


def build_l2sp(model, lr: float, strength: float, head: Sequence[str] = ()) -> BuiltOptimizer:
    """Classic (loss-level) L2-SP: lam/2 ||p - p0||^2 joins the loss, through Adam's moments."""
    import spdecay

    groups = _anchored_groups(model, strength, head)
    for group in groups:
        if group.get("anchor") == "zero":
            group["anchor"] = "init"  # LoRA adapters: their initial values (see the module doc)
    return BuiltOptimizer(spdecay.AdamL2SP(groups, lr=lr, weight_decay=strength), None)


def build_sgdspd(model, lr: float, strength: float, head: Sequence[str] = ()) -> BuiltOptimizer:
    """SGD with momentum; the SPD add-on hooks its ``step()`` (one call projects)."""
    import torch

    import spdecay

    opt = torch.optim.SGD(_anchored_groups(model, strength, head, for_addon=True), lr=lr, momentum=SGD_MOMENTUM)
    addon = spdecay.SelectiveProjectionDecay(opt, weight_decay=strength)
    return BuiltOptimizer(opt, addon.spd_stats, addon)


def _lpft_prepare(model, task_model, data, spec, batch_size: int, eval_batch_size: int) -> dict:
    from spdecay.experiments.training.head_fit import probe_head_phase

    return probe_head_phase(model, task_model, data, spec.seed, batch_size, eval_batch_size, lr=PROBE_LR,
                            weight_decay=HEAD_WEIGHT_DECAY)


_STRENGTHS = {"single": (0.01,), "sweep": (0.01, 0.1), "evidence": (0.01, 0.1, 1.0)}
_SPD_STRENGTHS = {"single": (1.0,), "sweep": (0.5, 1.0), "evidence": (0.5, 1.0, 2.0)}
# The powered presets (issue 18): four trained settings per method that span comparable ranges.
# SPD's strength reaches the deviation of L2-SP's strongest point; AdamW's decay is inert at
# these step counts, so AdamW (and LP-FT) sweep the learning rate; the probe sweeps its head
# decay; WiSE-FT sweeps alpha at evaluation only (no extra training).
POWERED_LRS = (1e-4, 2e-4, 3e-4, 5e-4)
POWERED = {"adamw": (0.01,), "l2sp": (0.01, 0.1, 0.3, 1.0), "adamspd": (1.0, 2.0, 4.0, 8.0),
           "probe": (0.0, 0.01, 0.1, 1.0), "wise_ft": (0.25, 0.5, 0.75)}

METHODS: dict[str, Method] = {m.name: m for m in (
    Method("pretrained", "the pre-trained model (zero-shot)", "#000000", "nothing is trained", "-",
           kind="reference", grids={g: (0.0,) for g in (*_STRENGTHS, "powered")}, lr=0.0),
    Method("adamw", "AdamW", "#1f77b4",
           "decoupled weight decay of backbone weight matrices and the head towards **zero** "
           "(biases and norms not decayed; LoRA adapters: towards zero)", "decay rate",
           grids={**_STRENGTHS, "powered": POWERED["adamw"]}, lr_grids={"powered": POWERED_LRS},
           build=build_adamw, default=True, evidence=True),
    Method("l2sp", "Adam L2-SP", "#2ca02c",
           "loss-level penalty strength/2 · ‖θ−θ₀‖² on every backbone parameter towards the "
           "**pre-trained** value (LoRA adapters: towards their **initial** values, B = 0 and A "
           "at its random init, so it cannot collapse them); head: decay 0.01", "penalty weight λ",
           grids={"single": (0.1,), "sweep": (0.1, 1.0), "evidence": (0.01, 0.1, 1.0), "powered": POWERED["l2sp"]},
           build=build_l2sp,
           default=True, evidence=True),
    Method("adamspd", "AdamSPD", "#d62728",
           "selective projection towards the **pre-trained** value of each backbone tensor, "
           f"only on steps where {SPD_CONDITION} and only by the step's growth of ‖θ−θ₀‖ (LoRA "
           "adapters: towards zero, as in the paper); head: decay 0.01", "projection strength λ",
           grids={**_SPD_STRENGTHS, "powered": POWERED["adamspd"]}, build=build_adamspd, default=True,
           evidence=True),
    Method("sgdspd", "SGD + SPD", "#9467bd",
           "SGD with momentum plus the SPD add-on: the same selective projection as AdamSPD",
           "projection strength λ", grids={**_SPD_STRENGTHS, "powered": POWERED["adamspd"]}, lr="sgd",
           build=build_sgdspd),
    Method("probe", "linear probe", "#7f7f7f",
           "the backbone is **frozen** (features computed once); only a new linear head trains, "
           "with AdamW decay", "head decay", kind="probe", grids={**_STRENGTHS, "powered": POWERED["probe"]}, lr=PROBE_LR,
           default=True, evidence=True),
    Method("wise_ft", "WiSE-FT", "#ff7f0e",
           "AdamW's fine-tuned backbone averaged with the **pre-trained** one (alpha 0.5; the powered "
           "presets sweep alpha 0.25/0.5/0.75 at evaluation only; `spdecay.interpolate`; LoRA merged "
           "first); AdamW's head", "AdamW's decay rate (powered: AdamW's learning rate x alpha)",
           kind="derived", derived_from="adamw", eval_grids={"powered": POWERED["wise_ft"]}, default=True,
           evidence=True),
    Method("lpft", "LP-FT", "#8c564b",
           "the new head first trained alone on the frozen pre-trained features exactly like the linear "
           "probe row (its own rate 1e-3 and passes), then AdamW on everything (decay towards zero) "
           "with the run's own warm-up and schedule", "decay rate (powered: learning rate)",
           grids={**_STRENGTHS, "powered": POWERED["adamw"]}, lr_grids={"powered": POWERED_LRS},
           build=build_adamw, prepare=_lpft_prepare, needs_head=True, evidence=True),
)}



def optimizer_names() -> tuple[str, ...]:
    """Every name --optimizers accepts (the reference rows are added by the tasks that want them)."""
    return tuple(n for n, m in METHODS.items() if m.kind != "reference")


OPTIMIZERS = optimizer_names()  # as of import (optimizer_names() sees entries added later)
DEFAULT_OPTIMIZERS = tuple(n for n, m in METHODS.items() if m.default)
EVIDENCE_OPTIMIZERS = tuple(n for n, m in METHODS.items() if m.evidence)


def method(name: str) -> Method:
    if name not in METHODS:
        raise RunnerError(f"unknown optimizer {name!r}; expected one of {', '.join(optimizer_names())}")
    return METHODS[name]


def strength_text(name: str, value: float) -> str:
    """A strength as the method names it: ``λ 1`` (SPD, L2-SP: the swept strength is a λ) or
    ``decay 0.01`` (AdamW, LP-FT, the probe's head, WiSE-FT's AdamW)."""
    m = METHODS.get(name)
    if m is None or m.kind == "reference":
        return "-"
    return f"{'λ' if 'λ' in m.strength else 'decay'} {value:g}"


def label(name: str) -> str:
    return METHODS[name].label if name in METHODS else name


def color(name: str) -> str:
    return METHODS[name].color if name in METHODS else "gray"


def order(names) -> list[str]:
    """``names`` in the table's order (unknown names last, in their given order)."""
    rank = {n: i for i, n in enumerate(METHODS)}
    return sorted(names, key=lambda n: rank.get(n, len(rank)))


def build_optimizer(name: str, model, head_patterns: Sequence[str], lr: float, strength: float) -> BuiltOptimizer:
    """The optimizer of method ``name``; ``strength`` is its regularisation hyper-parameter
    (``weight_decay``), ``head_patterns`` name the new head's modules (e.g. ``["classifier"]``)."""
    m = method(name)
    build = m.build if m.kind != "derived" else METHODS[m.derived_from].build
    if build is None:
        raise RunnerError(f"method {name!r} has no optimizer of its own")
    return build(model, lr, strength, head=tuple(head_patterns))


def help_text() -> str:
    """The methods for ``--optimizers --help``, read off the table."""
    return ", ".join(f"{n} ({METHODS[n].label})" for n in optimizer_names())
