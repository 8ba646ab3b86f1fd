"""scripts/setup.sh installs once and then skips (issue 22: every call of scripts/main.sh re-ran
every pip install, about 20 s), but installs again whenever what it installs may have changed.

The script runs in a copy of the checkout whose ``.venv/bin/python`` is a stand-in: it records
``python -m pip ...`` calls instead of running them and hands everything else (the quick import
check) to this interpreter, which has the pinned torch."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

FAKE_PYTHON = """#!/usr/bin/env bash
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then
  echo "$*" >> "{log}"
  case "$*" in *"{fail}"*) exit 1 ;; esac
  exit 0
fi
exec "{python}" "$@"
"""


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    pin = re.search(r'^TORCH_PIN="([^"]+)"', (ROOT / "scripts/setup.sh").read_text(), re.M)[1]
    try:
        torch_version = importlib.metadata.version("torch").split("+")[0]
    except importlib.metadata.PackageNotFoundError:
        torch_version = None
    if torch_version != pin:
        pytest.skip(f"needs the pinned torch {pin} in this interpreter, not {torch_version}")
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "src" / "spdecay").mkdir(parents=True)
    (tmp_path / "src" / "spdecay" / "__init__.py").write_text("")
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    fake(tmp_path, fail="no-such-argument")
    return tmp_path


def fake(checkout: Path, fail: str) -> None:
    python = checkout / ".venv" / "bin" / "python"
    python.write_text(FAKE_PYTHON.format(log=checkout / "pip.log", fail=fail,
                                         python=sys.executable))
    python.chmod(0o755)


def setup(checkout: Path, **env: str) -> tuple[int, list[str]]:
    """Run the copied setup.sh; its exit status and the pip calls it made."""
    log = checkout / "pip.log"
    log.unlink(missing_ok=True)
    run_env = {k: v for k, v in os.environ.items() if k != "SPDECAY_FORCE_SETUP"}
    run_env.update({"PYTHONPATH": str(checkout / "src"), **env})
    done = subprocess.run(["bash", "scripts/setup.sh"], cwd=checkout, env=run_env,
                          capture_output=True, text=True, timeout=120)
    return done.returncode, log.read_text().splitlines() if log.exists() else []


def test_installs_once_then_skips(checkout: Path) -> None:
    rc, calls = setup(checkout)
    assert rc == 0
    assert any("-e .[experiments" in c for c in calls)
    assert all("torch==" in c for c in calls if "install -q torch" in c or "-e ." in c)
    assert setup(checkout) == (0, [])


def test_installs_again_when_pyproject_changes_or_forced(checkout: Path) -> None:
    setup(checkout)
    with open(checkout / "pyproject.toml", "a") as f:
        f.write("\n# a new dependency\n")
    rc, calls = setup(checkout)
    assert rc == 0 and calls
    assert setup(checkout) == (0, [])
    rc, calls = setup(checkout, SPDECAY_FORCE_SETUP="1")
    assert rc == 0 and calls


def test_installs_again_when_spdecay_is_not_this_checkouts(checkout: Path) -> None:
    setup(checkout)
    elsewhere = checkout / "elsewhere"
    (elsewhere / "spdecay").mkdir(parents=True)
    (elsewhere / "spdecay" / "__init__.py").write_text("")
    rc, calls = setup(checkout, PYTHONPATH=str(elsewhere))
    assert rc == 0 and calls


def test_a_failed_install_is_retried_next_time(checkout: Path) -> None:
    fake(checkout, fail="mlxtend")
    rc, calls = setup(checkout)
    assert rc != 0 and calls
    fake(checkout, fail="no-such-argument")
    rc, calls = setup(checkout)
    assert rc == 0 and any("mlxtend" in c for c in calls)
