"""The robust fine-tuning experiment runner behind ``spdecay compare``.

Fine-tunes a pre-trained model with several optimizers (AdamW, L2-SP, AdamSPD, SGD + SPD), then
evaluates in-distribution and on shifted data. Everything heavy (transformers, matplotlib,
pandas) is imported lazily inside the modules that need it, so importing this package is cheap.
"""

from spdecay.experiments.config import CompareConfig
from spdecay.experiments.errors import RunnerError

__all__ = ["CompareConfig", "RunnerError", "run_compare"]


def run_compare(config: CompareConfig, **kwargs):  # noqa: ANN201 - re-export, typed in runner
    """Run the comparison described by ``config``; see :func:`spdecay.experiments.runner.run_compare`."""
    from spdecay.experiments.runner import run_compare as _run

    return _run(config, **kwargs)
