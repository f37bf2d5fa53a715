"""Decoding videos and frame folders into RGB chunks with bounded memory.

``open_video(path)`` accepts a video file (decoded with decord) or a folder of JPEG/PNG frames
(read with OpenCV in natural filename order: ``1.jpg, 2.jpg, 10.jpg``). Either way it returns a
:class:`VideoSource` whose :meth:`VideoSource.iter_chunks` yields ``(start_frame, frames)`` with
``frames`` a contiguous uint8 ``[n, H, W, 3]`` RGB array; never more than one chunk is in memory.

Every problem (missing path, a file that is not a video, an empty or zero-length file, an empty
folder, an unreadable image, images of different sizes) raises :class:`VideoDecodeError` naming
the file or folder. A container that reports more frames than it holds (a truncated download, a
wrong header) is decoded up to its last decodable frame; ``frames_decoded`` then holds the true
count and a warning is logged.

Two helpers for the extract stage live here too: :class:`FrameRateResampler` (nearest-frame
resampling to another frame rate, applied chunk by chunk) and :class:`BackgroundIterator` (runs a
decoding generator in a thread, a bounded number of items ahead, re-raising its errors in the
consumer).

decord is imported lazily, inside the functions that need it, so that training code importing
this module never loads it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import queue
import re
import sys
import tempfile
import threading
from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path
from typing import Any, Generic, Iterator, TypeVar

import numpy as np

log = logging.getLogger(__name__)

#: file suffixes (lower case) read as frames of a frame folder
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")
DEFAULT_FOLDER_FPS = 30.0


class VideoDecodeError(RuntimeError):
    """A video or frame folder that cannot be decoded; the message names the path and the problem."""


def natural_key(name: str) -> tuple:
    """Sort key putting ``2.jpg`` before ``10.jpg`` (digit runs compare as numbers)."""
    parts = re.split(r"(\d+)", name)
    return tuple((0, int(p), p) if p.isdigit() else (1, p.lower(), p) for p in parts if p != "")


class VideoSource:
    """An opened video or frame folder.

    Attributes:
        path: the file or folder.
        fps: frames per second (the container's; ``folder_fps`` for frame folders).
        height, width: frame size in pixels.
        num_frames: the frame count the container (or folder listing) reports; a damaged container
            may report more frames than it holds.
        frames_decoded: ``None`` until an :meth:`iter_chunks` pass ends, then the number of frames
            it actually yielded (the true count).
    """

    kind: str = "?"

    def __init__(self, path: Path, fps: float, height: int, width: int, num_frames: int) -> None:
        self.path = path
        self.fps = float(fps)
        self.height = int(height)
        self.width = int(width)
        self.num_frames = int(num_frames)
        self.frames_decoded: int | None = None

    def iter_chunks(self, chunk_frames: int = 64, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start_frame, frames)``, ``frames`` uint8 ``[n, H, W, 3]`` RGB, ``n <= chunk_frames``.

        Chunks are consecutive: each ``start_frame`` is the previous one plus its length. ``start`` /
        ``stop`` restrict the pass to frames ``[start, stop)`` (``stop=None``: to the end), the first
        chunk starting at ``start`` (the decode pool's jobs over parts of a long video,
        :mod:`extractors.decode_pool`); fewer frames come when the video ends (or breaks) earlier.
        """
        if int(chunk_frames) < 1:
            raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
        if start < 0 or (stop is not None and stop < start):
            raise ValueError(f"frame range [{start}, {stop}) is not a range of frames")
        self.frames_decoded = None
        count = start
        stop = self.num_frames if stop is None else min(int(stop), self.num_frames)
        for first, frames in self._chunks(int(chunk_frames), int(start), stop):
            count = first + len(frames)
            yield first, frames
        self.frames_decoded = count

    def _chunks(self, chunk_frames: int, start: int, stop: int) -> Iterator[tuple[int, np.ndarray]]:
        """Chunks of frames ``[start, stop)`` (``stop`` at most :attr:`num_frames`)."""
        raise NotImplementedError

    def read_all(self) -> np.ndarray:
        """Every frame at once, ``[N, H, W, 3]``; for tests and short clips only."""
        chunks = [f for _, f in self.iter_chunks()]
        if not chunks:
            return np.zeros((0, self.height, self.width, 3), np.uint8)
        return np.concatenate(chunks)

    def close(self) -> None:
        """Release the decoder (a later :meth:`iter_chunks` reopens it)."""

    def __enter__(self) -> "VideoSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({str(self.path)!r}, fps={self.fps:g}, {self.width}x{self.height}, "
            f"num_frames={self.num_frames})"
        )


