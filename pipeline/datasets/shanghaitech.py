"""ShanghaiTech Campus manifest builder (Zhong et al.'s weakly supervised split).

Dataset: W. Luo, W. Liu, S. Gao, "A Revisit of Sparse Coding Based Anomaly Detection in Stacked RNN
Framework", ICCV 2017: 437 videos of 13 campus scenes, originally 330 normal training videos and
107 test videos. Weakly supervised split: J.-X. Zhong, N. Li, W. Kong, S. Liu, T. H. Li, G. Li,
"Graph Convolutional Label Noise Cleaner: Train a Plug-and-play Action Classifier for Anomaly
Detection", CVPR 2019, which mixes anomalous and normal videos into train 238 (63 anomalous,
175 normal) and test 199 (44 anomalous, 155 normal); RTFM and later work use it.

Files read (found by name in ``--annotations``, else anywhere under ``--root``):

- ``SH_Train.txt`` and ``SH_Test.txt``: Zhong's split, one video name per line. The plain files carry
  names only (no label column); when they are absent, ``SH_Train_with_frame_counts.txt`` /
  ``SH_Test_with_frame_counts.txt`` (``name,label`` and ``name,label,frames`` lines, ``frames`` = -1
  for anomalous videos) serve instead. Any of these with a label column is used to cross-check the labels.
- ``test_frame_mask/<name>.npy`` (the original release's ``testing/test_frame_mask``): one 0/1 value
  per frame for each of the 107 original test videos.

Labels: a video is anomalous if and only if it has a mask with at least one 1; its class is
``Anomaly`` (the dataset has no classes), ``Normal`` otherwise. (On the released files this agrees
with Zhong's label column for all 437 videos: the 107 original test videos are the anomalous ones,
and each has at least one anomalous frame; one, ``04_0011``, is anomalous throughout.)

Intervals (anomalous test videos only): the runs of 1s of the mask, which is indexed by 0-based frame,
so a run covering mask[s..e-1] is the interval ``[s, e)`` with no conversion. Training videos carry
no intervals (weak labels).

Paths: Zhong's split mixes both halves of the original release, whose training part is videos
(``training/videos/01_001.avi``) and whose test part is JPEG frame folders
(``testing/frames/01_0014/``). Each name maps to whichever exists under ``--root`` (a video file
or a frame folder of that name, anywhere); a missing one keeps the standard path of its half
(names with a 4-digit number belong to the original test part).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from pipeline.datasets.common import (
    VIDEO_EXTS,
    BuildResult,
    DataFiles,
    check_unique,
    line_error,
    mask_intervals,
    parse_int,
    read_lines,
)
from pipeline.core.manifest import ManifestError, VideoRecord

_NAME_RE = re.compile(r"^\d{2}_\d{3,4}$")


def _read_split(path: Path) -> list[tuple[str, int | None, int | None, int]]:
    """``(name, label or None, frame count or None, line)`` per line of an ``SH_*.txt`` file."""
    out = []
    for lineno, text in read_lines(path):
        fields = [f for f in re.split(r"[,\s]+", text) if f]
        if not 1 <= len(fields) <= 3:
            raise line_error(path, lineno, "expected 'name', 'name,label' or 'name,label,frames'", text)
        name = fields[0]
        stem, ext = os.path.splitext(name)
        if ext.lower() in VIDEO_EXTS:
            name = stem
        if not _NAME_RE.match(name):
            raise line_error(path, lineno, f"{name!r} is not a ShanghaiTech video name like 01_001 or 01_0014", text)
        label = None
        if len(fields) >= 2:
            if fields[1] not in ("0", "1"):
                raise line_error(path, lineno, f"label {fields[1]!r} is not 0 or 1", text)
            label = int(fields[1])
        count = parse_int(fields[2], path, lineno, text, "frame count") if len(fields) == 3 else None
        out.append((name, label, count, lineno))
    return out


def _load_mask(path: Path) -> np.ndarray:
    try:
        mask = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ManifestError(f"{path}: not a readable .npy frame mask: {e}") from e
    if mask.ndim != 1 or mask.size == 0:
        raise ManifestError(f"{path}: a frame mask must be a non-empty 1-D array, got shape {mask.shape}")
    if not np.isin(mask, (0, 1)).all():
        raise ManifestError(f"{path}: a frame mask must hold only 0 and 1, got values {np.unique(mask)[:5]}")
    return mask


def build(root: str | Path, annotations: str | Path | None = None) -> BuildResult:
    """Build the ShanghaiTech manifest (see the module docstring for the files and conventions)."""
    files = DataFiles(root, annotations)
    split_files: dict[str, Path] = {}
    labelled: list[Path] = []
    for split, stem in (("train", "SH_Train"), ("test", "SH_Test")):
        split_files[split] = files.annotation([f"{stem}.txt", f"{stem}_with_frame_counts.txt"],
                                              f"ShanghaiTech {split} list (Zhong et al. split)")
        extra = files.annotation([f"{stem}_with_frame_counts.txt"], "labels", required=False)
        if extra is not None and extra != split_files[split]:
            labelled.append(extra)
    mask_dir = files.annotation(["test_frame_mask"], "ShanghaiTech frame masks (testing/test_frame_mask/)", folder=True)
    assert mask_dir is not None

    parsed: dict[Path, list[tuple[str, int | None, int | None, int]]] = {}
    for path in [*split_files.values(), *labelled]:
        if path not in parsed:
            parsed[path] = _read_split(path)
    rows = {split: parsed[path] for split, path in split_files.items()}
    check_unique([(n, split_files[s], ln) for s in ("train", "test") for n, _, _, ln in rows[s]])

    # labels / frame counts that any of the files gives, for the cross-checks
    given: dict[str, tuple[int, int | None, Path]] = {}
    for path, lines in parsed.items():
        for name, label, count, _ in lines:
            if label is not None:
                given[name] = (label, count, path)

    masks: dict[str, np.ndarray] = {}
    listed = {n for s in rows for n, _, _, _ in rows[s]}
    for name in sorted(listed):
        p = mask_dir / f"{name}.npy"
        if p.is_file():
            masks[name] = _load_mask(p)
    unlisted = sorted(p.stem for p in mask_dir.glob("*.npy") if p.stem not in listed)

    videos: list[VideoRecord] = []
    missing: list[VideoRecord] = []
    disagree, length_mismatch, test_part_without_mask = [], [], []
    for split in ("train", "test"):
        for name, _, _, _ in rows[split]:
            mask = masks.get(name)
            label = int(mask is not None and bool(mask.any()))
            if name in given and given[name][0] != label:
                disagree.append(f"{name} (mask says {label}, {given[name][2].name} says {given[name][0]})")
            if name in given and mask is not None and given[name][1] not in (None, -1) and given[name][1] != len(mask):
                length_mismatch.append(f"{name} (mask {len(mask)}, {given[name][2].name} {given[name][1]})")
            test_part = len(name.split("_")[1]) == 4
            if mask is None and test_part:
                test_part_without_mask.append(name)
            ivs = mask_intervals(mask) if (label and split == "test") else ()
            default = f"testing/frames/{name}" if test_part else f"training/videos/{name}.avi"
            videos.append(files.record(name, name, default, split, label, "Anomaly" if label else "Normal",
                                       ivs, missing=missing))

    notes = files.notes()
    n_anomalous = sum(v.label for v in videos)
    notes.append(f"labels: anomalous iff {mask_dir}/<name>.npy exists with a 1 ({n_anomalous} videos); "
                 "test intervals are the masks' runs of 1s (0-based frames, end exclusive, no conversion)")
    if given:
        checked = sorted({p.name for _, _, p in given.values()})
        notes.append(f"label cross-check against {', '.join(checked)} ({len(given)} videos): "
                     + (f"{len(disagree)} disagree (the masks were used): {'; '.join(disagree[:5])}" if disagree
                        else "all agree"))
    if length_mismatch:
        notes.append(f"{len(length_mismatch)} frame count(s) differ from the mask length: "
                     f"{'; '.join(length_mismatch[:5])}")
    if test_part_without_mask:
        notes.append(f"{len(test_part_without_mask)} video(s) of the original test part have no mask "
                     "(labelled normal): "
                     f"{', '.join(test_part_without_mask[:5])}")
    if unlisted:
        notes.append(f"{len(unlisted)} mask(s) belong to no listed video: {', '.join(unlisted[:5])}")
    return BuildResult(videos=videos, missing=missing, notes=notes)


__all__ = ["build"]
