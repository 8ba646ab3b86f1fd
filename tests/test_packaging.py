"""The distribution: `python -m build` makes an sdist and a wheel that pass `twine check`, and the
wheel installs and works in a fresh virtual environment that holds nothing but torch.

Slow (a minute or two: the fresh venv installs torch from the local wheel cache), so marked
``slow``; CI runs it with everything else.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCH_PIN = "torch==2.13.0"

pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONNOUSERSITE": "1"}
    env.pop("PYTHONPATH", None)  # the fresh venv must not see the source tree
    return env


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), **kw)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def _project_version() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    return re.search(r'^version = "([^"]+)"', text, re.MULTILINE).group(1)


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> dict[str, Path]:
    pytest.importorskip("build", reason="the `test` extra installs `build`")
    out = tmp_path_factory.mktemp("dist")
    # Without --sdist/--wheel, build makes the sdist and then the wheel *from the sdist*, so a
    # file missing from the sdist breaks the wheel too.
    _run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)])
    wheels, sdists = sorted(out.glob("*.whl")), sorted(out.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, sorted(p.name for p in out.iterdir())
    return {"wheel": wheels[0], "sdist": sdists[0]}


@pytest.fixture(scope="module")
def fresh_venv(dist, tmp_path_factory) -> Path:
    # A brand-new venv: no system site-packages, so only what we install is there.
    where = tmp_path_factory.mktemp("venv") / "env"
    venv.EnvBuilder(with_pip=True, system_site_packages=False, clear=True).create(where)
    py = where / "bin" / "python"
    _run([str(py), "-m", "pip", "install", "-q", "--no-compile", TORCH_PIN, str(dist["wheel"])])
    return where


def test_twine_check_passes(dist):
    pytest.importorskip("twine", reason="the `test` extra installs `twine`")
    proc = _run([sys.executable, "-m", "twine", "check", "--strict", str(dist["wheel"]), str(dist["sdist"])])
    assert proc.stdout.count("PASSED") == 2, proc.stdout


def test_wheel_metadata_and_contents(dist):
    with zipfile.ZipFile(dist["wheel"]) as whl:
        names = set(whl.namelist())
        meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        meta = whl.read(meta_name).decode()
    version = _project_version()
    assert dist["wheel"].name.startswith(f"spdecay-{version}-")
    assert "License-Expression: MIT" in meta
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    # The fused CPU kernel is compiled from its C sources on first use: every one must ship.
    src = ROOT / "src"
    kernel_sources = {p.relative_to(src).as_posix() for p in src.rglob("*.[ch]")}
    assert kernel_sources, "no C sources found under src/"
    assert kernel_sources <= names, sorted(kernel_sources - names)
    # Every module of the package ships too.
    modules = {p.relative_to(src).as_posix() for p in (src / "spdecay").rglob("*.py")}
    assert modules <= names, sorted(modules - names)
    # Torch is the only hard dependency; everything heavy is behind an extra.
    hard = [ln for ln in meta.splitlines() if ln.startswith("Requires-Dist:") and "extra ==" not in ln]
    assert len(hard) == 1 and hard[0].split(":", 1)[1].strip().startswith("torch"), hard


def test_wheel_imports_in_fresh_venv(fresh_venv):
    py = fresh_venv / "bin" / "python"
    code = (
        "import importlib.metadata as md, pathlib, torch, spdecay\n"
        "assert 'site-packages' in pathlib.Path(spdecay.__file__).parts, spdecay.__file__\n"
        "assert spdecay.__version__ == md.version('spdecay'), spdecay.__version__\n"
        "extra = {d.metadata['Name'].lower() for d in md.distributions()} & "
        "{'transformers', 'typer', 'peft', 'numpy'}\n"
        "assert not extra, extra\n"
        "p = torch.nn.Parameter(torch.ones(3))\n"
        "opt = spdecay.AdamSPD([p], lr=0.1)\n"
        "p.grad = torch.ones(3)\n"
        "opt.step()\n"
        "print(spdecay.__version__)\n"
    )
    proc = _run([str(py), "-c", code], cwd=fresh_venv)  # cwd away from the source tree
    assert proc.stdout.strip() == _project_version()


def test_cli_help_in_fresh_venv(fresh_venv):
    # `spdecay --help` must work without the `experiments` extra (typer is not installed here).
    proc = subprocess.run(
        [str(fresh_venv / "bin" / "spdecay"), "--help"],
        capture_output=True, text=True, cwd=fresh_venv, env=_env(),
    )
    assert proc.returncode == 0, proc.stderr
    assert "compare" in proc.stdout
