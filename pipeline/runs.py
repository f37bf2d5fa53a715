"""What the application hands the core for a run: the stage context with the datasets it can
make on demand (``data.manifest = 'demo'``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.core.stage import Context
from pipeline.demo import DEMO_DATA


def make_context(cfg: Any, run_dir: Path | str, progress: bool = True, store: Path | str | None = None) -> Context:
    """A :class:`~pipeline.core.stage.Context` for ``cfg`` in ``run_dir``: per-video artifacts in
    ``store`` (default ``$WSVAD_STORE`` or ``~/.cache/wsvad-pipeline/store``), the demo dataset
    generated under ``run_dir/demo_data`` when ``data.manifest`` is 'demo'."""
    return Context(cfg, Path(run_dir), progress=progress, store=Path(store) if store else None,
                   generated={"demo": DEMO_DATA})
