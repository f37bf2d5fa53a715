"""Why the project keeps its own k-means (``models/kmeans.py``) rather than scikit-learn's.

CLAWS clusters each training video's clip representations into 2 groups at every epoch. With the
project's batched k-means that is one call over all videos; with scikit-learn's ``KMeans`` it is one
call per video (``n_init=1``, k-means++ seeding, Lloyd: the same algorithm). NG-MIL clusters its
projected normal features once, where either is a single call. This script times both on
CLAWS-sized and NG-MIL-sized random data, on the CPU (and CUDA when present), and prints a
Markdown table for BENCHMARKS.md.

    python benchmarks/kmeans.py [--videos 800] [--clips 150] [--dim 512] [--repeats 3]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.kmeans import kmeans  # noqa: E402


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=800, help="UCF-Crime has 1610 training videos; CLAWS clusters each")
    ap.add_argument("--clips", type=int, default=150, help="clip representations per video")
    ap.add_argument("--dim", type=int, default=512, help="CLAWS's FC-1 width (hidden[0])")
    ap.add_argument("--points", type=int, default=20000, help="NG-MIL: projected normal features clustered once")
    ap.add_argument("--prototypes", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from sklearn.cluster import KMeans

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    videos = torch.randn(args.videos, args.clips, args.dim)
    lengths = torch.randint(args.clips // 2, args.clips + 1, (args.videos,), generator=g)
    seeds = torch.rand(args.videos, 2, generator=g, dtype=torch.float64)
    flat = torch.randn(args.points, 32)

    def sklearn_per_video() -> None:
        for v in range(args.videos):
            KMeans(2, n_init=1, max_iter=20, random_state=v).fit(videos[v, : int(lengths[v])].numpy())

    rows = [
        ("CLAWS: 2-means of every video", "models.kmeans (CPU, batched)",
         best_of(lambda: kmeans(videos, 2, lengths=lengths, seeds=seeds, iters=20), args.repeats)),
        ("CLAWS: 2-means of every video", "sklearn KMeans, one call per video", best_of(sklearn_per_video, 1)),
        (f"NG-MIL: {args.prototypes} prototypes of {args.points} points", "models.kmeans (CPU)",
         best_of(lambda: kmeans(flat, args.prototypes, gen=torch.Generator().manual_seed(0), iters=100, tol=1e-6),
                 args.repeats)),
        (f"NG-MIL: {args.prototypes} prototypes of {args.points} points", "sklearn KMeans",
         best_of(lambda: KMeans(args.prototypes, n_init=1, max_iter=100, random_state=0).fit(flat.numpy()),
                 args.repeats)),
    ]
    if torch.cuda.is_available():
        gpu = videos.cuda()
        rows.insert(1, ("CLAWS: 2-means of every video", f"models.kmeans ({torch.cuda.get_device_name()})",
                        best_of(lambda: kmeans(gpu, 2, lengths=lengths, seeds=seeds, iters=20), args.repeats)))
    print(f"{args.videos} videos x {args.clips} clips x {args.dim}-D; {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| task | implementation | seconds |\n|---|---|---|")
    for task, impl, secs in rows:
        print(f"| {task} | {impl} | {secs:.3f} |")


if __name__ == "__main__":
    main()