def _to_rgb3(frames: np.ndarray, where: Path) -> np.ndarray:
    """``[n, H, W]`` / ``[n, H, W, 1|3|4]`` -> contiguous uint8 ``[n, H, W, 3]``."""
    if frames.dtype != np.uint8:
        raise VideoDecodeError(f"{where}: decoder returned {frames.dtype} frames, expected uint8")
    if frames.ndim == 3:
        frames = frames[..., None]
    if frames.ndim != 4:
        raise VideoDecodeError(f"{where}: decoder returned frames of shape {frames.shape}")
    c = frames.shape[-1]
    if c == 1:
        frames = np.repeat(frames, 3, axis=-1)
    elif c == 4:
        frames = frames[..., :3]
    elif c != 3:
        raise VideoDecodeError(f"{where}: decoder returned {c}-channel frames")
    return np.ascontiguousarray(frames)


class DecordVideo(VideoSource):
    """A video file decoded with decord, ``chunk_frames`` frames per ``get_batch`` call."""

    kind = "video"

    def __init__(self, path: Path, fallback_fps: float = DEFAULT_FOLDER_FPS, num_threads: int = 0) -> None:
        self._num_threads = num_threads
        self._reader: Any = None
        reader = self._open(path)
        n = len(reader)
        if n <= 0:
            raise VideoDecodeError(f"{path}: the container reports no video frames")
        try:
            first = reader[0].asnumpy()
        except Exception as exc:  # decord raises its own DECORDError (a RuntimeError)
            raise VideoDecodeError(f"{path}: cannot decode the first frame: {_short(exc)}") from exc
        first = _to_rgb3(first[None], path)[0]
        fps = _float_or_nan(reader.get_avg_fps)
        if not (math.isfinite(fps) and fps > 0):
            log.warning("%s: the container reports no valid frame rate (%r); using %g fps", path, fps, fallback_fps)
            fps = float(fallback_fps)
        super().__init__(path, fps, first.shape[0], first.shape[1], n)
        self._reader = reader

    def _open(self, path: Path) -> Any:
        import decord  # lazily: training code never imports decord

        with _native_stderr() as native:
            try:
                return decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=self._num_threads)
            except Exception as exc:
                failure = exc
        # decord's own message is "Error reading <path>..."; the reason is in its C++ log line
        reason = _native_reason(native[0]) or _short(failure)
        raise VideoDecodeError(f"{path}: not a readable video: {reason}") from failure

    def close(self) -> None:
        self._reader = None

    def _chunks(self, chunk_frames: int, first: int, n: int) -> Iterator[tuple[int, np.ndarray]]:
        reader = self._reader if self._reader is not None else self._open(self.path)
        self._reader = reader
        for start in range(first, n, chunk_frames):
            stop = min(n, start + chunk_frames)
            try:
                frames = reader.get_batch(list(range(start, stop))).asnumpy()
            except Exception as exc:
                # The container promised frames it cannot deliver (a truncated file, a wrong count).
                # decord's own random access is unreliable past such damage, so decode the rest
                # frame by frame, sequentially, and stop at the last decodable frame.
                log.debug("%s: decord failed on frames %d..%d (%s); decoding frame by frame", self.path,
                          start, stop - 1, _short(exc))
                end = start
                for s, frames in self._sequential_tail(reader, start, chunk_frames, n):
                    end = s + len(frames)
                    yield s, frames
                if end == first == 0:
                    raise VideoDecodeError(f"{self.path}: no frame could be decoded: {_short(exc)}") from exc
                if end < n:
                    log.warning(
                        "%s: the container reports %d frames but only the first %d can be decoded (%s); "
                        "using those",
                        self.path, n, end, _short(exc),
                    )
                return
            yield start, self._check(_to_rgb3(frames, self.path), start)

    def _sequential_tail(self, reader: Any, start: int, chunk_frames: int, stop: int) -> Iterator[tuple[int, np.ndarray]]:
        """Frames ``start..stop - 1`` decoded one by one with PyAV, in chunks, until the first decode error.

        A frame's index is found from its timestamp in decord's frame index, so the frames line
        up with the ones decord already delivered; a frame that matches no index, or a gap, ends
        the decoding as a decode error does.
        """
        import av

        n = self.num_frames
        try:
            ts = np.asarray(reader.get_frame_timestamp(np.arange(n)), dtype=np.float64)[:, 0]
        except Exception:
            ts = None  # no timestamps: count frames from the start of the stream instead
        tol = 0.5 / self.fps
        try:
            container = av.open(str(self.path))
        except Exception as exc:
            log.debug("%s: PyAV cannot open the file either: %s", self.path, _short(exc))
            return
        try:
            stream = container.streams.video[0]
            stream.thread_count = 1
            if ts is not None and start > 0 and stream.time_base:
                try:
                    target = max(0.0, ts[start] - tol)
                    container.seek(int(target / stream.time_base), stream=stream, backward=True, any_frame=False)
                except Exception:
                    container.close()
                    container = av.open(str(self.path))
                    stream = container.streams.video[0]
                    stream.thread_count = 1
            expected, counter = start, 0
            buf: list[np.ndarray] = []
            decoded = container.decode(stream)
            while expected < stop:
                try:
                    frame = next(decoded)
                except StopIteration:
                    break
                except Exception as exc:
                    log.debug("%s: decoding stops after frame %d: %s", self.path, expected - 1, _short(exc))
                    break
                if ts is not None and frame.time is not None:
                    i = int(np.searchsorted(ts, frame.time))
                    cands = [j for j in (i - 1, i) if 0 <= j < n]
                    idx = min(cands, key=lambda j: abs(ts[j] - frame.time))
                    if abs(ts[idx] - frame.time) > tol:
                        log.debug("%s: frame at %.4fs matches no frame index; stopping", self.path, frame.time)
                        break
                else:
                    idx, counter = counter, counter + 1
                if idx < expected:
                    continue
                if idx > expected:
                    log.debug("%s: frames %d..%d missing; stopping", self.path, expected, idx - 1)
                    break
                img = frame.to_ndarray(format="rgb24")
                if img.shape[:2] != (self.height, self.width):
                    break
                buf.append(img)
                expected += 1
                if len(buf) == chunk_frames:
                    yield expected - len(buf), np.ascontiguousarray(np.stack(buf))
                    buf = []
            if buf:
                yield expected - len(buf), np.ascontiguousarray(np.stack(buf))
        finally:
            container.close()

    def _check(self, frames: np.ndarray, start: int) -> np.ndarray:
        if frames.shape[1:3] != (self.height, self.width):
            raise VideoDecodeError(
                f"{self.path}: frame size changes from {self.width}x{self.height} to "
                f"{frames.shape[2]}x{frames.shape[1]} near frame {start}"
            )
        return frames


