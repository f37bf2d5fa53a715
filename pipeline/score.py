"""Scoring new videos with a trained run: ``pipeline score VIDEO... --run-dir DIR [--out DIR] [--online]``.

The run directory says everything needed: ``RUN_DIR/config.yaml`` (the resolved config its latest
run saved) gives the extractor and the extract / segment settings, ``RUN_DIR/latest.json`` the train
stage folder holding ``model.pt``. A new video (file or JPEG/PNG frame folder) then goes through
exactly the code the pipeline's stages use:

- offline (default): :func:`extractors.stream.iter_clip_features` (the extract stage's decoding,
  clip cutting and batching), then for ``input_level == "segments"`` detectors (Sultani MIL) the
  segment stage's :func:`~stages.segment.segment_bins` / :func:`~stages.segment.pool_segments`
  with the run's segment settings, then the evaluate stage's :func:`~stages.evaluate.score_video`
  (crop averaging, units -> frames with :func:`~stages.evaluate.frames_from_units`). So a test video
  scored here gets the frame scores the evaluate stage gave it.
- online (``--online``): each clip's score is emitted as soon as its 16 frames are decoded and
  featurised (decoded ``clip_len`` frames at a time, one clip per forward pass), logged at INFO and
  yielded by :meth:`RunScorer.iter_online` / passed to the ``on_clip`` callback. Only detectors with
  ``causal = True`` (``models/base.py``) can run this way; today that is ``sultani_mil``. Its MLP
  scores each unit on its own, so online it scores single clips, fed the clip feature normalised as
  the run's segment scheme normalises segments (L2 for the default ``sultani`` scheme): those scores
  approximate the offline ones, which score 32-segment means. With the ``sultani`` scheme they are
  equal for videos of up to 17 clips (every segment is then a single clip); from 18 to 33 clips the
  last segment pools the last two clips, so those two differ; longer videos' segments pool several
  clips each. For a causal ``clips``-level detector, online and offline scores are the same.

A MIST run (``--method mist``, whose detector reads the ``mist_extract`` features) featurises with
its stage II encoder (the train stage's ``encoder.pt``) and scores with E_SGA's main head; a run
trained on ``extract.encoder`` features featurises with that encoder. Both build the extractor with
:func:`stages.mist.fine_tuned_extractor`, as the ``mist_extract`` stage does; a missing or mismatched
encoder exits 2.

Outputs per video, in ``--out`` (default ``RUN_DIR/scores``), each written atomically:
``<id>.csv`` (``frame,time_s,score``; ``time_s = frame / fps``; the score is empty for frames no clip
covers, i.e. a trailing partial clip with ``extract.partial_clip=drop``), ``<id>.json`` (fps, frame
count, clip ranges and scores, scored units, per-frame scores and times, run dir, method, mode,
cache keys, ``resume``: see below) and ``<id>.png`` (score over time). ``<id>`` is the file's stem or the folder's name
(``-2``, ``-3`` ... when two inputs share one).

Resuming (issue 19): a video whose result in ``--out`` was computed from the same inputs is not
scored again but reported as ``cached``; the final line says how many were computed and how many
cached, so after Ctrl-C the same command resumes. The inputs (:meth:`RunScorer.result_inputs`) are
the video's identity (its resolved path and :func:`pipeline.core.store.fingerprint`: size,
modification time, sampled content), the sha256 of the detector's ``model.pt`` and of the encoder
file if one featurises, the detector's method, the mode (online / offline), the extract settings
that key the extract stage's features (:meth:`stages.extract.ExtractStage.config_inputs`, with the
extractor's weights checksum and the crops it uses), the segment settings of a segment-level
detector, the plot's threshold and :data:`SCORE_FORMAT`. Their hash is stored in ``<id>.json`` under
``resume``, with the sha256 of ``<id>.csv`` and ``<id>.png``, and ``<id>.json`` is written last (our
choice: one file fewer than a sidecar, and no sidecar name can collide with another video's stem).
So a run killed at any point leaves either a complete result whose key and file checksums match, or
one that does not match and is computed again.

Progress: offline scoring shows a bar over the videos and one over the frames of the video being
scored (:func:`pipeline.core.progress.progress_bar`, stderr; off with ``-q``). Online scoring logs
every clip instead.

Imported features (issue 17): a run trained on ``pipeline import-features`` files has no extractor
of its own, so scoring extracts with the feature preset that reproduces the format (``rtfm`` ->
``rtfm``, ``roc-ng`` -> ``xd_violence``, ``sultani`` -> ``sultani``; :mod:`extractors.presets`) and
the imported files' crop count; ``--weights PATH`` gives that network a local file (e.g. Tushar-N's
converted ``.pth``). ``--preset`` naming another preset, or a preset the run's own features were not
made with, and ``--weights`` of other weights than the run extracted with, are refused.

Errors get one line, no traceback: a run-level problem (not a run directory, no trained detector,
a detector trained on other features than the run's extractor gives, a mismatched preset or weights
file, a MIST run's missing ``encoder.pt``) exits 2
before any video is read; a video that fails (missing, unreadable, too short) is reported, the
others go on, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

log = logging.getLogger(__name__)

#: version of what ``write`` produces, part of every result's key: raising it makes a rerun compute
#: every video again after a change to the outputs (our choice)
SCORE_FORMAT = 1


class ScoreError(RuntimeError):
    """A run directory that cannot score videos (the message names the file and the problem)."""


@dataclass
class ClipScore:
    """One clip's score as emitted online.

    Attributes:
        index: clip index (clip i covers frames ``[16 i, 16 i + 16)``).
        start, end: the clip's real frame range ``[start, end)``.
        t_start, t_end: the same in seconds (``frame / fps``).
        score: anomaly score in [0, 1] (mean over the run's crops).
        latency_s: wall time from asking for this clip to having its score: decoding its frames,
            resizing and cropping, the extractor's forward pass and the detector's.
    """

    index: int
    start: int
    end: int
    t_start: float
    t_end: float
    score: float
    latency_s: float


@dataclass
class ScoredVideo:
    """Per-frame scores of one video.

    Attributes:
        id: output file stem.
        path: the video file or frame folder.
        fps: frames per second (the container's; ``data.folder_fps`` for frame folders).
        n_frames: decoded frames.
        scores: ``[n_frames]`` float32 in [0, 1]; NaN where no clip covers the frame.
        times: ``[n_frames]`` float64 seconds, ``frame / fps``.
        clip_ranges: each clip's frame range ``[start, end)``.
        clip_scores: ``[T]`` each clip's score (offline segment detectors: the mean of the
            segment scores covering the clip).
        unit_level: what the detector scored: ``"segments"`` or ``"clips"``.
        unit_ranges, unit_scores: the scored units' frame ranges and scores.
        mode: ``"offline"`` or ``"online"``.
        method: the detector's registry name.
        clips: online mode: every emitted :class:`ClipScore`, in order.
    """

    id: str
    path: Path
    fps: float
    n_frames: int
    scores: np.ndarray
    times: np.ndarray
    clip_ranges: list[tuple[int, int]]
    clip_scores: np.ndarray
    unit_level: str
    unit_ranges: list[tuple[int, int]]
    unit_scores: np.ndarray
    mode: str
    method: str
    clips: list[ClipScore] = field(default_factory=list)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _video_id(path: Path) -> str:
    p = Path(path)
    name = p.name if p.is_dir() else p.stem
    return name or "video"


class RunScorer:
    """A run directory's extractor and trained detector, loaded once, scoring any number of videos.

    Args:
        run_dir: a run directory whose train stage finished (``model.pt``).
        device: ``None`` = the run's ``extract.device`` / ``train.device`` ('auto': a GPU if present).
    Raises:
        ScoreError: see the module docstring.
    """

    def __init__(self, run_dir: str | Path, device: str | None = None, method: str | None = None,
                 preset: str | None = None, weights: str | None = None) -> None:
        from pipeline.core.config import ConfigError, load_yaml
        from stages.config import build_config
        from pipeline.core.runner import resolve_device

        self.run_dir = Path(run_dir)
        cfg_path = self.run_dir / "config.yaml"
        latest_path = self.run_dir / "latest.json"
        if not self.run_dir.is_dir():
            raise ScoreError(f"{self.run_dir}: no such run directory")
        if not cfg_path.is_file():
            raise ScoreError(f"{self.run_dir}: not a run directory (no config.yaml); train a detector there first "
                             f"with `pipeline run --run-dir {self.run_dir}`")
        try:
            self.cfg = build_config([load_yaml(cfg_path)])
        except ConfigError as e:
            raise ScoreError(f"{cfg_path}: {_one_line(e)}") from None
        try:
            self.latest: dict[str, str] = json.loads(latest_path.read_text()) if latest_path.is_file() else {}
        except (OSError, ValueError) as e:
            raise ScoreError(f"{latest_path}: unreadable: {_one_line(e)}") from None
        if method is not None and method != self.cfg.train.method:
            self.train_dir = self._train_dir_of(method)
            self.cfg = self._training_config(method)
        elif "train" not in self.latest:
            raise ScoreError(f"{self.run_dir}: no trained detector (latest.json names no train stage); run "
                             f"`pipeline run --stage train --run-dir {self.run_dir}` first")
        else:
            self.train_dir = self.run_dir / self.latest["train"]
        self.model_path = self.train_dir / "model.pt"
        #: what the detector was trained on, said wherever it scores a video
        self.trained_on = trained_on(self.cfg.data.manifest)
        if not self.model_path.is_file():
            raise ScoreError(f"{self.model_path}: no trained detector (model.pt missing); run "
                             f"`pipeline run --stage train --run-dir {self.run_dir}` first")
        #: the feature preset scoring extracts with (extractors/presets.py), None for a run's own settings
        self.feature_preset = self._resolve_extract(preset, weights, cfg_path)
        if getattr(self.cfg.extract, "modality", "rgb") != "rgb":
            # scoring computes RGB features only; a flow detector fed RGB features of the same width
            # would score silently and wrongly
            raise ScoreError(
                f"{cfg_path}: this run's detector reads {self.cfg.extract.modality} features "
                "(extract.modality); `pipeline score` computes RGB features only, so score these videos "
                "with `pipeline run --stage evaluate` on a manifest that lists them"
            )
        try:
            self.saved = torch.load(self.model_path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ScoreError(f"{self.model_path}: unreadable detector: {_one_line(e)}") from None
        self.method = str(self.saved["method"])
        self.feature_dim = int(self.saved["feature_dim"])
        self._check_features_match()

        from extractors.build import build_extractor
        from models import DETECTORS
        from pipeline.core.registry import RegistryError
        from pipeline.core.store import StageDir
        from stages.train import load_detector
        from stages import CHAINS

        ex = self.cfg.extract
        self.device = device or resolve_device(ex.device)
        try:
            DETECTORS.get_class(self.method)
            chain = CHAINS.get(self.method)
            fine_tuned = chain is not None and chain.feature_stage == "mist_extract"
        except RegistryError as e:
            raise ScoreError(f"{self.model_path}: cannot load the detector: {_one_line(e)}") from None
        # MIST scores features re-extracted with its stage II encoder (mist_extract); a run with
        # extract.encoder trained its detector on features of such an encoder
        self.encoder = self.train_dir / "encoder.pt" if fine_tuned else (Path(ex.encoder).expanduser() if ex.encoder else None)
        try:
            if self.encoder is not None:
                from stages.mist import fine_tuned_extractor

                self.extractor = fine_tuned_extractor(ex, self.encoder, self.device)
            else:
                self.extractor = build_extractor(ex, self.device)
        except (RegistryError, OSError, ValueError, RuntimeError) as e:
            raise ScoreError(f"{cfg_path}: cannot build extractor {ex.backbone!r}: {_one_line(e)}") from None
        try:
            DETECTORS.get_class(self.method)
            self.model = load_detector(StageDir(self.train_dir), device or resolve_device(self.cfg.train.device))
        except (RegistryError, RuntimeError, KeyError) as e:
            raise ScoreError(f"{self.model_path}: cannot load the detector: {_one_line(e)}") from None
        self.model_device = str(next(self.model.parameters()).device)
        self.causal = bool(getattr(self.model, "causal", False))
        self.input_level = self.model.input_level

    # -- choosing among the run's detectors ----------------------------------------------------
    def _train_dir_of(self, method: str) -> Path:
        """The train stage folder of the latest detector trained with ``method`` in this run directory.

        Each folder's method is read from its ``stage.json`` (the inputs of its cache key), so that
        choosing never loads every trained model's weights."""
        found: dict[str, list[Path]] = {}
        for model in (self.run_dir / "cache" / "train").glob("*/model.pt"):
            try:
                inputs = json.loads((model.parent / "stage.json").read_text())["inputs"]
                m = str(inputs["config"]["train.method"])
            except (OSError, ValueError, KeyError, TypeError):  # unreadable: not choosable; the others still are
                continue
            found.setdefault(m, []).append(model)
        if method not in found:
            have = ", ".join(sorted(found)) or "none"
            raise ScoreError(f"{self.run_dir}: no detector trained with --method {method} (trained here: {have})")
        return max(found[method], key=lambda p: p.stat().st_mtime).parent

    def _training_config(self, method: str) -> Any:
        """The config ``method``'s detector was trained with (its checkpoint's record), else the run's
        saved config with that method's training defaults (the saved train section is another's)."""
        from pipeline.core.config import ConfigError, load_yaml
        from stages.config import build_config

        ckpt = self.train_dir / "checkpoint.pt"
        try:
            if ckpt.is_file():
                recorded = torch.load(ckpt, map_location="cpu", weights_only=True).get("config")
                if recorded:
                    return build_config([recorded], method=method)  # to_dict() holds no train.method
            saved = load_yaml(self.run_dir / "config.yaml")
            return build_config([{k: v for k, v in saved.items() if k != "train"}], method=method)
        except (ConfigError, OSError, RuntimeError) as e:
            raise ScoreError(f"{self.train_dir}: cannot read the config {method} was trained with: {_one_line(e)}") from None

    # -- consistency ---------------------------------------------------------------------------
    @cached_property
    def _extract_meta(self) -> dict[str, Any] | None:
        """Metadata of one video of the run's latest extract stage (its feature_dim, extractor, crops and
        weights), read once: the checks of the constructor each consult it."""
        rel = self.latest.get("extract")
        if not rel:
            return None
        from pipeline.core.errors import CorruptArtifact
        from pipeline.core.store import StageDir

        try:
            sd = StageDir(self.run_dir / rel)
            for vid in sd.complete_items():
                return sd.load_meta(vid)
        except CorruptArtifact:
            pass
        return None

    def _resolve_extract(self, preset: str | None, weights: str | None, cfg_path: Path) -> str | None:
        """Settle the extract settings scoring uses; returns the feature preset they follow.

        A run trained on imported features (``extract.import_format``) has no extractor of its own:
        scoring extracts with the preset that reproduces that format (:data:`extractors.presets.PRESET_FOR_IMPORT`),
        with the crop count of the imported files. ``preset`` (``score --preset``) must then be that
        preset, and for a run of its own features it must be what the run's settings are. ``weights``
        (``score --weights``) replaces ``extract.weights``: for imported features it is how a user
        gives the preset's network a local file (nothing can check it against the imported files;
        ``pipeline features compare`` does); for a run's own features it must be the file the run
        extracted with (same sha256).

        Raises:
            ScoreError: a preset or weights file that would give other features than the detector's.
        """
        from extractors.presets import PRESET_FOR_IMPORT, differences, preset_layer
        from pipeline.core.config import ConfigError, apply_section

        ex = self.cfg.extract
        fmt = ex.import_format
        if not fmt:
            if preset is not None:
                diffs = differences(preset, ex)
                if diffs:
                    raise ScoreError(f"{cfg_path}: the detector was trained on features not made with preset "
                                     f"{preset} ({'; '.join(diffs)}); score without --preset, or retrain")
            if weights:
                self._check_same_weights(weights, cfg_path)
                ex.weights = weights
            return preset or ex.preset
        matching = PRESET_FOR_IMPORT[fmt]
        if preset is not None and preset != matching:
            raise ScoreError(f"{cfg_path}: the detector was trained on imported {fmt} features, which preset "
                             f"{matching} reproduces; --preset {preset} would give other features")
        values = dict(preset_layer(matching)["extract"], preset=matching, import_format="", import_root="")
        crops = self._imported_crop_setting(cfg_path)
        if crops:
            values["crops"] = crops
        if weights:
            values["weights"] = weights
        try:
            apply_section(ex, values, "extract")
        except ConfigError as e:
            raise ScoreError(f"{cfg_path}: {_one_line(e)}") from None
        log.info("the detector was trained on imported %s features: scoring extracts with preset %s (%s crops); "
                 "check the match on one video with `pipeline features compare FILE VIDEO --preset %s`",
                 fmt, matching, ex.crops, matching)
        return matching

    def _imported_crop_setting(self, cfg_path: Path) -> str | None:
        """``extract.crops`` of the imported features' crop count (1, 5 or 10), from one imported item."""
        from extractors.transforms import CROP_SETTING_FOR_COUNT

        meta = self._extract_meta
        if meta is None:
            return None
        count = len(meta.get("crops") or [])
        setting = CROP_SETTING_FOR_COUNT.get(count)
        if setting is None:
            raise ScoreError(f"{cfg_path}: the imported features have {count} crops; a preset extracts 1, 5 or 10")
        return setting

    def _check_same_weights(self, weights: str, cfg_path: Path) -> None:
        """Refuse a weights file other than the one the run's features were extracted with."""
        from extractors import EXTRACTORS

        cls = EXTRACTORS.get_class(self.cfg.extract.backbone)
        try:
            given = cls.expected_checksum(weights)
        except (FileNotFoundError, OSError) as e:
            raise ScoreError(f"{weights}: {_one_line(e)}") from None
        meta = self._extract_meta or {}
        used = meta.get("weights_sha256")
        if used is None:
            log.warning("%s: the run's features record no weights checksum; cannot check --weights %s", cfg_path, weights)
        elif used != given:
            raise ScoreError(f"{weights}: sha256 {given[:12]}... differs from the weights the run's features were "
                             f"extracted with ({used[:12]}...); the detector would score other features")

    def _check_features_match(self) -> None:
        """Refuse a detector trained on other features than the run's extractor now gives."""
        from extractors import EXTRACTORS
        from pipeline.core.registry import RegistryError

        ex = self.cfg.extract
        # 1. what the detector was trained on: the train stage's checkpoint records the full config
        ckpt = self.train_dir / "checkpoint.pt"
        trained_cfg: dict[str, Any] | None = None
        if ckpt.is_file():
            try:
                trained_cfg = torch.load(ckpt, map_location="cpu", weights_only=True).get("config")
            except Exception as e:  # an unreadable checkpoint only costs this check
                log.warning("%s: cannot read the training config (%s); checking feature size only", ckpt, _one_line(e))
        if trained_cfg:
            t_ex, t_seg = trained_cfg.get("extract", {}), trained_cfg.get("segment", {})
            # imported features were matched to their preset above (_resolve_extract): only the clip length stays
            compared = ("clip_len",) if t_ex.get("import_format") else ("backbone", "weights", "clip_len")
            diffs = [
                f"extract.{k}: trained with {t_ex.get(k)!r}, run now has {getattr(ex, k)!r}"
                for k in compared
                if k in t_ex and t_ex.get(k) != getattr(ex, k)
            ]
            if self.saved.get("input_level") == "segments":
                diffs += [
                    f"segment.{k}: trained with {t_seg.get(k)!r}, run now has {getattr(self.cfg.segment, k)!r}"
                    for k in ("scheme", "num_segments")
                    if k in t_seg and t_seg.get(k) != getattr(self.cfg.segment, k)
                ]
            if diffs:
                raise ScoreError(
                    f"{self.model_path}: detector trained on other features than this run's config gives "
                    f"({'; '.join(diffs)}); retrain with `pipeline run --stage train --run-dir {self.run_dir}`"
                )
            for k in ("crops", "crop_order", "partial_clip"):
                if k in t_ex and t_ex.get(k) != getattr(ex, k) and not t_ex.get("import_format"):
                    log.warning("%s: trained with extract.%s=%r, scoring with %r (same feature space; "
                                "scores may differ slightly from the evaluation's)", self.model_path, k, t_ex[k], getattr(ex, k))
        # 2. feature size: the run's extracted features, else the extractor's declared size
        meta = self._extract_meta
        if meta is not None and meta.get("extractor") == ex.backbone and "feature_dim" in meta:
            dim, source = int(meta["feature_dim"]), f"the run's {ex.backbone} features are"
        else:
            try:
                dim, source = int(EXTRACTORS.get_class(ex.backbone).feature_dim), f"extractor {ex.backbone} gives"
            except (RegistryError, AttributeError):
                return  # reported when the extractor is built
        if dim != self.feature_dim:
            raise ScoreError(
                f"{self.model_path}: detector trained on {self.feature_dim}-D features, but {source} {dim}-D "
                f"(a detector trained on other features); retrain with `pipeline run --stage train --run-dir {self.run_dir}`"
            )

    def _check_dim(self, path: Path, feats: np.ndarray) -> None:
        if feats.shape[-1] != self.feature_dim:
            raise ScoreError(
                f"{path}: extractor {self.cfg.extract.backbone} gives {feats.shape[-1]}-D features but the "
                f"detector {self.model_path} was trained on {self.feature_dim}-D features"
            )

    # -- scoring -------------------------------------------------------------------------------
    def _segment_l2(self) -> bool:
        return self.cfg.segment.scheme == "sultani"  # as stages/segment.py SegmentStage.process

    def iter_online(self, path: str | Path, info: dict[str, Any] | None = None) -> Iterator[ClipScore]:
        """Yield each clip's :class:`ClipScore` as soon as its frames are decoded and featurised.

        Args:
            path: video file or frame folder.
            info: filled with ``fps``, ``height``, ``width``, ``crops`` and, at the end, ``n_frames``.
        Raises:
            ScoreError: the detector cannot run causally.
            VideoDecodeError: missing / unreadable video, or shorter than one clip.
        """
        from extractors.stream import iter_clip_features
        from stages.segment import pool_segments

        if not self.causal:
            raise ScoreError(f"{self.model_path}: detector {self.method!r} cannot run causally, so it has no "
                             "online mode; score without --online")
        path = Path(path)
        info = {} if info is None else info
        l2 = self.input_level == "segments" and self._segment_l2()
        clip_len = self.cfg.extract.clip_len
        clips = iter_clip_features(self.cfg, self.extractor, path, info=info, batch_clips=1, chunk_frames=clip_len)
        while True:
            t0 = time.perf_counter()
            try:
                i, (a, b), feats = next(clips)  # [C, D]
            except StopIteration:
                return
            self._check_dim(path, feats)
            # segment detectors: a clip is a one-clip segment, normalised as the segment stage does
            x = pool_segments(feats[None], [(0, 1)], l2) if l2 else feats[:, None, :]  # [C, 1, D]
            score = float(self.model.score(torch.from_numpy(np.ascontiguousarray(x)).to(self.model_device))[0])
            latency = time.perf_counter() - t0
            fps = info["fps"]
            yield ClipScore(i, a, b, a / fps, b / fps, score, latency)

    def score(
        self,
        path: str | Path,
        online: bool = False,
        on_clip: Callable[[ClipScore], None] | None = None,
        video_id: str | None = None,
        progress: bool = False,
    ) -> ScoredVideo:
        """Per-frame scores of one video (see the module docstring for the two modes).

        Args:
            path: video file or frame folder.
            online: score clip by clip while decoding (causal detectors only).
            on_clip: online mode: called with each :class:`ClipScore` as soon as it is known.
            video_id: output stem (default: the file's stem or the folder's name).
            progress: offline mode: a bar over the video's frames on stderr (default off: our choice,
                so that library calls stay silent; ``pipeline score`` turns it on unless ``-q``).
        """
        path = Path(path)
        vid = video_id or _video_id(path)
        info: dict[str, Any] = {}
        if hasattr(self.extractor, "attention"):
            self.extractor.attention.clear()  # E_SGA keeps each clip's attention map: not needed here
        if online:
            return self._score_online(path, vid, info, on_clip)
        return self._score_offline(path, vid, info, progress)

    def _score_online(self, path: Path, vid: str, info: dict[str, Any], on_clip: Callable[[ClipScore], None] | None) -> ScoredVideo:
        from stages.evaluate import frames_from_units

        clips: list[ClipScore] = []
        for c in self.iter_online(path, info):
            clips.append(c)
            log.info("%s: clip %d frames %d-%d (%.2f-%.2f s): score %.4f (%.3f s)", vid, c.index, c.start,
                     c.end - 1, c.t_start, c.t_end, c.score, c.latency_s)
            if on_clip is not None:
                on_clip(c)
        ranges = [(c.start, c.end) for c in clips]
        clip_scores = np.array([c.score for c in clips], np.float32)
        scores, covered = frames_from_units(clip_scores, ranges, int(info["n_frames"]))
        return self._result(path, vid, info, scores, covered, ranges, clip_scores, "clips", ranges, clip_scores, "online", clips)

    def _score_offline(self, path: Path, vid: str, info: dict[str, Any], progress: bool = False) -> ScoredVideo:
        from pipeline.core.metrics import snippet_level
        from pipeline.core.progress import progress_bar
        from stages.evaluate import frames_from_units, score_units
        from extractors.stream import iter_clip_features
        from stages.segment import pool_segments, segment_bins

        feats_list: list[np.ndarray] = []
        ranges: list[tuple[int, int]] = []
        # advanced by each clip's last source frame, so that resampling (extract.target_fps) keeps
        # the total the container's frame count, which the decoder reports on opening the video
        bar = None
        try:
            for _, (a, b), f in iter_clip_features(self.cfg, self.extractor, path, info=info):
                if not feats_list:
                    self._check_dim(path, f)
                    if progress and info.get("n_frames_reported"):
                        bar = progress_bar(None, True, total=info["n_frames_reported"], desc=vid, unit="frame",
                                           leave=False)
                feats_list.append(f)
                ranges.append((a, b))
                if bar is not None and b > bar.n:
                    bar.update(b - bar.n)
        finally:
            if bar is not None:
                bar.close()
        feats = np.stack(feats_list).astype(np.float32)  # [T, C, D], as the extract stage stores it
        meta = {"clip_ranges": [list(r) for r in ranges], "n_frames": int(info["n_frames"])}
        seg = None
        if self.input_level == "segments":
            seg_cfg = self.cfg.segment
            bins = segment_bins(len(ranges), seg_cfg.num_segments, seg_cfg.scheme)
            segments = pool_segments(feats, bins, l2=self._segment_l2())
            seg = ({"bins": [list(b) for b in bins]}, {"segments": segments})
        # one pass of the detector, shared with the evaluate stage's frame mapping
        units, unit_ranges = score_units(self.model, (meta, {"features": feats}), seg, self.model_device)
        scores, covered = frames_from_units(units, unit_ranges, int(info["n_frames"]))
        clip_scores, _ = snippet_level(scores, np.zeros(len(scores), np.int64), ranges)
        return self._result(path, vid, info, scores, covered, ranges, clip_scores.astype(np.float32),
                            self.input_level, unit_ranges, units.astype(np.float32), "offline", [])

    def _result(self, path: Path, vid: str, info: dict[str, Any], scores: np.ndarray, covered: np.ndarray,
                ranges: list[tuple[int, int]], clip_scores: np.ndarray, level: str,
                unit_ranges: list[tuple[int, int]], unit_scores: np.ndarray, mode: str,
                clips: list[ClipScore]) -> ScoredVideo:
        n = int(info["n_frames"])
        fps = float(info["fps"])
        return ScoredVideo(
            id=vid, path=path, fps=fps, n_frames=n,
            scores=np.where(covered, scores, np.nan).astype(np.float32),
            times=np.arange(n, dtype=np.float64) / fps,
            clip_ranges=ranges, clip_scores=clip_scores, unit_level=level, unit_ranges=unit_ranges,
            unit_scores=unit_scores, mode=mode, method=self.method, clips=clips,
        )

    # -- outputs -------------------------------------------------------------------------------
    def cache_keys(self) -> dict[str, str]:
        return {k: Path(v).name for k, v in self.latest.items() if k in ("extract", "segment", "train")}

    @cached_property
    def model_sha256(self) -> str:
        """sha256 of the detector's ``model.pt`` (read once, when first needed)."""
        from pipeline.core.store import sha256_file

        return sha256_file(self.model_path)

    @cached_property
    def encoder_sha256(self) -> str | None:
        """sha256 of the encoder file that featurises (MIST's ``encoder.pt``, ``extract.encoder``), else None."""
        from pipeline.core.store import sha256_file

        return sha256_file(self.encoder) if self.encoder is not None else None

    def result_inputs(self, path: str | Path, online: bool = False) -> dict[str, Any] | None:
        """What one video's scores depend on (the module docstring's "Resuming"); None for a path
        that cannot be fingerprinted (missing, unreadable: scoring reports it)."""
        from pipeline.core.store import fingerprint
        from stages.extract import ExtractStage

        resolved = Path(path).resolve()
        fp = fingerprint(resolved)
        if fp.get("missing") or fp.get("unreadable"):
            return None
        extract = ExtractStage().config_inputs(self.cfg)  # the settings that key the extract stage's features
        extract["weights_sha256"] = self.extractor.weights_checksum
        extract["crops_used"] = getattr(self.extractor, "input_crops", None) or self.cfg.extract.crops
        seg = self.cfg.segment
        return {
            "format": SCORE_FORMAT,
            "video": {"path": str(resolved), **fp},
            "model_sha256": self.model_sha256,
            "encoder_sha256": self.encoder_sha256,
            "method": self.method,
            "mode": "online" if online else "offline",
            "extract": extract,
            "segment": {"scheme": seg.scheme, "num_segments": seg.num_segments} if self.input_level == "segments" else None,
            "plot_threshold": self.cfg.evaluate.far_threshold,
        }

    def cached(self, video_id: str, out_dir: str | Path, inputs: dict[str, Any] | None) -> dict[str, Any] | None:
        """The ``<id>.json`` of a complete result in ``out_dir`` computed from ``inputs``, else None.

        Complete: the JSON (written last) holds ``inputs``' key, and ``<id>.csv`` / ``<id>.png`` have the
        size and sha256 it recorded for them."""
        from pipeline.core.store import sha256_file, stable_hash

        if inputs is None:
            return None
        out_dir = Path(out_dir)
        try:
            doc = json.loads((out_dir / f"{video_id}.json").read_text())
            resume = doc["resume"]
            if resume["key"] != stable_hash(inputs):
                return None
            for ext in ("csv", "png"):
                p, rec = out_dir / f"{video_id}.{ext}", resume["files"][ext]
                if p.stat().st_size != rec["size"] or sha256_file(p) != rec["sha256"]:
                    return None
            _summary(doc)  # the fields the summary line reads
        except (OSError, ValueError, KeyError, TypeError, IndexError):  # absent, partial or foreign: not a result
            return None
        return doc

    def write(self, sv: ScoredVideo, out_dir: Path, inputs: dict[str, Any] | None = None) -> dict[str, Path]:
        """Write ``<id>.csv``, ``<id>.png`` and, last, ``<id>.json`` into ``out_dir``, each atomically;
        returns their paths.

        ``inputs``: what the scores were computed from (:meth:`result_inputs`, taken before scoring;
        default: taken now). Its key and the CSV's and plot's checksums go into the JSON's ``resume``."""
        import hashlib

        from pipeline.core.store import atomic_write_bytes, atomic_write_json, atomic_write_text, stable_hash

        out_dir = Path(out_dir)
        if inputs is None:
            inputs = self.result_inputs(sv.path, sv.mode == "online")
        paths = {ext: out_dir / f"{sv.id}.{ext}" for ext in ("csv", "json", "png")}
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["frame", "time_s", "score"])
        for i, (t, s) in enumerate(zip(sv.times, sv.scores)):
            w.writerow([i, f"{t:.6f}", "" if np.isnan(s) else f"{s:.6f}"])
        csv_bytes = buf.getvalue().encode()
        png_bytes = score_plot(sv, self.cfg.evaluate.far_threshold)
        atomic_write_text(paths["csv"], buf.getvalue())
        atomic_write_bytes(paths["png"], png_bytes)

        def floats(a: np.ndarray, nd: int = 6) -> list[float | None]:
            return [None if not np.isfinite(x) else round(float(x), nd) for x in a]

        ex, seg = self.cfg.extract, self.cfg.segment
        doc: dict[str, Any] = {
            "video": str(sv.path),
            "id": sv.id,
            "fps": sv.fps,
            "n_frames": sv.n_frames,
            "duration_s": sv.n_frames / sv.fps,
            "mode": sv.mode,
            "method": sv.method,
            "causal": self.causal,
            "run_dir": str(self.run_dir.resolve()),
            "trained_on": self.trained_on,
            "model": str(self.model_path.resolve()),
            "cache_keys": self.cache_keys(),
            "extractor": {"name": getattr(self.extractor, "registry_name", ex.backbone),
                          "weights_sha256": self.extractor.weights_checksum,
                          "encoder": str(self.encoder.resolve()) if self.encoder is not None else None,
                          # a fine-tuned MIST encoder brings its own test-time input (whole frame: "none")
                          "crops": getattr(self.extractor, "input_crops", None) or ex.crops,
                          "crop_order": ex.crop_order, "clip_len": ex.clip_len,
                          "partial_clip": ex.partial_clip, "preset": self.feature_preset},
            "segment": {"scheme": seg.scheme, "num_segments": seg.num_segments} if self.input_level == "segments" else None,
            "clip_ranges": [list(r) for r in sv.clip_ranges],
            "clip_scores": floats(sv.clip_scores),
            "units": {"level": sv.unit_level, "ranges": [list(r) for r in sv.unit_ranges], "scores": floats(sv.unit_scores)},
            "scores": floats(sv.scores),
            "time_s": [round(float(t), 6) for t in sv.times],
        }
        if sv.mode == "online":
            doc["clip_latency_s"] = [round(c.latency_s, 6) for c in sv.clips]
            if self.input_level == "segments":
                doc["note"] = ("online scores are per clip (each clip feature normalised as the run's segments are); "
                               "they approximate the offline scores, which score 32-segment means")
        doc["resume"] = None if inputs is None else {
            "key": stable_hash(inputs),
            "inputs": inputs,
            "files": {ext: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                      for ext, data in (("csv", csv_bytes), ("png", png_bytes))},
        }
        atomic_write_json(paths["json"], doc)  # last: its key vouches for the two files above
        return paths


