"""HF Trainer + DeepSpeed ZeRO-2 with AdamSPD (examples/hf_trainer_deepspeed.py, 2 CPU
processes): attach_to_trainer gives the engine's flat partitions their layouts, the run trains
with SPD statistics logged and ends where the same Trainer run without DeepSpeed ends."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")
pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # ~1 min; tests/integrations/test_deepspeed.py covers attach
ROOT = Path(__file__).parents[2]


def test_hf_trainer_zero2_matches_one_process_without_deepspeed():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT / "src"), str(ROOT / "examples"), *filter(None, [os.environ.get("PYTHONPATH")])]))
    cmd = [sys.executable, str(ROOT / "examples" / "hf_trainer_deepspeed.py"), "--nproc", "2",
           "--steps", "10"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=500)
    assert out.returncode == 0, f"{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    assert "DeepSpeed ZeRO stage 2, DeepSpeedZeroOptimizer around AdamSPD" in out.stdout
    logged = [ln for ln in out.stdout.splitlines() if ln.startswith("{'loss'") and "'step'" in ln]
    fractions = [float(re.search(r"'spd/fraction_regularised': ([\d.e-]+)", ln).group(1))
                 for ln in logged]
    assert len(fractions) == 2 and any(f > 0 for f in fractions), logged  # SPD acted
    line = next(ln for ln in out.stdout.splitlines() if "max |difference|" in ln)
    assert float(line.rsplit(" ", 1)[1]) < 1e-5, line