#: threads decoding a frame folder's images (OpenCV's imdecode releases the GIL): one folder decodes
#: on up to this many cores, so that JPEG folders (Ped2, ShanghaiTech's test set) keep a GPU fed
FOLDER_DECODE_THREADS = min(8, os.cpu_count() or 1)

_pool_lock = threading.Lock()
_pools: dict[tuple[int, int], Any] = {}  # (pid, threads) -> ThreadPoolExecutor


def _folder_pool(threads: int) -> Any:
    """The process's image-decoding pool of ``threads`` threads, created on first use (and again in
    a forked child, whose copy of the parent's pool has no threads)."""
    with _pool_lock:
        key = (os.getpid(), threads)
        if key not in _pools:
            from concurrent.futures import ThreadPoolExecutor

            _pools[key] = ThreadPoolExecutor(threads, thread_name_prefix="wsvad-imdecode")
        return _pools[key]


class FrameFolder(VideoSource):
    """A folder of JPEG/PNG frames, one image per frame, in natural filename order.

    A chunk's images are decoded by :data:`FOLDER_DECODE_THREADS` threads (``threads``), each
    writing its frame straight into the chunk; the frames and the first error (in frame order) are
    the same as one thread's.
    """

    kind = "frames"

    def __init__(self, path: Path, fps: float = DEFAULT_FOLDER_FPS, threads: int | None = None) -> None:
        self.threads = FOLDER_DECODE_THREADS if threads is None else max(1, int(threads))
        try:
            names = [
                p.name
                for p in path.iterdir()
                if not p.name.startswith(".") and p.suffix.lower() in FRAME_SUFFIXES and p.is_file()
            ]
        except OSError as exc:
            raise VideoDecodeError(f"{path}: cannot list the frame folder: {exc}") from exc
        if not names:
            raise VideoDecodeError(
                f"{path}: empty frame folder (no {'/'.join(s[1:] for s in FRAME_SUFFIXES)} images)"
            )
        if not (math.isfinite(float(fps)) and float(fps) > 0):
            raise ValueError(f"folder_fps must be a positive number, got {fps!r}")
        self.files = [path / n for n in sorted(names, key=natural_key)]
        first = self._read(self.files[0])
        super().__init__(path, fps, first.shape[0], first.shape[1], len(self.files))

    @staticmethod
    def _read(file: Path) -> np.ndarray:
        import cv2

        try:
            data = np.fromfile(file, dtype=np.uint8)  # also handles non-ASCII paths on every OS
        except OSError as exc:
            raise VideoDecodeError(f"{file}: cannot read frame image: {exc}") from exc
        if data.size == 0:
            raise VideoDecodeError(f"{file}: empty frame image (0 bytes)")
        img = cv2.imdecode(data, cv2.IMREAD_COLOR)  # grayscale/alpha/16-bit -> 8-bit BGR
        if img is None or img.ndim != 3 or img.shape[2] != 3:
            raise VideoDecodeError(f"{file}: not a readable JPEG/PNG image")
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)

    def _chunks(self, chunk_frames: int, first: int, stop: int) -> Iterator[tuple[int, np.ndarray]]:
        pool = _folder_pool(self.threads) if self.threads > 1 else None
        for start in range(first, stop, chunk_frames):
            files = self.files[start : min(start + chunk_frames, stop)]
            out = np.empty((len(files), self.height, self.width, 3), np.uint8)

            def decode(j: int) -> None:
                img = self._read(files[j])
                if img.shape[:2] != (self.height, self.width):
                    raise VideoDecodeError(
                        f"{files[j]}: image is {img.shape[1]}x{img.shape[0]} but the folder's first frame "
                        f"{self.files[0].name} is {self.width}x{self.height}; all frames must have one size"
                    )
                out[j] = img

            if pool is None or len(files) == 1:
                for j in range(len(files)):
                    decode(j)
            else:
                # results in frame order: the first failing frame's error is raised, as one thread would
                for _ in pool.map(decode, range(len(files))):
                    pass
            yield start, out