def _summary_line(n_frames: int, fps: float, n_clips: int, mode: str, scores: np.ndarray, times: Any) -> str:
    """``N frames at F fps, C clips (mode); max score S at T s``."""
    finite = np.isfinite(scores)
    peak = int(np.nanargmax(scores)) if finite.any() else 0
    top = f"{np.nanmax(scores):.4f}" if finite.any() else "nan"
    return f"{n_frames} frames at {fps:g} fps, {n_clips} clips ({mode}); max score {top} at {times[peak]:.2f} s"


def _summary(doc: dict[str, Any]) -> str:
    """:func:`_summary_line` of a result's JSON."""
    scores = np.array([np.nan if x is None else x for x in doc["scores"]], np.float64)
    return _summary_line(int(doc["n_frames"]), float(doc["fps"]), len(doc["clip_ranges"]), str(doc["mode"]),
                         scores, doc["time_s"])


def _say(bar: Any, text: str, file: Any) -> None:
    """Print a line above the progress bars (tqdm's ``write`` clears and redraws them)."""
    if hasattr(bar, "write"):
        bar.write(text, file=file)
    else:
        print(text, file=file)


def score_plot(sv: ScoredVideo, threshold: float | None = 0.5) -> bytes:
    """PNG of the per-frame score over time (seconds), with the FAR threshold dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from stages.report import fig_png

    fig, ax = plt.subplots(figsize=(8, 2.6))
    ax.plot(sv.times, sv.scores, color="tab:blue", lw=1.2, label="anomaly score")
    if threshold is not None:
        ax.axhline(threshold, color="grey", ls="--", lw=0.8, label=f"threshold {threshold:g}")
    ax.set(ylim=(-0.02, 1.02), xlim=(0, max(sv.times[-1] if len(sv.times) else 0, 1.0 / sv.fps)),
           xlabel="time (s)", ylabel="score")
    what = "online, clip by clip" if sv.mode == "online" else "offline"
    ax.set_title(f"{sv.id}: {sv.method} ({what}), {sv.n_frames} frames at {sv.fps:g} fps", fontsize=9)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False)
    return fig_png(fig)


def score_video_file(
    run_dir: str | Path, path: str | Path, online: bool = False, on_clip: Callable[[ClipScore], None] | None = None
) -> ScoredVideo:
    """Score one video with ``run_dir``'s extractor and detector (loads both: for many videos, use
    one :class:`RunScorer`). Raises :class:`ScoreError` or ``VideoDecodeError``."""
    return RunScorer(run_dir).score(path, online=online, on_clip=on_clip)


#: what a demo-trained detector learned, and what its scores on other footage mean
DEMO_CAVEAT = ("trained on the synthetic demo dataset (30 generated videos of a plaza; anomalies: a fast vehicle, a "
               "running crowd, a fall): on your own footage its scores say how much a clip looks like those, not "
               "whether it is anomalous; train on your own videos for that (README, 'Your own videos')")


def trained_on(manifest: str) -> str:
    """What a run's detector was trained on, from its ``data.manifest``: the demo's caveat, or the manifest."""
    return DEMO_CAVEAT if manifest == "demo" else f"the videos of manifest {manifest}"


def cmd_score(args: argparse.Namespace) -> int:
    """``pipeline score``: exit 0 all scored, 1 some videos failed, 2 the run cannot score."""
    from pipeline.core.video import VideoDecodeError

    try:
        scorer = RunScorer(args.run_dir, method=getattr(args, "method", None), preset=getattr(args, "preset", None),
                           weights=getattr(args, "weights", None))
        if args.online and not scorer.causal:
            raise ScoreError(f"{scorer.model_path}: detector {scorer.method!r} cannot run causally, so it has no "
                             "online mode; score without --online")
    except ScoreError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    out_dir = Path(args.out) if args.out else Path(args.run_dir) / "scores"
    from pipeline.core.errors import StageError
    from pipeline.core.runner import check_writable

    try:
        check_writable(out_dir, "the output folder")  # before any video is decoded, not after its features
    except StageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from pipeline.core.progress import progress_bar

    if scorer.cfg.data.manifest == "demo":  # said once, before any score (and in each video's JSON)
        print(f"warning: {scorer.method} in {args.run_dir} was {DEMO_CAVEAT}", file=sys.stderr)
    # offline only: online scoring logs every clip, which is its progress
    progress = not getattr(args, "quiet", False) and not args.online
    used: set[str] = set()
    failures: list[tuple[Path, str]] = []
    computed = cached = 0
    bar = progress_bar(list(args.videos), progress, desc="score", unit="video")
    for path in bar:
        path = Path(path)
        vid = base = _video_id(path)
        n = 1
        while vid in used:
            n += 1
            vid = f"{base}-{n}"
        used.add(vid)
        try:
            inputs = scorer.result_inputs(path, online=args.online)  # before decoding: what is scored
            doc = scorer.cached(vid, out_dir, inputs)
            if doc is not None:
                cached += 1
                _say(bar, f"{path}: cached: {_summary(doc)} -> {out_dir / f'{vid}.csv'}", sys.stdout)
                continue
            sv = scorer.score(path, online=args.online, video_id=vid, progress=progress)
            files = scorer.write(sv, out_dir, inputs)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # one bad video never stops the others
            msg = _one_line(e)
            if not isinstance(e, (VideoDecodeError, ScoreError)):
                msg = f"{type(e).__name__}: {msg}"
                log.debug("scoring %s failed", path, exc_info=True)
            if str(path) not in msg:
                msg = f"{path}: {msg}"
            _say(bar, f"error: {msg}", sys.stderr)
            failures.append((path, msg))
            continue
        computed += 1
        line = _summary_line(sv.n_frames, sv.fps, len(sv.clip_ranges), sv.mode, sv.scores, sv.times)
        _say(bar, f"{path}: {line} -> {files['csv']}", sys.stdout)
    summary = f"{computed} computed, {cached} cached"
    if failures:
        print(f"{summary}; {len(failures)} of {len(args.videos)} video(s) failed")
        return 1
    print(summary)
    return 0


__all__ = ["SCORE_FORMAT", "ClipScore", "RunScorer", "ScoreError", "ScoredVideo", "cmd_score", "score_plot", "score_video_file"]
