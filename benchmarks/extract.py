"""Extraction throughput: our decode + preprocessing path against the JPEG-dump approach, and each
backbone's clips/s with the split of wall time between decoding, preprocessing and the network.

    python benchmarks/extract.py [VIDEO ...] [--backbones NAME ...] [--crops 10 5 center]
                                 [--clips N] [--no-model] [--no-jpeg] [--device auto|cpu|cuda]
                                 [--precision fp32|bf16|fp16] [--batch-clips B]
                                 [--resize-dtype uint8 float32]

Videos default to the real clips in ``../shared/data/videos``. Two parts:

1. Preprocessing only (no network), per video and crop setting, in frames per second (the best of
   ``--repeat`` interleaved runs of each path, so that a burst of load on a shared machine does not
   decide the ratio):

   - **JPEG path**, the common approach: dump every frame with ffmpeg (``ffmpeg -i VIDEO -q:v 2
     DIR/%06d.jpg``; when ffmpeg is missing, PyAV decodes and PIL writes JPEGs at quality 95 instead,
     and the table says so), then read the frames back with PIL and, per 16-frame clip, resize the
     short side to 256 (PIL bilinear), cut the 10 / 5 / centre 224 crops (torchvision's
     ``TenCrop`` / ``FiveCrop`` / ``CenterCrop``), convert to tensors and scale to [-1, 1], giving
     the same ``[C, 3, 16, 224, 224]`` float32 network input per clip. Reported with and without
     the dump (the dump is paid once per video, the read-back at every extraction).
   - **our path**: :func:`extractors.stream.iter_clip_features` with a network-free extractor of
     Inception-I3D's geometry (decord decoding in the background thread, batched resize + crops
     + normalisation, ``extract.batch_clips`` clips per batch), on the CPU; also with decoding in
     the calling thread (``extract.prefetch_batches=0``); the ratio uses the better of the two.
     One row per ``--resize-dtype`` (``extract.resize_dtype``; default: the config's, uint8).
   - **our path's CPU side when the network is on a GPU**: decoding and packing uint8 clip batches
     only (the decode thread's work); resize, crops and scaling then run on the GPU. Independent
     of the crop setting.

2. Per backbone (default: every registered one whose weights are available; ``--no-model`` skips
   this part) and crop setting: ``--clips`` clips through the real network after one warm-up batch:
   clips/s, video seconds per second, and the share of wall time spent waiting for decoded clips,
   preprocessing and in the network (timings synchronised on CUDA); the network's FLOPs per
   clip and crop (``torch.utils.flop_counter.FlopCounterMode`` on one batch) and the achieved
   FLOP/s, on CUDA also as a fraction of the device's dense bf16 peak (:data:`BF16_PEAK_TFLOPS`).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench_machine import cpu_name  # benchmarks/, the script's own folder

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench_extract")

#: dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from NVIDIA's product datasheets; the first
#: key contained in ``torch.cuda.get_device_name()`` wins, so the more specific names come first
BF16_PEAK_TFLOPS: dict[str, float] = {
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,  # SXM
    "H200": 989.0,
    "GH200": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10G": 70.0,
}

#: backbones the benchmark leaves out by default (test helpers registered by the test suite)
_SKIP_PREFIXES = ("test_", "bench_")


def machine_line() -> str:
    cpu = cpu_name()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{cpu}, {os.cpu_count()} CPUs, {gpu}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"python {sys.version.split()[0]}, {time.strftime('%Y-%m-%d')}; load average {load}")


def bf16_peak(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of a CUDA device, from :data:`BF16_PEAK_TFLOPS`; None if unknown."""
    for key, tflops in BF16_PEAK_TFLOPS.items():
        if key in device_name:
            return tflops * 1e12
    return None


# --------------------------------------------------------------------------------------------------
# Part 1: preprocessing only


class NullExtractor:
    """Inception-I3D's preprocessing (short side 256, 224 crops, ``x / 127.5 - 1``) and no network:
    ``features`` returns one zero per clip and crop."""

    feature_dim = 1
    clip_len = 16
    crop_size = 224
    resize = ("short", 256)
    registry_name = "bench_null"
    weights_checksum = "none"
    pointwise_normalize = True

    def __init__(self, device: str = "cpu") -> None:
        self.device = torch.device(device)

    def normalize(self, clips: torch.Tensor) -> torch.Tensor:
        from extractors.i3d_inception import InceptionI3dExtractor

        return InceptionI3dExtractor.normalize(self, clips)

    def normalize_(self, clips: torch.Tensor) -> torch.Tensor:
        from extractors.i3d_inception import InceptionI3dExtractor

        return InceptionI3dExtractor.normalize_(self, clips)

    def features(self, clips: torch.Tensor) -> torch.Tensor:
        return clips.new_zeros((clips.shape[0], 1))


