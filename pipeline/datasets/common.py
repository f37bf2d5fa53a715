"""What the dataset builders share: finding files, reading annotation lines, intervals, the result."""

from __future__ import annotations

import fnmatch
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Sequence

import numpy as np

from pipeline.core.manifest import ID_RE, ManifestError, VideoRecord

VIDEO_EXTS = frozenset(
    ".mp4 .avi .mkv .webm .mov .m4v .mpg .mpeg .wmv .flv .3gp .ts .mts .ogv .vob".split()
)
IMAGE_EXTS = frozenset(".jpg .jpeg .png .bmp .tif .tiff .gif .webp .ppm .pgm".split())
MISSING_SHOWN = 5  # names listed in the missing-video report


@dataclass
class BuildResult:
    """What a dataset builder produced.

    ``videos``: every listed video, in the lists' order (train first, then test), found or not.
    ``missing``: the subset of ``videos`` not found under the root (their ``path`` is the dataset's
    standard relative path). ``notes``: human-readable lines (files read, conversions applied,
    cross-checks, anything surprising) that the CLI prints.
    """

    videos: list[VideoRecord]
    missing: list[VideoRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# Reading annotation files


def read_lines(path: Path) -> list[tuple[int, str]]:
    """``(line number, stripped text)`` for every non-blank line of a UTF-8 text file (BOM and CRLF ok)."""
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")
    except OSError as e:
        raise ManifestError(f"{path}: cannot read: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise ManifestError(f"{path}: not UTF-8 text (byte {e.start}): is this the right file?") from e
    return [(i + 1, line.strip()) for i, line in enumerate(text.splitlines()) if line.strip()]


def line_error(path: Path, lineno: int, message: str, text: str | None = None) -> ManifestError:
    """A :class:`ManifestError` naming ``path:lineno``, quoting the offending line."""
    quoted = f" (line: {text[:120]!r})" if text is not None else ""
    return ManifestError(f"{path}:{lineno}: {message}{quoted}")


def parse_int(token: str, path: Path, lineno: int, text: str, what: str = "frame number") -> int:
    try:
        return int(token)
    except ValueError:
        raise line_error(path, lineno, f"{what} {token!r} is not an integer", text) from None


def check_id(vid: str, path: Path, lineno: int, text: str) -> str:
    """``vid`` if it is a valid manifest id (``pipeline.core.manifest``), else a :class:`ManifestError`."""
    if not ID_RE.match(vid):
        raise line_error(path, lineno, f"video name {vid!r} cannot be a manifest id "
                         "(no '/', '\\', ',', whitespace or leading '.')", text)
    return vid


def merge_intervals(intervals: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Sort and merge overlapping ``[start, end)`` intervals (touching ones stay separate)."""
    out: list[list[int]] = []
    for s, e in sorted(intervals):
        if out and s < out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return tuple((s, e) for s, e in out)


def mask_intervals(mask: np.ndarray) -> tuple[tuple[int, int], ...]:
    """Runs of 1s of a per-frame 0/1 mask as 0-based ``[start, end)`` intervals."""
    m = np.asarray(mask).astype(bool).astype(np.int8).ravel()
    d = np.diff(np.concatenate([[0], m, [0]]))
    starts, ends = np.flatnonzero(d == 1), np.flatnonzero(d == -1)
    return tuple((int(s), int(e)) for s, e in zip(starts, ends))


# ----------------------------------------------------------------------------------------------
# Indexing a data root


class FileIndex:
    """Everything under a folder, indexed once by name.

    ``videos``: key -> relative POSIX paths, keys being video-file stems (``Abuse001_x264`` for
    ``.../Abuse001_x264.mp4``) and folder names (frame folders). Image files are skipped, so frame
    folders cost one directory listing each. ``files``: lower-cased file or folder name -> relative
    paths, for finding annotation files.
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self.videos: dict[str, list[str]] = defaultdict(list)
        self.files: dict[str, list[str]] = defaultdict(list)
        self._scan()

    def _scan(self) -> None:
        stack: list[tuple[str, str]] = [(str(self.root), "")]
        seen: set[tuple[int, int]] = set()
        while stack:
            folder, rel = stack.pop()
            try:
                st = os.stat(folder)
                if (st.st_dev, st.st_ino) in seen:  # a directory link pointing back up
                    continue
                seen.add((st.st_dev, st.st_ino))
                it = os.scandir(folder)
            except OSError:
                continue
            with it:
                for entry in it:
                    name = entry.name
                    if name.startswith("."):
                        continue
                    ext = os.path.splitext(name)[1].lower()
                    if ext in IMAGE_EXTS:
                        continue
                    relpath = f"{rel}/{name}" if rel else name
                    try:
                        is_dir = entry.is_dir()
                    except OSError:
                        continue
                    if is_dir:
                        self.videos[name].append(relpath)
                        self.files[name.lower()].append(relpath)
                        stack.append((entry.path, relpath))
                    elif ext in VIDEO_EXTS:
                        self.videos[name[: -len(ext)]].append(relpath)
                    else:
                        self.files[name.lower()].append(relpath)

    def find_files(self, pattern: str) -> list[str]:
        """Relative paths of files/folders whose name matches ``pattern`` (fnmatch, case-insensitive)."""
        pattern = pattern.lower()
        if not any(c in pattern for c in "*?["):
            return sorted(self.files.get(pattern, []), key=_path_order)
        hits = [p for name, paths in self.files.items() if fnmatch.fnmatchcase(name, pattern) for p in paths]
        return sorted(hits, key=_path_order)


def _path_order(relpath: str) -> tuple[int, str]:
    return (relpath.count("/"), relpath)


def _suffix_match(candidate: str, default: str) -> int:
    """How many trailing path components ``candidate`` shares with ``default`` (case-insensitive)."""
    a = [p.lower() for p in PurePosixPath(candidate).parts]
    b = [p.lower() for p in PurePosixPath(default).parts]
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


class DataFiles:
    """A dataset's root (videos) and annotation folder, indexed lazily, once.

    Builders call :meth:`annotation` to find split/annotation files and :meth:`locate` to map each
    listed video name to the path it has under the root.
    """

    def __init__(self, root: str | Path, annotations: str | Path | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise ManifestError(f"--root {self.root}: not a folder")
        self.annotations = Path(annotations) if annotations else None
        if self.annotations is not None and not self.annotations.is_dir():
            raise ManifestError(f"--annotations {self.annotations}: not a folder")
        self._root_index: FileIndex | None = None
        self._ann_index: FileIndex | None = None
        self.read: list[Path] = []  # annotation files used, for the notes
        self.duplicates: list[str] = []  # video names found in more than one place

    @property
    def index(self) -> FileIndex:
        if self._root_index is None:
            self._root_index = FileIndex(self.root)
        return self._root_index

    def _searched(self) -> str:
        where = f"--root {self.root}"
        return f"--annotations {self.annotations} or {where}" if self.annotations else where

    def annotation(self, patterns: Sequence[str], what: str, required: bool = True,
                   folder: bool = False) -> Path | None:
        """The first file (or folder, with ``folder=True``) matching one of ``patterns``, in order.

        ``--annotations`` is searched first, then the root; within one folder the shallowest match
        wins. Raises :class:`ManifestError` when ``required`` and nothing matches.
        """
        bases: list[tuple[Path, Callable[[], FileIndex]]] = []
        if self.annotations is not None:
            bases.append((self.annotations, self._annotation_index))
        bases.append((self.root, lambda: self.index))
        for pattern in patterns:
            for base, get_index in bases:
                direct = base / pattern
                if not any(c in pattern for c in "*?[") and (direct.is_dir() if folder else direct.is_file()):
                    return self._used(direct)
                for rel in get_index().find_files(pattern):
                    path = base / rel
                    if path.is_dir() == folder:
                        return self._used(path)
        if required:
            names = " or ".join(patterns)
            raise ManifestError(f"{what}: no {names} found in {self._searched()} (searched all sub-folders by name)")
        return None

    def _annotation_index(self) -> FileIndex:
        assert self.annotations is not None
        if self._ann_index is None:
            same = self.annotations.resolve() == self.root.resolve()
            self._ann_index = self.index if same else FileIndex(self.annotations)
        return self._ann_index

    def _used(self, path: Path) -> Path:
        if path not in self.read:
            self.read.append(path)
        return path

    def locate(self, keys: str | Sequence[str], default: str,
               accept: Callable[[str], bool] | None = None) -> str | None:
        """The relative path of the video or frame folder named by one of ``keys``, or ``None``.

        Several candidates: those passing ``accept`` (if given) only; then the one sharing the most
        trailing path components with ``default`` (the dataset's standard layout), then the
        shallowest, then alphabetical.
        """
        keys = [keys] if isinstance(keys, str) else list(keys)
        candidates = [p for k in keys for p in self.index.videos.get(k, ())]
        if accept is not None:
            candidates = [p for p in candidates if accept(p)]
        if not candidates:
            return None
        if len(candidates) > 1:
            self.duplicates.append(keys[0])
            candidates.sort(key=lambda p: (-_suffix_match(p, default), p.count("/"), p))
        return candidates[0]

    def record(self, vid: str, keys: str | Sequence[str], default: str, split: str, label: int, cls: str,
               intervals: tuple[tuple[int, int], ...] = (), accept: Callable[[str], bool] | None = None,
               missing: list[VideoRecord] | None = None) -> VideoRecord:
        """A :class:`VideoRecord` whose path is the located one, or ``default`` (appended to ``missing``)."""
        found = self.locate(keys, default, accept)
        rec = VideoRecord(vid, found or default, split, label, cls, tuple(intervals))
        if found is None and missing is not None:
            missing.append(rec)
        return rec

    def notes(self) -> list[str]:
        out = [f"read {p}" for p in self.read]
        if self.duplicates:
            shown = ", ".join(self.duplicates[:MISSING_SHOWN])
            out.append(f"{len(self.duplicates)} video(s) found in more than one place under --root (e.g. {shown}); "
                       "used the copy whose folders match the dataset's standard layout best")
        return out


def check_unique(names: Iterable[tuple[str, Path, int]]) -> None:
    """Raise naming both lines when a video id is listed twice (``(id, file, line)`` triples)."""
    first: dict[str, tuple[Path, int]] = {}
    for vid, path, lineno in names:
        if vid in first:
            p0, l0 = first[vid]
            raise ManifestError(f"{path}:{lineno}: video {vid!r} listed twice (first at {p0}:{l0})")
        first[vid] = (path, lineno)


# ----------------------------------------------------------------------------------------------
# Frame-level ground truth


def padded_frame_labels(video: VideoRecord, n_frames: int, clip_len: int = 16) -> np.ndarray:
    """Per-frame 0/1 labels of ``video`` padded to ``ceil(n_frames / clip_len) * clip_len`` frames.

    The padding repeats the last frame's label: RTFM's frame-level ground truth (``gt-sh.npy``,
    built for its ShanghaiTech test list) pads each video this way so that every 16-frame snippet
    score, repeated 16 times, lines up with a label (RTFM ``list/make_gt_sh.py``; Tian et al.,
    "Weakly-supervised Video Anomaly Detection with Robust Temporal Feature Magnitude Learning",
    ICCV 2021). Returns ``uint8``; an empty array for ``n_frames == 0``.
    """
    if n_frames < 0 or clip_len < 1:
        raise ValueError(f"need n_frames >= 0 and clip_len >= 1, got {n_frames}, {clip_len}")
    labels = np.asarray(video.frame_labels(n_frames), dtype=np.uint8)
    if n_frames == 0:
        return labels
    padded = -(-n_frames // clip_len) * clip_len
    return np.concatenate([labels, np.full(padded - n_frames, labels[-1], dtype=np.uint8)])
