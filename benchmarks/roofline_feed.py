"""Does decoding keep a GPU fed? The extraction's real decode-and-pack path against a stand-in network
paced at a share of a GPU's bf16 roofline, with 1, 2, ... decode workers.

    python benchmarks/roofline_feed.py [VIDEO ...] [--repeat N] [--workers 1 2] [--share 0.5]
                                       [--gpu H100|H200] [--networks NAME ...] [--crops 10 5 1]
                                       [--real --device cuda] [--json FILE]

Without VIDEO it writes synthetic 320x240 and 480x360 H.264 videos (a textured scene panning, with
noise; libx264 crf 23, GOP 60, yuv420p) into a temporary folder; ``--repeat`` lists each video that
many times (each copy is a separate video for the decode pool).

1. **Threads or processes** (``--no-gil`` skips it): decord decoding of two copies of the first video,
   in one or two threads and in one or two processes: frames/s, and for threads the process's CPU
   time over wall time (2.0 on two cores means decord released the GIL).
2. **FLOPs per clip and crop** of each network, counted with ``torch.utils.flop_counter.FlopCounterMode``
   on one ``[1, 3, 16, 224, 224]`` clip (random weights: the count does not depend on them):
   ``i3d_inception`` (Inception-I3D ``forward_features``), ``resnet50_i3d`` (pytorchvideo's
   ``i3d_r50``) and ``resnet50_i3d_rtfm`` where that module is present. The roofline rate of a
   configuration is ``16 * share * peak / (FLOPs * crops)`` frames/s, ``peak`` the GPU's dense
   bf16 tensor-core peak (:data:`BF16_DENSE_PEAK`).
3. **Paced feed**: per video size, the decode path (``thread``: today's one decode thread per video,
   :func:`extractors.stream.clip_batches` in a ``BackgroundIterator``; ``pool xN``:
   :class:`extractors.decode_pool.DecodePool` with N workers) feeds a stand-in that holds each batch
   for exactly ``FLOPs * crops * clips / (share * peak)`` seconds, the time the network would take at
   that share of the peak (resize, crops and scaling run on the GPU in that setting and are left
   out). Reported: frames/s, the share of wall time the stand-in waited for a batch (the GPU's
   stall share), the unpaced rate (hold 0: decoding alone) and the decoding's CPU seconds per frame
   (the workers' CPU time, ``/proc``). From the smallest pool's CPU time per frame: the cores a GPU
   host needs so that decoding never stalls each configuration (``ceil(roofline rate * CPU s per
   frame) + 1``, the one for the network's own thread; cores counted as this machine's).
4. ``--real`` (on CUDA; ``benchmarks/gpu_figures.sh`` runs it): the real networks (random weights
   unless ``--weights`` loads the registered ones), bf16 autocast, through
   :func:`extractors.stream.iter_clip_features` fed by the pool: achieved FLOP/s as a share of the
   device's peak, and the share of wall time spent waiting for decoded clips.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from bench_machine import cpu_name  # benchmarks/, the script's own folder

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

log = logging.getLogger("roofline_feed")

#: dense (no sparsity) BF16 tensor-core peak, FLOP/s: NVIDIA H100 Tensor Core GPU datasheet and
#: NVIDIA H200 Tensor Core GPU datasheet, SXM form factor, "BF16 Tensor Core 1,979 teraFLOPS" quoted
#: with sparsity, i.e. 989 TFLOPS dense for both
BF16_DENSE_PEAK = {"H100": 989e12, "H200": 989e12}
CLIP = (16, 224, 224)  # frames, height, width of one network input clip (every network here)
SIZES = ((320, 240), (480, 360))  # UCF-Crime's frame size, and the larger ActivityNet-style one


# --------------------------------------------------------------------------------------------------
# inputs


def synthetic_video(path: Path, width: int, height: int, frames: int, seed: int) -> Path:
    """A panning textured scene with noise, H.264 (libx264 crf 23, GOP 60, yuv420p), 30 fps."""
    import av

    rng = np.random.default_rng(seed)
    scene = rng.integers(0, 256, (height // 8 + 2, (width + frames) // 8 + 2, 3), dtype=np.uint8)
    scene = np.kron(scene, np.ones((8, 8, 1), np.uint8))  # 8x8 blocks: compressible, not trivial
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=30)
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        s.options = {"crf": "23", "g": "60", "threads": "1"}
        for t in range(frames):
            f = scene[:height, t : t + width].astype(np.int16) + rng.integers(-6, 7, (height, width, 3))
            frame = av.VideoFrame.from_ndarray(np.clip(f, 0, 255).astype(np.uint8), format="rgb24")
            for pkt in s.encode(frame):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    return path


def network_builders() -> dict[str, tuple[Callable[[], torch.nn.Module], Callable[[Any, torch.Tensor], torch.Tensor]]]:
    """name -> (build a randomly initialised network, its clip-feature function)."""
    from extractors.i3d_inception import InceptionI3d
    from extractors.i3d_r50 import build_i3d_r50, i3d_r50_features

    out: dict[str, Any] = {
        "i3d_inception": (lambda: InceptionI3d(num_classes=400).eval(), lambda m, x: m.forward_features(x)),
        "resnet50_i3d": (build_i3d_r50, i3d_r50_features),
    }
    try:
        from extractors.i3d_r50_rtfm import build_rtfm_i3d_r50, rtfm_i3d_features

        out["resnet50_i3d_rtfm"] = (build_rtfm_i3d_r50, rtfm_i3d_features)
    except ImportError:
        pass
    return out


def count_flops(name: str) -> float:
    """FLOPs of one 16x224x224 clip (one crop) through ``name``'s feature path."""
    from torch.utils.flop_counter import FlopCounterMode

    build, features = network_builders()[name]
    model = build()
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        features(model, torch.zeros((1, 3, *CLIP)))
    return float(counter.get_total_flops())


