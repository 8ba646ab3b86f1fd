"""`spdecay compare --task llm`: LoRA on SmolLM2-135M-Instruct, the paper's PEFT setting.

The model is trained as an instruction follower (chat prompt with the text, the answer word as
the target) and classifies by label-word log-likelihood (``llm_scoring``). Methods:

* ``pretrained``: the untouched model, zero-shot on every set (the reference, always run);
* ``adamw``: AdamW, decoupled decay of the adapters (towards zero);
* ``l2sp``: Adam + L2-SP anchored at the adapters' *initial* values (B at zero, A at its random
  init), so it can never collapse the adapters by construction;
* ``adamspd``: AdamSPD with ``anchor="zero"`` for the adapters (the paper's PEFT setting);
* ``sgdspd``: SGD + the SPD add-on, anchor zero (only when asked for);
* ``wise_ft``: each AdamW run's weights interpolated halfway to the pre-trained model;
* ``probe``: a logistic-regression probe on the frozen model's last prompt-position hidden
  state (sentiment sets only; the LM itself is untouched, so its BBC score is the pre-trained one).

Every record has the shape of the other tasks' records (``val``/``test``/``ood`` with accuracy
and balanced accuracy, ``deviation``, ``spd``, ...) plus ``retention``: the zero-shot BBC News
score before and after fine-tuning and the drop (``forgetting``).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from spdecay.experiments.config import CompareConfig
from spdecay.experiments.data import Split
from spdecay.experiments.errors import RunnerError
from spdecay.experiments.llm_data import RETENTION_SET, LLMData, load_llm_data
from spdecay.experiments.llm_scoring import PromptEncoder, answer_loss, label_log_likelihoods
from spdecay.experiments.protocol import RunSpec
from spdecay.experiments.results_io import atomic_write_text, read_records, write_records
from spdecay.experiments.train import parameter_deviation

TRAINED = ("adamw", "l2sp", "adamspd", "sgdspd")
STRENGTH = {"adamw": 0.01, "l2sp": 0.1, "adamspd": 1.0, "sgdspd": 1.0}  # the runner's single defaults
WISE_ALPHA = 0.5
PROBE_C = (0.01, 0.1, 1.0)  # inverse L2 strengths of the probe, chosen on ID validation
LR_FLOOR = 0.1  # cosine decay to 10% of the peak: SPD still acts late in training
WARMUP_FRACTION = 0.1
SGD_MOMENTUM = 0.9

Log = Callable[[str], None]


@dataclass(frozen=True)
class LLMDefaults:
    train: int
    val: int
    test: int
    tweets: int
    bbc_per_class: int
    batch_size: int
    steps: int
    lr_adam: float
    lr_sgd: float
    max_length: int
    lora_rank: int
    probe_train: int
    eval_sequences: int = 16  # prompts per evaluation forward pass


# Sized for one seed of every method in <= 30 min on 2 shared CPU cores (see the README's table).
LLM_DEFAULTS = LLMDefaults(2000, 64, 160, 160, 8, 8, 32, 1e-3, 1e-2, 64, 8, 128)
LLM_QUICK = LLMDefaults(32, 8, 8, 8, 1, 4, 3, 1e-3, 1e-2, 48, 8, 16)


def llm_defaults(config: CompareConfig) -> LLMDefaults:
    d = LLM_QUICK if config.quick else LLM_DEFAULTS
    if config.train_size is not None:
        d = replace(d, train=config.train_size)
    if config.max_length is not None:
        d = replace(d, max_length=config.max_length)
    if config.lora_rank:
        d = replace(d, lora_rank=config.lora_rank)
    if config.batch_size is not None:
        d = replace(d, batch_size=config.batch_size)
    return d


LLMRun = RunSpec  # one run of the llm task: the same identity as the other tasks' runs


def plan_llm(config: CompareConfig, d: LLMDefaults) -> list[LLMRun]:
    """The trained runs: per seed, per method, every point of its grid (equal sizes)."""
    methods = [m for m in config.optimizers if m in TRAINED]
    if not methods:
        raise RunnerError(f"--task llm: --optimizers needs at least one of {', '.join(TRAINED)}")
    points = {}
    for m in methods:
        sweep = config.sweep.get(m, {})
        lr_default = config.lr.get(m, d.lr_sgd if m == "sgdspd" else d.lr_adam)
        points[m] = [(wd, lr) for wd in sweep.get("weight_decay", [STRENGTH[m]])
                     for lr in sweep.get("lr", [lr_default])]
    if len({len(p) for p in points.values()}) > 1:
        raise RunnerError(f"--sweep: every optimizer needs the same number of settings, got "
                          f"{ {m: len(p) for m, p in points.items()} }")
    return [LLMRun(m, s, wd, lr) for s in seed_range(config) for m in methods for wd, lr in points[m]]


def seed_range(config: CompareConfig) -> range:
    first = getattr(config, "first_seed", 0)  # seeds first .. first + seeds - 1
    return range(first, first + config.seeds)


def total_steps(config: CompareConfig, d: LLMDefaults, n_train: int) -> int:
    if config.steps is not None:
        return config.steps
    if config.epochs is not None:
        return max(1, math.ceil(config.epochs * max(1, n_train // d.batch_size)))
    return d.steps


def warmup_cosine(steps: int, floor: float = LR_FLOOR) -> Callable[[int], float]:
    warmup = max(1, int(WARMUP_FRACTION * steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


# -- model-side helpers ----------------------------------------------------------------------
class LLMTask:
    """The frozen base model, its tokenizer, and the token ids of every split (built once)."""

    def __init__(self, base: nn.Module, tokenizer, data: LLMData, d: LLMDefaults, device: torch.device):
        self.base = base.to(device)
        self.tokenizer = tokenizer
        self.data = data
        self.d = d
        self.device = device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.encoders = {key: PromptEncoder(tokenizer, fmt, d.max_length) for key, fmt in data.prompts.items()}
        self._ids: dict[str, list[list[int]]] = {}

    def encoder(self, split_name: str) -> PromptEncoder:
        return self.encoders.get(split_name, self.encoders["id"])

    def ids(self, split: Split) -> list[list[int]]:
        if split.name not in self._ids:
            self._ids[split.name] = self.encoder(split.name).encode_all(split.inputs)
        return self._ids[split.name]

    @torch.no_grad()
    def scores(self, model: nn.Module, split: Split, with_features: bool = False):
        """(N, C) label log-likelihoods (and (N, H) features) in the split's order; batches of
        similar length to waste little on padding."""
        enc = self.encoder(split.name)
        ids = self.ids(split)
        batch = self.d.eval_sequences  # longer labels continue from the prompt's cache: cheap
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        was_training = model.training
        model.eval()
        scores = torch.empty(len(ids), len(enc.label_ids))
        feats = None
        for start in range(0, len(order), batch):
            index = order[start : start + batch]
            out = label_log_likelihoods(model, [ids[i] for i in index], enc.label_ids, self.pad_id,
                                        with_features=with_features)
            if with_features:
                out, f = out
                if feats is None:
                    feats = torch.empty(len(ids), f.shape[-1])
                feats[index] = f.float().cpu()
            scores[index] = out.float().cpu()
        model.train(was_training)
        return (scores, feats) if with_features else scores

    def evaluate_all(self, model: nn.Module, features: bool = False) -> tuple[dict, dict]:
        """Metrics of val/test/every OOD set, and (if asked) the features of the sentiment sets."""
        from spdecay.experiments.evaluate import accuracy_metrics

        record: dict = {"ood": {}}
        feats: dict[str, torch.Tensor] = {}
        for key, split in (("val", self.data.val), ("test", self.data.test), *self.data.ood.items()):
            want = features and key != RETENTION_SET
            out = self.scores(model, split, with_features=want)
            scores = out[0] if want else out
            if want:
                feats[key] = out[1]
            metrics = accuracy_metrics(scores.argmax(-1), split.labels, scores.shape[1])
            if key in ("val", "test"):
                record[key] = metrics
            else:
                record["ood"][key] = metrics
        add_ood_means(record)
        return record, feats


def add_ood_means(record: dict) -> None:
    for metric in ("accuracy", "balanced_accuracy"):
        values = [m[metric] for m in record["ood"].values()]
        record[f"ood_mean_{metric}"] = sum(values) / len(values)


def build_llm_optimizer(name: str, model: nn.Module, lr: float, strength: float):
    """(optimizer, stats function or None). The anchored methods use the package's param groups
    (``peft="auto"``: adapters anchored at zero, no head); L2-SP re-anchors them at init."""
    import spdecay

    if name == "adamw":
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=lr, weight_decay=strength, foreach=True), None
    groups = spdecay.param_groups(model, peft="auto", weight_decay=strength, for_addon=name == "sgdspd")
    if name == "adamspd":
        opt = spdecay.AdamSPD(groups, lr=lr, weight_decay=strength)
        return opt, opt.spd_stats
    if name == "l2sp":
        for g in groups:
            if g.get("spd"):
                g["anchor"] = "init"  # each adapter's start value: lora_B zero, lora_A its random init
        return spdecay.AdamL2SP(groups, lr=lr, weight_decay=strength), None
    if name == "sgdspd":
        opt = torch.optim.SGD(groups, lr=lr, momentum=SGD_MOMENTUM)
        addon = spdecay.SelectiveProjectionDecay(opt, weight_decay=strength)
        return _AddonStep(opt, addon), addon.stats
    raise RunnerError(f"--task llm: unknown optimizer {name!r}")


class _AddonStep:
    """SGD followed by the SPD add-on's projection, behind the optimizer interface the loop uses."""

    def __init__(self, opt, addon):
        self.opt, self.addon = opt, addon
        self.param_groups = opt.param_groups

    def step(self):
        self.addon.step()

    def zero_grad(self, set_to_none: bool = True):
        self.opt.zero_grad(set_to_none=set_to_none)


