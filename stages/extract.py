"""Extract stage: decode each video in chunks and turn every 16-frame clip into crop features.

Clip i covers frames ``[16 i, 16 i + 16)``: non-overlapping 16-frame windows, as the public features
(RTFM issue 2; UR-DMU ``feature_extract/i3d_extract.py``). A trailing partial clip is padded by repeating
the last frame (``extract.partial_clip=pad``, as RTFM issue 53 and UR-DMU's extractor do) or dropped
(``drop``).
Per video it stores ``features`` ``[T, C, D]`` (float32, or float16 with ``extract.feature_dtype``)
and metadata: fps, frame count, each clip's real frame range ``[start, end)``, crop order, extractor
and weights checksum, so that evaluation maps clip scores to frames without guessing.

The streaming itself (decode thread, batching, preprocessing on the device) is
:mod:`extractors.stream`, which ``pipeline score`` uses too.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from pipeline.core.manifest import VideoRecord
from extractors.stream import extract_video
from pipeline.core.errors import StageError
from pipeline.core.precision import autocast
from pipeline.core.runner import resolve_device
from pipeline.core.stage import Context, Stage
from pipeline.core.store import StageDir

log = logging.getLogger(__name__)

#: settings added after the first version of this stage whose defaults reproduce its features
#: exactly; at these values they are left out of the cache key, so earlier feature caches stay valid
_NEUTRAL_DEFAULTS = {
    "extract.target_fps": 0.0, "extract.precision": "fp32", "extract.feature_dtype": "float32", "extract.modality": "rgb",
    "extract.resize_round": "round", "extract.preset": "default",
}


class ExtractStage(Stage):
    name = "extract"
    version = 1
    reads = (
        "extract.preset",
        "extract.backbone",
        "extract.clip_len",
        "extract.crops",
        "extract.crop_order",
        "extract.partial_clip",
        "extract.resize_dtype",
        "extract.resize_round",
        "extract.target_fps",
        "extract.precision",
        "extract.feature_dtype",
        "extract.modality",
        "data.folder_fps",
    )
    manifest_columns = ("id", "path")
    shard_by_frames = True  # under torchrun, balance ranks by frames: a video's cost grows with its length

    def __init__(self) -> None:
        self.extractor: Any = None
        self.importer: Any = None
        self.flow_extractor: Any = None
        self.decode_pool: Any = None  # extractors.decode_pool.DecodePool with extract.decode_workers > 1

    def upstream_for(self, cfg: Any) -> tuple[str, ...]:
        """The flow stage when ``extract.modality`` includes flow (stages/flow.py)."""
        return ("flow",) if cfg.extract.modality != "rgb" and not cfg.extract.import_format else ()

    def config_inputs(self, cfg: Any) -> dict[str, Any]:
        if cfg.extract.import_format:  # imported features depend only on where they come from
            return {
                "extract.import_format": cfg.extract.import_format,
                "extract.import_root": str(Path(cfg.extract.import_root).resolve()),
                "extract.clip_len": cfg.extract.clip_len,
            }
        out = super().config_inputs(cfg)
        for name, neutral in _NEUTRAL_DEFAULTS.items():
            if out.get(name) == neutral:
                del out[name]
        if cfg.extract.crops == "10":
            # flipped crops are the crops of the mirrored frame, as torchvision's TenCrop cuts them;
            # earlier versions mirrored each crop in place (extractors/transforms.py), so 10-crop
            # features of that order get a key of their own and are never reused
            out["extract.flipped_crops"] = "crops_of_mirrored_frame"
        return out

    def item_identity(self, ctx: Context, video: VideoRecord) -> dict[str, Any]:
        """The video's path and file fingerprint; with ``extract.import_format`` also its id, by which
        the imported feature file is found under ``extract.import_root`` (stages/feature_import.py)."""
        out = super().item_identity(ctx, video)
        if ctx.cfg.extract.import_format:
            out["id"] = video.id
        return out

    def extra_inputs(self, ctx: Context) -> dict[str, Any]:
        if ctx.cfg.extract.import_format:
            return {}
        from extractors import EXTRACTORS

        cls = EXTRACTORS.get_class(ctx.cfg.extract.backbone)
        out = {}
        if ctx.cfg.extract.modality != "flow":
            out["weights_sha256"] = cls.expected_checksum(ctx.cfg.extract.weights or None)
            out.update(cls.key_inputs(ctx.cfg.extract))
        if ctx.cfg.extract.modality != "rgb":
            from stages.flow import flow_weights_checksum

            out["flow_weights_sha256"] = flow_weights_checksum(ctx.cfg.extract)
        if ctx.cfg.extract.encoder:  # MIST's fine-tuned encoder: new features under a new key
            out["encoder_sha256"] = encoder_checksum(ctx.cfg.extract.encoder)
        return out

    def prepare(self, ctx: Context, out: StageDir) -> None:
        cfg = ctx.cfg.extract
        if cfg.import_format:
            if self.importer is None:
                from stages.feature_import import FeatureImporter

                self.importer = FeatureImporter(cfg.import_format, cfg.import_root, cfg.clip_len)
            return
        if self.extractor is None:
            from extractors.build import build_extractor

            cfg = ctx.cfg.extract
            device = resolve_device(cfg.device)
            try:
                autocast(torch.device(device), cfg.precision)
            except ValueError as exc:
                raise StageError(str(exc)) from None
            if cfg.modality != "rgb":  # the flow stream (stages/flow.py)
                from stages.flow import build_flow_extractor

                self.flow_extractor = build_flow_extractor(cfg, device)
                if cfg.modality == "flow":
                    self.extractor = self.flow_extractor  # no RGB network to load
                    return
            self.extractor = build_extractor(cfg, device)
            if cfg.encoder:
                from extractors.sga import SGAExtractor

                self.extractor = SGAExtractor(self.extractor, cfg.encoder)

    def prefetch(self, ctx: Context, videos: list[VideoRecord]) -> None:
        """With more than one decode worker (``extract.decode_workers``), start decoding ``videos`` in
        worker processes (:mod:`extractors.decode_pool`); the RGB path only."""
        cfg = ctx.cfg.extract
        if cfg.import_format or cfg.modality != "rgb" or not videos:
            return
        from extractors.decode_pool import DecodePool, DecodeSettings, default_workers

        device = str(self.extractor.device) if self.extractor is not None else resolve_device(cfg.device)
        workers = cfg.decode_workers or default_workers(device)
        if workers <= 1:
            return
        if self.decode_pool is None:
            self.decode_pool = DecodePool(workers, DecodeSettings.from_config(ctx.cfg), pin_memory=device.startswith("cuda"))
            log.info("extract: %d decode workers", workers)
        self.decode_pool.submit([(v.id, str(ctx.manifest.resolve(v))) for v in videos])

    def release(self) -> None:
        # the network, its weights on the device and, through _INPUT_BUFFERS' weak key, its input
        # buffer (770 MB for 8 clips of 10 crops) go before training starts; the decode workers stop
        if self.decode_pool is not None:
            self.decode_pool.close()
        self.extractor = self.importer = self.flow_extractor = self.decode_pool = None

    def process(self, ctx: Context, video: VideoRecord, out: StageDir, inputs: dict[str, StageDir]) -> None:
        if self.importer is not None:
            feats, meta = self.importer.load(video, ctx.manifest.resolve(video))
        elif ctx.cfg.extract.modality != "rgb":
            from stages.flow import extract_with_flow

            feats, meta = extract_with_flow(ctx, self.extractor, self.flow_extractor, video, inputs["flow"])
        else:
            feats, meta = self._extract_rgb(ctx, video)
        out.save_item(video.id, {"features": feats}, meta)

    def _extract_rgb(self, ctx: Context, video: VideoRecord) -> tuple[Any, dict[str, Any]]:
        """``extract_video``, from the decode pool's workers when there is one; a video they could not
        decode is decoded here instead (which gives the one-worker path's result or error)."""
        path = ctx.manifest.resolve(video)
        if self.decode_pool is None or video.id not in self.decode_pool:
            return extract_video(ctx, self.extractor, path)
        from extractors.decode_pool import DecodeFallback

        try:
            return extract_video(ctx, self.extractor, path, decoded=self.decode_pool.take(video.id))
        except DecodeFallback as e:
            log.debug("%s: decoding in this process: %s", path, e)
            return extract_video(ctx, self.extractor, path)


def encoder_checksum(path: str) -> str:
    """sha256 of a fine-tuned encoder file (``extract.encoder``); a missing file is a StageError."""
    from pipeline.core.store import sha256_file

    p = Path(path).expanduser()
    if not p.is_file():
        raise StageError(f"extract: {p}: encoder file not found (extract.encoder)")
    return sha256_file(p)
