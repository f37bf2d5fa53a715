"""TV-L1 throughput at 320x240: OpenCV's CPU Dual TV-L1 against the PyTorch TV-L1 (extractors/tvl1.py)
on the CPU and, when present, a GPU, with the mean end-point difference to OpenCV's flow.

    python benchmarks/flow.py [--video PATH] [--start F] [--pairs N] [--batches 1 8 32] [--threads T]
                              [--cuda-batches 1 8 32 64] [--compile] [--no-cpu-torch]

Frames: ``--pairs + 1`` frames from frame ``--start`` (default 16: the clip's first frames barely move)
of a real video (default ``../shared/data/videos/
v_GGSY1Qvo990.mp4``, an ActivityNet clip that is 320x240 natively; other videos are resized to
320x240 with INTER_AREA), made grey with OpenCV's conversion. Each method computes the flow of the
same ``--pairs`` consecutive pairs once (after a warm-up pair / batch): frame pairs per second is
pairs divided by wall time (on CUDA synchronised before the clock stops). OpenCV and the PyTorch
CPU runs use ``--threads`` threads (``cv2.setNumThreads``, ``torch.set_num_threads``; default 1:
the machine's cores are shared). EPE: mean over pixels and pairs of ``|flow - flow_opencv|``.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_VIDEO = ROOT.parent / "shared" / "data" / "videos" / "v_GGSY1Qvo990.mp4"


def load_gray(video: Path, n: int, start: int = 0) -> np.ndarray:
    """Frames ``start .. start + n - 1`` of ``video`` as 240x320 uint8 grey ``[n, 240, 320]``."""
    import cv2

    from extractors.flow import to_gray
    from pipeline.core.video import open_video

    frames = []
    with open_video(video) as src:
        for _, chunk in src.iter_chunks(64):
            frames.extend(chunk)
            if len(frames) >= start + n:
                break
    if len(frames) < start + n:
        raise SystemExit(f"{video}: {len(frames)} frames, need {start + n}")
    rgb = np.stack([f if f.shape[:2] == (240, 320) else cv2.resize(f, (320, 240), interpolation=cv2.INTER_AREA)
                    for f in frames[start : start + n]])
    return to_gray(rgb)


def epe(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(((a - b) ** 2).sum(-1)).mean())


def time_opencv(gray: np.ndarray) -> tuple[float, np.ndarray]:
    from extractors.flow import get_flow_method

    method = get_flow_method("tvl1_opencv")
    method.pairs(gray[:1], gray[1:2])  # warm-up
    t = time.perf_counter()
    flow = method.compute(gray)
    return time.perf_counter() - t, flow


def time_torch(gray: np.ndarray, batch: int, device: str, compile: bool = False) -> tuple[float, np.ndarray, float]:
    """Seconds, flow, and inner iterations run per batch on average."""
    from extractors.tvl1 import tvl1_flow

    dev = torch.device(device)
    frames = torch.from_numpy(gray).to(dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        n = min(batch, len(gray) - 1)
        tvl1_flow(frames[:n], frames[1 : n + 1], compile=compile)  # warm-up (and compilation)
        sync()
        stats: dict[str, int] = {}
        t = time.perf_counter()
        out = [tvl1_flow(frames[a : min(a + batch, len(gray) - 1)], frames[a + 1 : min(a + batch, len(gray) - 1) + 1],
                         compile=compile, stats=stats)
               for a in range(0, len(gray) - 1, batch)]
        sync()
        seconds = time.perf_counter() - t
    return seconds, torch.cat(out).cpu().numpy(), stats["iterations"] / len(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--video", type=Path, default=DEFAULT_VIDEO)
    p.add_argument("--start", type=int, default=16)
    p.add_argument("--pairs", type=int, default=32)
    p.add_argument("--batches", type=int, nargs="*", default=[1, 8, 32], help="PyTorch CPU batch sizes")
    p.add_argument("--cuda-batches", type=int, nargs="*", default=[1, 8, 32, 64])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-cpu-torch", action="store_true", help="skip the PyTorch CPU runs")
    p.add_argument("--compile", action="store_true",
                   help="also time the torch.compile'd iteration (CPU batches and, with a GPU, CUDA batches)")
    args = p.parse_args(argv)

    import cv2

    cv2.setNumThreads(args.threads)
    torch.set_num_threads(args.threads)
    gray = load_gray(args.video, args.pairs + 1, args.start)
    print(f"# TV-L1, {args.pairs} pairs of 320x240 frames {args.start}..{args.start + args.pairs} of "
          f"{args.video.name}; OpenCV defaults; "
          f"{platform.processor() or platform.machine()}, {args.threads} thread(s), torch {torch.__version__}, "
          f"OpenCV {cv2.__version__}")
    if torch.cuda.is_available():
        print(f"# GPU: {torch.cuda.get_device_name()}")
    print(f"{'method':<28} {'batch':>5} {'seconds':>9} {'pairs/s':>9} {'x OpenCV':>9} {'EPE px':>8} {'iter/batch':>10}")
    seconds, ref = time_opencv(gray)
    base = args.pairs / seconds
    print(f"{'tvl1_opencv (CPU)':<28} {1:>5} {seconds:>9.2f} {base:>9.2f} {1.0:>9.2f} {0.0:>8.4f} {'':>10}", flush=True)
    runs = [] if args.no_cpu_torch else [("cpu", b, c) for c in (False, True) if c <= args.compile for b in args.batches]
    if torch.cuda.is_available():
        runs += [("cuda", b, False) for b in args.cuda_batches]
        runs += [("cuda", b, True) for b in args.cuda_batches if args.compile]
    for device, batch, compiled in runs:
        seconds, flow, iters = time_torch(gray, batch, device, compiled)
        rate = args.pairs / seconds
        name = f"tvl1_torch ({device}{', compiled' if compiled else ''})"
        print(f"{name:<28} {batch:>5} {seconds:>9.2f} {rate:>9.2f} {rate / base:>9.2f} {epe(flow, ref):>8.4f} "
              f"{iters:>10.0f}", flush=True)
    print(f"# mean |flow| of OpenCV's flow: {np.sqrt((ref ** 2).sum(-1)).mean():.3f} px")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
