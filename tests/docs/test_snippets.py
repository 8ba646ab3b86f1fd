"""Every Python block of the README and the getting-started pages runs as written.

Each block runs on its own (a reader copies one block, not the page), in a fresh namespace.
Names a block uses without defining them (``model``, ``loader``, ``args``, ...) get small
stand-ins, and so do names it elides (``model = ...``); any other undefined name, a missing
import, fails the test with the block's file and line.
"""

from __future__ import annotations

import ast
import builtins
import re
import textwrap
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
FILES = ("README.md", "docs/usage.md", "docs/index.md")
FENCE = re.compile(r"^(?P<indent>[ \t]*)```python[ \t]*\n(?P<body>.*?)^(?P=indent)```", re.M | re.S)
ELIDED = re.compile(r"^(?P<indent>[ \t]*)(?P<name>\w+)[ \t]*=[ \t]*\.\.\.[ \t]*(#.*)?$", re.M)


def blocks() -> list[pytest.param]:
    found = []
    for name in FILES:
        text = (ROOT / name).read_text()
        for m in FENCE.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            found.append(pytest.param(textwrap.dedent(m["body"]), id=f"{name}:{line}"))
    return found


class TinyModel(nn.Sequential):
    """A stand-in pre-trained model: an embedding, two blocks in a ``ModuleList`` (the depth that
    ``llrd_param_groups`` finds) and a new head named ``classifier`` (what ``head="auto"``
    finds). A ``Sequential``, so ``model[-1]`` is the head as well."""

    def __init__(self) -> None:
        blocks = [nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 16), nn.ReLU()) for _ in range(2)]
        super().__init__(OrderedDict(embed=nn.Linear(8, 16), layers=nn.ModuleList(blocks),
                                     classifier=nn.Linear(16, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.classifier(x)


def torch_stand_ins(model: nn.Module) -> dict:
    torch.manual_seed(0)
    extra = nn.Parameter(torch.randn(5))
    return {
        "model": model,
        "loader": [(torch.randn(4, 8), torch.randint(0, 3, (4,))) for _ in range(2)],
        "loss_fn": nn.functional.cross_entropy,
        "backbone_params": [*model.embed.parameters(), *model.layers.parameters()],
        "new_head_params": list(model.classifier.parameters()),
        "lora_params": [nn.Parameter(torch.zeros(4, 16))],
        "ps": [extra],
        "anchor_tensors_or_None": [torch.zeros(5)],
        "pretrained_sd": {k: v.clone() for k, v in model.state_dict().items()},
    }


def plain_stand_ins(model: nn.Module) -> dict:
    return {"model": model, "loader": [(torch.randn(4, 8), torch.randint(0, 3, (4,)))],
            "loss_fn": nn.functional.cross_entropy}


def hf_stand_ins(tmp_path: Path) -> dict:
    """A tiny BERT classifier (its attention has ``query``/``value`` modules, as LoRA targets),
    Trainer arguments for two steps on the CPU, and a dataset of eight token sequences."""
    from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=2)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
                             report_to=[], save_strategy="no", logging_steps=1, use_cpu=True,
                             disable_tqdm=True)
    ds = [{"input_ids": torch.randint(0, 64, (8,)), "attention_mask": torch.ones(8, dtype=torch.long),
           "labels": torch.tensor(i % 2)} for i in range(8)]
    return {"model": BertForSequenceClassification(config), "args": args, "ds": ds}


def prepare(source: str, stand_ins: dict) -> tuple[str, dict]:
    """The block with its elided assignments removed, and the namespace it runs in."""
    elided = [m["name"] for m in ELIDED.finditer(source)]
    for name in elided:
        assert name in stand_ins, f"the block elides `{name} = ...` but the test has no stand-in"
    source = ELIDED.sub(lambda m: f"{m['indent']}pass  # {m['name']}: the test's stand-in", source)
    tree = ast.parse(source)
    loaded = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    bound = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load)}
    imported = {(a.asname or a.name).split(".")[0] for n in ast.walk(tree)
                if isinstance(n, ast.Import | ast.ImportFrom) for a in n.names}
    free = loaded - imported - set(dir(builtins))
    missing = sorted(free - bound - set(stand_ins))
    assert not missing, f"the block uses {missing} without defining or importing them"
    return source, {"__name__": "__snippet__", **{k: stand_ins[k] for k in free & set(stand_ins)}}


@pytest.mark.parametrize("source", blocks())
def test_block_runs_as_written(source: str, tmp_path: Path) -> None:
    if "transformers" in source:
        pytest.importorskip("peft")
        stand_ins = hf_stand_ins(tmp_path)
    else:
        stand_ins = torch_stand_ins(TinyModel())
    code, namespace = prepare(source, stand_ins)
    exec(compile(code, "<snippet>", "exec"), namespace)


def test_addon_block_runs_on_a_plain_sequential() -> None:
    """The README's add-on block names its head, so it also runs where ``head="auto"`` finds
    nothing: a plain ``nn.Sequential`` (issue 22: the old block raised there)."""
    (source,) = [p.values[0] for p in blocks()
                 if p.id.startswith("README.md") and "SelectiveProjectionDecay(opt" in p.values[0]]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    code, namespace = prepare(source, plain_stand_ins(model))
    exec(compile(code, "<snippet>", "exec"), namespace)
    groups = {g.get("name"): g for g in namespace["opt"].param_groups}
    assert {id(p) for p in groups["head"]["params"]} == {id(p) for p in model[-1].parameters()}
