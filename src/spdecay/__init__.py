"""spdecay: Selective Projection Decay (SPD) for robust fine-tuning in PyTorch."""

from spdecay.adam_spd import AdamSPD, adam_spd
from spdecay.addon import SelectiveProjectionDecay
from spdecay.l2sp import AdamL2SP
from spdecay.lpft import LPFT
from spdecay.param_groups import llrd_param_groups, param_groups
from spdecay.spd.layout import FlatLayout
from spdecay.stats import SPDStats
from spdecay.wise_ft import interpolate

__all__ = [
    "LPFT",
    "AdamL2SP",
    "AdamSPD",
    "FlatLayout",
    "SPDStats",
    "SelectiveProjectionDecay",
    "adam_spd",
    "interpolate",
    "llrd_param_groups",
    "param_groups",
]
__version__ = "0.1.0"
