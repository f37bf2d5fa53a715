"""Frame-level metrics, computed as the authors' test code does (RTFM test_10crop.py, test).

All metrics are over the concatenation of every test video's evaluated frames:

- ``auc``: ROC AUC (Sultani et al. 2018, Sec. 4.3; every later paper).
- ``ap``: ``sklearn.metrics.average_precision_score`` (step interpolation, as VadCLIP reports);
  ``ap_trapezoid``: ``auc(recall, precision)`` (trapezoid, as RTFM / XD-Violence repos report).
  The two differ; both are labelled.
- ``far``: share of frames of normal test videos scored above the threshold (0.5);
  :func:`false_alarm_rate`.
- ``auc_abnormal_only``: ROC AUC over the frames of anomalous test videos only (BN-WVAD).
- ``per_class_auc``: for each anomaly class, ROC AUC over that class's videos plus every normal test
  video (MIST's per-class protocol on UCF-Crime).
- ``score_gap``: mean score of anomalous frames minus mean score of normal frames (MIST).
- ``topk_precision``: NG-MIL's top-k precision (Park et al., "Normality Guided Multiple Instance
  Learning for Weakly Supervised Video Anomaly Detection", WACV 2023, Sec. 4.6, Eq. 12:
  TPI / (TPI + FPI) over the top-k instances of each *abnormal test video*, k = 3 as in their
  Fig. 4). It shows whether a MIL detector puts its highest scores on the
  truly anomalous instances. Computed here at snippet (16-frame clip) level; see :func:`topk_precision`.

:func:`auc_from_roc` gives the area under a published ROC curve (fpr, tpr points) with the same
``sklearn.metrics.auc`` trapezoid rule that ``roc_auc_score`` applies to its own curve.

:func:`choose_threshold` picks the threshold of the FAR and the report's per-video verdicts without
the test set: Youden's J (Youden 1950, "Index for rating diagnostic tests", Cancer 3(1)) on the
*training* videos' video-level scores (:func:`youden_threshold`). Detector scores are not
calibrated, so a fixed 0.5 can call a well-ranked run (AUC 0.96) "all missed", or every normal
frame a false alarm.
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


#: NG-MIL's k for top-k precision (Park et al. 2023, Fig. 4: "k=3"), an absolute number of instances
TOPK_DEFAULT = 3


def _auc(gt: np.ndarray, scores: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    if gt.min() == gt.max():
        return None  # undefined with a single class
    return float(roc_auc_score(gt, scores))


def frame_metrics(
    videos: list[VideoScores],
    far_threshold: float = 0.5,
    snippets: list[VideoScores] | None = None,
    topk: int = TOPK_DEFAULT,
) -> dict:
    """The metrics in the module docstring, as a JSON-ready dict (``None`` where undefined).

    Args:
        videos: every test video's evaluated frames.
        far_threshold: FAR threshold.
        snippets: the same videos at snippet level (:func:`snippet_level`); when given, the output
            has ``topk_precision`` (:func:`topk_precision` with ``k = topk``).
    """
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
    out["far"] = false_alarm_rate(videos, far_threshold)
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
    if snippets is not None:
        out["topk_precision"] = topk_precision(snippets, topk)
    return out


def false_alarm_rate(videos: list[VideoScores], threshold: float) -> float | None:
    """Share of the frames of normal videos (``label == 0``) scored above ``threshold`` (``None``
    without a normal video): the ``far`` metric."""
    normal = [v for v in videos if v.label == 0]
    if not normal:
        return None
    return float(np.mean(np.concatenate([v.scores for v in normal]) > threshold))


#: the rules :func:`choose_threshold` knows (``evaluate.threshold_rule``)
THRESHOLD_RULES = ("train_youden", "fixed")


def youden_threshold(labels, scores) -> dict:
    """The threshold maximising Youden's J = TPR - FPR over videos with 0/1 ``labels`` and
    video-level ``scores`` (the evaluate stage passes each training video's maximum frame score).

    The ROC is ``sklearn.metrics.roc_curve`` (every distinct score, ``drop_intermediate=False``),
    whose points call a video positive when ``score >= t``. The pipeline calls a frame an alarm
    when ``score > threshold`` (``far``, the report's verdicts), so the returned threshold is the
    midpoint between the J-maximising ``t`` and the next lower distinct score: ``score >
    threshold`` splits the videos exactly as ``score >= t`` did (``t`` itself would turn the videos
    scored exactly ``t`` into misses). J ties go to the highest ``t`` (fewest false alarms).

    Returns:
        ``{"threshold", "tpr", "fpr", "youden_j"}`` (the rates of the videos at the threshold).
    Raises:
        ValueError: no videos, a single class, or no threshold better than chance (max J <= 0),
            with the reason.
    """
    from sklearn.metrics import roc_curve

    labels = np.asarray(labels, np.int64).ravel()
    scores = np.asarray(scores, np.float64).ravel()
    if labels.size == 0:
        raise ValueError("no training video has features")
    if labels.min() == labels.max():
        which = "anomalous" if labels[0] else "normal"
        raise ValueError(f"the {labels.size} training videos are only {which} ones")
    fpr, tpr, thr = roc_curve(labels, scores, drop_intermediate=False)
    j = tpr - fpr
    # the first maximum (the highest threshold); equal J by other roundings (1 - 1/3 vs 2/3) tie
    k = int(np.flatnonzero(j >= j.max() - 1e-9)[0])
    if j[k] <= 0:
        raise ValueError("no threshold separates the training videos better than chance (Youden's J <= 0)")
    # 0 < k < len - 1 here: J is 0 at the first point (nothing positive) and the last (everything)
    return {"threshold": float((thr[k] + thr[k + 1]) / 2), "tpr": float(tpr[k]), "fpr": float(fpr[k]),
            "youden_j": float(j[k])}


def choose_threshold(rule: str, fixed: float, train_scores: dict[str, float], train_labels: dict[str, int]) -> dict:
    """The threshold of the FAR and the per-video verdicts, chosen without the test set.

    Args:
        rule: ``train_youden`` (:func:`youden_threshold` over the training videos) or ``fixed``.
        fixed: the fixed threshold (``evaluate.far_threshold``), also the fallback of
            ``train_youden`` when the training videos cannot choose one.
        train_scores: each training video's video-level score (its maximum frame score).
        train_labels: each training video's weak 0/1 label.
    Returns:
        ``{"threshold", "threshold_rule": the rule that chose it ("fixed" after a fallback),
        "threshold_note": one sentence naming the rule (and the reason of a fallback),
        "threshold_train": None, or {"videos", "abnormal", "tpr", "fpr", "youden_j", "max_scores"}}``.
    """
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"unknown threshold rule {rule!r}; one of {', '.join(THRESHOLD_RULES)}")
    if rule == "fixed":
        return {"threshold": float(fixed), "threshold_rule": "fixed",
                "threshold_note": f"fixed threshold {fixed:g} (evaluate.far_threshold)", "threshold_train": None}
    ids = sorted(train_scores)
    labels = [int(train_labels[i]) for i in ids]
    try:
        r = youden_threshold(labels, [train_scores[i] for i in ids])
    except ValueError as e:
        return {"threshold": float(fixed), "threshold_rule": "fixed",
                "threshold_note": f"fixed threshold {fixed:g}: fell back from train_youden because {e}",
                "threshold_train": None}
    train = {"videos": len(ids), "abnormal": int(sum(labels)), "tpr": r["tpr"], "fpr": r["fpr"],
             "youden_j": r["youden_j"], "max_scores": {i: float(train_scores[i]) for i in ids}}
    return {"threshold": r["threshold"], "threshold_rule": "train_youden",
            "threshold_note": f"threshold {r['threshold']:.4g} chosen on the training videos (Youden's J of "
                              f"video-level maxima: TPR {r['tpr']:.2f}, FPR {r['fpr']:.2f} on {len(ids)} videos)",
            "threshold_train": train}


def snippet_level(
    frame_scores: np.ndarray, frame_gt: np.ndarray, clip_ranges: list[tuple[int, int]] | list[list[int]]
) -> tuple[np.ndarray, np.ndarray]:
    """Snippet (clip) scores and labels from frame scores and frame ground truth.

    A snippet's score is the mean of its frames' scores (for a clip-level detector, the clip's own
    score; for a segment-level one, the mean of the segments covering it); its label is 1 when any
    of its frames lies in a ground-truth anomaly interval.

    Args:
        frame_scores: ``[F]`` per-frame scores.
        frame_gt: ``[F]`` 0/1 per-frame ground truth.
        clip_ranges: each clip's real frame range ``[start, end)`` (the extract stage's metadata).
    Returns:
        ``scores`` ``[T]`` float64 and ``labels`` ``[T]`` int64.
    """
    scores = np.array([float(np.mean(frame_scores[a:b])) for a, b in clip_ranges], np.float64)
    labels = np.array([int(np.any(frame_gt[a:b])) for a, b in clip_ranges], np.int64)
    return scores, labels


def _expected_topk_hits(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    """True positives among the ``k`` highest ``scores``; ties at the k-th score are shared.

    When the k-th place falls inside a group of tied scores (common for segment detectors, whose
    score repeats over a segment's clips), any choice inside the group is arbitrary, so the group
    contributes its share of positives pro rata: the expected count under random tie-breaking.
    """
    kth = np.sort(scores)[::-1][k - 1]
    above = scores > kth
    tied = scores == kth
    need = k - int(above.sum())
    return float(labels[above].sum()) + need * float(labels[tied].sum()) / float(tied.sum())


def topk_precision(videos: list[VideoScores], k: int = TOPK_DEFAULT) -> dict:
    """NG-MIL's top-k precision (Park et al. 2023, Sec. 4.6, Eq. 12) over abnormal test videos.

    For each anomalous video (``label == 1``), take the ``k`` instances with the highest scores
    (all of them when it has fewer than ``k``; k is absolute, 3 as in NG-MIL's Fig. 4) and count
    true positive instances (TPI: ground-truth anomalous) and false positive instances (FPI).
    Precision = TPI / (TPI + FPI), pooled over the videos (each contributes ``min(k, T)``
    instances). NG-MIL's instances are its 32 segments; here ``videos`` carries whatever instances
    the caller passes: the evaluate stage passes snippets (:func:`snippet_level`). Ties at the k-th
    score are shared pro rata (:func:`_expected_topk_hits`), so the value is deterministic.

    Args:
        videos: per-video instance ``scores`` and 0/1 ``gt`` (a :class:`VideoScores` per video);
            normal videos are ignored.
        k: instances per video.
    Returns:
        ``{"k", "precision" (None without any usable video), "videos": how many were used,
        "per_video": {id: precision}, "skipped": abnormal videos without any annotated anomalous
        instance (nothing to find, so left out)}``.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    hits = picked = 0.0
    per_video: dict[str, float] = {}
    skipped: list[str] = []
    for v in videos:
        if v.label != 1:
            continue
        scores = np.asarray(v.scores, np.float64)
        labels = np.asarray(v.gt, np.int64)
        if scores.size == 0 or not labels.any():
            skipped.append(v.id)
            continue
        kk = min(k, scores.size)
        h = _expected_topk_hits(scores, labels, kk)
        per_video[v.id] = h / kk
        hits += h
        picked += kk
    return {
        "k": k,
        "precision": hits / picked if picked else None,
        "videos": len(per_video),
        "per_video": per_video,
        "skipped": skipped,
    }


def auc_from_roc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Area under a ROC curve given as points (false positive rate, true positive rate).

    Uses ``sklearn.metrics.auc`` (trapezoid rule), the function behind ``roc_auc_score`` and the
    ``ap_trapezoid`` metric. ``fpr`` must be monotonic (as every ROC curve is).
    """
    from sklearn.metrics import auc

    fpr = np.asarray(fpr, np.float64).ravel()
    tpr = np.asarray(tpr, np.float64).ravel()
    if fpr.shape != tpr.shape or fpr.size < 2:
        raise ValueError(f"need matching fpr/tpr curves of at least 2 points, got {fpr.size} and {tpr.size}")
    return float(auc(fpr, tpr))


def roc_points(videos: list[VideoScores]) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.metrics import roc_curve

    gt = np.concatenate([v.gt for v in videos])
    scores = np.concatenate([v.scores for v in videos])
    fpr, tpr, _ = roc_curve(gt, scores)
    return fpr, tpr
