"""WS-VAD pipeline: weakly supervised video anomaly detection, from raw videos to evaluated detectors.

Top-level packages: ``pipeline`` (CLI, config, cache, stage runner, manifests, demo data),
``extractors`` (clip feature extractors), ``models`` (detectors), ``stages`` (the stages).
"""

__version__ = "0.1.0"
