"""Detectors and their registry.

Registered names (``pipeline list`` prints them):

- ``sultani_mil``: MIL ranking (Sultani, Chen & Shah, CVPR 2018).
- ``rtfm``: Robust Temporal Feature Magnitude learning (Tian et al., ICCV 2021).
- ``claws``: CLAWS Net, random batches + normalcy suppression + clustering distance loss (Zaheer et al., ECCV 2020).
- ``ar_net``: Anomaly Regression Net, dynamic MIL + center loss on every clip (Wan et al., ICME 2020).
- ``ng_mil``: Normality Guided MIL, prototype-refined top-k ranking (Park et al., WACV 2023).
- ``mist``: Multiple Instance Self-Training, pseudo-label generator + encoder fine-tuning (Feng et al., CVPR 2021).
"""

from __future__ import annotations

from .base import ClipBank, Detector, FeatureBank, MILBatch, TrainConfig, fit, length_mask, pad_clip_batch
from .registry import DETECTORS, register_detector

# Importing a module registers its detector.
from . import sultani_mil  # noqa: E402,F401
from . import rtfm  # noqa: E402,F401
from . import claws  # noqa: E402,F401
from . import arnet  # noqa: E402,F401
from . import ngmil  # noqa: E402,F401
from . import mist  # noqa: E402,F401

__all__ = [
    "DETECTORS", "ClipBank", "Detector", "FeatureBank", "MILBatch", "TrainConfig", "fit", "length_mask", "pad_clip_batch",
    "register_detector",
]
