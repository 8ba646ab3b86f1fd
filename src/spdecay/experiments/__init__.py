"""The robust fine-tuning experiment runner behind ``spdecay compare``.

Fine-tunes a pre-trained model with several optimizers (AdamW, L2-SP, AdamSPD, SGD + SPD), then
evaluates in-distribution and on shifted data. Everything heavy (transformers, matplotlib,
pandas) is imported lazily inside the modules that need it, so importing this package is cheap.
"""

from pathlib import Path
from typing import Any

from spdecay.experiments.config import CompareConfig
from spdecay.experiments.errors import RunnerError

__all__ = ["CompareConfig", "RunnerError", "merge_runs", "run_compare"]


def run_compare(config: CompareConfig, out: Path | None = None, **kwargs: Any) -> Path:
    """Run (or with ``resume=True`` continue) the comparison described by ``config`` in ``out``;
    see ``spdecay.experiments.runner.run_compare``. Imports the heavy parts on first call."""
    from spdecay.experiments.runner import run_compare as _run

    return _run(config, out, **kwargs)


def merge_runs(folders: list[Path], out: Path, **kwargs: Any) -> Path:
    """Combine runs of one study made with different ``--first-seed``; see
    ``spdecay.experiments.runner.merge_runs``."""
    from spdecay.experiments.runner import merge_runs as _merge

    return _merge([Path(f) for f in folders], Path(out), **kwargs)
