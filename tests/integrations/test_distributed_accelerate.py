"""accelerate + FSDP2 on 3 CPU processes (torchrun, gloo): the optimizer built before
``accelerator.prepare`` gets its parameters swapped for DTensors; the lazily captured anchors
are the initial weights and the run equals one process (examples/accelerate_fsdp2.py)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("accelerate")
pytestmark = pytest.mark.distributed
ROOT = Path(__file__).parents[2]


def test_accelerate_fsdp2_three_processes_match_one():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=3",
           f"--master_port={port}", str(ROOT / "examples" / "accelerate_fsdp2.py"), "--steps", "8"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    # C++ stack frames would push the cause out of the message
    err = "\n".join(ln for ln in out.stderr.splitlines() if not ln.startswith("frame #"))
    assert out.returncode == 0, f"{out.stdout[-1000:]}\n{err[-4000:]}"
    line = next(ln for ln in out.stdout.splitlines() if "max |difference|" in ln)
    assert line.startswith("3 processes, DTensor parameters, optimizer swapped: True, 6 anchors "
                           "(sharded alike: True"), line
    anchor_diff = float(re.search(r"max \|anchor - initial\| (\S+)\)", line).group(1))
    assert int(re.search(r"SPD fired (\d+) times", line).group(1)) > 0  # the decisions mattered
    diff = float(re.search(r"to one process: (\S+)$", line).group(1))
    assert anchor_diff == 0.0
    assert diff < 1e-9, line
