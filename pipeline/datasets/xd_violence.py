"""XD-Violence manifest builder.

Dataset: P. Wu, J. Liu, Y. Shi, Y. Sun, F. Shao, Z. Wu, Z. Yang, "Not only Look, but also Listen:
Learning Multimodal Violence Detection under Weak Supervision", ECCV 2020. 4,754 untrimmed videos
(movies, YouTube, CCTV, games), 217 h; train 3,954, test 800 (500 violent, 300 normal). Violence is
the anomaly; AP is the benchmark's main metric.

Files read (found by name in ``--annotations``, else anywhere under ``--root``):

- ``XD_Train.list`` / ``XD_Test.list`` (UR-DMU's lists), else ``rgb.list`` / ``rgb_test.list``
  (XDVioDet's): the split. They list feature files, 5 crops per video
  (``.../<name>__0.npy`` .. ``__4.npy``); the directory, the ``.npy`` extension and the ``__<crop>``
  suffix are dropped and the names deduplicated, keeping the first occurrence's order. A list of
  bare video names (``<name>`` or ``<name>.mp4``, one per line) works as well.
- ``XD_Annotation.txt`` (the release's ``annotations.txt``, which is also accepted): one line per
  violent test video, ``<name> s1 e1 [s2 e2 ...]``.

Labels and classes come from each name's label field, ``..._label_<codes>``, up to three codes
joined by ``-`` with ``0`` as filler: ``A`` normal; ``B1`` Fighting, ``B2`` Shooting, ``B4`` Riot,
``B5`` Abuse, ``B6`` Car accident (written ``CarAccident``), ``G`` Explosion (the six violence
classes of Wu et al.; the codes are those of the dataset's release and website, e.g.
``label_B2-G-0`` is shooting with an explosion). The ``class`` column holds the first code's class
(the primary one); the full multi-label field stays in the id.

Interval convention: **0-based start, exclusive end**, written unchanged. The annotation's numbers
are frame indices as the authors' ground-truth script uses them (``list/make_gt.py`` in
Roc-Ng/XDVioDet: ``gt_vec[s:e] = 1`` over the decoded frames), and the file agrees: 0 occurs as a
start (so frames are 0-based), and within a line pairs never overlap or touch. The release
carries no frame counts, so intervals cannot be checked against the video lengths here.

Ids are the video names, which contain ``#``, ``=``, ``&``, ``@`` and dots (allowed by the manifest's
id rules). Videos not found under ``--root`` keep the path ``<split>/<name>.mp4``.
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

CODES = {
    "A": "Normal",
    "B1": "Fighting",
    "B2": "Shooting",
    "B4": "Riot",
    "B5": "Abuse",
    "B6": "CarAccident",
    "G": "Explosion",
}
_CROP_RE = re.compile(r"^(?P<name>.+)__(?P<crop>\d+)$")


def _strip(token: str) -> str:
    """A list entry's video name: no folders, no ``.npy`` / video extension, no ``__<crop>`` suffix."""
    base = re.split(r"[\\/]", token)[-1]
    stem, ext = os.path.splitext(base)
    if ext.lower() == ".npy" or ext.lower() in VIDEO_EXTS:
        base = stem
    m = _CROP_RE.match(base)
    return m.group("name") if m else base


def label_of(name: str, path: Path, lineno: int, text: str) -> tuple[int, str]:
    """``(label, class)`` from a name's ``_label_<codes>`` field."""
    if "_label_" not in name:
        raise line_error(path, lineno, f"video name {name!r} has no '_label_<codes>' field", text)
    codes = [c for c in name.rsplit("_label_", 1)[1].split("-") if c != "0"]
    unknown = [c for c in codes if c not in CODES]
    if not codes or unknown:
        raise line_error(path, lineno, f"label field of {name!r}: unknown code(s) {unknown or ['(none)']}; "
                         f"expected {', '.join(CODES)}", text)
    if "A" in codes and len(codes) > 1:
        raise line_error(path, lineno, f"label field of {name!r} mixes 'A' (normal) with violence codes", text)
    return (0, "Normal") if codes == ["A"] else (1, CODES[codes[0]])