# --------------------------------------------------------------------------------------------------
# part 1: threads or processes


def _decode_all(path: str, reps: int = 1) -> int:
    from pipeline.core.video import open_video

    n = 0
    for _ in range(reps):
        with open_video(path, decoder_threads=1) as src:
            n += sum(len(f) for _, f in src.iter_chunks(128))
    return n


def gil_check(video: Path, reps: int = 3) -> list[dict[str, Any]]:
    """decord decoding in 1-2 threads and 1-2 processes (each decodes the video ``reps`` times)."""
    import multiprocessing as mp

    rows = []
    frames_per_run = reps * _frame_count(video)
    _decode_all(str(video))  # warm-up: the library and the file in the page cache
    for kind in ("threads", "processes"):
        for k in (1, 2):
            cpu0, t0 = time.process_time(), time.perf_counter()
            if kind == "threads":
                workers = [threading.Thread(target=_decode_all, args=(str(video), reps)) for _ in range(k)]
            else:
                # fork: a child starts in milliseconds (forkserver / spawn would time their start-up)
                workers = [mp.get_context("fork").Process(target=_decode_all, args=(str(video), reps)) for _ in range(k)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            wall = time.perf_counter() - t0
            rows.append({"kind": kind, "n": k, "fps": k * frames_per_run / wall,
                         "cpu_over_wall": (time.process_time() - cpu0) / wall if kind == "threads" else None})
    return rows


def _frame_count(video: Path) -> int:
    from pipeline.core.video import open_video

    with open_video(video) as src:
        return src.num_frames


# --------------------------------------------------------------------------------------------------
# part 3: the paced feed


def _hold(seconds: float) -> None:
    """Hold for exactly ``seconds`` (sleep, then spin the last half millisecond)."""
    end = time.perf_counter() + seconds
    if seconds > 0.001:
        time.sleep(seconds - 0.0005)
    while time.perf_counter() < end:
        pass


def _thread_batches(path: str, cfg: Any) -> Any:
    """Today's path: one decode thread per video (as :func:`extractors.stream.iter_clip_features`)."""
    from extractors.stream import BufferPool, clip_batches
    from pipeline.core.video import BackgroundIterator, open_video

    src = open_video(path)
    pool = BufferPool(pin_memory=False, keep=cfg.prefetch_batches + 2)
    producer = clip_batches(src, cfg.clip_len, cfg.batch_clips, cfg.chunk_frames, cfg.partial_clip, None, pool, None)
    it = BackgroundIterator(producer, depth=cfg.prefetch_batches, name="bench-decode")
    for item in it:
        if hasattr(item, "ranges"):
            yield item, (lambda t=item.frames: pool.put(t))
    src.close()


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (Linux ``/proc``; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def feed(videos: list[Path], workers: int, hold_per_clip: float, batch_clips: int = 8) -> dict[str, Any]:
    """Run ``videos`` through the decode path (``workers`` 0: the one-thread path) into the stand-in;
    returns frames/s, the stand-in's wait share and the CPU seconds decoding took per frame (the
    workers' CPU time; for the thread path this process's, whose stand-in sleeps)."""
    from extractors.decode_pool import DecodePool, DecodeSettings
    from stages.config import build_config

    cfg = build_config(sets=[f"extract.batch_clips={batch_clips}", "extract.partial_clip=drop"])
    settings = DecodeSettings.from_config(cfg)
    pool = DecodePool(workers, settings) if workers else None

    def cpu_now() -> float:
        if pool is None:
            return time.process_time()
        return sum(_cpu_seconds(pid) for pid in pool.worker_pids)

    frames = 0
    wait = 0.0
    t_start = None  # the clock starts at the first batch: the workers' start-up (once per run) is left out
    try:
        if pool is not None:
            pool.submit([(str(i), str(v)) for i, v in enumerate(videos)])
        t = time.perf_counter()
        for i, v in enumerate(videos):
            if pool is not None:
                video = pool.take(str(i))
                batches: Any = ((b, b.release) for b in video if hasattr(b, "ranges"))
            else:
                batches = _thread_batches(str(v), cfg.extract)
            while True:
                try:
                    batch, release = next(batches)
                except StopIteration:
                    break
                if t_start is not None:
                    wait += time.perf_counter() - t
                _hold(hold_per_clip * len(batch.ranges))
                if t_start is not None:
                    frames += len(batch.ranges) * cfg.extract.clip_len
                release()
                t = time.perf_counter()
                if t_start is None:  # the first batch only starts the clock
                    t_start = t
                    cpu0 = cpu_now()
        cpu = cpu_now() - cpu0
    finally:
        if pool is not None:
            pool.close()
    wall = t - t_start
    return {"frames": frames, "wall_s": wall, "fps": frames / wall, "wait_share": wait / wall,
            "cpu_s_per_frame": cpu / frames}


# --------------------------------------------------------------------------------------------------
# part 4: the real network on CUDA


def random_extractor(name: str, device: str) -> Any:
    """The registered extractor ``name`` with a randomly initialised network (timing only)."""
    from extractors import EXTRACTORS
    from extractors.base import ClipExtractor

    cls = EXTRACTORS.get_class(name)
    ext = cls.__new__(cls)
    ClipExtractor.__init__(ext, None, device)
    ext.model = network_builders()[name][0]().to(device)
    ext._checksum = "random"
    return ext


def real_run(videos: list[Path], name: str, crops: str, workers: int, flops: float, peak: float,
             device: str, weights: bool) -> dict[str, Any]:
    """``videos`` through the extract path (decode pool, preprocessing and ``name`` on ``device``, bf16)."""
    from extractors import EXTRACTORS
    from extractors.decode_pool import DecodePool, DecodeSettings
    from extractors.stream import iter_clip_features
    from stages.config import build_config

    ext = EXTRACTORS.get(name, device=device) if weights else random_extractor(name, device)
    cfg = build_config(sets=[f"extract.crops={crops}", "extract.precision=bf16", "extract.partial_clip=drop"])
    n_crops = {"10": 10, "5": 5, "center": 1}[crops]
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    # warm-up: cuDNN's algorithm choice and the input buffer, outside the timing
    warm = iter_clip_features(cfg, ext, videos[0])
    next(warm)
    warm.close()
    sync()
    stats: dict[str, float] = {}
    clips = 0
    t0 = time.perf_counter()
    with DecodePool(workers, DecodeSettings.from_config(cfg), pin_memory=str(device).startswith("cuda")) as pool:
        pool.submit([(str(i), str(v)) for i, v in enumerate(videos)])
        for i, v in enumerate(videos):
            clips += sum(1 for _ in iter_clip_features(cfg, ext, v, stats=stats, decoded=pool.take(str(i))))
    sync()
    wall = time.perf_counter() - t0
    achieved = clips * n_crops * flops / wall
    return {"network": name, "crops": crops, "workers": workers, "clips_per_s": clips / wall,
            "fps": clips * 16 / wall, "tflops": achieved / 1e12, "peak_share": achieved / peak,
            "stall_share": stats.get("wait_s", 0.0) / wall}


# --------------------------------------------------------------------------------------------------


def machine_line() -> str:
    cpu = cpu_name()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "?"
    return (f"{cpu}, {len(os.sched_getaffinity(0))} cores, {gpu}; torch {torch.__version__}, python "
            f"{sys.version.split()[0]}; {time.strftime('%Y-%m-%d')}, commit {commit}; load average "
            + " ".join(f"{x:.1f}" for x in os.getloadavg()))


def video_size(path: Path) -> tuple[int, int]:
    from pipeline.core.video import open_video

    with open_video(path) as src:
        return src.width, src.height


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("videos", nargs="*", type=Path)
    ap.add_argument("--repeat", type=int, default=1, help="list each video this many times")
    ap.add_argument("--frames", type=int, default=600, help="frames per synthetic video (default 600)")
    ap.add_argument("--synthetic", type=int, default=4, help="synthetic videos per size (default 4)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="pool sizes (default 1 2)")
    ap.add_argument("--share", type=float, default=0.5, help="share of the bf16 peak the network runs at (default 0.5)")
    ap.add_argument("--gpu", choices=sorted(BF16_DENSE_PEAK), default="H100")
    ap.add_argument("--networks", nargs="+", default=None)
    ap.add_argument("--crops", nargs="+", default=["10", "5", "1"], help="crops per clip (10, 5, 1)")
    ap.add_argument("--no-gil", action="store_true", help="skip part 1")
    ap.add_argument("--real", action="store_true", help="part 4: the real networks on --device (CUDA)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--weights", action="store_true", help="part 4 with the registered weights (else random)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    logging.getLogger("extractors.decode_pool").setLevel(logging.WARNING)
    torch.set_num_threads(1)  # the stand-in's process leaves the cores to decoding, as a GPU run does
    out: dict[str, Any] = {"machine": machine_line(), "command": " ".join(sys.argv)}
    log.info("%s", out["machine"])
    log.info("command: %s", out["command"])

    tmp = tempfile.TemporaryDirectory(prefix="roofline-feed-")
    groups: dict[str, list[Path]] = {}
    if args.videos:
        for v in args.videos:
            w, h = video_size(v)
            groups.setdefault(f"{w}x{h}", []).extend([v] * args.repeat)
    else:
        for w, h in SIZES:
            groups[f"{w}x{h}"] = [synthetic_video(Path(tmp.name) / f"synth_{w}x{h}_{i}.mp4", w, h, args.frames, i)
                                  for i in range(args.synthetic) for _ in range(args.repeat)]
    for size, vids in groups.items():
        log.info("%s: %d videos, %d frames", size, len(vids), sum(_frame_count(v) for v in vids))

    if not args.no_gil:
        first = next(iter(groups.values()))[0]
        out["gil"] = gil_check(first)
        log.info("\n## decord decoding in threads or processes (%s, decoder_threads=1)\n", first.name)
        log.info("| decoders | frames/s | process CPU / wall |\n|---|---|---|")
        for r in out["gil"]:
            cw = f"{r['cpu_over_wall']:.2f}" if r["cpu_over_wall"] is not None else "-"
            log.info("| %d %s | %.0f | %s |", r["n"], r["kind"], r["fps"], cw)

    names = args.networks or list(network_builders())
    flops = {n: count_flops(n) for n in names}
    peak = BF16_DENSE_PEAK[args.gpu]
    crops_n = {c: {"1": 1, "center": 1}.get(c, int(c)) for c in args.crops}
    targets = {(n, c): CLIP[0] * args.share * peak / (flops[n] * k) for n in names for c, k in crops_n.items()}
    out["flops_per_clip_crop"] = flops
    out["roofline_fps"] = {f"{n}/{c}": v for (n, c), v in targets.items()}
    log.info("\n## FLOPs per 16x224x224 clip and crop, and the frames/s at %.0f%% of the %s's dense bf16 peak (%.0f TFLOP/s)\n",
             100 * args.share, args.gpu, peak / 1e12)
    log.info("| network | GFLOPs per clip and crop | %s |\n|---|---|%s", " | ".join(f"{c} crops: frames/s (clips/s)" for c in args.crops), "---|" * len(args.crops))
    for n in names:
        cells = " | ".join(f"{targets[(n, c)]:,.0f} ({targets[(n, c)] / 16:,.0f})" for c in args.crops)
        log.info("| %s | %.1f | %s |", n, flops[n] / 1e9, cells)

    if args.real:
        from extractors.decode_pool import DecodePool  # noqa: F401 - fail early without the module

        name = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
        dev_peak = next((p for k, p in BF16_DENSE_PEAK.items() if k in name), peak)
        rows = []
        log.info("\n## real networks on %s, bf16 (peak %.0f TFLOP/s)\n", name, dev_peak / 1e12)
        log.info("| videos | network | crops | workers | clips/s | frames/s | TFLOP/s | share of peak | stall share |\n|---|---|---|---|---|---|---|---|---|")
        for size, vids in groups.items():
            for n in names:
                for c in args.crops:
                    for w in args.workers:
                        r = real_run(vids, n, "center" if c == "1" else c, w, flops[n], dev_peak, args.device, args.weights)
                        r["videos"] = size
                        rows.append(r)
                        log.info("| %s | %s | %s | %d | %.0f | %.0f | %.1f | %.1f%% | %.1f%% |", size, n, c, w,
                                 r["clips_per_s"], r["fps"], r["tflops"], 100 * r["peak_share"], 100 * r["stall_share"])
        out["real"] = rows
    else:
        paced: list[dict[str, Any]] = []
        rates: dict[str, dict[str, float]] = {}
        cpu_per_frame: dict[str, float] = {}
        for size, vids in groups.items():
            log.info("\n## %s: the decode path feeding the stand-in (frames/s; stand-in wait share)\n", size)
            modes = [("thread", 0)] + [(f"pool x{w}", w) for w in args.workers]
            log.info("| stand-in | roofline frames/s | %s |\n|---|---|%s", " | ".join(m for m, _ in modes), "---|" * len(modes))
            row = {}
            for m, w in modes:
                row[m] = feed(vids, w, 0.0)
            rates[size] = {m: r["fps"] for m, r in row.items()}
            cpu_per_frame[size] = row[f"pool x{min(args.workers)}"]["cpu_s_per_frame"]
            log.info("| none (decoding alone) | - | %s |", " | ".join(f"{row[m]['fps']:,.0f}" for m, _ in modes))
            log.info("| decoding CPU ms per frame, unpaced | - | %s |",
                     " | ".join(f"{1e3 * row[m]['cpu_s_per_frame']:.3f}" for m, _ in modes))
            for (n, c), target in targets.items():
                hold = flops[n] * crops_n[c] / (args.share * peak)
                res = {m: feed(vids, w, hold) for m, w in modes}
                for m, r in res.items():
                    paced.append({"videos": size, "network": n, "crops": c, "mode": m, "roofline_fps": target, **r})
                log.info("| %s, %s crops | %s | %s |", n, c, f"{target:,.0f}",
                         " | ".join(f"{res[m]['fps']:,.0f}; {100 * res[m]['wait_share']:.0f}%" for m, _ in modes))
        out["paced"], out["unpaced_fps"], out["cpu_s_per_frame"] = paced, rates, cpu_per_frame
        log.info("\n## cores a GPU host needs so that decoding never stalls (%.0f%% of the %s's bf16 peak)\n", 100 * args.share, args.gpu)
        w1 = min(args.workers)
        log.info("from the decode workers' CPU time per frame with %d worker(s), unpaced: %s (a worker "
                 "keeps more than one core busy: decord decodes and converts frames in threads of its own)", w1,
                 ", ".join(f"{s}: {1e3 * cpu_per_frame[s]:.3f} ms" for s in rates))
        log.info("| network | crops | %s |\n|---|---|%s", " | ".join(rates), "---|" * len(rates))
        cores = {}
        for (n, c), target in targets.items():
            cells = []
            for s in rates:
                k = math.ceil(target * cpu_per_frame[s]) + 1
                cores[f"{n}/{c}/{s}"] = k
                cells.append(str(k))
            log.info("| %s | %s | %s |", n, c, " | ".join(cells))
        out["cores_needed"] = cores
        if len(args.workers) > 1:
            lo, hi = min(args.workers), max(args.workers)
            for s in rates:
                log.info("%s: pool x%d / pool x%d unpaced = %.2fx; pool x%d / thread = %.2fx", s, hi, lo,
                         rates[s][f"pool x{hi}"] / rates[s][f"pool x{lo}"], hi, rates[s][f"pool x{hi}"] / rates[s]["thread"])
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    tmp.cleanup()


if __name__ == "__main__":
    main()
