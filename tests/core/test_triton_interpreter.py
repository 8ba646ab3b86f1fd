"""Run the Triton kernel tests on CPU through Triton's interpreter (where triton is installed).

``TRITON_INTERPRET=1`` must be set before the kernels are defined, so the tests run in a fresh
process. Without CUDA this is the only place the kernel logic is checked.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


@pytest.mark.slow  # ~1.5 min; CI runs it (the default run selects every marker)
@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: test_cuda_triton runs compiled")
def test_triton_kernels_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    src = str(ROOT / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
         str(HERE / "test_cuda_triton.py")],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and " failed" not in proc.stdout, tail