def dump_jpegs(video: Path, out_dir: Path) -> tuple[float, int, str]:
    """Every frame of ``video`` as ``out_dir/%06d.jpg``; returns (seconds, frames, tool used)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg:
        subprocess.run([ffmpeg, "-v", "error", "-nostdin", "-i", str(video), "-q:v", "2", str(out_dir / "%06d.jpg")],
                       check=True)
        tool = "ffmpeg -q:v 2"
    else:
        import av
        from PIL import Image

        with av.open(str(video)) as c:
            for i, frame in enumerate(c.decode(video=0), 1):
                Image.fromarray(frame.to_ndarray(format="rgb24")).save(out_dir / f"{i:06d}.jpg", quality=95)
        tool = "PyAV + PIL quality 95 (no ffmpeg)"
    return time.perf_counter() - t0, len(list(out_dir.glob("*.jpg"))), tool


def jpeg_readback(frame_dir: Path, crops: str, clip_len: int = 16) -> tuple[float, int]:
    """Read the JPEGs back with PIL and make each clip's network input the common way; returns
    (seconds, frames). Per clip: ``[C, 3, T, 224, 224]`` float32 in [-1, 1]."""
    from PIL import Image
    from torchvision import transforms as T

    crop = {"10": T.TenCrop(224), "5": T.FiveCrop(224), "center": lambda im: [T.CenterCrop(224)(im)]}[crops]
    resize = T.Resize(256, interpolation=T.InterpolationMode.BILINEAR)
    to_tensor = T.ToTensor()
    files = sorted(frame_dir.glob("*.jpg"))
    t0 = time.perf_counter()
    n = 0
    for s in range(0, len(files) - clip_len + 1, clip_len):
        per_frame = []
        for f in files[s : s + clip_len]:
            with Image.open(f) as im:
                img = resize(im.convert("RGB"))
            per_frame.append(torch.stack([to_tensor(c) for c in crop(img)]))  # [C, 3, 224, 224]
        clip = torch.stack(per_frame, dim=2) * 2.0 - 1.0  # [C, 3, T, 224, 224]
        assert clip.shape[2] == clip_len
        n += clip_len
    return time.perf_counter() - t0, n


#: the one network-free extractor of part 1: the extract stage builds its extractor once per run, and
#: the network-input buffer it allocates for the first video is reused for every later one
_NULL_EXTRACTOR = NullExtractor()


def our_preprocessing(video: Path, crops: str, batch_clips: int, prefetch: int,
                      resize_dtype: str = "uint8") -> tuple[float, int, dict[str, float]]:
    """Our decode + preprocessing path without a network; returns (seconds, frames, stats). Every
    call uses the same extractor, as the stage does across a run's videos, so the first call (the
    warm-up) pays the allocation of the network-input buffer and later calls reuse it."""
    from stages.config import build_config
    from extractors.stream import iter_clip_features

    cfg = build_config(sets=[f"extract.crops={crops}", f"extract.batch_clips={batch_clips}",
                             f"extract.prefetch_batches={prefetch}", "extract.partial_clip=drop",
                             f"extract.resize_dtype={resize_dtype}"])
    stats: dict[str, float] = {}
    t0 = time.perf_counter()
    n = sum(1 for _ in iter_clip_features(cfg, _NULL_EXTRACTOR, video, stats=stats))
    return time.perf_counter() - t0, n * cfg.extract.clip_len, stats


def our_cpu_side(video: Path, batch_clips: int) -> tuple[float, int]:
    """What the CPU does in our path when the network is on a GPU: decode and pack uint8 clip
    batches (the decode thread's work; resize, crops and scaling then run on the GPU). Returns
    (seconds, frames)."""
    from pipeline.core.video import open_video
    from extractors.stream import BufferPool, clip_batches

    t0 = time.perf_counter()
    n = 0
    with open_video(video) as src:
        pool = BufferPool(pin_memory=False, keep=4)
        for item in clip_batches(src, 16, batch_clips, 128, "drop", None, pool, None):
            frames = getattr(item, "frames", None)
            if frames is not None:
                n += frames.shape[0] * frames.shape[1]
                pool.put(frames)
    return time.perf_counter() - t0, n


def part_preprocessing(videos: list[Path], crops_list: list[str], batch_clips: int, jpeg: bool, repeat: int,
                        resize_dtypes: list[str]) -> None:
    log.info("\n## Preprocessing only (decode + resize 256 + crops 224 + scaling; no network), frames/s\n")
    log.info("| video | crops | resize | JPEG dump (once) | JPEG read-back + PIL resize + crops | JPEG incl. dump | "
             "ours (decord, background thread) | ours, decode in the calling thread | ours / JPEG read-back | "
             "ours, CPU side with a GPU (decode + uint8 batches) | that / JPEG read-back |")
    log.info("|---|---|---|---|---|---|---|---|---|---|---|")
    tools = set()
    for video in videos:
        for crops in crops_list:  # warm-up: imports, page cache, the network-input buffer
            for dtype in resize_dtypes:
                our_preprocessing(video, crops, batch_clips, 2, dtype)
        tmp = Path(tempfile.mkdtemp(prefix="wsvad-jpeg-"))
        try:
            dump_s = dump_n = 0
            if jpeg:
                dump_s, dump_n, tool = dump_jpegs(video, tmp)
                tools.add(tool)
            cpu_side = 0.0
            for _ in range(repeat):
                side_s, side_n = our_cpu_side(video, batch_clips)
                cpu_side = max(cpu_side, side_n / side_s)
            for crops in crops_list:
                # the best of `repeat` runs of each, interleaved
                ours = dict.fromkeys(resize_dtypes, 0.0)
                inline = dict.fromkeys(resize_dtypes, 0.0)
                jr = 0.0
                for _ in range(repeat):
                    for dtype in resize_dtypes:
                        ours_s, ours_n, _ = our_preprocessing(video, crops, batch_clips, 2, dtype)
                        inline_s, inline_n, _ = our_preprocessing(video, crops, batch_clips, 0, dtype)
                        ours[dtype] = max(ours[dtype], ours_n / ours_s)
                        inline[dtype] = max(inline[dtype], inline_n / inline_s)
                    if jpeg:
                        read_s, read_n = jpeg_readback(tmp, crops)
                        jr = max(jr, read_n / read_s)
                for dtype in resize_dtypes:
                    if jpeg:
                        jd = 1.0 / (1.0 / jr + dump_s / dump_n)
                        log.info("| %s | %s | %s | %.0f | %.1f | %.1f | %.1f | %.1f | %.1fx | %.0f | %.1fx |", video.name,
                                 crops, dtype, dump_n / dump_s, jr, jd, ours[dtype], inline[dtype],
                                 max(ours[dtype], inline[dtype]) / jr, cpu_side, cpu_side / jr)
                    else:
                        log.info("| %s | %s | %s | - | - | - | %.1f | %.1f | - | %.0f | - |", video.name, crops, dtype,
                                 ours[dtype], inline[dtype], cpu_side)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if tools:
        log.info("\nJPEG dump: %s", ", ".join(sorted(tools)))


# --------------------------------------------------------------------------------------------------
# Part 2: backbones


def available_backbones(names: list[str] | None, download: bool) -> list[tuple[str, str | None]]:
    """``(name, reason to skip or None)`` for the requested (default: all registered) backbones."""
    from extractors import EXTRACTORS
    from extractors.weights import cached_weights_path

    registered = EXTRACTORS.list()
    wanted = names or [n for n in registered if not n.startswith(_SKIP_PREFIXES)]
    out = []
    for name in wanted:
        if name not in registered:
            out.append((name, "not registered (yet)"))
            continue
        spec = EXTRACTORS.get_class(name).weights_spec
        if spec is not None and not download and not cached_weights_path(spec).is_file():
            out.append((name, f"weights not cached ({cached_weights_path(spec)}); pass --download to fetch them"))
            continue
        out.append((name, None))
    return out


def count_flops(extractor: Any) -> float:
    """FLOPs of one clip and crop through ``extractor.features`` (FlopCounterMode on one input)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros((1, 3, extractor.clip_len, extractor.crop_size, extractor.crop_size), device=extractor.device)
    with FlopCounterMode(display=False) as counter:
        extractor.features(x)
    return float(counter.get_total_flops())


def time_backbone(extractor: Any, video: Path, crops: str, n_clips: int, batch_clips: int, precision: str) -> dict[str, Any]:
    """Run ``n_clips`` clips of ``video`` (after a warm-up batch) and return the timings."""
    from stages.config import build_config
    from pipeline.core.video import open_video
    from extractors.stream import iter_clip_features

    cfg = build_config(sets=[f"extract.crops={crops}", f"extract.batch_clips={min(batch_clips, n_clips)}",
                             f"extract.precision={precision}", "extract.partial_clip=drop"])
    with open_video(video) as src:
        fps = src.fps
    warm = iter_clip_features(cfg, extractor, video, batch_clips=min(batch_clips, n_clips))
    next(warm)
    warm.close()
    stats: dict[str, float] = {}
    t0 = time.perf_counter()
    it = iter_clip_features(cfg, extractor, video, stats=stats)
    done = 0
    for _ in it:
        done += 1
        if done >= n_clips:
            break
    it.close()
    wall = time.perf_counter() - t0
    return {"wall": wall, "clips": done, "fps": fps, "stats": stats}


def part_backbones(videos: list[Path], names: list[str] | None, crops_list: list[str], n_clips: int,
                   batch_clips: int, device: str, precision: str, download: bool) -> None:
    from extractors import EXTRACTORS
    from extractors.transforms import crop_names

    log.info("\n## Backbones: %d clips per setting after a warm-up batch (device %s, precision %s)\n",
             n_clips, device, precision)
    log.info("| backbone | crops | video | clips/s | video s/s | wait for decode | preprocess | network | other | "
             "GFLOP per clip-crop | achieved TFLOP/s | of bf16 peak |")
    log.info("|---|---|---|---|---|---|---|---|---|---|---|---|")
    peak = bf16_peak(torch.cuda.get_device_name()) if device.startswith("cuda") else None
    for name, reason in available_backbones(names, download):
        if reason:
            log.info("| %s | skipped: %s |||||||||||", name, reason)
            continue
        try:
            extractor = EXTRACTORS.get(name, device=device)
        except Exception as exc:  # a download that fails offline, a missing optional dependency
            log.info("| %s | skipped: %s |||||||||||", name, " ".join(str(exc).split())[:200])
            continue
        flops = count_flops(extractor)
        for crops in crops_list:
            for video in videos:
                r = time_backbone(extractor, video, crops, n_clips, batch_clips, precision)
                st, wall, clips = r["stats"], r["wall"], r["clips"]
                wait, pre, net = st.get("wait_s", 0.0), st.get("preprocess_s", 0.0), st.get("network_s", 0.0)
                ncrops = len(crop_names(crops))
                achieved = flops * clips * ncrops / net if net else float("nan")
                frac = f"{achieved / peak:.1%}" if peak else "-"
                log.info("| %s | %s | %s | %.2f | %.2f | %.0f%% | %.0f%% | %.0f%% | %.0f%% | %.1f | %.3f | %s |", name,
                         crops, video.name, clips / wall, clips * 16 / r["fps"] / wall, 100 * wait / wall,
                         100 * pre / wall, 100 * net / wall, 100 * (wall - wait - pre - net) / wall, flops / 1e9,
                         achieved / 1e12, frac)
        del extractor


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("videos", nargs="*", type=Path)
    p.add_argument("--backbones", nargs="+", default=None, help="registered names (default: all with weights)")
    p.add_argument("--crops", nargs="+", default=["10", "5", "center"], choices=("10", "5", "center"))
    p.add_argument("--clips", type=int, default=None, help="clips per backbone and setting (default 4 on CPU, 128 on CUDA)")
    p.add_argument("--batch-clips", type=int, default=8, help="extract.batch_clips (default 8, the config default)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--no-model", action="store_true", help="preprocessing comparison only (quick on a CPU)")
    p.add_argument("--no-jpeg", action="store_true", help="skip the JPEG-dump path")
    p.add_argument("--no-preprocessing", action="store_true", help="backbones only")
    p.add_argument("--download", action="store_true", help="fetch weights that are not cached yet")
    p.add_argument("--repeat", type=int, default=3, help="preprocessing: best of N interleaved runs per path")
    p.add_argument("--resize-dtype", nargs="+", default=["uint8"], choices=("uint8", "float32"),
                   help="extract.resize_dtype of our path: a row each (default uint8, the config default)")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    from pipeline.core.runner import resolve_device

    videos = a.videos or sorted((ROOT.parent / "shared" / "data" / "videos").glob("*.mp4"))
    if not videos:
        raise SystemExit("no videos given and none in ../shared/data/videos")
    device = resolve_device(a.device)
    log.info("machine: %s", machine_line())
    for v in videos:
        from pipeline.core.video import open_video

        with open_video(v) as src:
            log.info("video: %s, %dx%d, %g fps, %d frames", v.name, src.width, src.height, src.fps, src.num_frames)
    if not a.no_preprocessing:
        part_preprocessing(videos, a.crops, a.batch_clips, not a.no_jpeg, a.repeat, a.resize_dtype)
    if not a.no_model:
        n = a.clips or (128 if device.startswith("cuda") else 4)
        part_backbones(videos, a.backbones, a.crops, n, a.batch_clips, device, a.precision, a.download)


if __name__ == "__main__":
    main()
