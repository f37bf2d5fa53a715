"""Clip features of one video, streamed: decode in bounded chunks, batch clips, run the network.

Used by the extract stage (``stages/extract.py``), MIST's re-extraction and ``pipeline score``.
Clip i covers frames ``[16 i, 16 i + 16)`` (non-overlapping 16-frame windows, as the public
features: RTFM issue 2; UR-DMU ``feature_extract/i3d_extract.py``); the frames after the last full
clip follow ``extract.partial_clip`` (:mod:`extractors.clip_rules`: pad, cycle, drop or
exclude_last_frame).

The path a clip takes (:func:`iter_clip_features`):

1. A background thread (:class:`pipeline.core.video.BackgroundIterator`, ``extract.prefetch_batches``
   batches ahead) decodes the video in chunks of ``extract.chunk_frames`` frames, resamples it to
   ``extract.target_fps`` if set, cuts clips and packs ``extract.batch_clips`` of them into one
   uint8 ``[B, T, H, W, 3]`` array (pinned memory when the network is on CUDA). Decoding thus
   overlaps the network, and memory stays bounded whatever the video's length. With
   ``extract.decode_workers`` > 1 the extract stage has worker processes do this step instead, for
   upcoming videos and parts of long ones at once (:mod:`extractors.decode_pool`, ``decoded=``).
2. The consumer moves the uint8 batch to the extractor's device and there resizes it (rounded to
   whole numbers as PIL does, or unrounded: ``extract.resize_dtype``), normalises and cuts the
   crops (:func:`extractors.transforms.preprocess_clips`, equal to the per-clip CPU path value for
   value) into ``channels_last_3d`` layout, the layout that per-clip path handed the network (so
   CPU features are bit-identical to it); on CUDA the conv weights are put in that layout too
   (``extract.channels_last``).
3. The network runs under autocast when ``extract.precision`` is bf16 / fp16. On CUDA the next
   batch is launched before the previous batch's features are copied back.

Frame-rate resampling (``extract.target_fps``): output frame j is source frame
``floor(j * fps / target_fps)`` (:class:`pipeline.core.video.FrameRateResampler`); clips are cut from the
resampled frames, but every range stored or yielded is in SOURCE frames, so evaluation (ground truth
in source frames) is unchanged. With ``r = fps / target_fps`` a clip made of resampled frames
``[a, b)`` covers source frames ``[floor(a r), e)`` with ``e = max(floor((b - 1) r) + 1,
floor(b r))`` when resampled frame ``b`` exists and ``e =`` the source frame count otherwise: the
clips tile the video without gaps (a downsampled clip also covers the source frames skipped
between its frames), and when upsampling a source frame repeated across a clip boundary belongs
to both clips' ranges. Without resampling this is ``[16 i, 16 i + 16)`` exactly.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from pipeline.core.precision import autocast

log = logging.getLogger(__name__)


def _settings(ctx_or_cfg: Any) -> Any:
    """A :class:`RunConfig` from a Context or a RunConfig."""
    return getattr(ctx_or_cfg, "cfg", ctx_or_cfg)


@dataclass
class ClipBatch:
    """Clips packed by the decode thread: ``frames`` ``[B, T, H, W, 3]`` uint8 RGB (a partial clip
    filled as ``extract.partial_clip`` says), ``ranges`` each clip's source frame range, ``first`` the index of
    the first clip; ``release``, when set, hands ``frames``' memory back once the consumer is done with
    it (a decode pool's shared-memory slot, :mod:`extractors.decode_pool`) instead of the consumer's
    :class:`BufferPool`."""

    first: int
    frames: torch.Tensor
    ranges: list[tuple[int, int]]
    release: Any = None


@dataclass
class DecodeEnd:
    """The decode thread's last item: source frames decoded, frames after resampling, clips made."""

    n_frames: int
    n_resampled: int
    n_clips: int


class BufferPool:
    """uint8 batch buffers handed back and forth between the decode thread and the consumer.

    Allocating a fresh ~30 MB array per batch in the decode thread and freeing it in the consumer
    makes glibc's allocator grow the heap over a long video (its mmap threshold adapts upwards and
    the freed blocks fragment the decode thread's arena: +0.6 GB over a 5-minute 320x240 video
    here); reusing a few buffers keeps memory flat. Buffers go back to the pool only once the
    consumer is done with them (on CUDA after the batch's features have been copied back, so an
    asynchronous host-to-device copy has finished).
    """

    def __init__(self, pin_memory: bool, keep: int) -> None:
        self.pin_memory = pin_memory
        self.keep = keep
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def get(self, shape: tuple[int, ...]) -> torch.Tensor:
        """A uint8 tensor of ``shape`` (contents undefined)."""
        with self._lock:
            for i, t in enumerate(self._free):
                if tuple(t.shape) == shape:
                    return self._free.pop(i)
        return torch.empty(shape, dtype=torch.uint8, pin_memory=self.pin_memory)

    def put(self, t: torch.Tensor) -> None:
        with self._lock:
            if len(self._free) < self.keep:
                self._free.append(t)


#: seconds between two returns of freed heap memory to the OS during an extraction (see _HeapTrimmer)
HEAP_TRIM_INTERVAL_S = 0.5


#: each extractor's network-input buffer between two videos (:func:`iter_clip_features` takes it at
#: the start of a video and hands it back at the end). A 10-crop batch of 8 clips is 770 MB of float32;
#: allocating it anew per video cost the CPU path a page fault per 4 KiB written, which on the short
#: ActivityNet clips (3 batches each) was half of its preprocessing time. Taking the buffer out of the
#: map while a video runs keeps two videos extracted at once (threads or interleaved generators) from
#: sharing it; the entry goes with the extractor.
_INPUT_BUFFERS: "weakref.WeakKeyDictionary[Any, torch.Tensor]" = weakref.WeakKeyDictionary()


def _take_input_buffer(extractor: Any) -> torch.Tensor | None:
    """The buffer ``extractor``'s last video left (removed from :data:`_INPUT_BUFFERS`), or None."""
    try:
        return _INPUT_BUFFERS.pop(extractor, None)
    except TypeError:  # not weak-referenceable or not hashable: no reuse
        return None


def _keep_input_buffer(extractor: Any, buffer: torch.Tensor | None) -> None:
    """Keep ``buffer`` for ``extractor``'s next video (see :data:`_INPUT_BUFFERS`)."""
    if buffer is None:
        return
    try:
        _INPUT_BUFFERS[extractor] = buffer
    except TypeError:
        pass


def resize_spec(resize: tuple, resize_round: str = "round") -> tuple:
    """An extractor's ``resize`` with ``extract.resize_round`` applied to a short-side resize
    (:func:`extractors.transforms.resized_size`)."""
    if resize[0] == "short" and resize_round != "round":
        return ("short", resize[1], resize_round)
    return tuple(resize)


def network_input(extractor: Any, clips: torch.Tensor, crops: str, order: str, resize_dtype: str,
                  resize_round: str = "round", **layout: Any) -> torch.Tensor:
    """:func:`extractors.transforms.preprocess_clips` of uint8 ``[B, T, H, W, 3]`` clips with the
    extractor's geometry and normalisation (in place where it has ``normalize_``, after the crops
    where it is not pointwise); ``layout``: ``memory_format``, ``max_elements``, ``buffer``.
    An extractor with its own ``resize_dtype`` (a fine-tuned MIST encoder, whose recipe resizes as
    OpenCV does) overrides the run's. Returns ``[B * C, 3, T, s, s]`` float32 on the clips' device."""
    from extractors.transforms import preprocess_clips

    resize_dtype = getattr(extractor, "resize_dtype", None) or resize_dtype
    frame_mean = getattr(extractor, "frame_mean", None)  # a mean subtracted per position before cropping
    if frame_mean is not None:
        layout["frame_mean"] = frame_mean
    return preprocess_clips(
        clips, resize_spec(extractor.resize, resize_round), extractor.crop_size, crops, order,
        normalize=extractor.normalize,
        normalize_after_crop=not getattr(extractor, "pointwise_normalize", False),
        normalize_in_place=getattr(extractor, "normalize_", None),
        resize_dtype=resize_dtype, **layout,
    )


class _HeapTrimmer:
    """Calls glibc's ``malloc_trim(0)`` at most every :data:`HEAP_TRIM_INTERVAL_S` seconds.

    Long-lived small arrays (each clip's features, kept until the video is done) interleave in the
    heap with the large short-lived buffers of decoding and preprocessing, which glibc serves from
    the heap once its adaptive mmap threshold has grown; the freed holes then fragment and the
    resident memory grows with the video's length (here from 1.8 GB for 1 minute of 320x240 video
    to 10.6 GB for an hour, ``benchmarks/extract_memory.py``). ``malloc_trim`` hands the free pages
    back, which keeps resident memory flat. A no-op where the C library has no ``malloc_trim``.
    """

    def __init__(self) -> None:
        self._trim: Any = None
        self._last = 0.0
        try:
            import ctypes
            import ctypes.util

            self._trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            pass

    def __call__(self) -> None:
        now = time.monotonic()
        if self._trim is not None and now - self._last >= HEAP_TRIM_INTERVAL_S:
            self._trim(0)
            self._last = now


def clip_batches(
    src: Any,
    clip_len: int,
    batch_size: int,
    chunk_frames: int,
    partial_clip: str,
    resampler: Any,
    pool: BufferPool,
    stats: dict[str, float] | None,
    first_frame: int = 0,
) -> Iterator[ClipBatch | DecodeEnd]:
    """Decode ``src`` chunk by chunk, resample, cut clips and pack them ``batch_size`` at a time.

    Runs in the decode thread. Holds at most one decoded chunk plus the frames of one batch (views
    into the chunks) besides the packed batch it yields. Adds its own busy time (decoding + packing,
    not the time spent waiting for the consumer) to ``stats['decode_s']``.

    ``first_frame``: ``src`` yields frames from this one on (a decode-pool job over part of a video,
    :mod:`extractors.decode_pool`); a multiple of ``clip_len`` and only without resampling, so clip
    ``first_frame // clip_len`` comes first and frame counts and clip indices are the whole video's.
    """
    from extractors.clip_rules import fill_order, keeps_partial
    from pipeline.core.video import VideoDecodeError

    pending: list[np.ndarray] = []  # resampled frames not yet in a clip, views into decoded chunks
    pending_src: list[int] = []  # their source frame indices
    ready: list[tuple[list[np.ndarray], tuple[int, int]]] = []  # clips waiting to be packed
    if first_frame and (first_frame % clip_len or resampler is not None):
        raise ValueError(f"clips can start at frame {first_frame} only on a clip boundary and without resampling")
    n_src = n_out = first_frame
    n_clips = first_frame // clip_len
    # downsampling: a clip's range ends where the next resampled frame starts, so wait for it;
    # exclude_last_frame: a clip is cut only once a frame after it exists
    lookahead = 1 if (resampler is not None and resampler.ratio > 1) or partial_clip == "exclude_last_frame" else 0
    busy = 0.0

    def take(n: int, end: int) -> None:
        ready.append((pending[:n], (pending_src[0], end)))
        del pending[:n], pending_src[:n]

    def pack() -> ClipBatch:
        nonlocal n_clips
        h, w = ready[0][0][0].shape[:2]
        frames = pool.get((len(ready), clip_len, h, w, 3))
        arr = frames.numpy()
        for i, (clip, _) in enumerate(ready):
            for t, j in enumerate(fill_order(len(clip), clip_len, partial_clip)):
                arr[i, t] = clip[j]  # a partial clip's padding (extractors.clip_rules)
        out = ClipBatch(n_clips, frames, [r for _, r in ready])
        n_clips += len(ready)
        ready.clear()
        return out

    t0 = time.perf_counter()
    for start, frames in src.iter_chunks(chunk_frames):
        if start != n_src:
            raise VideoDecodeError(f"{src.path}: decoder skipped frames {n_src}..{start - 1}")
        offsets = resampler.select(start, len(frames)) if resampler is not None else range(len(frames))
        n_src += len(frames)
        for o in offsets:
            pending.append(frames[o])
            pending_src.append(start + o)
        n_out += len(offsets)
        while len(pending) >= clip_len + lookahead:
            end = pending_src[clip_len - 1] + 1
            if lookahead:
                end = max(end, pending_src[clip_len])
            take(clip_len, end)
            if len(ready) == batch_size:
                batch = pack()
                busy += time.perf_counter() - t0
                yield batch
                t0 = time.perf_counter()
    if len(pending) >= clip_len and partial_clip != "exclude_last_frame":
        take(clip_len, n_src)  # downsampling: the last full clip, no resampled frame after it
    if pending and keeps_partial(partial_clip):
        take(len(pending), n_src)
    if ready:
        batch = pack()
        busy += time.perf_counter() - t0
        yield batch
        t0 = time.perf_counter()
    busy += time.perf_counter() - t0
    if stats is not None:
        stats["decode_s"] = stats.get("decode_s", 0.0) + busy
    yield DecodeEnd(n_src, n_out, n_clips)


def iter_clip_features(
    ctx_or_cfg: Any,
    extractor: Any,
    path: Any,
    info: dict[str, Any] | None = None,
    batch_clips: int | None = None,
    chunk_frames: int | None = None,
    stats: dict[str, float] | None = None,
    decoded: Any = None,
) -> Iterator[tuple[int, tuple[int, int], np.ndarray]]:
    """Decode ``path`` in chunks and yield each clip's features as soon as its batch is computed.

    See the module docstring for the path a clip takes and for frame-rate resampling.

    Args:
        ctx_or_cfg: a :class:`Context` or a ``RunConfig``; reads ``extract.*`` and ``data.folder_fps``.
        extractor: a built ``ClipExtractor``.
        path: video file or frame folder.
        info: if given, filled with ``fps`` (the source's), ``height``, ``width``, ``crops``,
            ``target_fps`` (``None`` without resampling) and ``clip_fps`` (the rate clips are cut
            at) once the video is open, and ``n_frames`` (source frames) and ``n_frames_resampled``
            once it is fully decoded.
        batch_clips, chunk_frames: override ``extract.batch_clips`` / ``extract.chunk_frames``
            (online scoring uses 1 and ``clip_len`` so that every clip comes out as soon as its
            frames are decoded). Features do not depend on either. With one clip per batch the
            video is decoded in the calling thread, nothing ahead of the clip being computed.
        stats: if given, timings are added to it (seconds): ``decode_s`` (the decode thread's busy
            time: decoding, resampling, packing clips), ``wait_s`` (the consumer waiting for decoded
            batches), ``preprocess_s`` (transfer, resize, crops, normalisation), ``network_s``
            (forward pass and copying features back); and counts ``clips`` and ``batches``. On CUDA
            the device is synchronised after each step so that the split is exact (and the next
            batch is then not launched early).
        decoded: the video's clip batches as a decode pool delivers them
            (:meth:`extractors.decode_pool.DecodePool.take`: decoded and packed by worker processes
            with this run's settings, in clip order); ``path`` is then not opened here, and
            ``chunk_frames`` / ``batch_clips`` are the pool's.
    Yields:
        ``(clip_index, (start, end), features)``: the clip's real SOURCE frame range ``[start, end)``
        (a padded trailing clip ends at the last real frame) and ``features`` ``[C, D]`` float32
        (with ``extract.feature_dtype=float16``, values already rounded to float16, as stored), in
        clip order.
    Raises:
        VideoDecodeError: unreadable video, skipped frames, or shorter than one clip; raised in the
            caller's thread whichever thread decoded.
        extractors.decode_pool.DecodeFallback: ``decoded``'s worker could not decode the video (the
            caller then decodes it itself); DecodeWorkerCrashed: a worker died decoding it.
        ValueError: the extractor produced non-finite features (or ones float16 cannot hold), or a
            precision the device does not support.
    """
    from extractors.transforms import RESIZE_MAX_ELEMENTS, RESIZE_MAX_ELEMENTS_CUDA, crop_names
    from pipeline.core.video import BackgroundIterator, FrameRateResampler, VideoDecodeError, open_video

    run_cfg = _settings(ctx_or_cfg)
    cfg = run_cfg.extract
    clip_len = cfg.clip_len
    batch_size = batch_clips or cfg.batch_clips
    device = torch.device(extractor.device)
    amp = autocast(device, cfg.precision)  # refuse an unsupported precision before decoding
    memory_format = torch.channels_last_3d if cfg.channels_last else torch.contiguous_format
    if device.type == "cuda" and cfg.channels_last:
        getattr(extractor, "set_memory_format", lambda fmt: None)(memory_format)
    store_dtype = np.dtype(cfg.feature_dtype)
    max_elements = RESIZE_MAX_ELEMENTS_CUDA if device.type == "cuda" else RESIZE_MAX_ELEMENTS

    # a pool's video has the source's fps / height / width / num_frames and close(), and is itself
    # the iterator of packed batches
    src = decoded if decoded is not None else open_video(path, folder_fps=run_cfg.data.folder_fps)
    resampler = None
    if cfg.target_fps > 0:
        resampler = FrameRateResampler(src.fps, cfg.target_fps)
        if resampler.ratio * clip_len < 1:
            src.close()
            raise ValueError(f"{path}: extract.target_fps={cfg.target_fps:g} is more than {clip_len} times the "
                             f"video's {src.fps:g} fps: a clip would span less than one source frame")
    # an extractor with its own test-time input (MIST's fine-tuned encoder, extractors.sga) overrides extract.crops
    crops = getattr(extractor, "input_crops", None) or cfg.crops
    names = crop_names(crops, cfg.crop_order)
    if info is not None:
        # n_frames_reported: the container's (or folder listing's) count, known before decoding, for
        # progress bars; n_frames, set at the end, is what was decoded
        info.update(fps=src.fps, height=src.height, width=src.width, crops=names, crop_setting=crops,
                    target_fps=cfg.target_fps or None, clip_fps=cfg.target_fps or src.fps,
                    n_frames_reported=src.num_frames)

    pool = BufferPool(pin_memory=device.type == "cuda", keep=cfg.prefetch_batches + 2)
    trim_heap = _HeapTrimmer()
    batches: Any = decoded
    if decoded is None:
        producer = clip_batches(src, clip_len, batch_size, chunk_frames or cfg.chunk_frames, cfg.partial_clip,
                                resampler, pool, stats)
        # one clip per batch is online scoring's latency mode: each clip comes out before any later frame
        # is read, as a live source requires, so nothing is decoded ahead
        threaded = cfg.prefetch_batches > 0 and batch_size > 1
        batches = (
            BackgroundIterator(producer, depth=cfg.prefetch_batches, name=f"wsvad-decode:{Path(str(path)).name}")
            if threaded else producer
        )
    timed = stats is not None
    sync = torch.cuda.synchronize if timed and device.type == "cuda" else (lambda: None)
    # on CUDA, launch batch k + 1 before copying batch k's features back (not in per-clip latency mode)
    defer = device.type == "cuda" and batch_size > 1 and not timed
    end: DecodeEnd | None = None

    def finish(batch: ClipBatch, feats: torch.Tensor) -> Iterator[tuple[int, tuple[int, int], np.ndarray]]:
        t = time.perf_counter()
        f = feats.float().cpu().numpy().reshape(len(batch.ranges), len(names), -1)
        if timed:
            stats["network_s"] = stats.get("network_s", 0.0) + time.perf_counter() - t
        if batch.release is not None:
            batch.release()
        else:
            pool.put(batch.frames)
        trim_heap()
        if not np.isfinite(f).all():
            raise ValueError(f"{path}: the extractor produced non-finite features")
        if store_dtype != np.float32:
            with np.errstate(over="ignore"):
                stored = f.astype(store_dtype)
            if not np.isfinite(stored).all():
                raise ValueError(f"{path}: features exceed the range of extract.feature_dtype={cfg.feature_dtype}")
            f = stored.astype(np.float32)
        for j, (rng, feats_j) in enumerate(zip(batch.ranges, f)):
            yield batch.first + j, rng, np.array(feats_j, dtype=np.float32)  # a copy: buffers get reused

    in_flight: tuple[ClipBatch, torch.Tensor] | None = None
    # the network input of the previous batch (or video), rewritten by the next one (on CUDA the
    # rewrite is ordered after the previous forward pass on the same stream)
    net_input = _take_input_buffer(extractor)
    try:
        with torch.inference_mode():
            while True:
                t = time.perf_counter()
                try:
                    item = next(batches)
                except StopIteration:
                    break
                if timed:
                    stats["wait_s"] = stats.get("wait_s", 0.0) + time.perf_counter() - t
                if isinstance(item, DecodeEnd):
                    end = item
                    continue
                t = time.perf_counter()
                x = item.frames.to(device, non_blocking=True)
                x = network_input(extractor, x, crops, cfg.crop_order, cfg.resize_dtype, cfg.resize_round,
                                  memory_format=memory_format, max_elements=max_elements,
                                  buffer=net_input)  # [B*C, 3, T, s, s] on the device
                if net_input is None or x.untyped_storage().data_ptr() != net_input.untyped_storage().data_ptr():
                    net_input = x  # newly allocated: the buffer for the next batches
                sync()
                t2 = time.perf_counter()
                with amp:
                    feats = extractor.features(x)
                sync()
                if timed:
                    stats["preprocess_s"] = stats.get("preprocess_s", 0.0) + t2 - t
                    stats["network_s"] = stats.get("network_s", 0.0) + time.perf_counter() - t2
                    stats["clips"] = stats.get("clips", 0) + len(item.ranges)
                    stats["batches"] = stats.get("batches", 0) + 1
                del x
                if defer:
                    if in_flight is not None:
                        yield from finish(*in_flight)
                    in_flight = (item, feats)
                else:
                    yield from finish(item, feats)
            if in_flight is not None:
                yield from finish(*in_flight)
                in_flight = None
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()
        src.close()
        _keep_input_buffer(extractor, net_input)
    if end is None:  # cannot happen: the producer always ends with DecodeEnd or raises
        raise VideoDecodeError(f"{path}: decoding ended without a frame count")
    if info is not None:
        info["n_frames"] = end.n_frames
        info["n_frames_resampled"] = end.n_resampled
    if not end.n_clips:
        rate = f" ({end.n_resampled} after resampling to {cfg.target_fps:g} fps)" if resampler is not None else ""
        raise VideoDecodeError(
            f"{path}: {end.n_frames} frames{rate} is shorter than one {clip_len}-frame clip "
            f"(extract.partial_clip={cfg.partial_clip})"
        )


def extract_video(ctx: Any, extractor: Any, path: Any, decoded: Any = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Features of one video, ``[T, C, D]`` in ``extract.feature_dtype`` (float32 by default), and its
    metadata (see the module docstring); ``decoded``: the video from a decode pool
    (:func:`iter_clip_features`), else it is decoded here. ``n_frames``, ``fps`` and ``clip_ranges`` are the source
    video's even when ``extract.target_fps`` resamples it; ``target_fps`` / ``n_frames_resampled``
    record the resampling (``None`` / equal to ``n_frames`` without)."""
    cfg = _settings(ctx).extract
    info: dict[str, Any] = {}
    outputs: list[np.ndarray] = []
    ranges: list[list[int]] = []
    for _, (a, b), f in iter_clip_features(ctx, extractor, path, info=info, decoded=decoded):
        outputs.append(f)
        ranges.append([a, b])
    feats = np.stack(outputs).astype(cfg.feature_dtype)
    meta = {
        "n_frames": info["n_frames"],
        "fps": info["fps"],
        "height": info["height"],
        "width": info["width"],
        "clip_len": cfg.clip_len,
        "clip_ranges": ranges,
        "target_fps": info["target_fps"],
        "clip_fps": info["clip_fps"],
        "n_frames_resampled": info["n_frames_resampled"],
        "frame_selection": "floor(j * fps / target_fps)" if info["target_fps"] else "all frames",
        "crops": info["crops"],
        "crop_setting": info["crop_setting"],
        "resize_dtype": getattr(extractor, "resize_dtype", None) or cfg.resize_dtype,
        "resize": list(resize_spec(extractor.resize, cfg.resize_round)),
        "crop_order": cfg.crop_order,
        "partial_clip": cfg.partial_clip,
        "preset": cfg.preset or None,
        "extractor": extractor.registry_name,
        "weights_sha256": extractor.weights_checksum,
        # a per-pixel input mean the extractor subtracts (C3D's Sports-1M cube: extract.c3d_mean), None without
        "input_mean_sha256": getattr(extractor, "mean_sha256", None),
        "feature_dim": int(feats.shape[-1]),
        "feature_dtype": str(feats.dtype),
        "precision": cfg.precision,
    }
    return feats, meta
