"""Compare the extract stage's features of two run directories, byte for byte, video by video.

Used to show that the per-video store (issue 18) computes the same features as the layout before
it: run the demo's extract stage with the earlier commit and with this one, then

    python benchmarks/compare_features.py OLD_RUN_DIR NEW_RUN_DIR

Either run directory may be of either layout (items inside the run directory, or an index into the
store). Prints one line per video that differs and a summary; exits 1 when any video differs or
is missing from one side.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.core.store import StageDir  # noqa: E402


def extract_dir(run_dir: Path) -> StageDir:
    latest = json.loads((run_dir / "latest.json").read_text())
    return StageDir(run_dir / latest["extract"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    args = ap.parse_args(argv)
    a, b = extract_dir(args.old), extract_dir(args.new)
    va, vb = set(a.complete_items()), set(b.complete_items())
    bad = 0
    for vid in sorted(va | vb):
        if vid not in va or vid not in vb:
            print(f"{vid}: only in {'old' if vid in va else 'new'}")
            bad += 1
            continue
        fa, fb = a.item_file(vid, "features"), b.item_file(vid, "features")
        if fa.read_bytes() != fb.read_bytes():
            x, y = np.load(fa), np.load(fb)
            diff = float(np.abs(x.astype(np.float64) - y).max()) if x.shape == y.shape else float("nan")
            print(f"{vid}: differ (shapes {x.shape} / {y.shape}, max abs difference {diff:.3g})")
            bad += 1
    print(f"{len(va & vb)} videos compared, {bad} differ or are missing")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
