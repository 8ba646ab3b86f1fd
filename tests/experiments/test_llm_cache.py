"""The de-quantised weight cache of the llm task: keyed by the GGUF file's hash, a second load
reads the cache without converting, a changed file or an incomplete folder is never reused."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from spdecay.experiments.tasks.llm import model as llm_model  # noqa: E402
from spdecay.experiments.tasks.llm.model import (  # noqa: E402
    cache_folder,
    cache_root,
    file_sha256,
    load_causal_lm,
)
from tests.helpers.llm_tiny import tiny_llama, tiny_tokenizer  # noqa: E402


class CountingConverter:
    """Stands in for the slow GGUF de-quantisation: a tiny Llama whose weights depend on the
    file's bytes, so a stale cache would show up as wrong weights."""

    def __init__(self):
        self.calls = 0

    def __call__(self, path):
        self.calls += 1
        tok = tiny_tokenizer()
        seed = sum(path.read_bytes()) % 1000
        return tiny_llama(len(tok), seed=seed), tok


def fake_gguf(tmp_path, content: bytes):
    path = tmp_path / "src" / "Tiny.Q4.gguf"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(content)
    return path


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_second_load_comes_from_the_cache_with_identical_weights(tmp_path):
    gguf = fake_gguf(tmp_path, b"weights-v1")
    convert, logs = CountingConverter(), []
    m1, tok1, info1 = load_causal_lm(gguf, root=tmp_path / "cache", convert=convert, log=logs.append)
    assert convert.calls == 1 and not info1.from_cache
    assert any("first load" in line for line in logs)  # the slow step is announced
    m2, tok2, info2 = load_causal_lm(gguf, root=tmp_path / "cache", convert=convert, log=logs.append)
    assert convert.calls == 1 and info2.from_cache
    assert info2.cache == info1.cache == str(cache_folder(gguf, file_sha256(gguf), tmp_path / "cache"))
    assert file_sha256(gguf)[:16] in info2.cache
    assert same_weights(m1, m2)
    reference, _ = CountingConverter()(gguf)
    assert same_weights(m2, reference)  # the cache holds what the conversion produced
    assert m2.lm_head.weight.data_ptr() == m2.model.embed_tokens.weight.data_ptr()  # still tied
    assert tok2("a great film")["input_ids"] == tok1("a great film")["input_ids"]
    assert tok2.chat_template == tok1.chat_template
    assert "quantization_config" not in json.loads((tmp_path / info2.cache / "config.json").read_text())


def test_changed_file_gets_a_new_key_and_is_converted_again(tmp_path):
    gguf = fake_gguf(tmp_path, b"weights-v1")
    convert = CountingConverter()
    old, _, info_old = load_causal_lm(gguf, root=tmp_path, convert=convert, log=lambda s: None)
    gguf.write_bytes(b"weights-v2: another model")  # same path, new content
    new, _, info_new = load_causal_lm(gguf, root=tmp_path, convert=convert, log=lambda s: None)
    assert convert.calls == 2 and not info_new.from_cache and info_new.cache != info_old.cache
    assert not same_weights(old, new)
    assert same_weights(new, CountingConverter()(gguf)[0])


def test_incomplete_or_foreign_cache_folder_is_rebuilt(tmp_path):
    gguf = fake_gguf(tmp_path, b"weights-v1")
    folder = cache_folder(gguf, file_sha256(gguf), tmp_path)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")  # an interrupted conversion: no marker
    convert = CountingConverter()
    load_causal_lm(gguf, root=tmp_path, convert=convert, log=lambda s: None)
    assert convert.calls == 1
    (folder / llm_model.MARKER).write_text(json.dumps({"sha256": "0" * 64}))  # names another file
    _, _, info = load_causal_lm(gguf, root=tmp_path, convert=convert, log=lambda s: None)
    assert convert.calls == 2 and not info.from_cache
    _, _, info = load_causal_lm(gguf, root=tmp_path, convert=convert, log=lambda s: None)
    assert convert.calls == 2 and info.from_cache


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SPDECAY_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"
    monkeypatch.delenv("SPDECAY_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "spdecay"
