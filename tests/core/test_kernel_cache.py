"""The C kernel's cache is private: nothing another user could have written is ever loaded.

Each case: the default falls back to the torch path with one warning naming the reason (a missing
compiler silently), ``fused=True`` raises a clear error, and a planted library never runs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import torch

import spdecay.spd.backends.fused_c as FC
from spdecay import AdamSPD, SelectiveProjectionDecay

PLANTED = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
    const char *path = getenv("SPDECAY_TEST_MARKER");
    if (path) { FILE *f = fopen(path, "w"); if (f) { fputs("ran", f); fclose(f); } }
}
int unrelated(void) { return 0; }
"""


@pytest.fixture(scope="module")
def built() -> Path:
    """The kernel as this machine caches it (built once, in the user's cache, as any first
    optimizer would)."""
    FC.library()
    (so,) = FC.cache_dir().glob(f"fused_c_{'?' * 20}.so")
    return so


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A private cache directory and cleared build caches (cleared again afterwards)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("SPDECAY_CACHE_DIR", str(cache))
    monkeypatch.setenv("SPDECAY_TEST_MARKER", str(tmp_path / "marker"))
    FC.library.cache_clear()
    FC.available.cache_clear()
    yield cache
    FC.library.cache_clear()
    FC.available.cache_clear()


@pytest.fixture
def so(fresh, built) -> Path:
    """Where the kernel would be in the fresh cache (the directory made private)."""
    FC._private_dir(fresh)
    return fresh / built.name


def _plant(target: Path, tmp_path: Path) -> None:
    src = tmp_path / "planted.c"
    src.write_text(PLANTED)
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(target), str(src)], check=True)


def _default_falls_back(reason: str, tmp_path: Path) -> None:
    p = torch.ones(3, requires_grad=True)
    with pytest.warns(RuntimeWarning, match=reason):
        opt = AdamSPD([p], lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning, not one per optimizer or step
        AdamSPD([torch.ones(2, requires_grad=True)], lr=0.1)
        SelectiveProjectionDecay(torch.optim.SGD([torch.ones(2, requires_grad=True)], lr=0.1))
        p.grad = torch.ones(3)
        opt.step()  # on the torch path
    assert torch.allclose(p.detach(), torch.full((3,), 0.9))
    assert not (tmp_path / "marker").exists(), "a planted library ran"


def _fused_refuses(reason: str, tmp_path: Path) -> None:
    FC.library.cache_clear()
    p = torch.ones(3, requires_grad=True)
    p.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match=reason):
        AdamSPD([p], lr=0.1, fused=True).step()
    with pytest.raises(RuntimeError, match=reason):
        SelectiveProjectionDecay(torch.optim.SGD([p], lr=0.1), fused=True)
    assert torch.equal(p.detach(), torch.ones(3))
    assert not (tmp_path / "marker").exists(), "a planted library ran"


def test_a_library_owned_by_someone_else_is_not_loaded(so, tmp_path, monkeypatch):
    _plant(so, tmp_path)  # what another user would leave under the predictable name
    if os.getuid() == 0:
        os.chown(so, 65534, 65534)
    else:  # cannot give files away: pretend to be someone else instead
        monkeypatch.setattr(FC, "_uid", lambda: os.getuid() + 1)
        monkeypatch.setattr(FC, "_private_dir", lambda path: path)
    _default_falls_back("owned by uid", tmp_path)
    _fused_refuses("owned by uid", tmp_path)


def test_a_directory_owned_by_someone_else_is_not_used(fresh, so, tmp_path, monkeypatch):
    _plant(so, tmp_path)
    if os.getuid() == 0:
        os.chown(fresh, 65534, 65534)
    else:
        real = FC._check_private
        monkeypatch.setattr(FC, "_check_private", lambda path, what, st: real(
            path, what, os.stat_result((st.st_mode, 0, 0, 0, os.getuid() + 1, *st[5:]))))
    _default_falls_back(r"directory .* owned by uid", tmp_path)
    _fused_refuses(r"directory .* owned by uid", tmp_path)


@pytest.mark.parametrize("what", ["directory", "library"])
def test_group_or_other_writable_entries_are_not_loaded(fresh, so, tmp_path, what):
    _plant(so, tmp_path)
    os.chmod(fresh if what == "directory" else so, 0o777)
    _default_falls_back(f"{what} .* writable by group or others", tmp_path)
    _fused_refuses(f"{what} .* writable by group or others", tmp_path)


def test_a_library_without_the_kernel_symbols_falls_back(so, tmp_path):
    _plant(so, tmp_path)  # ours (right owner, mode), but not the kernel: it runs, then is refused
    os.chmod(so, 0o700)
    _default_falls_back_after_load = pytest.warns(RuntimeWarning, match="lacks the entry point")
    p = torch.ones(3, requires_grad=True)
    with _default_falls_back_after_load:
        opt = AdamSPD([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    assert torch.allclose(p.detach(), torch.full((3,), 0.9))
    FC.library.cache_clear()
    with pytest.raises(RuntimeError, match="lacks the entry point spd_phase1_f32"):
        AdamSPD([p], lr=0.1, fused=True).step()


def test_empty_variables_mean_unset_and_relative_paths_are_not_used(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SPDECAY_CACHE_DIR", "")
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    assert FC.cache_dir() == tmp_path / ".cache" / "spdecay"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative")  # invalid per the XDG spec: ignored
    assert FC.cache_dir() == tmp_path / ".cache" / "spdecay"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert FC.cache_dir() == tmp_path / "xdg" / "spdecay"
    monkeypatch.setenv("SPDECAY_CACHE_DIR", "relative")
    with pytest.raises(FC.KernelUnavailable, match="not an absolute path"):
        FC.cache_dir()


def test_an_empty_cache_variable_builds_nowhere_near_the_working_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SPDECAY_CACHE_DIR", "")
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    FC.library.cache_clear()
    try:
        FC.library()
    finally:
        FC.library.cache_clear()
    assert list(work.iterdir()) == []
    cache = tmp_path / "home" / ".cache" / "spdecay"
    assert (cache.stat().st_mode & 0o777) == 0o700  # created private
    (so,) = cache.glob("fused_c_*.so")
    assert so.stat().st_uid == os.getuid() and not so.stat().st_mode & 0o077
    stamp = so.stat().st_mtime_ns
    FC.library.cache_clear()
    try:
        FC.library()  # a second process (here: a cleared cache) loads the same file
    finally:
        FC.library.cache_clear()
    assert so.stat().st_mtime_ns == stamp and len(list(cache.iterdir())) == 1


def test_the_kernel_in_a_private_cache_is_used(so, built):
    shutil.copy(built, so)
    os.chmod(so, 0o700)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert FC.available()
