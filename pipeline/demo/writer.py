"""Writing the demo dataset: H.264 mp4 files and JPEG frame folders, atomic and resumable."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

from pipeline.core.manifest import Manifest, VideoRecord, load_manifest
from pipeline.core.store import dir_mode, remove_stale_temps, temp_prefix
from pipeline.demo.render import render_frames
from pipeline.demo.timeline import DEMO_MANIFEST, FPS, GENERATOR_VERSION, HEIGHT, JPEG_QUALITY, STATE_DIR, WIDTH, X264_OPTIONS, demo_video_length, event_interval


log = logging.getLogger("pipeline.demo")


def _stamp(video: VideoRecord) -> str:
    data = {
        "generator": GENERATOR_VERSION,
        "id": video.id,
        "path": video.path,
        "label": video.label,
        "class": video.cls,
        "interval": list(event_interval(video) or ()),
        "frames": demo_video_length(video.id),
        "x264": X264_OPTIONS,
        "jpeg_quality": JPEG_QUALITY,
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _is_frame_folder(video: VideoRecord) -> bool:
    return not Path(video.path).suffix


def rgb_to_i420(frame: np.ndarray) -> np.ndarray:
    """RGB uint8 ``[H, W, 3]`` -> planar YUV 4:2:0 ``[H * 3 / 2, W]`` (BT.601, limited range).

    Integer arithmetic only. Letting FFmpeg's swscale convert instead makes the encoded bytes
    depend on the memory alignment of each frame (its SIMD and C paths round differently).
    """
    rgb = frame.astype(np.int32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    h, w = r.shape
    y = ((66 * r + 129 * g + 25 * b + 128) >> 8) + 16
    # chroma from the 2x2 block means (rounded), as in a box-filtered 4:2:0 downsampling
    def sub(c: np.ndarray) -> np.ndarray:
        return (c[0::2, 0::2] + c[0::2, 1::2] + c[1::2, 0::2] + c[1::2, 1::2] + 2) >> 2

    rs, gs, bs = sub(r), sub(g), sub(b)
    u = ((-38 * rs - 74 * gs + 112 * bs + 128) >> 8) + 128
    v = ((112 * rs - 94 * gs - 18 * bs + 128) >> 8) + 128
    out = np.empty((h * 3 // 2, w), np.uint8)
    out[:h] = np.clip(y, 0, 255)
    out[h : h + h // 4] = np.clip(u, 0, 255).reshape(h // 4, w)
    out[h + h // 4 :] = np.clip(v, 0, 255).reshape(h // 4, w)
    return out


def _write_mp4(video: VideoRecord, dest: Path) -> None:
    import av

    from pipeline.core.store import atomic_path

    with atomic_path(dest) as tmp:
        with av.open(str(tmp), "w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=FPS)
            stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
            stream.time_base = Fraction(1, FPS)
            stream.options = dict(X264_OPTIONS)
            stream.thread_count = 1
            for i, frame in enumerate(render_frames(video)):
                vf = av.VideoFrame.from_ndarray(rgb_to_i420(frame), format="yuv420p")
                vf.pts = i
                vf.time_base = Fraction(1, FPS)
                for packet in stream.encode(vf):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)


def _write_frame_folder(video: VideoRecord, dest: Path) -> None:
    import cv2

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(dest.name), suffix=".tmp", dir=dest.parent))
    try:
        for i, frame in enumerate(render_frames(video)):
            bgr = cv2.cvtColor(frame, cv2.COLOR_RGB2BGR)
            ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
            if not ok:
                raise RuntimeError(f"{video.id}: JPEG encoding failed for frame {i}")
            with open(tmp / f"{i:06d}.jpg", "wb") as fh:
                fh.write(buf.tobytes())
                os.fsync(fh.fileno())
        os.chmod(tmp, dir_mode())  # mkdtemp makes it private; the umask decides, as for any folder
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _generate_one(video: VideoRecord, root: str) -> str:
    """Render and write one video (atomically), then its completion stamp; returns the id."""
    from pipeline.core.store import atomic_write_text

    dest = Path(root) / video.path
    if _is_frame_folder(video):
        _write_frame_folder(video, dest)
    else:
        if dest.is_dir():
            shutil.rmtree(dest)
        _write_mp4(video, dest)
    atomic_write_text(Path(root) / STATE_DIR / f"{video.id}.json", json.dumps({"stamp": _stamp(video)}) + "\n")
    return video.id


def _is_complete(video: VideoRecord, root: Path) -> bool:
    dest = root / video.path
    state = root / STATE_DIR / f"{video.id}.json"
    if not dest.exists() or not state.is_file():
        return False
    try:
        return json.loads(state.read_text()).get("stamp") == _stamp(video)
    except (OSError, ValueError):
        return False


def generate_demo_dataset(
    root: str | Path, manifest_path: str | Path = DEMO_MANIFEST, progress: bool = True, workers: int | None = None
) -> Manifest:
    """Write every video of the demo manifest under ``root`` and return the manifest for ``root``.

    Videos already complete (same manifest row, same generator version: a stamp in
    ``root/.demo_state/<id>.json`` written after the video) are skipped, so an interrupted run
    resumes; each video is written to a temporary file or folder and renamed into place.
    Temporaries of killed runs are removed (``pipeline.core.store.remove_stale_temps``). The manifest is copied to
    ``root/manifest.csv``.

    Args:
        root: data root.
        manifest_path: the demo manifest (rows with paths ``videos/<id>.mp4`` or ``frames/<id>``).
        progress: show a tqdm progress bar.
        workers: processes rendering in parallel (default: up to 2, one per CPU core).
    """
    from pipeline.core.store import atomic_write_bytes

    root = Path(root)
    manifest_path = Path(manifest_path)
    manifest = load_manifest(manifest_path, root, check_files=False)
    for v in manifest.videos:
        event_interval(v)  # validate every row before writing anything
    root.mkdir(parents=True, exist_ok=True)
    for folder in {(root / v.path).parent for v in manifest.videos} | {root / STATE_DIR}:
        remove_stale_temps(folder)  # temporaries of killed runs (a live generator's are kept)
    todo = [v for v in manifest.videos if not _is_complete(v, root)]
    t0 = time.monotonic()
    if todo:
        log.info("generating %d of %d demo videos under %s", len(todo), len(manifest.videos), root)
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="demo videos", unit="video", disable=not progress)
        n_workers = workers if workers is not None else min(2, os.cpu_count() or 1)
        n_workers = max(1, min(n_workers, len(todo)))
        try:
            if n_workers == 1:
                for v in todo:
                    _generate_one(v, str(root))
                    bar.update(1)
            else:
                import multiprocessing as mp
                from concurrent.futures import ProcessPoolExecutor, as_completed

                ctx = mp.get_context("spawn")  # no fork of a process that may hold torch threads
                pool = ProcessPoolExecutor(n_workers, mp_context=ctx)
                try:
                    futures = [pool.submit(_generate_one, v, str(root)) for v in todo]
                    for fut in as_completed(futures):
                        fut.result()
                        bar.update(1)
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)  # let running writes clean up
                    raise
                pool.shutdown()
        finally:
            bar.close()
        log.info("demo videos written in %.1f s", time.monotonic() - t0)
    else:
        log.info("all %d demo videos already present under %s", len(manifest.videos), root)
    atomic_write_bytes(root / "manifest.csv", manifest_path.read_bytes())
    return load_manifest(root / "manifest.csv", root)
