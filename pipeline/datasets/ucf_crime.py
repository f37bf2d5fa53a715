"""UCF-Crime manifest builder.

Dataset: W. Sultani, C. Chen, M. Shah, "Real-world Anomaly Detection in Surveillance Videos",
CVPR 2018. 1,900 untrimmed surveillance videos, 13 anomaly classes; weakly supervised split:
train 1,610 (810 anomalous, 800 normal), test 290 (140 anomalous, 150 normal).

Files read (found by name in ``--annotations``, else anywhere under ``--root``):

- ``Anomaly_Train.txt`` (release file, required): the 1,610 training videos, one
  ``<Class>/<name>.mp4`` per line; normal videos sit in ``Training_Normal_Videos_Anomaly/``.
  The class is the folder name; every training label is video-level only (no intervals).
- ``Temporal_Anomaly_Annotation*.txt`` (release file ``Temporal_Anomaly_Annotation_for_Testing_Videos.txt``,
  required): the 290 test videos, ``<name>.mp4 <Class> s1 e1 s2 e2`` with ``-1 -1`` for a missing
  interval and class ``Normal`` for normal videos. If it is absent, ``UCF_Annotation_with_frame_counts.txt``
  (below) serves instead.
- ``UCF_Annotation_with_frame_counts.txt`` (optional; from the UR-DMU repository): the same
  intervals as ``<Class>/<name>.mp4 <frames> <Class> s1 e1 s2 e2`` with each test video's frame
  count. When present, intervals are cut at the frame count, and both files are cross-checked.

Interval convention: the release's frame numbers are **1-based and inclusive at both ends**. This is
how the dataset authors' own evaluation reads them (``Evaluate_Anomaly_Detector.m`` in
WaqasSultani/AnomalyDetectionCVPR2018: ``GT(max(s,1):min(e,Actual_frames)) = 1`` on 1-based MATLAB
frames), and the files agree: no start is 0 (the smallest is 1), and ``Assault006`` and
``Shooting046`` end exactly on their frame count (8,096 and 5,088), which only a 1-based frame number
can do. So ``s e`` becomes ``[s - 1, e)`` (0-based, end exclusive), and, as in that evaluation code,
``e`` is cut at the frame count when the counts file is present: five intervals (``Arson011``,
``Arson016``, ``Explosion033``, ``Fighting003``, ``Shooting015``) end 1-2 frames past their video's
decoded frame count. Note that RTFM's ``list/make_gt.py`` reads the same numbers as 0-based inclusive
(``range(s, e + 1)``), one frame later than here.

Ids are file stems (``Abuse001_x264``); classes are the 13 UCF classes, ``Normal`` for normal videos.
Videos not found under ``--root`` keep the standard path (``<Class>/<name>.mp4``,
``Training_Normal_Videos_Anomaly/<name>.mp4``, ``Testing_Normal_Videos_Anomaly/<name>.mp4``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from pipeline.datasets.common import (
    VIDEO_EXTS,
    BuildResult,
    DataFiles,
    check_id,
    check_unique,
    line_error,
    merge_intervals,
    parse_int,
    read_lines,
)
from pipeline.core.manifest import VideoRecord

CLASSES = (
    "Abuse", "Arrest", "Arson", "Assault", "Burglary", "Explosion", "Fighting", "RoadAccidents",
    "Robbery", "Shooting", "Shoplifting", "Stealing", "Vandalism",
)
NORMAL = "Normal"
TRAIN_NORMAL_DIR = "Training_Normal_Videos_Anomaly"
TEST_NORMAL_DIR = "Testing_Normal_Videos_Anomaly"
_CLASS_BY_LOWER = {c.lower(): c for c in CLASSES}


def _split_name(token: str) -> tuple[list[str], str]:
    """(folders, stem) of a listed ``[folders/]name.mp4``."""
    parts = [p for p in re.split(r"[\\/]", token) if p]
    stem, ext = os.path.splitext(parts[-1])
    if ext.lower() not in VIDEO_EXTS:
        stem = parts[-1]
    return parts[:-1], stem


def _class(token: str, path: Path, lineno: int, text: str) -> str:
    if token.lower() == NORMAL.lower():
        return NORMAL
    if token.lower() in _CLASS_BY_LOWER:
        return _CLASS_BY_LOWER[token.lower()]
    raise line_error(path, lineno, f"unknown class {token!r}: expected {NORMAL} or one of {', '.join(CLASSES)}", text)


def _read_train(path: Path) -> list[tuple[str, str, str, int]]:
    """``(id, class, listed path, line)`` per line of ``Anomaly_Train.txt``."""
    out = []
    for lineno, text in read_lines(path):
        if len(text.split()) != 1:
            raise line_error(path, lineno, "expected one '<Class>/<name>.mp4' per line", text)
        folders, stem = _split_name(text)
        if not folders:
            raise line_error(path, lineno, "expected '<Class>/<name>.mp4': the folder gives the class", text)
        folder = folders[-1]
        if "normal" in folder.lower():
            cls = NORMAL
        elif folder.lower() in _CLASS_BY_LOWER:
            cls = _CLASS_BY_LOWER[folder.lower()]
        else:
            raise line_error(path, lineno, f"folder {folder!r} is neither {TRAIN_NORMAL_DIR} nor one of the "
                             f"13 classes ({', '.join(CLASSES)})", text)
        filename = re.split(r"[\\/]", text)[-1]
        listed = f"{folder}/{filename}"  # the standard '<Class>/<name>.mp4'
        out.append((check_id(stem, path, lineno, text), cls, listed, lineno))
    return out


def _intervals(tokens: list[str], path: Path, lineno: int, text: str) -> list[tuple[int, int]]:
    """1-based inclusive pairs (``-1 -1`` = none) -> 0-based ``[start, end)``."""
    nums = [parse_int(t, path, lineno, text) for t in tokens]
    out = []
    for s, e in zip(nums[::2], nums[1::2]):
        if s == -1 and e == -1:
            continue
        if s < 0 or e < 0:
            raise line_error(path, lineno, f"interval {s} {e}: frame numbers must be >= 0, or both -1 for none", text)
        if e < s:
            raise line_error(path, lineno, f"interval {s} {e} ends before it starts", text)
        out.append((max(s, 1) - 1, e))
    return out


def _read_test(path: Path, with_counts: bool) -> list[tuple[str, str, list[tuple[int, int]], int | None, int, str]]:
    """``(id, class, intervals, frame count or None, line, text)`` per test line."""
    n_fields = 7 if with_counts else 6
    form = "<Class>/<name>.mp4 <frames> <Class> s1 e1 s2 e2" if with_counts else "<name>.mp4 <Class> s1 e1 s2 e2"
    out = []
    for lineno, text in read_lines(path):
        tokens = text.split()
        if len(tokens) != n_fields:
            raise line_error(path, lineno, f"expected {n_fields} fields '{form}', got {len(tokens)}", text)
        _, stem = _split_name(tokens[0])
        vid = check_id(stem, path, lineno, text)
        count = None
        if with_counts:
            count = parse_int(tokens[1], path, lineno, text, "frame count")
            tokens = [tokens[0]] + tokens[2:]
        cls = _class(tokens[1], path, lineno, text)
        ivs = _intervals(tokens[2:], path, lineno, text)
        if cls == NORMAL and ivs:
            raise line_error(path, lineno, "a Normal video with anomaly intervals", text)
        out.append((vid, cls, ivs, count, lineno, text))
    return out


def build(root: str | Path, annotations: str | Path | None = None) -> BuildResult:
    """Build the UCF-Crime manifest (see the module docstring for the files and conventions)."""
    files = DataFiles(root, annotations)
    train_file = files.annotation(["Anomaly_Train.txt"], "UCF-Crime training list")
    test_file = files.annotation(["Temporal_Anomaly_Annotation*.txt"], "UCF-Crime test annotation", required=False)
    counts_file = files.annotation(["UCF_Annotation_with_frame_counts.txt"], "UCF-Crime frame counts", required=False)
    if test_file is None and counts_file is None:
        files.annotation(["Temporal_Anomaly_Annotation*.txt", "UCF_Annotation_with_frame_counts.txt"],
                         "UCF-Crime test annotation")  # raises, naming both
    notes: list[str] = []

    train = _read_train(train_file)
    test = _read_test(test_file, False) if test_file is not None else _read_test(counts_file, True)
    counts: dict[str, int] = {}
    if counts_file is not None:
        with_counts = _read_test(counts_file, True)
        counts = {vid: n for vid, _, _, n, _, _ in with_counts}
        if test_file is not None:
            ref = {vid: (cls, ivs) for vid, cls, ivs, _, _, _ in with_counts}
            differ = [vid for vid, cls, ivs, _, _, _ in test if ref.get(vid) != (cls, ivs)]
            if differ or len(ref) != len(test):
                notes.append(f"{counts_file.name} disagrees with {test_file.name} on {len(differ)} video(s) "
                             f"({', '.join(differ[:5])}) or lists {len(ref)} videos instead of {len(test)}; "
                             f"used {test_file.name}")
    check_unique([(vid, train_file, ln) for vid, _, _, ln in train]
                 + [(vid, test_file or counts_file, ln) for vid, _, _, _, ln, _ in test])

    videos: list[VideoRecord] = []
    missing: list[VideoRecord] = []
    for vid, cls, listed, _ in train:
        videos.append(files.record(vid, vid, listed, "train", int(cls != NORMAL), cls, missing=missing))

    clipped, no_interval, odd_name = [], [], []
    for vid, cls, ivs, _, _, _ in test:
        n = counts.get(vid)
        if n is not None:
            cut = [(s, min(e, n)) for s, e in ivs if s < n]
            if cut != ivs:
                clipped.append(f"{vid} ({'; '.join(f'{s}-{e}' for s, e in ivs)} -> frames {n})")
            ivs = cut
        if cls != NORMAL and not ivs:
            no_interval.append(vid)
        if cls != NORMAL and not vid.lower().startswith(cls.lower()):
            odd_name.append(vid)
        default = f"{TEST_NORMAL_DIR}/{vid}.mp4" if cls == NORMAL else f"{cls}/{vid}.mp4"
        videos.append(files.record(vid, vid, default, "test", int(cls != NORMAL), cls,
                                   merge_intervals(ivs), missing=missing))

    notes = files.notes() + notes
    notes.append("test intervals: the release's 1-based inclusive frame numbers 's e' are written as 0-based, "
                 "end-exclusive [s-1, e) (Sultani et al.'s evaluation convention)")
    if counts:
        notes.append(f"{len(clipped)} test interval(s) ended past the video's frame count and were cut there: "
                     + (", ".join(clipped) if clipped else "none"))
    else:
        notes.append("no UCF_Annotation_with_frame_counts.txt: intervals are not cut at the frame counts "
                      "(a few end 1-2 frames past the decoded length; the evaluate stage then leaves such a video out of the "
                      "metrics and lists it as a failure: add the file, or cut those intervals in the manifest)")
    if no_interval:
        notes.append(f"{len(no_interval)} anomalous test video(s) without any interval: {', '.join(no_interval[:5])}")
    if odd_name:
        notes.append(f"{len(odd_name)} test video(s) whose name does not start with their class: "
                     f"{', '.join(odd_name[:5])}")
    return BuildResult(videos=videos, missing=missing, notes=notes)


__all__ = ["CLASSES", "build"]
