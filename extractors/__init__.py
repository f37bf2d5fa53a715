"""Clip feature extractors and their registry.

Registered names (``pipeline list`` prints them):

- ``i3d_inception``: Inception-I3D (Carreira & Zisserman 2017), Kinetics-400 RGB weights
  (DeepMind's ``rgb_scratch``), Mixed_5c average-pooled to 1024-D per 16-frame clip, input in [-1, 1].
"""

from __future__ import annotations

from pipeline.registry import Registry

from .base import ClipExtractor

EXTRACTORS: Registry[ClipExtractor] = Registry("extractor")

# Importing a module registers its extractors.
from . import i3d_inception  # noqa: E402,F401

__all__ = ["EXTRACTORS", "ClipExtractor"]
