"""Per-clip latency of online scoring (``pipeline score --online``) with the real Inception-I3D.

    python benchmarks/score_latency.py [--run-dir DIR] [--crops {center,5,10}] [VIDEO ...]

For every clip, the time from asking for it to having its score: decoding its 16 frames, resizing
and cropping, the I3D forward pass and the detector (``ClipScore.latency_s``; the consumer's own
time is not counted). Each video's first clip also opens the file and warms the network up, so it
is reported apart; mean / p50 / p95 are over the other clips. For comparison, the same videos are
also scored offline (decoded 128 frames at a time, 8 clips per forward pass).

The run directory must hold a detector trained on ``i3d_inception`` features; without one, the
demo is run there first (``pipeline demo``, a few minutes). Videos default to the real clips in
``../shared/data/videos``. ``--crops`` overrides the run's crop setting for the timing only (the
detector scores any number of crops; the demo run uses the centre crop).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from bench_machine import cpu_name  # benchmarks/, the script's own folder

ROOT = Path(__file__).resolve().parents[1]


def ensure_run(run_dir: Path) -> None:
    from pipeline.cli import main

    if not (run_dir / "latest.json").is_file() or not list((run_dir / "cache" / "train").glob("*/model.pt")):
        print(f"no trained run in {run_dir}: running `pipeline demo` there first", file=sys.stderr)
        if main(["-q", "demo", "--run-dir", str(run_dir)]) != 0:
            raise SystemExit("pipeline demo failed")


def stats(x: list[float]) -> str:
    a = np.asarray(x) * 1000
    if a.size == 0:
        return "n/a | n/a | n/a"
    return f"{a.mean():.0f} | {np.percentile(a, 50):.0f} | {np.percentile(a, 95):.0f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("videos", nargs="*", type=Path)
    p.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "demo")
    p.add_argument("--crops", choices=("center", "5", "10"), default=None, help="override the run's crops for timing")
    a = p.parse_args()
    videos = a.videos or sorted((ROOT.parent / "shared" / "data" / "videos").glob("*.mp4"))
    if not videos:
        raise SystemExit("no videos given and none in ../shared/data/videos")
    ensure_run(a.run_dir)

    import torch

    from pipeline.score import RunScorer

    scorer = RunScorer(a.run_dir, device="cpu")
    if scorer.cfg.extract.backbone != "i3d_inception":
        raise SystemExit(f"{a.run_dir}: extractor is {scorer.cfg.extract.backbone}, not i3d_inception")
    if a.crops:
        scorer.cfg.extract.crops = a.crops
    crops = scorer.cfg.extract.crops

    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__} on CPU, {torch.get_num_threads()} threads, python {sys.version.split()[0]}, "
          f"{time.strftime('%Y-%m-%d')}")
    print(f"run: {a.run_dir} (detector {scorer.method}, extractor i3d_inception, crops {crops})\n")
    print("| video | size, fps | clips | video per clip (ms) | first clip (ms) | online mean (ms) | p50 (ms) | p95 (ms) "
          "| offline, per clip (ms) |")
    print("|---|---|---|---|---|---|---|---|---|")
    steady_all: list[float] = []
    for v in videos:
        info: dict = {}
        lat = [c.latency_s for c in scorer.iter_online(v, info)]
        t0 = time.perf_counter()
        off = scorer.score(v)
        offline = (time.perf_counter() - t0) / len(off.clip_ranges)
        steady_all += lat[1:]
        clip_ms = 1000 * scorer.cfg.extract.clip_len / info["fps"]
        print(f"| {v.name} | {info['width']}x{info['height']}, {info['fps']:g} | {len(lat)} | {clip_ms:.0f} | "
              f"{lat[0] * 1000:.0f} | {stats(lat[1:])} | {offline * 1000:.0f} |")
    print(f"\nall videos, clips after the first: mean / p50 / p95 = {stats(steady_all)} ms over {len(steady_all)} clips")


if __name__ == "__main__":
    main()
