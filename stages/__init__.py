"""The pipeline's stages, in dependency order: (flow ->) extract -> segment -> train -> evaluate.

``flow`` runs only when ``extract.modality`` reads flow; MIST's stages (``stages/mist.py``) only for
``--method mist``: both are ``optional`` stages.

``decode`` is not a stage of its own: the extract stage decodes each video in bounded chunks
(``pipeline.core.video``) and never stores raw frames.
"""

from __future__ import annotations

from pipeline.core.stage import Stage

from .chains import OwnTraining
from .evaluate import EvaluateStage
from .extract import ExtractStage
from .flow import FlowStage
from .mist import MIST_CHAIN, mist_stages
from .segment import SegmentStage
from .train import TrainStage

#: detectors that train through stages of their own (``stages.chains``)
CHAINS: dict[str, OwnTraining] = {"mist": MIST_CHAIN}


def all_stages() -> list[Stage]:
    """Fresh instances of every stage, in dependency order."""
    generator, pseudo, reextract, explain = mist_stages()  # optional: run only for --method mist
    return [FlowStage(), ExtractStage(), SegmentStage(), generator, pseudo, TrainStage(CHAINS), reextract, explain,
            EvaluateStage(CHAINS)]


STAGE_NAMES = ("extract", "segment", "train", "evaluate")