def open_video(path: str | Path, folder_fps: float = DEFAULT_FOLDER_FPS, decoder_threads: int = 0) -> VideoSource:
    """Open a video file or a JPEG/PNG frame folder.

    Args:
        path: the video file or the frame folder.
        folder_fps: frame rate of a frame folder (which has none of its own); also used for a
            video whose container reports no valid frame rate.
        decoder_threads: decord's ``num_threads`` for a video file (0: FFmpeg's automatic count);
            the decode pool's workers use 1 each (:mod:`extractors.decode_pool`). Frames do not
            depend on it.

    Raises:
        VideoDecodeError: naming the path and the problem.
    """
    p = Path(path)
    if not p.exists():
        raise VideoDecodeError(f"{p}: no such video file or frame folder")
    if p.is_dir():
        return FrameFolder(p, fps=folder_fps)
    if not p.is_file():
        raise VideoDecodeError(f"{p}: not a regular file or folder")
    try:
        size = p.stat().st_size
    except OSError as exc:
        raise VideoDecodeError(f"{p}: cannot read: {exc}") from exc
    if size == 0:
        raise VideoDecodeError(f"{p}: empty file (0 bytes)")
    return DecordVideo(p, fallback_fps=folder_fps, num_threads=decoder_threads)


#: denominators allowed when a float frame rate is read as a fraction: exact for NTSC rates such as
#: 30000/1001 (29.97) and 24000/1001, and for every integer or decimal-with-two-places rate
FPS_MAX_DENOMINATOR = 10000