def _scheduler(opt, steps: int):
    base = opt.opt if isinstance(opt, _AddonStep) else opt
    return torch.optim.lr_scheduler.LambdaLR(base, warmup_cosine(steps))


@torch.no_grad()
def adapter_deviation(model: nn.Module, start: dict[str, torch.Tensor]) -> dict:
    """||theta - theta0|| of the adapters (theta0: their initial values), per tensor and in total,
    and the size of the weight change they make, ||delta W|| = ||s B A|| summed over layers,
    relative to the pre-trained weights they modify."""
    out = parameter_deviation(model, start)
    delta_sq = base_sq = 0.0
    for module in model.modules():
        if hasattr(module, "lora_A") and hasattr(module, "base_layer") and "default" in getattr(module, "lora_A", {}):
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            delta_sq += float((module.scaling["default"] * (b.double() @ a.double())).norm() ** 2)
            base_sq += float(module.base_layer.weight.double().norm() ** 2)
    out["deviation"]["weight_change"] = math.sqrt(delta_sq)
    out["deviation"]["weight_change_relative"] = math.sqrt(delta_sq / base_sq) if base_sq > 0 else float("nan")
    return out


def _no_deviation() -> dict:
    return {"deviation": {"total": 0.0, "relative": 0.0, "weight_change": 0.0, "weight_change_relative": 0.0},
            "layers": {"names": [], "deviation": [], "relative": [], "ndim": []}}


