"""The framework core: what every layer above builds on.

- ``store``: atomic writes, checksums, the per-video item store, checkpoints, the stale-temp sweeper;
- ``registry``: name -> class registries (extractors and detectors keep theirs in their own packages);
- ``config``: config primitives and the settings sections of the stages;
- ``manifest``, ``video``: the dataset's CSV and decoding its videos;
- ``metrics``, ``distributed``;
- ``stage``, ``runner``, ``status``: the stage interface, running stages with caching and resume, and
  reporting their state.

Nothing here imports ``extractors``, ``models``, ``stages`` or the application (``pipeline.cli``,
``pipeline.score``, ``pipeline.demo``, ``pipeline.datasets``); tests/test_layers.py enforces it.
"""
