"""``pipeline features compare FEATURES VIDEO``: do this project's features of VIDEO match a feature file?

Before trusting a detector trained on published features (RTFM's ``[T, 10, 2048]`` files, the
XD-Violence per-crop ``[T, 1024]`` files, ...) to score a new video, a user checks that the pipeline
extracts the same features from the video those files were made from. This command extracts VIDEO
with the run's extract settings (``--config`` / ``--set``, as ``pipeline run``; e.g.
``extract.backbone``, ``extract.crops``, ``extract.weights``) and compares it, clip by clip and crop
by crop, with FEATURES:

- clip-count alignment: both counts, and which side has extra clips (compared: the common prefix);
- per clip and crop: cosine similarity and relative L2 ``||ours - theirs|| / ||theirs||``;
- a verdict: *match* when the relative L2 is below ``--tolerance`` (default 1e-2, issue 17's
  criterion for reproduced features) on every compared clip and crop.

FEATURES is a ``.npy`` of ``[T, D]`` (one crop, e.g. an XD-Violence ``__0`` file) or ``[T, C, D]``;
with one crop in the file and several extracted, ``--crop`` names which extracted crop to compare
(default 0: the centre crop in the project's crop orders). ``--out FILE.csv`` writes every row.
Exit status: 0 match, 1 mismatch, 2 the inputs cannot be compared (unreadable file, other
feature size, crop out of range).
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core.config import ConfigError

log = logging.getLogger(__name__)

#: issue 17's criterion for features reproduced from a video: relative L2 below 1e-2 on every clip and crop
DEFAULT_TOLERANCE = 1e-2


@dataclass
class Comparison:
    """Per compared clip ``t`` and crop ``c``: ``cosine[t, c]``, ``rel_l2[t, c]``; the clip counts."""

    cosine: np.ndarray
    rel_l2: np.ndarray
    ours_clips: int
    theirs_clips: int
    crops: list[str]

    def matches(self, tolerance: float) -> bool:
        return bool(self.rel_l2.size) and bool(np.all(self.rel_l2 < tolerance))


def load_reference(path: Path) -> np.ndarray:
    """A feature file as ``[T, C, D]`` float64 (a ``[T, D]`` file is one crop).

    Raises:
        ConfigError: unreadable, or not 2-D / 3-D numbers (one line naming the file).
    """
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read the feature file ({e})") from None
    if arr.ndim == 2:
        arr = arr[:, None, :]
    if arr.ndim != 3 or not np.issubdtype(arr.dtype, np.number):
        raise ConfigError(f"{path}: expected a [T, D] or [T, C, D] array of numbers, got {arr.dtype} {arr.shape}")
    return arr.astype(np.float64)


def compare(ours: np.ndarray, theirs: np.ndarray, crop: int | None = None) -> Comparison:
    """Compare ``ours`` ``[T1, C1, D]`` with ``theirs`` ``[T2, C2, D]`` over the common clip prefix.

    With ``C2 == 1`` and ``C1 > 1``, ``ours``'s crop ``crop`` (default 0) is compared; otherwise the
    crop counts must agree. Raises ConfigError when the feature sizes or crops cannot be paired.
    """
    if ours.shape[-1] != theirs.shape[-1]:
        raise ConfigError(f"feature sizes differ: ours {ours.shape[-1]}-D, the file's {theirs.shape[-1]}-D "
                          "(another backbone or layer: check extract.backbone)")
    names = [str(i) for i in range(theirs.shape[1])]
    if theirs.shape[1] == 1 and ours.shape[1] > 1:
        c = 0 if crop is None else crop
        if not 0 <= c < ours.shape[1]:
            raise ConfigError(f"--crop {c}: the extraction has crops 0..{ours.shape[1] - 1}")
        ours, names = ours[:, c : c + 1], [f"ours {c} / file 0"]
    elif theirs.shape[1] != ours.shape[1]:
        raise ConfigError(f"crop counts differ: ours {ours.shape[1]}, the file's {theirs.shape[1]} "
                          "(set extract.crops to the file's, or give a one-crop file)")
    n = min(len(ours), len(theirs))
    a, b = ours[:n].astype(np.float64), theirs[:n]
    dot = (a * b).sum(-1)
    na, nb = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
    cosine = dot / np.maximum(na * nb, 1e-12)
    rel = np.linalg.norm(a - b, axis=-1) / np.maximum(nb, 1e-12)
    return Comparison(cosine, rel, len(ours), len(theirs), names)


def report_lines(cmp: Comparison, tolerance: float) -> list[str]:
    """The human-readable summary: alignment, the worst clips, the verdict."""
    lines = [f"clips: ours {cmp.ours_clips}, the file's {cmp.theirs_clips}"]
    if cmp.ours_clips != cmp.theirs_clips:
        extra = "ours" if cmp.ours_clips > cmp.theirs_clips else "the file"
        lines.append(f"  {extra} has {abs(cmp.ours_clips - cmp.theirs_clips)} more clip(s): compared the first "
                     f"{min(cmp.ours_clips, cmp.theirs_clips)} (check extract.partial_clip and the frame count)")
    if cmp.rel_l2.size:
        worst = np.unravel_index(int(np.argmax(cmp.rel_l2)), cmp.rel_l2.shape)
        lines.append(f"cosine similarity: mean {cmp.cosine.mean():.6f}, min {cmp.cosine.min():.6f}")
        lines.append(f"relative L2: mean {cmp.rel_l2.mean():.3g}, max {cmp.rel_l2.max():.3g} "
                     f"(clip {worst[0]}, crop {cmp.crops[worst[1]]})")
    ok = cmp.matches(tolerance)
    lines.append(f"{'match' if ok else 'MISMATCH'}: relative L2 {'<' if ok else 'not <'} {tolerance:g} on "
                 f"{'every' if ok else 'some'} compared clip and crop")
    return lines


def rows_csv(cmp: Comparison) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["clip", "crop", "cosine", "relative_l2"])
    for t in range(cmp.cosine.shape[0]):
        for c, name in enumerate(cmp.crops):
            w.writerow([t, name, f"{cmp.cosine[t, c]:.8f}", f"{cmp.rel_l2[t, c]:.8g}"])
    return buf.getvalue()


def cmd_features_compare(args: argparse.Namespace, cfg: object) -> int:
    """Extract ``args.video`` with ``cfg``'s extract settings and compare it with ``args.features``."""
    from extractors.build import build_extractor
    from extractors.stream import extract_video
    from pipeline.core.runner import resolve_device
    from pipeline.core.store import atomic_write_text
    from pipeline.core.video import VideoDecodeError

    theirs = load_reference(Path(args.features))
    ex = cfg.extract  # type: ignore[attr-defined]
    extractor = build_extractor(ex, resolve_device(ex.device))
    try:
        ours, meta = extract_video(cfg, extractor, Path(args.video))
    except VideoDecodeError as e:
        raise ConfigError(str(e)) from None
    cmp = compare(ours, theirs, args.crop)
    print(f"{args.video}: preset {ex.preset}, {ex.backbone}, crops {ex.crops} ({', '.join(meta['crops'])}), "
          f"partial clip {ex.partial_clip}, {meta['n_frames']} frames -> {ours.shape}; {args.features} -> {theirs.shape}")
    for line in report_lines(cmp, args.tolerance):
        print(line)
    if args.out:
        atomic_write_text(Path(args.out), rows_csv(cmp))
        print(f"per clip and crop: {args.out}")
    return 0 if cmp.matches(args.tolerance) else 1
