"""Evaluate stage: score every test video, map scores to frames, compute metrics, write a report.

Frame mapping uses the clip frame ranges stored by the extract stage (no assumed fps or clip count):
a clip score covers its clip's real frames; a segment score covers the frames of its clips. Where
units overlap (a short video's segments repeat clips) a frame gets the mean of their scores. Frames
no unit covers (a trailing partial clip dropped with ``extract.partial_clip=drop``) are left out of
the metrics, as the published protocols truncate them. Crop scores are averaged per unit, as the
authors do (RTFM test_10crop.py and Roc-Ng/XDVioDet test.py, test: mean over the crops).

Besides the FAR at the fixed ``evaluate.far_threshold`` (0.5, ``far``), metrics.json has
``far_at_threshold``, the FAR at a threshold chosen without the test set
(``evaluate.threshold_rule``, default ``train_youden``): the training videos are scored the same
way, each video's maximum frame score is its video-level score, and the threshold maximising
Youden's J against their weak labels is taken (:func:`pipeline.core.metrics.choose_threshold`;
``threshold``, ``threshold_rule``, ``threshold_note``, ``threshold_train``). The report's
per-video verdicts use it.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from pipeline.core.store import atomic_save_npy, atomic_write_json
from pipeline.core.metrics import VideoScores, choose_threshold, false_alarm_rate, frame_metrics, snippet_level
from pipeline.core.errors import StageError
from pipeline.core.runner import resolve_device
from pipeline.core.stage import Context, Stage, check_features
from pipeline.core.store import StageDir

from models import DETECTORS

from .chains import OwnTraining
from .train import load_detector

log = logging.getLogger(__name__)


def frames_from_units(unit_scores: np.ndarray, unit_frames: list[tuple[int, int]], n_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Spread unit scores over frames.

    Args:
        unit_scores: ``[U]`` scores of clips or segments.
        unit_frames: each unit's frame range ``[start, end)``.
        n_frames: frames in the video.
    Returns:
        ``scores`` ``[n_frames]`` float32 (mean of covering units, 0 where uncovered) and
        ``covered`` ``[n_frames]`` bool.
    """
    total = np.zeros(n_frames, np.float64)
    count = np.zeros(n_frames, np.int64)
    for s, (a, b) in zip(unit_scores, unit_frames):
        b = min(b, n_frames)
        total[a:b] += float(s)
        count[a:b] += 1
    covered = count > 0
    scores = np.where(covered, total / np.maximum(count, 1), 0.0).astype(np.float32)
    return scores, covered


