"""Decoding speed of JPEG/PNG frame folders (``pipeline.core.video.FrameFolder``) against the number of
decoding threads.

    python benchmarks/folder_decode.py [FOLDER ...] [--threads 1 2 4 8] [--chunk 128] [--repeat 3]

Folders default to the 12 UCSD Ped2 test clips in ``../shared/data/ucsd_ped2/testing/frames``
(360x240 JPEGs, 2,010 frames). For each thread count, every folder is read in chunks of ``--chunk``
frames (as the extract stage reads them, into uint8 RGB arrays) and frames per second is all frames
over the wall time; the best of ``--repeat`` interleaved runs (the page cache is warm after the first
pass). The default thread count of the pipeline is ``FOLDER_DECODE_THREADS`` (min(8, CPUs)).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PED2 = Path(os.environ.get("VAD_SHARED_DATA", ROOT.parent / "shared" / "data")) / "ucsd_ped2" / "testing" / "frames"

log = logging.getLogger("bench_folder_decode")


def read_all(folders: list[Path], threads: int, chunk: int) -> tuple[float, int]:
    """Seconds and frames to read every folder with ``threads`` decoding threads."""
    from pipeline.core.video import FrameFolder

    t0 = time.perf_counter()
    n = 0
    for folder in folders:
        for _, frames in FrameFolder(folder, threads=threads).iter_chunks(chunk):
            n += len(frames)
    return time.perf_counter() - t0, n


def main() -> None:
    from pipeline.core.video import FOLDER_DECODE_THREADS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="*", type=Path)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--chunk", type=int, default=128)
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    folders = a.folders or sorted(d for d in PED2.iterdir() if d.is_dir())
    log.info("# %d folders; %s, %d CPUs, python %s, %s; load average %s; pipeline default %d threads",
             len(folders), platform.machine(), os.cpu_count(), sys.version.split()[0], time.strftime("%Y-%m-%d"),
             " ".join(f"{x:.1f}" for x in os.getloadavg()), FOLDER_DECODE_THREADS)
    read_all(folders, 1, a.chunk)  # warm the page cache
    best = {t: 0.0 for t in a.threads}
    for _ in range(a.repeat):
        for t in a.threads:
            s, n = read_all(folders, t, a.chunk)
            best[t] = max(best[t], n / s)
    log.info("| threads | frames/s | x one thread |\n|---|---|---|")
    for t in a.threads:
        log.info("| %d | %.0f | %.2f |", t, best[t], best[t] / best[a.threads[0]])


if __name__ == "__main__":
    main()
