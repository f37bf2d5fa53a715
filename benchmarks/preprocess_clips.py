"""`preprocess_clips` alone (no decoding, no network): frames per second of the extract stage's
resize + crops + normalisation on the CPU, per frame size, crop setting, resize precision and
normalisation (out of place as ``normalize``, or in place as the stage runs ``normalize_``).

    OMP_NUM_THREADS=2 python benchmarks/preprocess_clips.py [--sizes 240x320 360x480] [--repeat 5]

Inputs are a batch of 8 random 16-frame uint8 clips (values do not change the cost), Inception-I3D's
geometry (short side 256, 224 crops, ``x / 127.5 - 1``), ``channels_last_3d`` output written into a
reused buffer as the stage does. Also the resize alone, per 16-frame clip. Each figure is the best of
``--repeat`` runs after a warm-up.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
log = logging.getLogger("bench_preprocess_clips")


def best_seconds(fn: Callable[[], object], repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    from extractors.i3d_inception import InceptionI3dExtractor
    from extractors.transforms import _resize, crop_names, preprocess_clips, resized_size

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["240x320", "360x480"], help="HxW of the frames")
    p.add_argument("--crops", nargs="+", default=["10", "5", "center"])
    p.add_argument("--repeat", type=int, default=5)
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    log.info("torch %s, %d threads", torch.__version__, torch.get_num_threads())
    normalize = lambda x: InceptionI3dExtractor.normalize(None, x)  # noqa: E731
    normalize_ = lambda x: InceptionI3dExtractor.normalize_(None, x)  # noqa: E731
    cl = torch.channels_last_3d
    g = torch.Generator().manual_seed(0)
    log.info("\n| frames | resize alone, uint8 (ms per 16 frames) | resize alone, float32 (incl. conversion) |")
    log.info("|---|---|---|")
    for size in a.sizes:
        h, w = (int(v) for v in size.split("x"))
        frames = torch.randint(0, 256, (16, h, w, 3), dtype=torch.uint8, generator=g)
        out = resized_size(h, w, ("short", 256))
        times = [best_seconds(lambda d=d: _resize(frames, out, d), a.repeat) * 1e3 for d in ("uint8", "float32")]
        log.info("| %s | %.1f | %.1f |", size, *times)
    log.info("\n| frames | crops | resize | normalisation | frames/s |")
    log.info("|---|---|---|---|---|")
    for size in a.sizes:
        h, w = (int(v) for v in size.split("x"))
        clips = torch.randint(0, 256, (8, 16, h, w, 3), dtype=torch.uint8, generator=g)
        for crops in a.crops:
            buf = torch.empty((8 * len(crop_names(crops)), 3, 16, 224, 224), memory_format=cl)
            for dtype in ("uint8", "float32"):
                for label, in_place in (("out of place", None), ("in place", normalize_)):
                    s = best_seconds(lambda: preprocess_clips(clips, ("short", 256), 224, crops, normalize=normalize,
                                                              memory_format=cl, buffer=buf, resize_dtype=dtype,
                                                              normalize_in_place=in_place), a.repeat)
                    log.info("| %s | %s | %s | %s | %.0f |", size, crops, dtype, label, clips.shape[0] * 16 / s)


if __name__ == "__main__":
    main()
