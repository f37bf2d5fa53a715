"""Build manifests from the benchmarks' own split and annotation files.

``pipeline manifest build {ucf-crime,shanghaitech,xd-violence,ucsd-ped2} --root DIR
[--annotations DIR] [--out FILE]`` reads a dataset's split lists and temporal annotations and writes
a manifest (``data_manifests/README.md``): train/test split, video-level label, anomaly class, and
for anomalous test videos the anomalous frame intervals, 0-based, start inclusive, end exclusive.
Each dataset module converts from its release's own convention and documents how:

=============== =========================================================================================
``ucf-crime``    ``pipeline/datasets/ucf_crime.py``: 1-based inclusive frame numbers -> ``[s - 1, e)``
``shanghaitech`` ``pipeline/datasets/shanghaitech.py``: per-frame 0/1 masks -> runs of 1s
``xd-violence``  ``pipeline/datasets/xd_violence.py``: 0-based start, exclusive end -> unchanged
``ucsd-ped2``    ``pipeline/datasets/ucsd_ped2.py``: 1-based inclusive (``ped2.mat``) -> ``[s - 1, e)``
=============== =========================================================================================

Finding the videos
    Users unpack the archives in different layouts, so nothing is assumed about folders: everything
    under ``--root`` is indexed once (``os.scandir``, recursively, following directory links once)
    by file stem for video files (``.mp4``, ``.avi``, ...) and by name for folders (JPEG frame
    folders), and each listed video is looked up by its name. When a name occurs more than once
    (UCF-Crime ships some videos twice), the path sharing the most trailing folder names with the
    dataset's standard layout wins, then the shorter path. Manifest paths are relative to ``--root``:
    use that folder as ``data.root`` when running the pipeline.

Finding the annotation files
    In ``--annotations`` if given (searched recursively), then anywhere under ``--root``, by file name.
    A missing required file, or a malformed line, raises :class:`~pipeline.core.manifest.ManifestError`
    naming the file and line (the CLI exits with status 2).

Missing videos (policy)
    **Every video the split lists name is written to the manifest, found or not**, so that the
    manifest is always the full benchmark (its counts match the papers' and its test set is the one
    everyone reports on). A video not found under ``--root`` gets the dataset's standard relative
    path; the command prints a warning with the number of missing videos, the first few names, and
    the folder it searched. ``pipeline run`` then records each missing video as that video's failure
    and goes on with the others; ``load_manifest(..., check_files=True)`` refuses such a manifest.
    To leave videos out deliberately, edit the manifest.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Callable

from pipeline.core.manifest import SPLITS, ManifestError, VideoRecord, write_manifest
from pipeline.datasets import shanghaitech, ucf_crime, ucsd_ped2, xd_violence
from pipeline.datasets.common import (
    MISSING_SHOWN,
    BuildResult,
    DataFiles,
    FileIndex,
    mask_intervals,
    merge_intervals,
    padded_frame_labels,
    read_lines,
)


# ----------------------------------------------------------------------------------------------
# Builders and the CLI command


def _canonical(name: str) -> str:
    key = name.strip().lower().replace("_", "-")
    return {"ucf": "ucf-crime", "ucfcrime": "ucf-crime", "sh": "shanghaitech", "shanghai": "shanghaitech",
            "xd": "xd-violence", "ped2": "ucsd-ped2"}.get(key, key)


def build_manifest(name: str, root: str | Path, annotations: str | Path | None = None) -> BuildResult:
    """Run the builder of dataset ``name`` (a key of :data:`BUILDERS`) on ``root``."""
    key = _canonical(name)
    if key not in BUILDERS:
        raise ManifestError(f"unknown dataset {name!r}: one of {', '.join(BUILDERS)}")
    return BUILDERS[key](root, annotations)


def _summary_table(videos: list[VideoRecord]) -> list[str]:
    counts = Counter((v.split, v.label) for v in videos)
    rows = [f"  {'split':<6} {'anomalous':>9} {'normal':>7} {'total':>6}"]
    for split in SPLITS:
        a, n = counts[(split, 1)], counts[(split, 0)]
        rows.append(f"  {split:<6} {a:>9} {n:>7} {a + n:>6}")
    classes = Counter(v.cls for v in videos if v.label == 1)
    if classes:
        rows.append("  classes: " + ", ".join(f"{c} {k}" for c, k in sorted(classes.items())))
    return rows


def missing_report(result: BuildResult, root: Path) -> list[str]:
    """The warning lines about listed videos not found under ``root`` (empty when none is missing)."""
    if not result.missing:
        return []
    n, total = len(result.missing), len(result.videos)
    by_split = Counter(v.split for v in result.missing)
    shown = ", ".join(v.id for v in result.missing[:MISSING_SHOWN]) + (", ..." if n > MISSING_SHOWN else "")
    lines = [
        f"warning: {n} of {total} listed videos not found under {root} "
        f"({', '.join(f'{k} {by_split[k]}' for k in SPLITS if by_split[k])}; searched every sub-folder for "
        f"video files and frame folders named after each video): {shown}",
        "warning: they are still written to the manifest with the dataset's standard path, so it stays the "
        "full benchmark; a run records each missing video as a failure and goes on with the others",
    ]
    if n == total:
        lines.append(f"warning: no listed video was found at all: is {root} the folder the videos were unpacked into?")
    return lines


def cmd_manifest_build(args) -> int:
    """``pipeline manifest build``: build, write ``args.out`` (default ``./<dataset>.csv``), report."""
    result = build_manifest(args.dataset, args.root, getattr(args, "annotations", None))
    out = Path(args.out) if getattr(args, "out", None) else Path(f"{_canonical(args.dataset)}.csv")
    try:
        write_manifest(result.videos, out)
    except OSError as e:
        raise ManifestError(f"{out}: cannot write the manifest: {e.strerror or e}") from e
    for note in result.notes:
        print(f"note: {note}")
    found = len(result.videos) - len(result.missing)
    print(f"{args.dataset}: wrote {len(result.videos)} videos to {out} ({found} found, {len(result.missing)} missing)")
    for row in _summary_table(result.videos):
        print(row)
    root = Path(args.root)
    print(f"paths are relative to {root}: run with --set data.manifest={out} --set data.root={root}")
    sys.stdout.flush()
    for line in missing_report(result, Path(args.root)):
        print(line, file=sys.stderr)
    return 0


BUILDERS: dict[str, Callable[..., BuildResult]] = {
    "ucf-crime": ucf_crime.build,
    "shanghaitech": shanghaitech.build,
    "xd-violence": xd_violence.build,
    "ucsd-ped2": ucsd_ped2.build,
}

__all__ = [
    "BUILDERS", "BuildResult", "DataFiles", "FileIndex", "build_manifest", "cmd_manifest_build",
    "mask_intervals", "merge_intervals", "missing_report", "padded_frame_labels", "read_lines",
]
