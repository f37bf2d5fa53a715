"""Detectors whose training is a chain of their own stages (MIST): the module that owns those
stages defines an :class:`OwnTraining`, and ``stages.all_stages`` hands it to the train and
evaluate stages, so that the detector interface (``models.base.Detector``) stays free of them.

A detector without one trains with the generic loop of ``stages/train.py`` on the segment or
extract features, and is evaluated on the extract stage's clips.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from pipeline.core.stage import Context
from pipeline.core.store import StageDir


@dataclass(frozen=True)
class OwnTraining:
    """How the train and evaluate stages run a detector with its own chain of stages.

    Attributes:
        train_inputs: the runner stages the train stage reads (MIST: ``extract``, ``mist_pseudo``).
        run_train: the train stage's work, ``(ctx, out, inputs) -> DONE summary``; it writes
            ``model.pt`` with ``stages.train.write_model`` so that evaluation loads it the same way.
        feature_stage: the stage whose clip features evaluate and score read (MIST: ``mist_extract``).
        eval_inputs: the stages the evaluate stage reads.
    """

    train_inputs: tuple[str, ...]
    run_train: Callable[[Context, StageDir, dict[str, StageDir]], dict[str, Any]]
    feature_stage: str
    eval_inputs: tuple[str, ...]