def add_retention(record: dict, before: dict[str, float]) -> None:
    after = record["ood"][RETENTION_SET]
    record["retention"] = {
        RETENTION_SET: {
            "before_balanced_accuracy": before["balanced_accuracy"], "after_balanced_accuracy": after["balanced_accuracy"],
            "before_accuracy": before["accuracy"], "after_accuracy": after["accuracy"],
            "forgetting": before["balanced_accuracy"] - after["balanced_accuracy"],
        }
    }


def _progress(desc: str, total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, disable=None)


def train_llm_run(run: LLMRun, task: LLMTask, steps: int, progress: bool) -> tuple[dict, nn.Module, dict]:
    """Train one LoRA run; returns its record (without the retention fields), the model and the
    adapters' initial values."""
    from spdecay.experiments.llm_model import with_lora

    d, data = task.d, task.data
    model = with_lora(task.base, d.lora_rank, run.seed).to(task.device)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt, stats_fn = build_llm_optimizer(run.optimizer, model, run.lr, run.weight_decay)
    sched = _scheduler(opt, steps)
    train_ids = task.ids(data.train)
    answers = task.encoder("id").label_ids
    labels = data.train.labels.tolist()
    per_epoch = max(1, len(train_ids) // d.batch_size)
    fired_sum = ratio_sum = loss_sum = acc_sum = 0.0
    fired_counts, fired_names = None, None
    bar = _progress(f"{run.optimizer} seed {run.seed}", steps, progress)
    model.train()
    t0 = time.perf_counter()
    perm = None
    for step in range(steps):
        epoch, pos = divmod(step, per_epoch)
        if pos == 0 or perm is None:  # data order: a pure function of (seed, epoch)
            perm = torch.randperm(len(train_ids), generator=torch.Generator().manual_seed(1_000_003 * run.seed + epoch))
        index = perm[pos * d.batch_size : (pos + 1) * d.batch_size].tolist()
        loss, token_acc = answer_loss(model, [train_ids[i] for i in index], [answers[labels[i]] for i in index],
                                      task.pad_id)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if stats_fn is not None:
            s = stats_fn()
            if len(s.names):
                fired = s.fired.detach().float().cpu()
                fired_counts = fired if fired_counts is None else fired_counts + fired
                fired_names = list(s.names)
                fired_sum += float(fired.mean())
                ratio_sum += float(s.ratio.float().mean())
        loss_sum += float(loss.detach())
        acc_sum += float(token_acc)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / (step + 1):.3f}")
    if bar is not None:
        bar.close()
    train_time = time.perf_counter() - t0
    record, _ = task.evaluate_all(model)
    record.update(adapter_deviation(model, start))
    record["spd"] = None if fired_counts is None else {
        "fraction_fired": fired_sum / steps, "mean_ratio": ratio_sum / steps,
        "layer_names": fired_names, "layer_fired_fraction": (fired_counts / steps).tolist(),
    }
    record.update(
        run_id=run.run_id, optimizer=run.optimizer, seed=run.seed, hparams=run.hparams, steps=steps,
        batch_size=d.batch_size, train_loss=loss_sum / steps, train_accuracy=acc_sum / steps,
        train_time_s=train_time, wall_time_s=time.perf_counter() - t0,
    )
    return record, model, start


