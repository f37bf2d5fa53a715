"""Dataset manifests: one row per video, validated on load.

Format (documented in ``data_manifests/README.md``): a UTF-8 CSV file with the header
``id,path,split,label,class,intervals``; lines starting with ``#`` are comments.

- ``id``: unique video id naming every cached artifact: no ``/``, ``\\``, comma, whitespace or
  control character, and no leading dot.
- ``path``: the video file or JPEG frame folder, relative to the data root; it may not be absolute
  nor climb out of the root with ``..``.
- ``split``: ``train`` or ``test``.
- ``label``: video-level label, ``1`` anomalous, ``0`` normal.
- ``class``: anomaly class (``Normal`` for normal videos); free text without commas.
- ``intervals``: for anomalous test videos, the anomalous frame intervals ``start-end`` separated by
  ``;``; frames are 0-based, ``start`` inclusive and ``end`` exclusive. Empty otherwise.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

COLUMNS = ("id", "path", "split", "label", "class", "intervals")
SPLITS = ("train", "test")
# ids name files: no path separators, commas, whitespace or control characters, no leading dot
# (XD-Violence names contain '#', '=' and '&', so a stricter set would reject real datasets)
ID_RE = re.compile(r"^[^./\\,\s\x00-\x1f][^/\\,\s\x00-\x1f]*$")


class ManifestError(ValueError):
    """A manifest that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class VideoRecord:
    """One manifest row.

    ``intervals`` are ``(start, end)`` frame pairs, 0-based, end exclusive.
    """

    id: str
    path: str
    split: str
    label: int
    cls: str
    intervals: tuple[tuple[int, int], ...] = field(default_factory=tuple)

    def frame_labels(self, n_frames: int) -> "list[int]":
        """Per-frame 0/1 ground truth for a video of ``n_frames`` frames."""
        gt = [0] * n_frames
        for start, end in self.intervals:
            for f in range(max(0, start), min(end, n_frames)):
                gt[f] = 1
        return gt


@dataclass
class Manifest:
    """A validated list of videos and the data root their paths are relative to."""

    source: Path
    root: Path
    videos: list[VideoRecord]

    def split(self, name: str) -> list[VideoRecord]:
        return [v for v in self.videos if v.split == name]

    def by_id(self) -> dict[str, VideoRecord]:
        return {v.id: v for v in self.videos}

    def resolve(self, video: VideoRecord) -> Path:
        return self.root / video.path

    def fingerprint(self, columns: tuple[str, ...] = COLUMNS) -> str:
        """sha256 over the given columns of every row, in order.

        Stages hash only the columns they read: the extract stage reads ``id`` and ``path``, so a
        corrected label or interval does not invalidate features.
        """
        rows = []
        for v in self.videos:
            d = asdict(v)
            d["class"] = d.pop("cls")
            rows.append([d[c] if c != "intervals" else [list(i) for i in d[c]] for c in columns])
        return hashlib.sha256(json.dumps(rows).encode()).hexdigest()

    def missing_files(self) -> list[VideoRecord]:
        return [v for v in self.videos if not self.resolve(v).exists()]


def _parse_intervals(text: str, where: str) -> tuple[tuple[int, int], ...]:
    text = text.strip()
    if not text:
        return ()
    out = []
    for part in text.split(";"):
        m = re.fullmatch(r"\s*(-?\d+)\s*-\s*(-?\d+)\s*", part)
        if not m:
            raise ManifestError(f"{where}: bad interval {part!r}: expected 'start-end' frame numbers")
        start, end = int(m.group(1)), int(m.group(2))
        if start < 0 or end <= start:
            raise ManifestError(f"{where}: bad interval {part!r}: need 0 <= start < end")
        out.append((start, end))
    out.sort()
    for (s0, e0), (s1, _) in zip(out, out[1:]):
        if s1 < e0:
            raise ManifestError(f"{where}: intervals {s0}-{e0} and {s1}-... overlap")
    return tuple(out)


