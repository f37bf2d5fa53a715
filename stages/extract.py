"""Extract stage: decode each video in chunks and turn every 16-frame clip into crop features.

Clip i covers frames ``[16 i, 16 i + 16)`` (PROTOCOLS.md, 'Features and clips'). A trailing partial
clip is padded by repeating the last frame (``extract.partial_clip=pad``) or dropped (``drop``).
Per video it stores ``features`` ``[T, C, D]`` float32 and metadata: fps, frame count, each clip's
real frame range ``[start, end)``, crop order, extractor and weights checksum, so that evaluation
maps clip scores to frames without guessing.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from pipeline.manifest import VideoRecord
from pipeline.runner import Context, Stage, StageDir, resolve_device

log = logging.getLogger(__name__)


class ExtractStage(Stage):
    name = "extract"
    version = 1
    reads = (
        "extract.backbone",
        "extract.clip_len",
        "extract.crops",
        "extract.crop_order",
        "extract.partial_clip",
        "data.folder_fps",
    )
    manifest_columns = ("id", "path")

    def __init__(self) -> None:
        self.extractor: Any = None
        self.importer: Any = None

    def config_inputs(self, cfg: Any) -> dict[str, Any]:
        if cfg.extract.import_format:  # imported features depend only on where they come from
            return {
                "extract.import_format": cfg.extract.import_format,
                "extract.import_root": str(Path(cfg.extract.import_root).resolve()),
                "extract.clip_len": cfg.extract.clip_len,
            }
        return super().config_inputs(cfg)

    def extra_inputs(self, ctx: Context) -> dict[str, Any]:
        if ctx.cfg.extract.import_format:
            return {}
        from extractors import EXTRACTORS

        cls = EXTRACTORS.get_class(ctx.cfg.extract.backbone)
        return {"weights_sha256": cls.expected_checksum(ctx.cfg.extract.weights or None)}

    def prepare(self, ctx: Context, out: StageDir) -> None:
        cfg = ctx.cfg.extract
        if cfg.import_format:
            if self.importer is None:
                from stages.feature_import import FeatureImporter

                self.importer = FeatureImporter(cfg.import_format, cfg.import_root, cfg.clip_len)
            return
        if self.extractor is None:
            from extractors import EXTRACTORS

            cfg = ctx.cfg.extract
            self.extractor = EXTRACTORS.get(
                cfg.backbone, weights=cfg.weights or None, device=resolve_device(cfg.device)
            )

    def process(self, ctx: Context, video: VideoRecord, out: StageDir, inputs: dict[str, StageDir]) -> None:
        if self.importer is not None:
            feats, meta = self.importer.load(video, ctx.manifest.resolve(video))
        else:
            feats, meta = extract_video(ctx, self.extractor, ctx.manifest.resolve(video))
        out.save_item(video.id, {"features": feats}, meta)


def _settings(ctx_or_cfg: Any) -> Any:
    """A :class:`RunConfig` from a Context or a RunConfig."""
    return getattr(ctx_or_cfg, "cfg", ctx_or_cfg)


def iter_clip_features(
    ctx_or_cfg: Any,
    extractor: Any,
    path: Any,
    info: dict[str, Any] | None = None,
    batch_clips: int | None = None,
    chunk_frames: int | None = None,
) -> Iterator[tuple[int, tuple[int, int], np.ndarray]]:
    """Decode ``path`` in chunks and yield each clip's features as soon as its batch is computed.

    Args:
        ctx_or_cfg: a :class:`Context` or a ``RunConfig``; reads ``extract.*`` and ``data.folder_fps``.
        extractor: a built ``ClipExtractor``.
        path: video file or frame folder.
        info: if given, filled with ``fps``, ``height``, ``width`` and ``crops`` once the video is
            open, and ``n_frames`` once it is fully decoded.
        batch_clips, chunk_frames: override ``extract.batch_clips`` / ``extract.chunk_frames``
            (online scoring uses 1 and ``clip_len`` so that every clip comes out as soon as its
            frames are decoded). Features do not depend on either.
    Yields:
        ``(clip_index, (start, end), features)``: the clip's real frame range ``[start, end)`` (a
        padded trailing clip ends at the last real frame) and ``features`` ``[C, D]`` float32, in
        clip order.
    Raises:
        VideoDecodeError: unreadable video, skipped frames, or shorter than one clip.
        ValueError: the extractor produced non-finite features.
    """
    from extractors.transforms import crop_names, resize_frames, spatial_crops
    from pipeline.video import VideoDecodeError, open_video

    run_cfg = _settings(ctx_or_cfg)
    cfg = run_cfg.extract
    clip_len = cfg.clip_len
    batch_size = batch_clips or cfg.batch_clips
    src = open_video(path, folder_fps=run_cfg.data.folder_fps)
    names = crop_names(cfg.crops, cfg.crop_order)
    if info is not None:
        info.update(fps=src.fps, height=src.height, width=src.width, crops=names)

    pending: list[np.ndarray] = []  # frames not yet in a full clip (< clip_len)
    batch: list[torch.Tensor] = []  # preprocessed clips waiting for a forward pass
    batch_ranges: list[tuple[int, int]] = []
    n_clips = 0
    n_frames = 0

    def preprocess(frames: np.ndarray) -> torch.Tensor:
        x = resize_frames(torch.from_numpy(frames), extractor.resize)  # [T, 3, h, w]
        c = spatial_crops(x, extractor.crop_size, cfg.crops, cfg.crop_order)  # [C, T, 3, s, s]
        return c.permute(0, 2, 1, 3, 4)  # [C, 3, T, s, s]

    def flush() -> Iterator[tuple[int, tuple[int, int], np.ndarray]]:
        if not batch:
            return
        x = torch.cat(batch)  # [B*C, 3, T, s, s]
        x = extractor.normalize(x.to(extractor.device, non_blocking=True))
        f = extractor.features(x).float().cpu().numpy().reshape(len(batch), len(names), -1)
        if not np.isfinite(f).all():
            raise ValueError(f"{path}: the extractor produced non-finite features")
        first = n_clips - len(batch)
        done = list(zip(batch_ranges, f))
        batch.clear()
        batch_ranges.clear()
        for j, (rng, feats) in enumerate(done):
            yield first + j, rng, feats.astype(np.float32)

    def add(clip: np.ndarray, n_real: int) -> None:
        nonlocal n_clips
        s = n_clips * clip_len
        batch_ranges.append((s, s + n_real))
        batch.append(preprocess(clip))
        n_clips += 1

    for start, frames in src.iter_chunks(chunk_frames or cfg.chunk_frames):
        if start != n_frames:
            raise VideoDecodeError(f"{path}: decoder skipped frames {n_frames}..{start - 1}")
        n_frames += len(frames)
        pending.extend(frames)
        while len(pending) >= clip_len:
            clip = np.stack(pending[:clip_len])
            del pending[:clip_len]
            add(clip, clip_len)
            if len(batch) >= batch_size:
                yield from flush()
    if pending and cfg.partial_clip == "pad":
        add(np.stack(pending + [pending[-1]] * (clip_len - len(pending))), len(pending))
    yield from flush()
    if info is not None:
        info["n_frames"] = n_frames
    if not n_clips:
        raise VideoDecodeError(
            f"{path}: {n_frames} frames is shorter than one {clip_len}-frame clip "
            f"(extract.partial_clip={cfg.partial_clip})"
        )


def extract_video(ctx: Context, extractor: Any, path: Any) -> tuple[np.ndarray, dict[str, Any]]:
    """Features of one video: ``[T, C, D]`` float32 and its metadata (see module docstring)."""
    cfg = _settings(ctx).extract
    info: dict[str, Any] = {}
    outputs: list[np.ndarray] = []
    ranges: list[list[int]] = []
    for _, (a, b), f in iter_clip_features(ctx, extractor, path, info=info):
        outputs.append(f)
        ranges.append([a, b])
    feats = np.stack(outputs).astype(np.float32)
    meta = {
        "n_frames": info["n_frames"],
        "fps": info["fps"],
        "height": info["height"],
        "width": info["width"],
        "clip_len": cfg.clip_len,
        "clip_ranges": ranges,
        "crops": info["crops"],
        "crop_setting": cfg.crops,
        "extractor": extractor.registry_name,
        "weights_sha256": extractor.weights_checksum,
        "feature_dim": int(feats.shape[-1]),
    }
    return feats, meta
