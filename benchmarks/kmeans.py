"""What the one k-means (``models/kmeans.py``, scikit-learn's) costs CLAWS and NG-MIL.

CLAWS clusters each training video's clip representations into 2 groups at every epoch (one
scikit-learn call per video); NG-MIL clusters its projected normal features once. At commit
ec666a6 ``models/kmeans.py`` was a batched torch k-means and this script compared the two
(BENCHMARKS.md, "k-means"); scikit-learn was as fast, so it replaced it. This script times the
k-means on CLAWS-sized and NG-MIL-sized random data and prints a Markdown table.

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
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    videos = torch.randn(args.videos, args.clips, args.dim)
    lengths = torch.randint(args.clips // 2, args.clips + 1, (args.videos,), generator=g)
    flat = torch.randn(args.points, 32)
    rows = [
        ("CLAWS: 2-means of every video (one epoch)", "models.kmeans",
         best_of(lambda: kmeans(videos, 2, lengths=lengths, gen=torch.Generator().manual_seed(0), iters=20),
                 args.repeats)),
        (f"NG-MIL: {args.prototypes} prototypes of {args.points} points", "models.kmeans",
         best_of(lambda: kmeans(flat, args.prototypes, gen=torch.Generator().manual_seed(0), iters=100, tol=1e-6),
                 args.repeats)),
    ]
    print(f"{args.videos} videos x {args.clips} clips x {args.dim}-D; {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| task | implementation | seconds |\n|---|---|---|")
    for task, impl, secs in rows:
        print(f"| {task} | {impl} | {secs:.3f} |")


if __name__ == "__main__":
    main()