def _check_path(path: str, where: str) -> str:
    if not path:
        raise ManifestError(f"{where}: empty path")
    p = PurePosixPath(path.replace("\\", "/"))
    if p.is_absolute() or re.match(r"^[A-Za-z]:", path):
        raise ManifestError(f"{where}: path {path!r} is absolute; paths must be relative to the data root")
    if ".." in p.parts:
        raise ManifestError(f"{where}: path {path!r} escapes the data root ('..')")
    return str(p)


def load_manifest(source: str | Path, root: str | Path | None = None, check_files: bool = True) -> Manifest:
    """Read and validate a manifest.

    Args:
        source: the CSV file.
        root: data root the ``path`` column is relative to; defaults to the manifest's folder.
        check_files: raise if a listed video does not exist under the root.

    Raises:
        ManifestError: naming the file and line of the first problem (missing file, bad interval,
            duplicate id, path escaping the root, unknown split, label not 0/1, missing column).
    """
    source = Path(source)
    if not source.is_file():
        raise ManifestError(f"{source}: manifest not found")
    root_path = Path(root) if root else source.parent
    videos: list[VideoRecord] = []
    seen: dict[str, int] = {}
    # utf-8-sig: a spreadsheet's "CSV UTF-8" starts with a byte-order mark, which would otherwise
    # glue itself to the first header ("\ufeffid") and fail with two headers that look identical
    try:
        with source.open(newline="", encoding="utf-8-sig") as fh:
            lines = [(i + 1, line) for i, line in enumerate(fh) if line.strip() and not line.lstrip().startswith("#")]
    except UnicodeDecodeError as e:
        raise ManifestError(f"{source}: not UTF-8 text (byte {e.start}: {e.reason}); save it as CSV UTF-8") from None
    if not lines:
        raise ManifestError(f"{source}: empty manifest (no header)")
    header_line, header_text = lines[0]
    header = next(csv.reader([header_text]))
    header = [h.strip() for h in header]
    if tuple(header) != COLUMNS:
        raise ManifestError(f"{source}:{header_line}: header must be {','.join(COLUMNS)}, got {','.join(header)}")
    for lineno, text in lines[1:]:
        where = f"{source}:{lineno}"
        cells = next(csv.reader([text]))
        if len(cells) != len(COLUMNS):
            raise ManifestError(f"{where}: expected {len(COLUMNS)} columns, got {len(cells)}")
        vid, path, split, label, cls, intervals = (c.strip() for c in cells)
        if not ID_RE.match(vid):
            raise ManifestError(f"{where}: bad id {vid!r}: no '/', '\\', ',', whitespace or leading '.' allowed")
        if vid in seen:
            raise ManifestError(f"{where}: duplicate id {vid!r} (first on line {seen[vid]})")
        seen[vid] = lineno
        path = _check_path(path, where)
        if split not in SPLITS:
            raise ManifestError(f"{where}: split {split!r} is not one of {', '.join(SPLITS)}")
        if label not in ("0", "1"):
            raise ManifestError(f"{where}: label {label!r} is not 0 or 1")
        ivs = _parse_intervals(intervals, where)
        if ivs and label == "0":
            raise ManifestError(f"{where}: normal video (label 0) has anomaly intervals")
        if ivs and split != "test":
            raise ManifestError(f"{where}: intervals are given for a {split} video; only test videos carry them")
        videos.append(VideoRecord(vid, path, split, int(label), cls or ("Normal" if label == "0" else "Anomaly"), ivs))
        if check_files and not (root_path / path).exists():
            raise ManifestError(f"{where}: video {path!r} not found under data root {root_path}")
    return Manifest(source=source, root=root_path, videos=videos)


def write_manifest(videos: list[VideoRecord], dest: str | Path) -> None:
    """Write ``videos`` as a manifest CSV (atomically)."""
    from pipeline.core.store import atomic_write_text

    rows = [",".join(COLUMNS)]
    for v in videos:
        ivs = ";".join(f"{s}-{e}" for s, e in v.intervals)
        rows.append(",".join([v.id, v.path, v.split, str(v.label), v.cls, ivs]))
    atomic_write_text(Path(dest), "\n".join(rows) + "\n")
