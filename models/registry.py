"""The detector registry. Importing the ``models`` package registers every detector in it; import
``DETECTORS`` from there (``from models import DETECTORS``) so that the registry is full."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from pipeline.core.registry import Registry

if TYPE_CHECKING:
    from models.base import Detector

DETECTORS: "Registry[Detector]" = Registry("detector")


def register_detector(name: str) -> "Callable[[type[Detector]], type[Detector]]":
    """Register a detector class; its ``Config.method`` becomes ``name``."""

    def wrap(cls: "type[Detector]") -> "type[Detector]":
        DETECTORS.register(name)(cls)
        cls.Config.method = name
        return cls

    return wrap