def score_units(
    model: torch.nn.Module, ext: tuple[dict, dict], seg: tuple[dict, dict] | None, device: str
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """The detector's scores of one video's units (segments or clips, crops averaged) and each
    unit's frame range ``[start, end)``, from the extract (and segment) items ``(meta, arrays)``."""
    meta, arrays = ext
    clip_ranges = [tuple(r) for r in meta["clip_ranges"]]
    if model.input_level == "segments":
        if seg is None:
            raise StageError("segment features missing")
        seg_meta, seg_arrays = seg
        bags = torch.from_numpy(seg_arrays["segments"]).to(device)  # [C, S, D]
        units = model.score(bags).cpu().numpy()
        unit_frames = [(clip_ranges[a][0], clip_ranges[b - 1][1]) for a, b in seg_meta["bins"]]
    else:
        # float32 whatever the stored dtype (extract.feature_dtype=float16 meets float32 weights)
        bags = torch.from_numpy(arrays["features"]).float().permute(1, 0, 2).contiguous().to(device)  # [C, T, D]
        units = model.score(bags).cpu().numpy()
        unit_frames = clip_ranges
    return units, unit_frames


def score_video(
    model: torch.nn.Module, ext: tuple[dict, dict], seg: tuple[dict, dict] | None, device: str
) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame scores ``[n_frames]`` and coverage mask of one video (see module docstring)."""
    units, unit_frames = score_units(model, ext, seg, device)
    return frames_from_units(units, unit_frames, int(ext[0]["n_frames"]))


class EvaluateStage(Stage):
    name = "evaluate"
    # 2: metrics.json gains NG-MIL's top-k precision; 3: the training-chosen threshold (threshold,
    # threshold_rule, threshold_note, threshold_train, far_at_threshold)
    version = 3
    reads = ("evaluate",)
    manifest_columns = ("id", "split", "label", "class", "intervals")
    upstream = ("extract", "segment", "train")
    per_video = False

    def __init__(self, chains: dict[str, OwnTraining] | None = None) -> None:
        #: detectors scored on their own stages' features (``stages.all_stages`` passes MIST's)
        self.chains = chains or {}

    def upstream_for(self, cfg: Any) -> tuple[str, ...]:
        """Clip-level detectors score extract's clips and need no segments."""
        cls = DETECTORS.get_class(cfg.train.method)
        chain = self.chains.get(cfg.train.method)
        if chain is not None:
            return chain.eval_inputs
        return self.upstream if cls.input_level == "segments" else ("extract", "train")

    def run_whole(self, ctx: Context, out: StageDir, inputs: dict[str, StageDir]) -> dict[str, Any]:

        device = resolve_device(ctx.cfg.train.device)
        model = load_detector(inputs["train"], device)
        chain = self.chains.get(ctx.cfg.train.method)
        features = inputs[chain.feature_stage if chain else "extract"]  # extract's, or MIST's re-extracted
        done = set(features.complete_items())
        if "segment" in inputs:
            done &= set(inputs["segment"].complete_items())
        tests = [v for v in ctx.manifest.split("test") if v.id in done]
        missing = [v.id for v in ctx.manifest.split("test") if v.id not in done]
        if not tests:
            raise StageError("no test video has features; nothing to evaluate")
        results: list[VideoScores] = []
        snippets: list[VideoScores] = []  # clip level, for NG-MIL's top-k precision
        warnings: list[str] = []
        failures: list[dict[str, Any]] = []  # videos left out of the metrics, with the reason
        for v in tests:
            ext = features.load_item(v.id)
            seg = inputs["segment"].load_item(v.id) if "segment" in inputs else None
            try:
                _check_test_video(ctx, v, model, ext, seg, features if seg is None else inputs["segment"])
            except ValueError as e:
                log.error("evaluate: video %s left out: %s", v.id, e)
                failures.append({"video": v.id, "path": v.path, "stage": "evaluate", "error": str(e)})
                warnings.append(f"{v.id}: left out of the metrics: {e}")
                continue
            scores, covered = score_video(model, ext, seg, device)
            n = len(scores)
            gt = np.asarray(v.frame_labels(n), np.uint8)
            atomic_save_npy(out.items / f"{v.id}.scores.npy", np.where(covered, scores, np.nan).astype(np.float32))
            results.append(VideoScores(v.id, scores[covered], gt[covered], v.label, v.cls))
            clip_scores, clip_gt = snippet_level(scores, gt, ext[0]["clip_ranges"])
            snippets.append(VideoScores(v.id, clip_scores, clip_gt, v.label, v.cls))
        if not results:
            raise StageError("no test video could be evaluated: " + "; ".join(f["error"] for f in failures))
        metrics = frame_metrics(results, ctx.cfg.evaluate.far_threshold, snippets=snippets)
        ev = ctx.cfg.evaluate
        maxima: dict[str, float] = {}
        if ev.threshold_rule == "train_youden":
            maxima = _train_video_maxima(ctx, model, features, inputs.get("segment"), done, device, warnings)
        labels = {v.id: v.label for v in ctx.manifest.split("train")}
        chosen = choose_threshold(ev.threshold_rule, ev.far_threshold, maxima, labels)
        if chosen["threshold_rule"] != ev.threshold_rule:
            warnings.append(chosen["threshold_note"])
        log.info("evaluate: %s", chosen["threshold_note"])
        metrics.update(chosen)
        metrics["far_at_threshold"] = false_alarm_rate(results, chosen["threshold"])
        metrics["missing_test_videos"] = missing
        metrics["failed_videos"] = failures
        metrics["warnings"] = warnings
        metrics["config"] = ctx.cfg.to_dict()
        metrics["cache_keys"] = {n: d.path.name for n, d in inputs.items()}
        atomic_write_json(out.path / "metrics.json", metrics)
        from stages.report import write_report

        train_log = inputs["train"].path / "train_log.csv"
        left_out = {f["video"] for f in failures}
        evaluated = [v for v in tests if v.id not in left_out]
        write_report(out.path, metrics, evaluated, out.items, train_log, plots=ctx.cfg.evaluate.plots)
        log.info("evaluate: frame AUC %.4f over %d test videos", metrics["auc"] or float("nan"), len(results))
        return {
            "auc": metrics["auc"],
            "ap": metrics["ap"],
            "far": metrics["far"],
            "far_threshold": metrics["far_threshold"],
            "threshold": metrics["threshold"],
            "threshold_rule": metrics["threshold_rule"],
            "far_at_threshold": metrics["far_at_threshold"],
            "report": str(out.path / "report.html"),
            "metrics": str(out.path / "metrics.json"),
            "failures": failures,
        }


def _train_video_maxima(ctx: Context, model: torch.nn.Module, features: StageDir, segments: StageDir | None,
                        done: set[str], device: str, warnings: list[str]) -> dict[str, float]:
    """Each training video's maximum frame score, scored as the test videos are (:func:`score_video`),
    for :func:`pipeline.core.metrics.choose_threshold`. Videos without features are skipped; one whose
    features no detector may see (:func:`check_features`) is left out with a warning."""
    maxima: dict[str, float] = {}
    dim = getattr(model, "feature_dim", None)
    for v in ctx.manifest.split("train"):
        if v.id not in done:
            continue
        if segments is not None and model.input_level == "segments":
            ext = (features.load_meta(v.id), {})  # the clip ranges; the clip features are not needed
            seg = segments.load_item(v.id)
            units, src = seg[1]["segments"], segments.item_file(v.id, "segments")
        else:
            ext, seg = features.load_item(v.id), None
            units, src = ext[1]["features"], features.item_file(v.id, "features")
        try:
            check_features(units, src, dim)
        except ValueError as e:
            log.warning("evaluate: training video %s left out of the threshold choice: %s", v.id, e)
            warnings.append(f"{v.id}: left out of the threshold choice: {e}")
            continue
        scores, covered = score_video(model, ext, seg, device)
        if covered.any():
            maxima[v.id] = float(scores[covered].max())
    return maxima


def _check_test_video(ctx: Context, v: Any, model: torch.nn.Module, ext: tuple[dict, dict],
                      seg: tuple[dict, dict] | None, src: StageDir) -> None:
    """Refuse a test video the metrics must not include, with a ValueError naming its file: units
    (segments or clips) of another width than the detector's, NaN/inf values, or an anomaly
    interval past the video's last frame (ground truth and video disagree)."""
    name = "segments" if seg is not None else "features"
    units = (seg if seg is not None else ext)[1][name]
    check_features(units, src.item_file(v.id, name), getattr(model, "feature_dim", None))
    n = int(ext[0]["n_frames"])
    for s, e in v.intervals:
        if e > n:
            raise ValueError(f"{ctx.manifest.source}: video {v.id} ({ctx.manifest.resolve(v)}): anomaly interval "
                             f"{s}-{e} ends after the video's {n} frames")


