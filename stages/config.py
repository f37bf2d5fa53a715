"""The run's whole config: the core's sections plus the chosen detector's ``train`` section.

:func:`build_config` lives here rather than in ``pipeline.core.config`` because it must know the
detector registry (``models``), which sits above the core.
"""

from __future__ import annotations

import difflib
from typing import Any

from extractors.presets import preset_layer as feature_preset_layer
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
    extract_values = merged.get("extract")
    chosen_preset = extract_values.get("preset") if isinstance(extract_values, dict) else None
    if chosen_preset:
        # the preset's values go under every layer, so that a setting given anywhere overrides it
        try:
            merged = merge(feature_preset_layer(str(chosen_preset)), merged)
        except ValueError as e:
            raise ConfigError(str(e)) from None
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


#: steps of ``--preset quick``: what the tests' synthetic benchmark trains every detector for
#: (tests/test_synthetic_benchmark.py ITERATIONS: 400 steps reach frame AUC above 0.9 on it)
QUICK_ITERATIONS = 400
#: MIST stage II under ``--preset quick``: the CPU settings of benchmarks/mist.py (4 epochs, the
#: backbone frozen for 3, 5 videos of each class a batch), measured in BENCHMARKS.md "MIST"
QUICK_MIST_STAGE2 = {"ft_epochs": 4, "ft_freeze_epochs": 3, "ft_batch_videos": 5}

PRESETS = ("quick",)


def preset_layer(name: str, method: str) -> dict[str, Any]:
    """The config layer of preset ``name`` for detector ``method``, applied over the defaults and
    under ``--config`` and ``--set``.

    ``quick``: a short schedule for trying the pipeline on a small dataset or a CPU, not for the
    published numbers: :data:`QUICK_ITERATIONS` steps with the detector's own ``short_schedule``
    (each detector documents why its entries differ from the published settings, measured on the
    tests' small datasets), and for MIST :data:`QUICK_MIST_STAGE2`. The published schedules (e.g.
    RTFM's 15,000 steps, CLAWS's 100,000, batches of 30-32 videos) stay the defaults.

    Raises:
        ConfigError: an unknown preset or detector.
    """
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    try:
        cls = DETECTORS.get_class(method)
    except RegistryError as e:
        raise ConfigError(str(e)) from None
    train: dict[str, Any] = {"iterations": QUICK_ITERATIONS, **cls.short_schedule}
    if method == "mist":
        train.update(QUICK_MIST_STAGE2)
    return {"train": train}
