"""What ``extract.resize_dtype`` changes: resized values against PIL, and real features.

    python benchmarks/resize_precision.py [VIDEO ...] [--frames N] [--no-features]

Videos default to the real clips in ``../shared/data/videos``. Per video:

1. ``--frames`` frames spread over the video, short side resized to 256 (Inception-I3D's and
   ResNet-50 I3D's resize) and to C3D's fixed 128x171, four ways: PIL's bilinear ``resize`` on the
   image (what torchvision's ``Resize`` does on PIL images, the public features' pipeline), our
   ``uint8`` resize on the CPU, the two rounded float32 passes that stand in for it on CUDA, and our
   ``float32`` resize. Reported: the share of values that differ from PIL (or from the CPU uint8
   kernel) by more than 0.5 (for whole numbers: at all), the mean and the largest difference.
2. Unless ``--no-features`` or the Inception-I3D weights are not cached: the real network's centre-
   crop features of the whole video with each setting (``extractors.stream.extract_video``), compared
   clip by clip (relative L2 difference, cosine similarity).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
log = logging.getLogger("bench_resize_precision")


def pil_resize(frames: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """``[N, H, W, 3]`` uint8 -> ``[N, 3, h, w]`` float32 by PIL's bilinear resize."""
    from PIL import Image

    out = [np.asarray(Image.fromarray(f).resize((size[1], size[0]), Image.BILINEAR)) for f in frames]
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float()


def part_values(video: Path, n_frames: int) -> None:
    from extractors.transforms import _rounded_passes, resize_frames, resized_size
    from pipeline.core.video import open_video

    with open_video(video) as src:
        every = src.read_all()
    frames = np.ascontiguousarray(every[np.linspace(0, len(every) - 1, n_frames).round().astype(int)])
    del every
    h, w = frames.shape[1:3]
    t = torch.from_numpy(frames)
    for name, size in (("short side 256", resized_size(h, w, ("short", 256))), ("C3D 128x171", (128, 171))):
        pil = pil_resize(frames, size)
        u8 = resize_frames(t, ("fixed", *size), "uint8")
        f32 = resize_frames(t, ("fixed", *size), "float32")
        passes = _rounded_passes(t.permute(0, 3, 1, 2).float(), size)
        for label, a, ref in (("uint8 (CPU) vs PIL", u8, pil), ("float32 vs PIL", f32, pil),
                              ("uint8 (CUDA passes) vs PIL", passes, pil), ("uint8 (CUDA passes) vs CPU uint8", passes, u8)):
            d = (a - ref).abs()
            log.info("| %s | %s | %s | %.2f %% | %.4f | %.3f |", video.name, name, label,
                     100 * float((d > 0.5).float().mean()), float(d.mean()), float(d.max()))


def part_features(video: Path) -> None:
    from extractors import EXTRACTORS
    from extractors.i3d_inception import I3D_K400_RGB
    from extractors.weights import cached_weights_path
    from stages.config import build_config
    from extractors.stream import extract_video

    path = cached_weights_path(I3D_K400_RGB)
    if not path.is_file():
        log.info("| %s | skipped: Inception-I3D weights not cached | | |", video.name)
        return
    ex = EXTRACTORS.get("i3d_inception", weights=str(path), device="cpu")
    feats = {}
    for dtype in ("uint8", "float32"):
        feats[dtype], _ = extract_video(build_config(sets=["extract.crops=center", f"extract.resize_dtype={dtype}"]),
                                        ex, video)
    a = feats["uint8"].reshape(len(feats["uint8"]), -1)
    b = feats["float32"].reshape(len(feats["float32"]), -1)
    rel = np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    log.info("| %s | %d | %.2f %% (max %.2f %%) | %.6f |", video.name, len(a), 100 * rel.mean(), 100 * rel.max(), cos.min())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("videos", nargs="*", type=Path)
    p.add_argument("--frames", type=int, default=16, help="frames per video for the value comparison")
    p.add_argument("--no-features", action="store_true", help="skip the real-network comparison")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    videos = a.videos or sorted((ROOT.parent / "shared" / "data" / "videos").glob("*.mp4"))
    if not videos:
        raise SystemExit("no videos given and none in ../shared/data/videos")
    log.info("## Resized values, %d frames per video\n", a.frames)
    # "off by more than 0.5": for whole numbers, any difference; for float32, a different value
    # once rounded
    log.info("| video | resize | comparison | values off by more than 0.5 | mean difference | largest |")
    log.info("|---|---|---|---|---|---|")
    for v in videos:
        part_values(v, a.frames)
    if not a.no_features:
        log.info("\n## Inception-I3D centre-crop features, uint8 against float32 resizing\n")
        log.info("| video | clips | relative L2 difference, mean | cosine similarity, min |")
        log.info("|---|---|---|---|")
        for v in videos:
            part_features(v)


if __name__ == "__main__":
    main()
