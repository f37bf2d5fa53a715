"""Segment stage: pool each video's clip features into a fixed number of segments (default 32).

Two published schemes:

- ``sultani`` (Sultani et al. 2018, Sec. 3.3; the official ``Save_C3DFeatures_32Segments.m`` of
  WaqasSultani/AnomalyDetectionCVPR2018): bin edges ``round(linspace(0, T - 1, S + 1))`` over clip
  indices (the script's 1-based ``round(linspace(1, T, 33))``); segment i is the mean of clips
  ``[e_i, e_{i+1})``, or clip ``e_i`` alone when the bin is empty; each segment is L2-normalised. As
  in the script, the last segment ends before clip ``T - 1``: its branch that would include the last
  clip (``ishots == length(thirty2_shots)``) never runs, since the loop stops one short of it. The
  official evaluation (``Evaluate_Anomaly_Detector.m``) uses the same bins, so the last clip's
  frames get no segment score there either (it leaves them at 0); here they are left out of the
  metrics, as every frame no unit covers is (``stages/evaluate.py``).
- ``rtfm`` (Tian et al. 2021, their ``process_feat``): edges ``int(linspace(0, T, S + 1))``; mean of
  ``[e_i, e_{i+1})``, or clip ``e_i`` when empty; no normalisation.

Stored per video: ``segments`` ``[C, S, D]`` float32 and ``bins``: each segment's clip index range
``[a, b)``, from which evaluation derives the frames a segment score covers.
"""

from __future__ import annotations

import numpy as np

from pipeline.core.manifest import VideoRecord
from pipeline.core.stage import Context, Stage, check_features
from pipeline.core.store import StageDir


def segment_bins(n_clips: int, n_segments: int, scheme: str) -> list[tuple[int, int]]:
    """Clip index ranges ``[a, b)`` of each segment, every range non-empty and inside ``[0, n_clips)``."""
    if n_clips < 1:
        raise ValueError("a video needs at least one clip")
    if scheme == "sultani":
        edges = np.floor(np.linspace(0, n_clips - 1, n_segments + 1) + 0.5).astype(int)  # MATLAB round
    elif scheme == "rtfm":
        edges = np.linspace(0, n_clips, n_segments + 1).astype(int)
    else:
        raise ValueError(f"unknown segment scheme {scheme!r}")
    bins = []
    for i in range(n_segments):
        a, b = int(edges[i]), int(edges[i + 1])
        a = min(a, n_clips - 1)
        bins.append((a, max(b, a + 1)))
    return bins


def pool_segments(features: np.ndarray, bins: list[tuple[int, int]], l2: bool) -> np.ndarray:
    """``features`` ``[T, C, D]`` (float32 or float16) -> ``[C, S, D]`` float32, the mean of each bin (then unit L2 norm if ``l2``)."""
    # float32 arithmetic whatever the stored dtype: float16 features (extract.feature_dtype) would
    # overflow in the L2 norm of 4096-D vectors
    seg = np.stack([features[a:b].mean(axis=0, dtype=np.float32) for a, b in bins], axis=1)  # [C, S, D]
    if l2:
        seg = seg / np.maximum(np.linalg.norm(seg, axis=-1, keepdims=True), 1e-12)
    return seg.astype(np.float32)


class SegmentStage(Stage):
    name = "segment"
    version = 2  # 2: the Sultani scheme's last segment leaves out the last clip, as the official script does
    reads = ("segment",)
    upstream = ("extract",)

    def process(self, ctx: Context, video: VideoRecord, out: StageDir, inputs: dict[str, StageDir]) -> None:
        cfg = ctx.cfg.segment
        meta, arrays = inputs["extract"].load_item(video.id)
        feats = arrays["features"]
        check_features(feats, inputs["extract"].item_file(video.id, "features"), meta.get("feature_dim"))
        if meta.get("units") == "segments":  # imported Sultani features are already segments
            if feats.shape[0] != cfg.num_segments:
                raise ValueError(f"imported segment features have {feats.shape[0]} segments, not {cfg.num_segments}")
            bins = [(i, i + 1) for i in range(cfg.num_segments)]
        else:
            bins = segment_bins(feats.shape[0], cfg.num_segments, cfg.scheme)
        seg = pool_segments(feats, bins, l2=cfg.scheme == "sultani")
        out.save_item(video.id, {"segments": seg}, {"bins": [list(b) for b in bins], "n_clips": int(feats.shape[0])})
