"""UCSD Ped2 manifest builder, with a deterministic weakly supervised split defined here.

Dataset: V. Mahadevan, W. Li, V. Bhalodia, N. Vasconcelos, "Anomaly Detection in Crowded Scenes",
CVPR 2010 (UCSD Anomaly Detection Dataset, Ped2 scene): pedestrians on a walkway filmed at 360x240;
anomalies are bikes, carts, skaters. 16 training clips, all normal, and 12 test clips.

Files read (found by name in ``--annotations``, else anywhere under ``--root``):

- ``ped2.mat``: frame-level ground truth as distributed with W. Liu, W. Luo, D. Lian, S. Gao,
  "Future Frame Prediction for Anomaly Detection - A New Baseline", CVPR 2018
  (StevenLiuWen/ano_pred_cvpr2018): variable ``gt``, a 1x12 cell, entry k a 2xN array whose columns
  are the ``[start; end]`` frame numbers of test clip k's anomalous events. These are UCSD's
  ``gt_frame`` ranges (``UCSDped2.m``: ``TestVideoFile{1}.gt_frame = [61:180]``): **1-based and
  inclusive at both ends**; that repository's evaluation reads them as ``gt[start - 1:end] = 1``, and
  the file agrees (starts are >= 1, and ends reach exactly the clip length: 180 for 180-frame clips).
  So ``s e`` becomes ``[s - 1, e)``, 0-based, end exclusive.
- The clips themselves are JPEG frame folders, ``testing/frames/NN/`` and ``training/frames/NN/``
  (that repository's layout), or UCSD's original ``Test/TestNNN/`` and ``Train/TrainNNN/`` (``.tif``).
  A folder counts as a test clip if its name is ``TestNNN`` or a folder above it is named
  ``test``/``testing`` (likewise ``train``/``training``), because both halves use ``01``, ``02``...

The mat says that **all 12 test clips contain anomalies** (two, 08 and 10, are anomalous
throughout); only the 16 training clips are normal. A weakly supervised split needs anomalous
and normal videos on both sides (as Zhong et al., CVPR 2019, did for ShanghaiTech), so this module
defines one, fixed and documented:

- train (18 = 6 anomalous + 12 normal): test clips 01, 03, 05, 07, 09, 11 (video-level label 1, no
  intervals) and training clips 01-12;
- test (10 = 6 anomalous + 4 normal): test clips 02, 04, 06, 08, 10, 12 (with their intervals) and
  training clips 13-16.

Odd/even interleaving spreads the clip lengths (120-180 frames) and the fully anomalous clips
(08, 10 in test; 03 and 11 are almost fully anomalous in train) over both sides. Ids are UCSD's names,
``Train001``..``Train016`` and ``Test001``..``Test012``; class ``Anomaly`` (the mat gives none).
With only the test folders present (as in ``../shared/data/ucsd_ped2``) the manifest is still the
whole split and the 16 training clips are reported missing. When a clip folder is found, its
images are counted and intervals are cut at that count (none needs it on the released files).
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Callable

import numpy as np

from pipeline.datasets.common import IMAGE_EXTS, BuildResult, DataFiles, merge_intervals
from pipeline.core.manifest import ManifestError, VideoRecord

N_TRAIN_CLIPS = 16  # the original training set: normal clips Train001..Train016
N_TRAIN_CLIPS_IN_TRAIN = 12  # training clips 01-12 -> train split, 13-16 -> test split


def read_mat(path: Path) -> list[list[tuple[int, int]]]:
    """Per test clip, its ``(start, end)`` frame numbers as stored (1-based inclusive)."""
    try:
        import scipy.io
    except ImportError as e:  # scipy comes with scikit-learn
        raise ManifestError(f"{path}: reading .mat files needs scipy (pip install scipy)") from e
    try:
        mat = scipy.io.loadmat(str(path))
    except NotImplementedError as e:
        raise ManifestError(f"{path}: MATLAB v7.3 (HDF5) files are not supported; re-save it with "
                            "save('ped2.mat', 'gt', '-v7')") from e
    except (OSError, ValueError, TypeError) as e:
        raise ManifestError(f"{path}: not a readable .mat file: {e}") from e
    if "gt" not in mat:
        raise ManifestError(f"{path}: no variable 'gt' (found {', '.join(k for k in mat if not k.startswith('__'))})")
    cells = np.asarray(mat["gt"]).ravel()
    clips: list[list[tuple[int, int]]] = []
    for k, cell in enumerate(cells, start=1):
        try:
            arr = np.asarray(cell, dtype=np.int64)
        except (TypeError, ValueError):
            raise ManifestError(f"{path}: gt entry {k}: expected a 2xN array of frame numbers, "
                                f"got {str(cell)[:80]!r}") from None
        if arr.ndim == 1 and arr.size == 2:
            arr = arr.reshape(2, 1)
        elif arr.ndim == 2 and arr.shape[0] != 2 and arr.shape[1] == 2:
            arr = arr.T
        if arr.ndim != 2 or arr.shape[0] != 2:
            raise ManifestError(f"{path}: gt entry {k}: expected a 2xN array of [start; end] frame numbers, "
                                f"got shape {arr.shape}")
        events = []
        for s, e in arr.T.tolist():
            if s < 1 or e < s:
                raise ManifestError(f"{path}: gt entry {k}: event {s}-{e}: need 1 <= start <= end "
                                    "(1-based inclusive frame numbers)")
            events.append((s, e))
        clips.append(events)
    if not clips:
        raise ManifestError(f"{path}: 'gt' is empty")
    return clips


def _under(kind: str) -> Callable[[str], bool]:
    """Accept paths of ``kind`` ('test' or 'train') clips: ``TestNNN`` folders or ones below ``test(ing)/``."""
    words = {"test": ("test", "testing"), "train": ("train", "training")}[kind]

    def accept(relpath: str) -> bool:
        parts = [p.lower() for p in PurePosixPath(relpath).parts]
        return parts[-1].startswith(kind) or any(p in words for p in parts[:-1])

    return accept


def _count_images(folder: Path) -> int:
    try:
        with os.scandir(folder) as it:
            return sum(1 for e in it if os.path.splitext(e.name)[1].lower() in IMAGE_EXTS)
    except OSError:
        return 0


def build(root: str | Path, annotations: str | Path | None = None) -> BuildResult:
    """Build the UCSD Ped2 manifest (see the module docstring for the split and conventions)."""
    files = DataFiles(root, annotations)
    mat_path = files.annotation(["ped2.mat"], "UCSD Ped2 ground truth")
    assert mat_path is not None
    events = read_mat(mat_path)
    n_test = len(events)

    videos: list[VideoRecord] = []
    missing: list[VideoRecord] = []
    cut: list[str] = []

    def test_clip(k: int, split: str) -> VideoRecord:
        label = int(bool(events[k - 1]))
        ivs = [(s - 1, e) for s, e in events[k - 1]] if split == "test" else []
        default = f"testing/frames/{k:02d}"
        found = files.locate([f"{k:02d}", f"Test{k:03d}"], default, _under("test"))
        if found is not None and ivs:
            n = _count_images(files.root / found)
            if n and any(e > n for _, e in ivs):
                cut.append(f"Test{k:03d} ({n} frames)")
                ivs = [(s, min(e, n)) for s, e in ivs if s < n]
        rec = VideoRecord(f"Test{k:03d}", found or default, split, label, "Anomaly" if label else "Normal",
                          merge_intervals(ivs))
        if found is None:
            missing.append(rec)
        return rec

    def train_clip(k: int, split: str) -> VideoRecord:
        return files.record(f"Train{k:03d}", [f"{k:02d}", f"Train{k:03d}"], f"training/frames/{k:02d}",
                            split, 0, "Normal", accept=_under("train"), missing=missing)

    for k in range(1, n_test + 1, 2):
        videos.append(test_clip(k, "train"))
    for k in range(1, N_TRAIN_CLIPS_IN_TRAIN + 1):
        videos.append(train_clip(k, "train"))
    for k in range(2, n_test + 1, 2):
        videos.append(test_clip(k, "test"))
    for k in range(N_TRAIN_CLIPS_IN_TRAIN + 1, N_TRAIN_CLIPS + 1):
        videos.append(train_clip(k, "test"))

    notes = files.notes()
    without = [f"Test{k:03d}" for k, ev in enumerate(events, start=1) if not ev]
    notes.append(f"{mat_path.name}: {n_test} test clips, {n_test - len(without)} with anomalous events; "
                 "1-based inclusive 's e' written as 0-based end-exclusive [s-1, e)")
    notes.append("split (defined by this project, pipeline/datasets/ucsd_ped2.py): train = odd test clips + "
                 f"training clips 01-{N_TRAIN_CLIPS_IN_TRAIN:02d}; test = even test clips + training clips "
                 f"{N_TRAIN_CLIPS_IN_TRAIN + 1:02d}-{N_TRAIN_CLIPS:02d}")
    if without:
        notes.append(f"test clip(s) without anomalous events in the mat (labelled normal): {', '.join(without)}")
    if cut:
        notes.append(f"interval(s) cut at the clip's frame count: {', '.join(cut)}")
    return BuildResult(videos=videos, missing=missing, notes=notes)


__all__ = ["N_TRAIN_CLIPS", "build", "read_mat"]