def _read_list(path: Path) -> tuple[list[tuple[str, int, str]], int]:
    """``(name, first line, text)`` per video of a feature list, crops deduplicated; and the line count."""
    out: dict[str, tuple[str, int, str]] = {}
    lines = read_lines(path)
    for lineno, text in lines:
        name = _strip(text)
        if name not in out:
            out[name] = (check_id(name, path, lineno, text), lineno, text)
    return list(out.values()), len(lines)


def _read_annotation(path: Path) -> dict[str, tuple[tuple[tuple[int, int], ...], int]]:
    """name -> (0-based end-exclusive intervals, line)."""
    out: dict[str, tuple[tuple[tuple[int, int], ...], int]] = {}
    for lineno, text in read_lines(path):
        tokens = text.split()
        name = _strip(tokens[0])
        nums = [parse_int(t, path, lineno, text) for t in tokens[1:]]
        if not nums or len(nums) % 2:
            raise line_error(path, lineno,
                             f"expected '<name> start end [start end ...]', got {len(nums)} numbers", text)
        pairs = []
        for s, e in zip(nums[::2], nums[1::2]):
            if s < 0 or e <= s:
                raise line_error(path, lineno, f"interval {s} {e}: need 0 <= start < end", text)
            pairs.append((s, e))
        if name in out:
            raise line_error(path, lineno, f"video {name!r} annotated twice (first on line {out[name][1]})", text)
        out[name] = (merge_intervals(pairs), lineno)
    return out


def build(root: str | Path, annotations: str | Path | None = None) -> BuildResult:
    """Build the XD-Violence manifest (see the module docstring for the files and conventions)."""
    files = DataFiles(root, annotations)
    lists = {
        "train": files.annotation(["XD_Train.list", "rgb.list"], "XD-Violence training list"),
        "test": files.annotation(["XD_Test.list", "rgb_test.list"], "XD-Violence test list"),
    }
    ann_file = files.annotation(["XD_Annotation.txt", "annotations.txt"], "XD-Violence test annotation")
    assert ann_file is not None
    parsed = {split: _read_list(path) for split, path in lists.items()}
    entries = {split: p[0] for split, p in parsed.items()}
    check_unique([(name, lists[s], ln) for s in ("train", "test") for name, ln, _ in entries[s]])
    ann = _read_annotation(ann_file)

    videos: list[VideoRecord] = []
    missing: list[VideoRecord] = []
    not_annotated, normal_annotated, train_annotated = [], [], []
    for split in ("train", "test"):
        for name, lineno, text in entries[split]:
            label, cls = label_of(name, lists[split], lineno, text)
            ivs: tuple[tuple[int, int], ...] = ()
            if name in ann:
                if split == "train":
                    train_annotated.append(name)
                elif not label:
                    normal_annotated.append(name)
                else:
                    ivs = ann[name][0]
            elif split == "test" and label:
                not_annotated.append(name)
            videos.append(files.record(name, name, f"{split}/{name}.mp4", split, label, cls, ivs, missing=missing))

    listed = {v.id for v in videos}
    unlisted = [n for n in ann if n not in listed]
    notes = files.notes()
    crops = {split: parsed[split][1] / max(len(entries[split]), 1) for split in lists}
    notes.append("lists: " + ", ".join(f"{lists[s].name} {len(entries[s])} videos ({crops[s]:g} lines each)"
                                       for s in lists))
    notes.append("test intervals: 0-based start, exclusive end, as in the annotation (XDVioDet's make_gt.py); "
                 "class = the first code of the '_label_' field")
    for what, names in (("violent test video(s) without annotation", not_annotated),
                        ("normal test video(s) with an annotation (ignored)", normal_annotated),
                        ("training video(s) with an annotation (ignored: weak labels)", train_annotated),
                        (f"annotated video(s) in neither list ({ann_file.name})", unlisted)):
        if names:
            notes.append(f"{len(names)} {what}: {', '.join(names[:5])}")
    return BuildResult(videos=videos, missing=missing, notes=notes)


__all__ = ["CODES", "build", "label_of"]
