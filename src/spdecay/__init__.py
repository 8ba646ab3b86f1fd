"""spdecay: Selective Projection Decay (SPD) for robust fine-tuning in PyTorch."""

from spdecay._functional import SPDStepStats, adam_spd
from spdecay.adam_spd import AdamSPD
from spdecay.addon import SelectiveProjectionDecay as SelectiveProjectionDecay
from spdecay.l2sp import AdamL2SP as AdamL2SP
from spdecay.lpft import LPFT as LPFT
from spdecay.param_groups import llrd_param_groups as llrd_param_groups
from spdecay.param_groups import param_groups as param_groups
from spdecay.stats import SPDStats
from spdecay.wise_ft import interpolate as interpolate

__all__ = ["AdamSPD", "SPDStats", "SPDStepStats", "adam_spd"]
__version__ = "0.1.0"
