"""The extractor registry. Importing the ``extractors`` package registers every extractor in it;
import ``EXTRACTORS`` from there (``from extractors.registry import EXTRACTORS``) so that the registry is full."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.core.registry import Registry

if TYPE_CHECKING:
    from extractors.base import ClipExtractor

EXTRACTORS: "Registry[ClipExtractor]" = Registry("extractor")
