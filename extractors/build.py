"""Building the run's extractor from its ``extract`` settings: the one place that does it."""

from __future__ import annotations

from typing import Any


def build_extractor(extract_cfg: Any, device: Any) -> Any:
    """The registered extractor ``extract.backbone`` with ``extract.weights`` and the options its
    class reads from the other settings (:meth:`extractors.base.ClipExtractor.config_options`), on ``device``.

    Raises:
        RegistryError: unknown backbone; WeightsError / StageError: weights that cannot be had.
    """
    from extractors import EXTRACTORS  # the package: importing it registers every extractor

    options = EXTRACTORS.get_class(extract_cfg.backbone).config_options(extract_cfg)
    return EXTRACTORS.get(extract_cfg.backbone, weights=extract_cfg.weights or None, device=str(device), **options)
