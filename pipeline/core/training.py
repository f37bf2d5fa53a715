"""The one training loop and its checkpoint helper, shared by the train stage, ``Detector.fit``
and MIST's stage II.

A training run is a sequence of steps. :func:`training_loop` runs steps ``start .. total - 1``,
refuses a loss that is not finite, keeps one log row per step and saves a checkpoint when asked,
so that a killed run resumes from its last checkpoint (:func:`load_checkpoint`) with the same
model, optimiser, random state and log, and trains to the same weights.
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from pipeline.core.errors import StageError
from pipeline.core.progress import progress_bar
from pipeline.core.store import atomic_torch_save, atomic_write_text, verified_torch_load

log = logging.getLogger(__name__)


def rng_state(gen: torch.Generator) -> dict[str, Any]:
    """torch's global random state (CPU and, when present, CUDA) and the sampling generator's."""
    state = {"torch": torch.get_rng_state(), "sampler": gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], gen: torch.Generator) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    gen.set_state(state["sampler"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Save a resumable training state atomically, with its checksum (``<path>.sha256``)."""
    atomic_torch_save(path, state)


def load_checkpoint(path: Path, device: torch.device | str, what: str = "train") -> dict[str, Any] | None:
    """The resumable checkpoint at ``path``, or None to start from step 0 (none yet, or one that
    fails its checksum or cannot be read: it is removed, never resumed from)."""
    if not path.is_file():
        return None
    try:
        return verified_torch_load(path, map_location=device)
    except ValueError as e:
        log.warning("%s: %s; removed, training starts over from step 0", what, e)
        path.unlink(missing_ok=True)
        return None


def write_log(path: Path, rows: list[dict[str, float]]) -> None:
    """Rewrite the per-step log CSV ``path`` (every column any row has) atomically."""
    keys: list[str] = []
    for r in rows:
        keys.extend(k for k in r if k not in keys)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def training_loop(
    step: Callable[[int], dict[str, float]],
    *,
    total: int,
    start: int = 0,
    rows: list[dict[str, float]] | None = None,
    checkpoint: Callable[[int], None] | None = None,
    checkpoint_when: Callable[[int], bool] = lambda done: False,
    progress: bool = False,
    desc: str = "train",
    unit: str = "step",
    hint: str = "",
) -> list[dict[str, float]]:
    """Run ``step(i)`` for ``i`` in ``start .. total - 1``; returns the log rows.

    Args:
        step: one training step; returns its log row, whose ``"total"`` is the loss minimised.
        total, start: the steps to run (``start`` > 0 when resuming).
        rows: the log so far (resuming), appended to in place.
        checkpoint: ``checkpoint(done)`` saves the state after ``done`` steps; called when
            ``checkpoint_when(done)`` holds and after the last step.
        progress: show a progress bar (``desc``, ``unit``).
        hint: appended to the error of a loss that is not finite (e.g. "lower train.lr?").

    Raises:
        StageError: the loss became NaN or infinite.
    """
    rows = [] if rows is None else rows
    for i in progress_bar(range(start, total), progress, desc=desc, unit=unit, initial=start, total=total):
        row = step(i)
        if not np.isfinite(row["total"]):
            raise StageError(f"{desc}: loss became {row['total']} at step {i + 1}" + (f"; {hint}" if hint else ""))
        rows.append(row)
        done = i + 1
        if checkpoint is not None and (checkpoint_when(done) or done == total):
            checkpoint(done)
    return rows