class FrameRateResampler:
    """Nearest-frame resampling of a frame stream from ``src_fps`` to ``target_fps``.

    Rule: output frame ``j`` is source frame ``floor(j * src_fps / target_fps)``, the source frame on
    screen at output time ``j / target_fps``; output frames continue while that source frame exists,
    so ``N`` source frames give ``ceil(N * target_fps / src_fps)`` output frames. Upsampling (25 -> 30
    fps) repeats some source frames (every fifth here), downsampling skips some. The ratio is taken
    as an exact fraction of the two rates (each read with denominator <= :data:`FPS_MAX_DENOMINATOR`,
    so 29.97 fps is 30000/1001), so the selection has no floating-point drift over long videos.

    The selection is streaming: :meth:`select` is called with consecutive chunks of source frames
    and returns which of them the output takes.
    """

    def __init__(self, src_fps: float, target_fps: float) -> None:
        if not (src_fps > 0 and target_fps > 0):
            raise ValueError(f"frame rates must be positive, got {src_fps!r} -> {target_fps!r}")
        self.src_fps = float(src_fps)
        self.target_fps = float(target_fps)
        self.ratio = Fraction(self.src_fps).limit_denominator(FPS_MAX_DENOMINATOR) / Fraction(
            self.target_fps
        ).limit_denominator(FPS_MAX_DENOMINATOR)  # source frames per output frame
        self.next_output = 0
        self._next_source = 0

    @property
    def identity(self) -> bool:
        """True when every source frame is taken exactly once (equal rates)."""
        return self.ratio == 1

    def source_index(self, j: int) -> int:
        """The source frame that output frame ``j`` shows: ``floor(j * ratio)``."""
        return (j * self.ratio.numerator) // self.ratio.denominator

    def n_output(self, n_source: int) -> int:
        """Output frames made from ``n_source`` source frames: ``ceil(n_source / ratio)``."""
        return -((-n_source * self.ratio.denominator) // self.ratio.numerator)

    def select(self, start: int, n: int) -> list[int]:
        """Offsets (into the chunk ``[start, start + n)`` of source frames) of the frames the next
        output frames show, in output order; an offset repeats when a source frame is repeated.

        Raises:
            ValueError: the chunk does not start where the previous one ended.
        """
        if start != self._next_source:
            raise ValueError(f"source chunk starts at frame {start}, expected {self._next_source}")
        self._next_source = start + n
        out: list[int] = []
        while True:
            s = self.source_index(self.next_output)
            if s >= start + n:
                return out
            out.append(s - start)
            self.next_output += 1


T = TypeVar("T")


class BackgroundIterator(Generic[T]):
    """Iterate ``source`` in a daemon thread, at most ``depth`` items ahead of the consumer.

    The thread feeds a bounded queue, so memory holds at most ``depth`` finished items plus the one
    being made. An exception raised by ``source`` is re-raised by :meth:`__next__` in the consumer
    (the same exception object, with the worker's traceback). :meth:`close` (also on ``with`` exit
    and when the consumer stops early) tells the thread to stop, drops queued items and joins it;
    the thread notices between items, and a generator ``source`` is closed in the thread (its
    ``finally`` blocks run there). Items are produced and consumed in order.

    Use it for work that releases the GIL (decord, PyAV and OpenCV decode in C with the GIL released),
    so that it overlaps the consumer's computation.
    """

    _POLL_S = 0.05

    def __init__(self, source: Iterable[T], depth: int = 2, name: str = "wsvad-background") -> None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._run, args=(source,), name=name, daemon=True)
        self._thread.start()

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def _put(self, item: tuple[str, Any]) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=self._POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, source: Iterable[T]) -> None:
        it = iter(source)
        try:
            for item in it:
                if not self._put(("item", item)):
                    return
            self._put(("end", None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
            self._put(("error", exc))
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                try:
                    close()
                except Exception as exc:  # a generator's cleanup failing must not hide the real error
                    log.debug("background source cleanup failed: %s", exc)

    def __iter__(self) -> "BackgroundIterator[T]":
        return self

    def __next__(self) -> T:
        if self._done:
            raise StopIteration
        while True:
            try:
                kind, value = self._queue.get(timeout=self._POLL_S)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    self._done = True
                    raise RuntimeError(f"background thread {self._thread.name} ended without a result") from None
        if kind == "item":
            return value
        self._done = True
        self.close()
        if kind == "error":
            raise value
        raise StopIteration

    def close(self, timeout: float = 30.0) -> None:
        """Stop the thread and wait for it (up to ``timeout`` seconds; it finishes its current item)."""
        self._done = True
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("background thread %s still running after %.0f s", self._thread.name, timeout)

    def __enter__(self) -> "BackgroundIterator[T]":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self._stop.set()


def _float_or_nan(fn: Any) -> float:
    try:
        return float(fn())
    except Exception:
        return float("nan")


@contextlib.contextmanager
def _native_stderr() -> Iterator[list[str]]:
    """Collect what native code writes to file descriptor 2 meanwhile (decord's C++ ``LOG(ERROR)``
    lines, FFmpeg's messages), so that a failure is reported once, in the tool's own line; the
    collected text is in the yielded list afterwards. Other threads' stderr output of that moment
    (a progress bar) is collected too, so it wraps only the opening of a file."""
    sys.stderr.flush()
    saved = os.dup(2)
    collected: list[str] = []
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield collected
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            collected.append(sink.read().decode("utf-8", errors="replace"))


def _native_reason(text: str) -> str:
    """The reason in decord's log line ``...video_reader.cc:86: ERROR opening: <path>, <reason>``, or ''."""
    for line in reversed(text.splitlines()):
        m = re.search(r"ERROR opening: .*?, (.+)$", line)
        if m:
            return m.group(1).strip()
    return ""


def _short(exc: BaseException, limit: int = 300) -> str:
    """A one-line excerpt of an exception message (decord's carry C++ source locations)."""
    text = " ".join(str(exc).split())
    text = re.sub(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ", "", text)
    text = text.split("Stack trace")[0].strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."