@torch.no_grad()
def wise_ft_record(adamw_record: dict, model: nn.Module, task: LLMTask, start: dict | None = None,
                   alpha: float = WISE_ALPHA) -> dict:
    """WiSE-FT of a LoRA run in merged-weight space: (1 - a) W0 + a (W0 + s B A) = W0 + s (a B) A,
    i.e. the package's ``interpolate`` of each lora_B with its pre-trained value, zero."""
    from spdecay import interpolate

    t0 = time.perf_counter()
    state = {n: p.detach() for n, p in model.named_parameters() if "lora_B" in n}
    mixed = interpolate({n: torch.zeros_like(p) for n, p in state.items()}, state, alpha)
    original = {n: p.clone() for n, p in state.items()}
    params = dict(model.named_parameters())
    for n, v in mixed.items():
        params[n].copy_(v)
    record, _ = task.evaluate_all(model)
    record.update(adapter_deviation(model, start) if start is not None else _no_deviation())
    for n, v in original.items():  # leave the AdamW model as it was
        params[n].copy_(v)
    record.update(
        run_id=adamw_record["run_id"].replace("adamw-", "wise_ft-", 1), optimizer="wise_ft",
        seed=adamw_record["seed"], hparams=dict(adamw_record["hparams"]), steps=adamw_record["steps"],
        batch_size=adamw_record["batch_size"], spd=None, alpha=alpha,
        train_loss=None, train_accuracy=None, wall_time_s=adamw_record["wall_time_s"] + time.perf_counter() - t0,
    )
    return record


