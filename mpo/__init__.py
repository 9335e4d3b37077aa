"""Mixed Preference Optimization for InternVL.

The objective is importable on its own (torch only)::

    from mpo import MPOLoss, RewardShift
"""

from mpo.losses import MPOLoss, RewardShift, bco_pair_loss, dpo_sigmoid_loss, sft_loss
from mpo.types import EncodedPair, MPOLossOutput, PreferenceBatch, PreferenceRecord, SequenceLogps

__all__ = [
    "EncodedPair",
    "MPOLoss",
    "MPOLossOutput",
    "PreferenceBatch",
    "PreferenceRecord",
    "RewardShift",
    "SequenceLogps",
    "bco_pair_loss",
    "dpo_sigmoid_loss",
    "sft_loss",
]
__version__ = "0.1.0"
