"""Peak memory of the extract path against video length: it must not grow with the video.

    python benchmarks/extract_memory.py [--minutes 1 5 15 60] [--crops center] [--dir /tmp/wsvad-mem]

Generates (once; kept in ``--dir``) synthetic 320x240, 30 fps H.264 videos of the given lengths
(1 h = 108,000 frames; PyAV / libx264, preset ultrafast, a textured background scrolling under a
moving square, so that every frame differs), then extracts each one in a fresh process with a cheap
extractor (per-crop channel means and frame differences, 8-D: the point is the decode, clip and
preprocessing path, not the network) through :func:`extractors.stream.extract_video`, the extract
stage's own code. Per length it reports the wall time and the process's peak resident memory
(``ru_maxrss``) next to its resident memory just before extracting (imports and extractor loaded),
so the difference is what the extraction itself held at most. ``--geometry native`` (default) skips
the resize (the frames are 240 high already; 224 crops), ``i3d`` resizes the short side to 256 first.

The stored feature array itself grows with the video ([T, C, D]; for Inception-I3D with 10 crops
1 h at 30 fps is 6,750 clips x 10 x 1024 float32 = 276 MB); that is output, not the decode path, and
it is tiny here (D = 8).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("extract_memory")

#: 320x240 at 30 fps: Sultani et al.'s UCF-Crime frame size and rate (Sultani et al. 2018, implementation details)
WIDTH, HEIGHT, FPS = 320, 240, 30


def generate(path: Path, n_frames: int) -> float:
    """Write ``n_frames`` synthetic frames as H.264 (yuv420p, preset ultrafast); returns seconds taken."""
    import av

    rng = np.random.default_rng(0)
    tex = (rng.random((HEIGHT, 2 * WIDTH, 3)) * 120 + 60).astype(np.uint8)  # scrolls horizontally
    t0 = time.perf_counter()
    tmp = path.with_suffix(".part.mp4")
    with av.open(str(tmp), "w") as c:
        s = c.add_stream("libx264", rate=FPS)
        s.width, s.height, s.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        s.options = {"preset": "ultrafast", "crf": "23"}
        frame = np.empty((HEIGHT, WIDTH, 3), np.uint8)
        for t in range(n_frames):
            x = t % WIDTH
            frame[:] = tex[:, x : x + WIDTH]
            y0, x0 = 40 + (t // 3) % 150, (t * 4) % (WIDTH - 40)
            frame[y0 : y0 + 40, x0 : x0 + 40] = (250, 240, 20)
            for pkt in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    tmp.rename(path)
    return time.perf_counter() - t0


def rss_mb() -> float:
    """Current resident set size of this process, MB (from /proc/self/status)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(video: Path, crops: str, prefetch: int, geometry: str) -> None:
    """Extract ``video`` in this process and print one JSON line of measurements."""
    import torch

    from extractors.base import ClipExtractor
    from stages.config import build_config
    from extractors.stream import extract_video

    class MeanExtractor(ClipExtractor):
        """8-D: per-channel mean, mean absolute frame difference, per-channel std, a constant."""

        feature_dim = 8
        crop_size = 224  # Inception-I3D's geometry, so resize and crops cost what they cost for it
        resize = ("short", 256)
        registry_name = "bench_mean"

        @property
        def weights_checksum(self) -> str:
            return "none"

        def normalize(self, clips: torch.Tensor) -> torch.Tensor:
            return clips / 127.5 - 1.0

        def features(self, clips: torch.Tensor) -> torch.Tensor:
            mean = clips.mean(dim=(2, 3, 4))
            diff = (clips[:, :, 1:] - clips[:, :, :-1]).abs().mean(dim=(1, 2, 3, 4))[:, None]
            std = clips.std(dim=(2, 3, 4))
            return torch.cat([mean, diff, std, torch.ones_like(diff)], 1)

    import decord  # noqa: F401  (its import alone takes a few hundred MB; count it before, not in, the run)

    if geometry == "native":  # frames are 320x240 already: no resize, a 224 crop
        MeanExtractor.resize = ("short", HEIGHT)
    cfg = build_config(sets=[f"extract.crops={crops}", f"extract.prefetch_batches={prefetch}", "extract.device=cpu"])
    ex = MeanExtractor(device="cpu")
    samples: list[tuple[float, float]] = []
    stop = threading.Event()

    def sample() -> None:
        t0 = time.perf_counter()
        while not stop.wait(0.25):
            samples.append((time.perf_counter() - t0, rss_mb()))

    before = rss_mb()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    feats, meta = extract_video(cfg, ex, video)
    wall = time.perf_counter() - t0
    stop.set()
    sampler.join()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    half = len(samples) // 2
    out = {
        "frames": meta["n_frames"], "clips": int(feats.shape[0]), "wall_s": wall, "rss_before_mb": before,
        "peak_rss_mb": peak, "rss_max_first_half_mb": max((r for _, r in samples[:half]), default=float("nan")),
        "rss_max_second_half_mb": max((r for _, r in samples[half:]), default=float("nan")),
        "features_mb": feats.nbytes / 2**20,
    }
    sys.stdout.write(json.dumps(out) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, nargs="+", default=[1, 5, 15, 60])
    p.add_argument("--crops", default="center", choices=("10", "5", "center"))
    p.add_argument("--prefetch", type=int, default=2, help="extract.prefetch_batches")
    p.add_argument("--geometry", default="native", choices=("native", "i3d"),
                   help="native: no resize (240p frames, 224 crops; decode + clip path only); "
                        "i3d: short side resized to 256 first, as for Inception-I3D (slower)")
    p.add_argument("--dir", type=Path, default=Path("/tmp/wsvad-mem"), help="where the videos are written (kept)")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(a.child, a.crops, a.prefetch, a.geometry)
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    a.dir.mkdir(parents=True, exist_ok=True)
    import platform

    import torch

    log.info("machine: %s, %d CPUs, torch %s, python %s, %s; load average %s", platform.machine(), os.cpu_count(),
             torch.__version__, sys.version.split()[0], time.strftime("%Y-%m-%d"),
             " ".join(f"{x:.1f}" for x in os.getloadavg()))
    rows = []
    for minutes in a.minutes:
        n = int(round(minutes * 60 * FPS))
        video = a.dir / f"synthetic_{WIDTH}x{HEIGHT}_{FPS}fps_{n}.mp4"
        if not video.is_file():
            seconds = generate(video, n)
            log.info("generated %s: %d frames in %.1f s (%.0f frames/s), %.1f MB", video, n, seconds, n / seconds,
                     video.stat().st_size / 2**20)
        cmd = [sys.executable, __file__, "--child", str(video), "--crops", a.crops, "--prefetch", str(a.prefetch),
               "--geometry", a.geometry]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if res.returncode != 0:
            raise SystemExit(f"extraction of {video} failed:\n{res.stderr[-3000:]}")
        m = json.loads(res.stdout.strip().splitlines()[-1])
        m["minutes"] = minutes
        rows.append(m)
        log.info("%g min: %s", minutes, json.dumps(m))
    log.info("\ncrops %s, geometry %s, extract.prefetch_batches %d, batch_clips 8, chunk_frames 128 (defaults)\n",
             a.crops, a.geometry, a.prefetch)
    log.info("| video | frames | clips | extraction wall | frames/s | RSS before | peak RSS | peak - before | "
             "RSS max, 1st / 2nd half of the run |")
    log.info("|---|---|---|---|---|---|---|---|---|")
    for m in rows:
        log.info("| %g min | %d | %d | %.1f s | %.0f | %.0f MB | %.0f MB | %.0f MB | %.0f / %.0f MB |", m["minutes"],
                 m["frames"], m["clips"], m["wall_s"], m["frames"] / m["wall_s"], m["rss_before_mb"],
                 m["peak_rss_mb"], m["peak_rss_mb"] - m["rss_before_mb"], m["rss_max_first_half_mb"],
                 m["rss_max_second_half_mb"])


if __name__ == "__main__":
    main()
