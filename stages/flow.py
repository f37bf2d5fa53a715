"""Flow stage: TV-L1 optical flow per video, cached, for the I3D flow stream (``extract.modality``).

Why a stage of its own, upstream of extract (rather than flow computed inside extract): TV-L1 is by
far the most expensive step of a flow pipeline (OpenCV's CPU TV-L1 runs at about 2 frame pairs/s at
320x240 here), and its result depends only on the videos and the TV-L1 settings (``flow.*``), not
on the network, crops or precision. Cached under its own key, it is computed once and reused when
the crops, the backbone, the flow-stream weights or the modality change; a killed run resumes video
by video like every stage. The stage runs only when ``extract.modality`` includes flow (it is
``optional``; extract names it upstream then).

Per video it stores ``flow`` ``[N - 1, h, w, 2]`` for N decoded frames: flow ``t`` maps frame ``t``
to frame ``t + 1`` (pixels, ``(dx, dy)``), resized with its vectors scaled to the RGB path's size
(short side ``flow.short_side`` = 256, :func:`extractors.flow.resize_flow`) and quantised
(``flow.storage``: uint8 over [-20, 20], denseflow's convention, or float16; the network clips at
+-20 anyway). A 320x240 video stores 341x256x2 bytes = 175 kB per frame in uint8 (float16 twice
that); UCF-Crime's 13.8 M frames would take about 2.4 TB in uint8. The array is written chunk by
chunk (``flow.chunk_frames`` frames decoded at a time) into a temporary ``.npy`` that is renamed
into place, so memory does not grow with the video's length and a killed write leaves nothing.

Clip alignment (used by the extract stage, :func:`flow_clip_indices`): clip i covers frames
``[16 i, 16 i + 16)`` as for RGB, and its flow clip is the 16 flow fields ``16 i .. 16 i + 15``,
i.e. the flow between consecutive frames of ``16 i .. 16 i + 16`` (17 frames), the convention of
the feature extractors the WS-VAD flow features come from (I3D's flow input has one field per RGB
frame; v-iashin/video_features stacks 16 + 1 frames per flow clip). AR-Net (Wan et al. 2020, Sec. 2.1
and 3) says only that each 16-frame clip's flow frames come from TV-L1 and that the RGB and flow
features are concatenated (Table 3: 91.24 % AUC on ShanghaiTech); RTFM uses RGB only (RTFM paper
Sec. 4.2 and Tables 1-3: I3D-RGB). The video's last frame has no
successor: where a clip would need flow ``N - 1`` the last field ``N - 2`` is repeated, and a padded
partial clip is filled with its own fields as the RGB clip is with its frames (``extract.partial_clip``,
:mod:`extractors.clip_rules`).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Iterator

import numpy as np
import torch

from pipeline.core.manifest import VideoRecord
from extractors.clip_rules import clip_ranges, fill_order
from extractors.stream import extract_video
from pipeline.core.errors import CorruptArtifact, StageError
from pipeline.core.precision import autocast
from pipeline.core.runner import resolve_device
from pipeline.core.stage import Context, Stage
from pipeline.core.store import StageDir

log = logging.getLogger(__name__)

#: bytes reserved for a streamed ``.npy`` header (the shape is only known at the end)
_NPY_HEADER_BYTES = 128


class FlowStage(Stage):
    name = "flow"
    version = 1
    reads = ("flow", "data.folder_fps")
    manifest_columns = ("id", "path")
    optional = True  # runs when extract reads it (extract.modality with flow)
    shard_by_frames = True  # under torchrun, balance ranks by frames: TV-L1's cost grows with length

    def __init__(self) -> None:
        self.method: Any = None

    def prepare(self, ctx: Context, out: StageDir) -> None:
        if self.method is None:
            from extractors.flow import flow_params_from_config, get_flow_method

            cfg = ctx.cfg.flow
            self.method = get_flow_method(
                cfg.method, flow_params_from_config(cfg), resolve_device(cfg.device), cfg.batch_pairs, cfg.compile
            )

    def process(self, ctx: Context, video: VideoRecord, out: StageDir, inputs: dict[str, StageDir]) -> None:
        compute_video_flow(ctx, self.method, ctx.manifest.resolve(video), out, video.id)


# --------------------------------------------------------------------------------------------------
# Writing: a video's flow, streamed into one .npy


def compute_video_flow(ctx: Any, method: Any, path: Any, out: StageDir, vid: str) -> dict[str, Any]:
    """Decode ``path`` in chunks, compute TV-L1 between consecutive frames, store the flow item of
    ``vid`` (see the module docstring); returns its metadata.

    Raises:
        VideoDecodeError: unreadable video, skipped frames, or fewer than 2 frames.
    """
    from extractors.flow import iter_flow, network_size, quantize_flow, resize_flow
    from pipeline.core.video import VideoDecodeError, open_video

    cfg = ctx.cfg.flow
    src = open_video(path, folder_fps=ctx.cfg.data.folder_fps)
    size = network_size(src.height, src.width, cfg.short_side)
    store = np.dtype(cfg.storage)
    decoded = {"frames": 0}
    t0 = time.perf_counter()

    def chunks() -> Iterator[np.ndarray]:
        for start, frames in src.iter_chunks(cfg.chunk_frames):
            if start != decoded["frames"]:
                raise VideoDecodeError(f"{path}: decoder skipped frames {decoded['frames']}..{start - 1}")
            decoded["frames"] += len(frames)
            yield frames

    def blocks() -> Iterator[np.ndarray]:
        for flow in iter_flow(chunks(), method):
            yield quantize_flow(resize_flow(torch.from_numpy(flow), size), cfg.storage)

    try:
        entry = out.save_streamed(vid, "flow", (*size, 2), store, blocks())
    finally:
        src.close()
    if decoded["frames"] < 2:
        out.drop_item(vid)
        raise VideoDecodeError(f"{path}: {decoded['frames']} frame(s); optical flow needs at least 2")
    seconds = time.perf_counter() - t0
    meta = {
        "n_frames": decoded["frames"],
        "fps": src.fps,
        "height": src.height,
        "width": src.width,
        "flow_height": size[0],
        "flow_width": size[1],
        "storage": cfg.storage,
        "method": cfg.method,
        "seconds": round(seconds, 3),
        "pairs_per_s": round((decoded["frames"] - 1) / max(seconds, 1e-9), 3),
    }
    out.finish_item(vid, meta, {"flow": entry})
    return meta


def load_flow(flow_dir: StageDir, vid: str) -> tuple[dict[str, Any], np.ndarray]:
    """A cached flow item: metadata and the stored array, memory-mapped ``[N - 1, h, w, 2]``
    (uint8 or float16; :func:`extractors.flow.dequantize_flow` gives pixels). Its size is checked
    against the record (:meth:`StageDir.load_mapped`); the sha256 is not re-read (that would read
    the whole file)."""
    meta, arr = flow_dir.load_mapped(vid, "flow")
    if arr.shape[0] != meta["n_frames"] - 1:
        path = flow_dir.item_file(vid, "flow")
        raise CorruptArtifact(f"{path}: {arr.shape[0]} flow fields for {meta['n_frames']} frames", path)
    return meta, arr


# --------------------------------------------------------------------------------------------------
# Reading: flow clips through the flow stream (the extract stage, extract.modality)


def flow_clip_indices(start: int, end: int, clip_len: int, n_flow: int, partial_clip: str = "pad") -> list[int]:
    """Flow fields of the clip of frames ``[start, end)`` (module docstring): ``start .. start +
    clip_len - 1``; a partial clip's missing fields follow ``partial_clip`` as its RGB frames do (the
    last real field repeated, or the clip's own fields cycled: :func:`extractors.clip_rules.fill_order`),
    each capped at the last field ``n_flow - 1`` (the video's last frame has no successor)."""
    order = fill_order(end - start, clip_len, partial_clip)
    return [min(start + j, n_flow - 1) for j in order]


def iter_flow_clip_features(
    ctx: Any, extractor: Any, stored: np.ndarray, n_frames: int, where: str
) -> Iterator[tuple[tuple[int, int], np.ndarray]]:
    """``(clip range, features [C, D] float32)`` per clip of the stored flow, ``extract.batch_clips``
    clips per forward pass; reads only the batch's flow fields from the memory map."""
    from extractors.flow import dequantize_flow, preprocess_flow_clips

    cfg = ctx.cfg.extract
    device = torch.device(extractor.device)
    ranges = clip_ranges(n_frames, cfg.clip_len, cfg.partial_clip)
    if not ranges:
        raise ValueError(f"{where}: {n_frames} frames is shorter than one {cfg.clip_len}-frame clip "
                         f"(extract.partial_clip={cfg.partial_clip})")
    with torch.inference_mode():
        for b0 in range(0, len(ranges), cfg.batch_clips):
            batch = ranges[b0 : b0 + cfg.batch_clips]
            idx = np.array([flow_clip_indices(a, b, cfg.clip_len, len(stored), cfg.partial_clip) for a, b in batch])
            clips = dequantize_flow(np.asarray(stored[idx.reshape(-1)])).to(device)
            clips = clips.view(len(batch), cfg.clip_len, *clips.shape[1:])
            x = preprocess_flow_clips(clips, extractor.crop_size, cfg.crops, cfg.crop_order)
            with autocast(device, cfg.precision):
                feats = extractor.features(x).float().cpu().numpy()
            feats = feats.reshape(len(batch), -1, feats.shape[-1])
            if not np.isfinite(feats).all():
                raise ValueError(f"{where}: the flow stream produced non-finite features")
            yield from zip(batch, feats)


def build_flow_extractor(cfg: Any, device: str) -> Any:
    """The flow stream of ``extract.backbone`` (``<backbone>_flow``) with ``extract.flow_weights``."""
    from extractors import EXTRACTORS
    from pipeline.core.registry import RegistryError

    name = f"{cfg.backbone}_flow"
    try:
        return EXTRACTORS.get(name, weights=cfg.flow_weights or None, device=device)
    except RegistryError:
        raise StageError(f"extract: backbone {cfg.backbone!r} has no flow stream ({name!r} is not registered); "
                         "extract.modality=rgb, or a backbone with one (i3d_inception, resnet50_i3d)") from None
    except NotImplementedError as e:
        raise StageError(f"extract: {e}") from None


def flow_weights_checksum(cfg: Any) -> str:
    """sha256 of the flow-stream weights a run will use (for the extract stage's key)."""
    from extractors import EXTRACTORS
    from pipeline.core.registry import RegistryError

    try:
        cls = EXTRACTORS.get_class(f"{cfg.backbone}_flow")
        return cls.expected_checksum(cfg.flow_weights or None)
    except RegistryError:
        raise StageError(f"extract: backbone {cfg.backbone!r} has no flow stream; use extract.modality=rgb") from None
    except NotImplementedError as e:
        raise StageError(f"extract: {e}") from None


def extract_with_flow(
    ctx: Any, rgb_extractor: Any, flow_extractor: Any, video: VideoRecord, flow_dir: StageDir
) -> tuple[np.ndarray, dict[str, Any]]:
    """Features of one video for ``extract.modality`` ``flow`` or ``rgb+flow``: ``[T, C, D]`` (D the
    flow stream's, or RGB's + flow's concatenated per clip and crop, RGB first) and the extract
    stage's metadata."""
    from extractors.transforms import crop_names

    cfg = ctx.cfg.extract
    path = ctx.manifest.resolve(video)
    flow_meta, stored = load_flow(flow_dir, video.id)
    ranges, feats = [], []
    for rng, f in iter_flow_clip_features(ctx, flow_extractor, stored, flow_meta["n_frames"], str(path)):
        ranges.append(list(rng))
        feats.append(f)
    flow_feats = np.stack(feats)
    if cfg.modality == "rgb+flow":
        rgb_feats, meta = extract_video(ctx, rgb_extractor, path)
        if meta["clip_ranges"] != ranges:
            raise ValueError(f"{path}: RGB clips {len(meta['clip_ranges'])} and flow clips {len(ranges)} differ "
                             f"(decoded {meta['n_frames']} frames now, {flow_meta['n_frames']} for the cached flow)")
        out = np.concatenate([rgb_feats.astype(np.float32), flow_feats], axis=-1)
        meta["extractor"] = f"{rgb_extractor.registry_name}+{flow_extractor.registry_name}"
    else:
        out = flow_feats
        meta = {
            "n_frames": flow_meta["n_frames"], "fps": flow_meta["fps"], "height": flow_meta["height"],
            "width": flow_meta["width"], "clip_len": cfg.clip_len, "clip_ranges": ranges, "target_fps": None,
            "clip_fps": flow_meta["fps"], "n_frames_resampled": flow_meta["n_frames"], "frame_selection": "all frames",
            "crops": crop_names(cfg.crops, cfg.crop_order), "crop_setting": cfg.crops,
            "crop_order": cfg.crop_order, "partial_clip": cfg.partial_clip, "preset": cfg.preset,
            "extractor": flow_extractor.registry_name, "weights_sha256": flow_extractor.weights_checksum,
            "precision": cfg.precision,
        }
    out = out.astype(cfg.feature_dtype)
    meta.update(
        modality=cfg.modality, flow_weights_sha256=flow_extractor.weights_checksum, flow_method=flow_meta["method"],
        flow_storage=flow_meta["storage"], feature_dim=int(out.shape[-1]), feature_dtype=str(out.dtype),
    )
    return out, meta


__all__ = [
    "FlowStage",
    "build_flow_extractor",
    "compute_video_flow",
    "extract_with_flow",
    "flow_clip_indices",
    "flow_weights_checksum",
    "iter_flow_clip_features",
    "load_flow",
]
