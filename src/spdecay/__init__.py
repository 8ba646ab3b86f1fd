"""spdecay: Selective Projection Decay (SPD) for robust fine-tuning in PyTorch."""

from spdecay._functional import SPDStepStats, adam_spd
from spdecay.adam_spd import AdamSPD
from spdecay.stats import SPDStats

__all__ = ["AdamSPD", "SPDStats", "SPDStepStats", "adam_spd"]
__version__ = "0.1.0"