def probe_record(task: LLMTask, pre_record: dict, feats: dict[str, torch.Tensor], seed: int) -> dict:
    """Logistic regression on frozen last-position features of ``probe_train`` training prompts;
    C picked on ID validation balanced accuracy. BBC News is scored by the untouched LM."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from spdecay.experiments.evaluate import accuracy_metrics

    t0 = time.perf_counter()
    data = task.data
    n = min(task.d.probe_train, len(data.train))
    train_split = data.train.subset(range(n), name="probe_train")
    task.encoders.setdefault("probe_train", task.encoder("id"))
    _, train_feats = task.scores(task.base, train_split, with_features=True)
    scaler = StandardScaler().fit(train_feats.numpy())
    best = None
    for c in PROBE_C:
        clf = LogisticRegression(C=c, max_iter=2000).fit(scaler.transform(train_feats.numpy()), train_split.labels.numpy())
        pred = torch.as_tensor(clf.predict(scaler.transform(feats["val"].numpy())))
        score = accuracy_metrics(pred, data.val.labels, 2)["balanced_accuracy"]
        if best is None or score > best[0]:
            best = (score, c, clf)
    _, c, clf = best
    record: dict = {"ood": {}}
    for key, split in (("val", data.val), ("test", data.test), ("tweets", data.ood["tweets"])):
        pred = torch.as_tensor(clf.predict(scaler.transform(feats[key].numpy())))
        metrics = accuracy_metrics(pred, split.labels, 2)
        (record["ood"].__setitem__(key, metrics) if key == "tweets" else record.__setitem__(key, metrics))
    record["ood"][RETENTION_SET] = dict(pre_record["ood"][RETENTION_SET])  # the LM is not changed
    add_ood_means(record)
    record.update(_no_deviation())
    record.update(
        run_id=f"probe-seed{seed}-wd0-lr0", optimizer="probe", seed=seed, hparams={"weight_decay": 0.0, "lr": 0.0},
        probe_C=c, probe_train=n, steps=0, batch_size=0, spd=None, train_loss=None, train_accuracy=None,
        wall_time_s=time.perf_counter() - t0,
    )
    return record


# -- the run ---------------------------------------------------------------------------------
def _prepare_out(config: CompareConfig, out: Path | None, resume: bool) -> tuple[CompareConfig, Path]:
    if resume:
        if out is None or not (out / "config.json").is_file():
            raise RunnerError("--resume needs --out DIR holding the config.json of an earlier run")
        return CompareConfig.load(out / "config.json"), out
    out = out or Path("runs") / f"llm-{time.strftime('%Y%m%d-%H%M%S')}"
    if out.exists() and not out.is_dir():
        raise RunnerError(f"--out {out}: is a file, not a folder")
    if (out / "results.jsonl").exists():
        raise RunnerError(f"--out {out}: already holds results; continue it with --resume or choose another folder")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.json", config.to_json())
    return config, out


def _threads(device: torch.device, threads: int | None) -> int:
    """--threads, else OMP_NUM_THREADS, else every core this process may use."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    n = threads or (int(env) if env.isdigit() and int(env) > 0 else cores)
    if device.type == "cpu" or threads is not None:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def run_llm_compare(
    config: CompareConfig, out: Path | None = None, *, resume: bool = False, progress: bool = True,
    threads: int | None = None, prepared: bool = False, log: Log = lambda s: print(s, file=sys.stderr),
) -> Path:
    """Run (or continue) the llm comparison. ``prepared``: ``out`` was already checked and
    holds this config (the common runner did it), so it is continued as is."""
    from spdecay.experiments.llm_model import load_causal_lm, smollm2_gguf
    from spdecay.experiments.tasks import resolve_device

    t_start = time.perf_counter()
    if not prepared:
        config, out = _prepare_out(config, out, resume)
    d = llm_defaults(config)
    runs = plan_llm(config, d)
    device = resolve_device(config.device)
    threads = _threads(device, threads)
    skipped = [m for m in config.optimizers if m not in (*TRAINED, "probe", "wise_ft")]
    if skipped:
        log(f"llm: {', '.join(skipped)} not applicable to the llm task (no new head); skipped")
    want_wise = "adamw" in config.optimizers and "wise_ft" in config.optimizers
    records = read_records(out / "results.jsonl")
    done = {r["run_id"] for r in records}
    log(f"spdecay compare: task llm (LoRA r={d.lora_rank} on SmolLM2-135M-Instruct), {len(runs)} trained runs "
        f"+ pretrained/probe{'/WiSE-FT' if want_wise else ''} references, {threads} threads on {device}, output {out}")

    data = load_llm_data(d.train, d.val, d.test, d.tweets, d.bbc_per_class)
    base, tokenizer, info = load_causal_lm(smollm2_gguf(), log=log)
    task = LLMTask(base, tokenizer, data, d, device)
    steps = total_steps(config, d, len(data.train))
    log(f"data: train {len(data.train)}, val {len(data.val)}, test {len(data.test)}, "
        + ", ".join(f"{k} {len(v)}" for k, v in data.ood.items())
        + f"; {steps} steps of batch {d.batch_size} (<= {d.max_length} tokens) per run")

    def save(record: dict) -> None:
        record["task"] = "llm"
        record["schedule"] = "cosine"  # 10% warm-up, cosine to LR_FLOOR of the peak
        records.append(record)
        done.add(record["run_id"])
        write_records(out, records)

    # The reference: the pre-trained model zero-shot (deterministic: one evaluation for all seeds).
    seeds = seed_range(config)
    pre_id = f"pretrained-seed{seeds[0]}-wd0-lr0"
    t0 = time.perf_counter()
    pre = next((r for r in records if r["run_id"] == pre_id), None)
    feats: dict = {}
    if pre is None or ("probe" in config.optimizers and any(f"probe-seed{s}-wd0-lr0" not in done for s in seeds)):
        log("llm: scoring the pre-trained model zero-shot on every set")
        pre_metrics, feats = task.evaluate_all(task.base, features=True)
        if pre is None:
            pre = {**pre_metrics, **_no_deviation(), "run_id": pre_id, "optimizer": "pretrained", "seed": seeds[0],
                   "hparams": {"weight_decay": 0.0, "lr": 0.0}, "steps": 0, "batch_size": 0, "spd": None,
                   "train_loss": None, "train_accuracy": None, "wall_time_s": time.perf_counter() - t0,
                   "load": {"from_cache": info.from_cache, "seconds": info.seconds}}
            add_retention(pre, pre["ood"][RETENTION_SET])
            save(pre)
        log(f"[pretrained] val {pre['val']['balanced_accuracy']:.3f} test {pre['test']['balanced_accuracy']:.3f} "
            f"tweets {pre['ood']['tweets']['balanced_accuracy']:.3f} bbc {pre['ood'][RETENTION_SET]['balanced_accuracy']:.3f} "
            f"(balanced; {time.perf_counter() - t0:.0f} s)")
    before = pre["ood"][RETENTION_SET]
    for s in seeds[1:]:  # the same numbers under every seed: paired tables line up
        rid = f"pretrained-seed{s}-wd0-lr0"
        if rid not in done:
            save({**pre, "run_id": rid, "seed": s})
    if "probe" in config.optimizers:
        for s in seeds:
            if f"probe-seed{s}-wd0-lr0" not in done:
                rec = probe_record(task, pre, feats, s)
                add_retention(rec, before)
                save(rec)
                log(f"[probe] val {rec['val']['balanced_accuracy']:.3f} test {rec['test']['balanced_accuracy']:.3f} "
                    f"tweets {rec['ood']['tweets']['balanced_accuracy']:.3f} (C {rec['probe_C']:g}, {rec['wall_time_s']:.0f} s)")

    todo = [r for r in runs if r.run_id not in done or (want_wise and r.optimizer == "adamw"
                                                         and r.run_id.replace("adamw-", "wise_ft-", 1) not in done)]
    times: list[float] = []
    for i, run in enumerate(todo, 1):
        rec, model, start = train_llm_run(run, task, steps, progress)
        add_retention(rec, before)
        if run.run_id not in done:
            save(rec)
        times.append(rec["wall_time_s"])
        left = (len(todo) - i) * sum(times) / len(times)
        log(f"[{i}/{len(todo)}] {run.run_id}: val {rec['val']['balanced_accuracy']:.3f} test "
            f"{rec['test']['balanced_accuracy']:.3f} tweets {rec['ood']['tweets']['balanced_accuracy']:.3f} bbc "
            f"{rec['ood'][RETENTION_SET]['balanced_accuracy']:.3f} (forgetting {rec['retention'][RETENTION_SET]['forgetting']:+.3f}; "
            f"{rec['wall_time_s']:.0f} s, about {left / 60:.0f} min left)")
        if want_wise and run.optimizer == "adamw":
            wise = wise_ft_record(rec, model, task, start)
            add_retention(wise, before)
            save(wise)
            log(f"    wise_ft (alpha {WISE_ALPHA}): test {wise['test']['balanced_accuracy']:.3f} tweets "
                f"{wise['ood']['tweets']['balanced_accuracy']:.3f} bbc {wise['ood'][RETENTION_SET]['balanced_accuracy']:.3f}")
        del model
    from spdecay.experiments.llm_report import write_llm_report

    table = write_llm_report(out, config, records, log=log, total_s=time.perf_counter() - t_start)
    print(table)
    return out
