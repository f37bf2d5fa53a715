"""Extract stage: decode each video in chunks and turn every 16-frame clip into crop features.

Clip i covers frames ``[16 i, 16 i + 16)`` (PROTOCOLS.md, 'Features and clips'). A trailing partial
clip is padded by repeating the last frame (``extract.partial_clip=pad``) or dropped (``drop``).
Per video it stores ``features`` ``[T, C, D]`` float32 and metadata: fps, frame count, each clip's
real frame range ``[start, end)``, crop order, extractor and weights checksum, so that evaluation
maps clip scores to frames without guessing.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from pipeline.manifest import VideoRecord
from pipeline.runner import Context, Stage, StageDir, resolve_device

log = logging.getLogger(__name__)


class ExtractStage(Stage):
    name = "extract"
    version = 1
    reads = (
        "extract.extractor",
        "extract.clip_len",
        "extract.crops",
        "extract.crop_order",
        "extract.partial_clip",
        "data.folder_fps",
    )
    manifest_columns = ("id", "path")

    def __init__(self) -> None:
        self.extractor: Any = None

    def extra_inputs(self, ctx: Context) -> dict[str, Any]:
        from extractors import EXTRACTORS

        cls = EXTRACTORS.get_class(ctx.cfg.extract.extractor)
        return {"weights_sha256": cls.expected_checksum(ctx.cfg.extract.weights or None)}

    def prepare(self, ctx: Context, out: StageDir) -> None:
        if self.extractor is None:
            from extractors import EXTRACTORS

            cfg = ctx.cfg.extract
            self.extractor = EXTRACTORS.get(
                cfg.extractor, weights=cfg.weights or None, device=resolve_device(cfg.device)
            )

    def process(self, ctx: Context, video: VideoRecord, out: StageDir, inputs: dict[str, StageDir]) -> None:
        feats, meta = extract_video(ctx, self.extractor, ctx.manifest.resolve(video))
        out.save_item(video.id, {"features": feats}, meta)


def extract_video(ctx: Context, extractor: Any, path: Any) -> tuple[np.ndarray, dict[str, Any]]:
    """Features of one video: ``[T, C, D]`` float32 and its metadata (see module docstring)."""
    from extractors.transforms import crop_names, resize_frames, spatial_crops
    from pipeline.video import VideoDecodeError, open_video

    cfg = ctx.cfg.extract
    clip_len = cfg.clip_len
    src = open_video(path, folder_fps=ctx.cfg.data.folder_fps)
    names = crop_names(cfg.crops, cfg.crop_order)

    pending: list[np.ndarray] = []  # frames not yet in a full clip (< clip_len)
    batch: list[torch.Tensor] = []  # preprocessed clips waiting for a forward pass
    outputs: list[np.ndarray] = []
    ranges: list[list[int]] = []
    n_frames = 0

    def preprocess(frames: np.ndarray) -> torch.Tensor:
        x = resize_frames(torch.from_numpy(frames), extractor.resize)  # [T, 3, h, w]
        c = spatial_crops(x, extractor.crop_size, cfg.crops, cfg.crop_order)  # [C, T, 3, s, s]
        return c.permute(0, 2, 1, 3, 4)  # [C, 3, T, s, s]

    def flush() -> None:
        if not batch:
            return
        x = torch.cat(batch)  # [B*C, 3, T, s, s]
        x = extractor.normalize(x.to(extractor.device, non_blocking=True))
        f = extractor.features(x).float().cpu().numpy()
        outputs.append(f.reshape(len(batch), len(names), -1))
        batch.clear()

    for start, frames in src.iter_chunks(cfg.chunk_frames):
        if start != n_frames:
            raise VideoDecodeError(f"{path}: decoder skipped frames {n_frames}..{start - 1}")
        n_frames += len(frames)
        pending.extend(frames)
        while len(pending) >= clip_len:
            clip = np.stack(pending[:clip_len])
            del pending[:clip_len]
            s = len(ranges) * clip_len
            ranges.append([s, s + clip_len])
            batch.append(preprocess(clip))
            if len(batch) >= cfg.batch_clips:
                flush()
    if pending and cfg.partial_clip == "pad":
        clip = np.stack(pending + [pending[-1]] * (clip_len - len(pending)))
        s = len(ranges) * clip_len
        ranges.append([s, s + len(pending)])
        batch.append(preprocess(clip))
    flush()
    if not ranges:
        raise VideoDecodeError(
            f"{path}: {n_frames} frames is shorter than one {clip_len}-frame clip "
            f"(extract.partial_clip={cfg.partial_clip})"
        )
    feats = np.concatenate(outputs).astype(np.float32)
    if not np.isfinite(feats).all():
        raise ValueError(f"{path}: the extractor produced non-finite features")
    meta = {
        "n_frames": n_frames,
        "fps": src.fps,
        "height": src.height,
        "width": src.width,
        "clip_len": clip_len,
        "clip_ranges": ranges,
        "crops": names,
        "crop_setting": cfg.crops,
        "extractor": extractor.registry_name,
        "weights_sha256": extractor.weights_checksum,
        "feature_dim": int(feats.shape[-1]),
    }
    return feats, meta
