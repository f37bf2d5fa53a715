"""Clip feature extractors and their registry.

Registered names (``pipeline list`` prints them):

- ``i3d_inception``: Inception-I3D (Carreira & Zisserman 2017), Kinetics-400 RGB weights
  (DeepMind's ``rgb_scratch``), Mixed_5c average-pooled to 1024-D per 16-frame clip, input in [-1, 1].
- ``resnet50_i3d``: ResNet-50 I3D (pytorchvideo ``i3d_r50``, Kinetics-400 ``I3D_8x8_R50``), the 2048-D
  input of its classification projection per 16-frame clip; RTFM's normalisation (mean 114.75, std 57.375).
- ``resnet50_i3d_rtfm``: RTFM's ResNet-50 I3D (Tushar-N ``I3Res50`` with video-nonlocal-net's Caffe2
  ``i3d_baseline_32x2_IN_pretrain_400k`` weights, CC-BY-NC 4.0), res5 averaged to 2048-D per 16-frame clip.
- ``c3d_fc6``: C3D Sports-1M (Tran et al. 2015; the DavideA/c3d-pytorch port of the weights), fc6 after ReLU,
  4096-D per 16x112x112 clip; frames resized to 128x171, BGR minus the Caffe channel mean (Sultani et al.).
- ``i3d_inception_flow``, ``resnet50_i3d_flow``: the flow streams (2-channel TV-L1 flow in [-1, 1]) that
  ``extract.modality`` = ``flow`` / ``rgb+flow`` uses (``extractors.flow``).
"""

from __future__ import annotations

from .base import ClipExtractor
from .registry import EXTRACTORS

# Importing a module registers its extractors.
from . import i3d_inception  # noqa: E402,F401
from . import i3d_r50  # noqa: E402,F401
from . import i3d_r50_rtfm  # noqa: E402,F401
from . import c3d  # noqa: E402,F401
from . import flow  # noqa: E402,F401  (the flow streams: i3d_inception_flow, resnet50_i3d_flow)

__all__ = ["EXTRACTORS", "ClipExtractor"]
