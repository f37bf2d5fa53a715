"""Frame-level metrics (PROTOCOLS.md, 'Evaluation').

All metrics are over the concatenation of every test video's evaluated frames:

- ``auc``: ROC AUC (Sultani et al. 2018, Sec. 4.3; every later paper).
- ``ap``: ``sklearn.metrics.average_precision_score`` (step interpolation, as VadCLIP reports);
  ``ap_trapezoid``: ``auc(recall, precision)`` (trapezoid, as RTFM / XD-Violence repos report).
  The two differ; both are labelled.
- ``far``: share of frames of normal test videos scored above the threshold (0.5).
- ``auc_abnormal_only``: ROC AUC over the frames of anomalous test videos only (BN-WVAD).
- ``per_class_auc``: for each anomaly class, ROC AUC over that class's videos plus every normal test
  video (MIST's per-class protocol on UCF-Crime).
- ``score_gap``: mean score of anomalous frames minus mean score of normal frames (MIST).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class VideoScores:
    """One test video's frame scores ``[F]`` float in [0, 1], ground truth ``[F]`` 0/1, label and class."""

    id: str
    scores: np.ndarray
    gt: np.ndarray
    label: int
    cls: str


def _auc(gt: np.ndarray, scores: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    if gt.min() == gt.max():
        return None  # undefined with a single class
    return float(roc_auc_score(gt, scores))


def frame_metrics(videos: list[VideoScores], far_threshold: float = 0.5) -> dict:
    """The metrics in the module docstring, as a JSON-ready dict (``None`` where undefined)."""
    from sklearn.metrics import auc, average_precision_score, precision_recall_curve

    gt = np.concatenate([v.gt for v in videos]).astype(np.int64)
    scores = np.concatenate([v.scores for v in videos]).astype(np.float64)
    out: dict = {"frames": int(gt.size), "anomalous_frames": int(gt.sum()), "videos": len(videos)}
    out["auc"] = _auc(gt, scores)
    if gt.any():
        out["ap"] = float(average_precision_score(gt, scores))
        precision, recall, _ = precision_recall_curve(gt, scores)
        out["ap_trapezoid"] = float(auc(recall, precision))
    else:
        out["ap"] = out["ap_trapezoid"] = None
    normal = [v for v in videos if v.label == 0]
    out["far"] = float(np.mean(np.concatenate([v.scores for v in normal]) > far_threshold)) if normal else None
    out["far_threshold"] = far_threshold
    abnormal = [v for v in videos if v.label == 1]
    if abnormal:
        out["auc_abnormal_only"] = _auc(
            np.concatenate([v.gt for v in abnormal]), np.concatenate([v.scores for v in abnormal])
        )
    else:
        out["auc_abnormal_only"] = None
    per_class = {}
    for cls in sorted({v.cls for v in abnormal}):
        subset = [v for v in videos if v.label == 0 or v.cls == cls]
        per_class[cls] = _auc(np.concatenate([v.gt for v in subset]), np.concatenate([v.scores for v in subset]))
    out["per_class_auc"] = per_class
    out["score_gap"] = float(scores[gt == 1].mean() - scores[gt == 0].mean()) if 0 < gt.sum() < gt.size else None
    return out


def roc_points(videos: list[VideoScores]) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.metrics import roc_curve

    gt = np.concatenate([v.gt for v in videos])
    scores = np.concatenate([v.scores for v in videos])
    fpr, tpr, _ = roc_curve(gt, scores)
    return fpr, tpr
