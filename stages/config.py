"""The run's whole config: the core's sections plus the chosen detector's ``train`` section.

:func:`build_config` lives here rather than in ``pipeline.core.config`` because it must know the
detector registry (``models``), which sits above the core.
"""

from __future__ import annotations

import difflib
from typing import Any

from models.registry import DETECTORS
from pipeline.core.config import SECTIONS, ConfigError, RunConfig, apply_section, merge, parse_set
from pipeline.core.registry import RegistryError

#: the detector of a run that names none (Sultani et al., CVPR 2018: the UCF-Crime baseline)
DEFAULT_METHOD = "sultani_mil"


def train_config_class(method: str) -> type:
    """The config dataclass of detector ``method``."""
    return DETECTORS.get_class(method).Config


def build_config(
    layers: list[dict[str, Any]] | None = None,
    sets: list[str] | None = None,
    method: str | None = None,
) -> RunConfig:
    """Resolve a run config from override layers (e.g. parsed YAML files), ``--set`` items and ``--method``.

    Raises:
        ConfigError: unknown section or key, wrong type, value outside its choices, unknown method.
    """
    merged: dict[str, Any] = {}
    for layer in layers or []:
        merged = merge(merged, layer)
    merged = merge(merged, parse_set(sets or []))
    for section in merged:
        if section not in SECTIONS:
            close = difflib.get_close_matches(section, SECTIONS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config section '{section}'{hint}; sections: {', '.join(SECTIONS)}")
    train_values = dict(merged.get("train") or {})
    chosen = method or train_values.pop("method", None) or DEFAULT_METHOD
    train_values.pop("method", None)
    try:
        train_cls = train_config_class(str(chosen))
    except RegistryError as e:
        raise ConfigError(str(e)) from None
    cfg = RunConfig(train=train_cls())
    for section in SECTIONS:
        if section in merged:
            values = train_values if section == "train" else merged[section]
            apply_section(getattr(cfg, section), values, section)
    if cfg.segment.scheme == "auto":
        # resolved here, so that the segment stage's cache key holds the scheme actually used
        cfg.segment.scheme = DETECTORS.get_class(str(chosen)).segment_scheme
    return cfg
