"""Importing published precomputed features as the extract stage's artifacts.

``extract.import_format`` picks the format and ``extract.import_root`` the folder holding the files
(searched recursively); the extract stage then reads each manifest video's file instead of running
a network, validates it, and stores it in the usual ``[T, C, D]`` layout with clip frame ranges, so
that ``segment``, ``train`` and ``evaluate`` run on it unchanged.

Formats:

- ``rtfm``: one ``<id>_i3d.npy`` (or ``<id>.npy``) per video, float32 ``[T, 10, 2048]``: RTFM's
  ResNet-50 I3D 10-crop features (Tian et al. 2021), cut by torchvision's ``TenCrop`` (RTFM issue 21),
  i.e. in the ``torchvision`` crop order; crops are recorded as ``rtfm_0`` .. ``rtfm_9``.
- ``roc-ng``: one file per crop, ``<id>__0.npy`` .. ``<id>__9.npy`` (5 for XD-Violence), each
  ``[T, 1024]`` Inception-I3D; ``__0`` centre, ``__1``-``__4`` corners (Roc-Ng/XDVioDet README), then
  flips (not documented upstream; see :mod:`extractors.transforms`).
- ``sultani``: one ``<id>.txt`` per video with 32 rows of 4,096 C3D fc6 values (already the 32
  L2-normalised segments of Sultani et al. 2018). These are segments, not clips: the segment stage
  passes them through, and their frame ranges follow Sultani's binning of the video's 16-frame clips,
  which needs the video's frame count (read from the video when it is present; for training videos
  without a file a nominal 16 frames per segment is recorded, since training ignores frames).

Clip i of the clip formats covers frames ``[16 i, 16 i + 16)``; the frame count is taken as ``16 T``
(the published protocols evaluate exactly those frames).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from extractors.transforms import CROP_SETTING_FOR_COUNT, crop_names
from pipeline.core.manifest import VideoRecord

FORMATS = ("rtfm", "roc-ng", "sultani")
_EXPECTED_DIM = {"rtfm": 2048, "roc-ng": 1024, "sultani": 4096}


class FeatureImportError(ValueError):
    """A feature file that is missing, unreadable or of the wrong shape; names the file."""


def index_files(root: Path, suffix: str) -> dict[str, Path]:
    """Every file under ``root`` ending in ``suffix``, by file name without the suffix."""
    out: dict[str, Path] = {}
    stack = [root]
    while stack:
        with os.scandir(stack.pop()) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    stack.append(Path(e.path))
                elif e.name.endswith(suffix):
                    out.setdefault(e.name[: -len(suffix)], Path(e.path))
    return out


def _load_npy(path: Path) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same error to the user
        raise FeatureImportError(f"{path}: not a readable .npy array ({type(e).__name__}: {e})") from None
    if arr.dtype.kind != "f":
        raise FeatureImportError(f"{path}: expected floating-point features, got dtype {arr.dtype}")
    return arr.astype(np.float32, copy=False)


def _check(arr: np.ndarray, path: Path, fmt: str) -> None:
    if arr.shape[-1] != _EXPECTED_DIM[fmt]:
        raise FeatureImportError(f"{path}: feature dimension {arr.shape[-1]}, expected {_EXPECTED_DIM[fmt]} for '{fmt}'")
    if arr.shape[0] < 1:
        raise FeatureImportError(f"{path}: no clips")
    if not np.isfinite(arr).all():
        raise FeatureImportError(f"{path}: contains NaN or infinite values")


class FeatureImporter:
    """Reads one format's files under a root (indexed once)."""

    def __init__(self, fmt: str, root: str | Path, clip_len: int = 16) -> None:
        if fmt not in FORMATS:
            raise FeatureImportError(f"unknown feature format {fmt!r}; known: {', '.join(FORMATS)}")
        self.fmt, self.root, self.clip_len = fmt, Path(root), clip_len
        if not self.root.is_dir():
            raise FeatureImportError(f"{self.root}: feature folder not found (extract.import_root)")
        self.files = index_files(self.root, ".txt" if fmt == "sultani" else ".npy")

    def _find(self, stem: str) -> Path:
        path = self.files.get(stem)
        if path is None:
            raise FeatureImportError(f"{self.root}: no feature file '{stem}{'.txt' if self.fmt == 'sultani' else '.npy'}'")
        return path

    def load(self, video: VideoRecord, video_path: Path | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        """``[T, C, D]`` float32 features and extract-stage metadata for one manifest video."""
        if self.fmt == "rtfm":
            path = self.files.get(f"{video.id}_i3d") or self._find(video.id)
            arr = _load_npy(path)
            if arr.ndim != 3 or arr.shape[1] != 10:
                raise FeatureImportError(f"{path}: RTFM features must be [T, 10, 2048], got {list(arr.shape)}")
            _check(arr, path, "rtfm")
            return arr, self._clip_meta(arr, [f"rtfm_{i}" for i in range(10)], [path])
        if self.fmt == "roc-ng":
            paths = []
            for k in range(10):
                p = self.files.get(f"{video.id}__{k}")
                if p is None:
                    break
                paths.append(p)
            if not paths:
                self._find(f"{video.id}__0")
            crops = [_load_npy(p) for p in paths]
            for p, a in zip(paths, crops):
                if a.ndim != 2:
                    raise FeatureImportError(f"{p}: Roc-Ng features must be [T, 1024], got {list(a.shape)}")
                _check(a, p, "roc-ng")
            if len({a.shape[0] for a in crops}) != 1:
                raise FeatureImportError(f"{paths[0].parent}: crops of {video.id} have different clip counts {[a.shape[0] for a in crops]}")
            if len(crops) not in CROP_SETTING_FOR_COUNT:
                raise FeatureImportError(f"{paths[0].parent}: {video.id} has {len(crops)} crop files; expected 1, 5 or 10")
            names = crop_names(CROP_SETTING_FOR_COUNT[len(crops)], "roc-ng")
            arr = np.stack(crops, axis=1)
            return arr, self._clip_meta(arr, names, paths)
        path = self._find(video.id)
        try:
            arr = np.loadtxt(path, dtype=np.float32, ndmin=2)
        except ValueError as e:
            raise FeatureImportError(f"{path}: not a whitespace-separated numeric table ({e})") from None
        if arr.shape != (32, 4096):
            raise FeatureImportError(f"{path}: Sultani features must be 32 x 4096, got {arr.shape[0]} x {arr.shape[1]}")
        _check(arr, path, "sultani")
        return arr[:, None, :], self._segment_meta(video, video_path, path)

    def _clip_meta(self, arr: np.ndarray, names: list[str], paths: list[Path]) -> dict[str, Any]:
        t = int(arr.shape[0])
        L = self.clip_len
        return {
            "n_frames": t * L,
            "fps": None,
            "clip_len": L,
            "clip_ranges": [[i * L, i * L + L] for i in range(t)],
            "crops": names,
            "extractor": f"import:{self.fmt}",
            "feature_dim": int(arr.shape[-1]),
            "imported_from": [str(p) for p in paths],
            "units": "clips",
        }

    def _segment_meta(self, video: VideoRecord, video_path: Path | None, path: Path) -> dict[str, Any]:
        from stages.segment import segment_bins

        n_frames = None
        if video_path is not None and video_path.exists():
            from pipeline.core.video import open_video

            src = open_video(video_path)
            n_frames = sum(len(f) for _, f in src.iter_chunks(256))
        estimated = n_frames is None
        if estimated:
            if video.split == "test":
                raise FeatureImportError(
                    f"{path}: Sultani-format features are 32 segments with no frame alignment; the video "
                    f"file is needed to map them to frames for evaluation, and {video_path} is missing"
                )
            n_frames = 32 * self.clip_len
        L = self.clip_len
        bins = segment_bins(max(1, n_frames // L), 32, "sultani")
        return {
            "n_frames": n_frames,
            "fps": None,
            "clip_len": L,
            "clip_ranges": [[a * L, min(b * L, n_frames)] for a, b in bins],
            "crops": ["c"],
            "extractor": "import:sultani",
            "feature_dim": 4096,
            "imported_from": [str(path)],
            "units": "segments",
            "frames_estimated": estimated,
        }
