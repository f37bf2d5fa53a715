"""Decoding spread over worker processes, feeding one network in order (``extract.decode_workers``).

The extract stage's network sits on one device; a single decode thread (:mod:`extractors.stream`)
cannot keep a GPU busy (3,481 frames/s at 320x240 on one core, BENCHMARKS.md, against ~11,000 for
half of an H100's bf16 peak with Inception-I3D and 10 crops). :class:`DecodePool` runs
``workers`` processes that each decode one *job* at a time and pack its clips exactly as the
one-thread path does (:func:`extractors.stream.clip_batches`, the same code); the consumer reads
each video's batches strictly in order, so the features are byte-identical to the one-worker path.

Jobs. A video is one job, or, when it is longer than ``split_frames`` and not resampled
(``extract.target_fps = 0``), one job per ``split_frames`` frames (a multiple of
``batch_clips * clip_len``, so every network batch holds the clips it holds on the one-worker
path). A job other than the last packs whole clips of its range only; the last one applies
``extract.partial_clip`` to the video's end. The first job of a video reports the frame count the
container gives, which decides the split; later videos' jobs wait until the earlier videos' splits
are known, so jobs are always handed out in (video, part) order. Resampled videos are not split:
a clip's range then depends on the next resampled frame, across a part's end.

Memory. Packed batches travel through at most ``max_batches`` shared-memory slots (each one batch,
``B * T * H * W * 3`` bytes: 29.5 MB for 8 clips of 320x240), created on demand and reused; a
worker asks the parent for a slot before packing a batch and the slot comes back once the consumer
is done with the batch (on CUDA, once it is copied into a pinned buffer). Beside the slots each
worker holds one decoded chunk (``extract.chunk_frames`` frames) and the frames of one batch. One
slot is always kept for the job the consumer needs next, so later jobs filling the others cannot
stall it (no deadlock however the jobs finish).

Failures. A Python exception in a worker (an unreadable file, a damaged container that ends early
inside a non-final part) makes the consumer's read raise :class:`DecodeFallback`: the caller then
decodes that video itself, on the one-worker path, which gives exactly its result or error. A worker
that dies (a crash in native decoding code) makes that video's read raise
:class:`DecodeWorkerCrashed`; a new worker takes its place and the other videos go on.
:meth:`DecodePool.close` (also on Ctrl-C, through the extract stage's ``release``) stops and joins
every worker and removes the shared memory; workers ignore SIGINT so that a terminal's Ctrl-C
reaches the parent alone, which then stops them.

Threads or processes: decord releases the GIL while decoding (two threads decoding two 320x240
videos kept both cores of the development machine busy: process CPU time / wall time 1.96), but a
worker process is what isolates a crash in native decoding code, and the packing loop is Python;
``benchmarks/roofline_feed.py`` measures both.
"""

from __future__ import annotations

import heapq
import logging
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass, field
from multiprocessing import shared_memory
from multiprocessing.connection import wait as wait_any
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from extractors.stream import BufferPool, ClipBatch, DecodeEnd, clip_batches

log = logging.getLogger(__name__)

#: network batches per job of a long video: a job covers ``SPLIT_BATCHES * batch_clips * clip_len``
#: frames (1,024 with the defaults). Each job reopens the video and seeks (decoding from the keyframe
#: before it: up to one GOP, 60 frames in the ActivityNet clips measured, a few percent of a job),
#: while the consumer's in-order reading buffers about ``workers * job / 2`` frames, so jobs are short.
SPLIT_BATCHES = 8
#: shared-memory slots per worker when ``max_batches`` is not given: enough for the buffering above
#: (``SPLIT_BATCHES / 2``) plus one batch being packed and one being computed
SLOTS_PER_WORKER = SPLIT_BATCHES // 2 + 2
#: shared memory the slots may take together, bytes (8 GiB): with large frames the slot count shrinks
#: to fit (1080p: 0.8 GB per 8-clip batch, 10 slots), at least 3
SLOT_BYTES = 8 << 30
#: environment variable naming a video file (its name) whose decode worker exits abruptly: the tests'
#: way of crashing a worker (read in the parent when the pool starts, so it reaches forked workers)
CRASH_ENV = "WSVAD_TEST_DECODE_CRASH"
_POLL_S = 0.05


class DecodeFallback(Exception):
    """A worker could not decode a video (the message says why): decode it in the calling thread."""


class DecodeWorkerCrashed(RuntimeError):
    """The worker decoding a video died; the message names the video and the exit status."""


def default_workers(device: str) -> int:
    """``extract.decode_workers = 0``: on CUDA every core this process may run on
    (``os.sched_getaffinity``) but one, which the network's own thread needs, shared among the
    processes ``torchrun`` started on this host (``LOCAL_WORLD_SIZE``, one per GPU); on the CPU 1
    (the network, not decoding, takes the cores there)."""
    if not str(device).startswith("cuda"):
        return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local_ranks = 1
    return max(1, cores // local_ranks - 1)


@dataclass(frozen=True)
class DecodeSettings:
    """What a worker needs to decode and pack a video as :func:`extractors.stream.iter_clip_features`
    would (``extract.*`` values; ``folder_fps`` is ``data.folder_fps``)."""

    clip_len: int
    batch_clips: int
    chunk_frames: int
    partial_clip: str
    target_fps: float
    folder_fps: float

    @classmethod
    def from_config(cls, cfg: Any) -> "DecodeSettings":
        """From a RunConfig."""
        e = cfg.extract
        return cls(e.clip_len, e.batch_clips, e.chunk_frames, e.partial_clip, e.target_fps, cfg.data.folder_fps)


@dataclass(frozen=True)
class _JobSpec:
    """What a worker is sent: decode ``path``'s frames ``[start, stop)`` (``stop=None``: to the end,
    the video's last part). ``first``: report the video's header before decoding."""

    id: int
    path: str
    start: int
    stop: int | None
    first: bool
    settings: DecodeSettings
    crash: bool = False


# ------------------------------------------------------------------------------------------------
# worker side


class _Cancelled(Exception):
    """The parent no longer wants the job's batches."""


class _SlotView:
    """A granted shared-memory slot as :func:`extractors.stream.clip_batches` uses a buffer."""

    def __init__(self, index: int, array: np.ndarray) -> None:
        self.index = index
        self.array = array

    def numpy(self) -> np.ndarray:
        return self.array


class _WorkerSlots:
    """The worker's :class:`extractors.stream.BufferPool` stand-in: ``get`` asks the parent for a slot
    and waits for it (the parent's reply None cancels the job)."""

    def __init__(self, tasks: Any, results: Any) -> None:
        self.tasks = tasks
        self.results = results
        self.job = -1
        self._maps: dict[int, tuple[str, shared_memory.SharedMemory]] = {}

    def get(self, shape: tuple[int, ...]) -> _SlotView:
        nbytes = int(np.prod(shape))
        self.results.send(("slot?", self.job, nbytes))
        reply = self.tasks.recv()
        if reply[0] == "stop":
            raise SystemExit(0)
        _, index, name = reply
        if index is None:
            raise _Cancelled()
        cached = self._maps.get(index)
        if cached is None or cached[0] != name:  # new, or replaced by a larger one
            if cached is not None:
                _close_shm(cached[1])
            self._maps[index] = (name, shared_memory.SharedMemory(name=name))
        buf = self._maps[index][1].buf
        return _SlotView(index, np.ndarray(shape, np.uint8, buffer=buf[:nbytes]))

    def put(self, t: Any) -> None:  # clip_batches never hands buffers back itself
        pass

    def close(self) -> None:
        for _, shm in self._maps.values():
            _close_shm(shm)


class _Range:
    """``src`` restricted to frames ``[start, stop)`` for :func:`extractors.stream.clip_batches`."""

    def __init__(self, src: Any, start: int, stop: int | None) -> None:
        self.src, self.start, self.stop, self.path = src, start, stop, src.path

    def iter_chunks(self, chunk_frames: int) -> Iterator[tuple[int, np.ndarray]]:
        return self.src.iter_chunks(chunk_frames, self.start, self.stop)


def _run_job(job: _JobSpec, slots: _WorkerSlots, results: Any) -> None:
    """Decode and pack one job, sending ``header`` (first part), ``batch`` and ``end`` messages."""
    from pipeline.core.video import FrameRateResampler, open_video

    s = job.settings
    slots.job = job.id
    with open_video(job.path, folder_fps=s.folder_fps, decoder_threads=1) as src:
        final = job.stop is None or job.stop >= src.num_frames
        if job.first:
            results.send(("header", job.id, src.fps, src.height, src.width, src.num_frames))
        if job.crash:
            os._exit(70)  # the tests' crash (CRASH_ENV): no cleanup, no message, as a segfault
        resampler = None
        if s.target_fps > 0:
            resampler = FrameRateResampler(src.fps, s.target_fps)
            if resampler.ratio * s.clip_len < 1:
                raise ValueError(f"{job.path}: extract.target_fps is too high for the video")  # the caller says it
        # a non-final part holds whole clips only; the video's last part applies the trailing-clip rule
        rule = s.partial_clip if final else "drop"
        source = _Range(src, job.start, None if final else job.stop)
        for item in clip_batches(source, s.clip_len, s.batch_clips, s.chunk_frames, rule, resampler, slots, None,
                                 first_frame=job.start):
            if isinstance(item, DecodeEnd):
                results.send(("end", job.id, final, item.n_frames, item.n_resampled, item.n_clips))
            else:
                results.send(("batch", job.id, item.frames.index, item.first, item.ranges,
                              tuple(item.frames.array.shape)))


def _worker_main(tasks: Any, results: Any) -> None:
    """A worker: run jobs until told to stop (or until the parent goes away)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops us
    slots = _WorkerSlots(tasks, results)
    try:
        while True:
            try:
                msg = tasks.recv()
            except EOFError:
                return
            if msg[0] == "stop":
                return
            job = msg[1]
            try:
                _run_job(job, slots, results)
            except _Cancelled:
                results.send(("cancelled", job.id))
            except Exception as exc:  # the parent decides; the caller's thread decodes it again
                results.send(("error", job.id, f"{type(exc).__name__}: {exc}"))
    except (EOFError, BrokenPipeError, SystemExit):
        return
    finally:
        slots.close()


# ------------------------------------------------------------------------------------------------
# parent side


@dataclass
class _Job:
    id: int
    video: "_Video"
    part: int
    start: int
    stop: int | None
    worker: "_Worker | None" = None
    state: str = "pending"  # pending | running | done | dropped
    held: list[tuple[str, Any]] = field(default_factory=list)  # items waiting for the earlier parts


@dataclass
class _Video:
    index: int
    key: str
    path: str
    jobs: list[_Job] = field(default_factory=list)
    header: tuple[float, int, int, int] | None = None
    delivered: int = 0  # parts whose items are all in ``out``
    out: "queue.Queue[tuple[str, Any]]" = field(default_factory=queue.Queue)
    failed: bool = False
    taken: bool = False


@dataclass
class _Slot:
    index: int
    shm: shared_memory.SharedMemory
    size: int
    job: _Job | None = None  # the job it is granted to, until the consumer releases it
    sent: bool = False  # its batch has been sent (on its way to the consumer or in its hands)


class _Worker:
    def __init__(self, ctx: Any) -> None:
        task_r, self.tasks = ctx.Pipe(duplex=False)
        self.results, result_w = ctx.Pipe(duplex=False)
        self.process = ctx.Process(target=_worker_main, args=(task_r, result_w), name="wsvad-decode-worker", daemon=True)
        self.process.start()
        task_r.close()
        result_w.close()
        self.job: _Job | None = None
        self.waiting: int | None = None  # bytes of a slot it asked for and waits on


class DecodePool:
    """``workers`` decode processes feeding one consumer in video order (module docstring).

    Use: :meth:`submit` the videos in the order they will be read, then :meth:`take` each in that
    order and pass it to :func:`extractors.stream.iter_clip_features` (``decoded=``); :meth:`close`
    at the end (also a context manager).

    Args:
        workers: processes (>= 1).
        settings: the run's decode settings (:meth:`DecodeSettings.from_config`).
        pin_memory: hand the consumer batches in pinned memory (a copy out of the slot), for a
            network on CUDA; otherwise the batch is the slot itself, released after use.
        max_batches: shared-memory slots (default ``workers * SLOTS_PER_WORKER``, at least 3), fewer
            where their batches would take more than ``max_bytes`` (default :data:`SLOT_BYTES`).
        split_frames: frames per job of a long video (default ``SPLIT_BATCHES * batch_clips *
            clip_len``; 0: never split); rounded down to a multiple of ``batch_clips * clip_len``.
    """

    def __init__(self, workers: int, settings: DecodeSettings, pin_memory: bool = False,
                 max_batches: int | None = None, split_frames: int | None = None, max_bytes: int = SLOT_BYTES) -> None:
        if workers < 1:
            raise ValueError(f"decode workers must be >= 1, got {workers}")
        self.settings = settings
        self.pin_memory = pin_memory
        step = settings.batch_clips * settings.clip_len
        split = SPLIT_BATCHES * step if split_frames is None else int(split_frames)
        self.split_frames = (split // step) * step if settings.target_fps <= 0 else 0
        self._slot_limit = max(3, max_batches if max_batches is not None else workers * SLOTS_PER_WORKER)
        self.max_slots = self._slot_limit
        self.max_bytes = max_bytes
        self._crash_name = os.environ.get(CRASH_ENV, "")
        method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
        self._ctx = mp.get_context(method)
        if method == "forkserver":
            # the server imports this module (and torch) once; workers fork from it in milliseconds
            self._ctx.set_forkserver_preload([__name__])
        self._lock = threading.RLock()
        self._videos: list[_Video] = []
        self._by_key: dict[str, _Video] = {}
        self._jobs: dict[int, _Job] = {}
        self._pending: list[tuple[int, int, int]] = []  # heap of (video index, part, job id)
        self._slots: list[_Slot] = []
        self._next_job = 0
        self._closed = False
        self._pinned: Any = None
        self._workers = [_Worker(self._ctx) for _ in range(workers)]
        self._thread = threading.Thread(target=self._loop, name="wsvad-decode-pool", daemon=True)
        self._thread.start()

    # -- the consumer's side --------------------------------------------------------------------
    def submit(self, videos: list[tuple[str, str]]) -> None:
        """Queue ``(key, path)`` videos, in the order :meth:`take` will ask for them."""
        with self._lock:
            for key, path in videos:
                v = _Video(len(self._videos), key, str(path))
                self._videos.append(v)
                self._by_key[key] = v
                self._add_job(v, 0, 0, self.split_frames or None)
            self._pump()

    def __contains__(self, key: str) -> bool:
        """Whether ``key`` was submitted and not taken yet."""
        with self._lock:
            v = self._by_key.get(key)
            return v is not None and not v.taken

    def take(self, key: str) -> "PooledVideo":
        """The submitted video ``key``, to read once; videos submitted before it and never taken are
        dropped (their slots freed)."""
        with self._lock:
            v = self._by_key.get(key)
            if v is None or v.taken:
                raise KeyError(f"video {key!r} was not submitted to the decode pool (or was taken already)")
            v.taken = True
            for earlier in self._videos[: v.index]:
                if not earlier.taken:
                    earlier.taken = True
                    self._drop_video(earlier)
            self._pump()
        return PooledVideo(self, v)

    def close(self) -> None:
        """Stop and join every worker, remove the shared memory. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            workers = list(self._workers)
        for w in workers:
            try:
                w.tasks.send(("stop",))
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + 2.0
        for w in workers:
            w.process.join(max(0.0, deadline - time.monotonic()))
            if w.process.is_alive():  # busy decoding: a worker holds nothing that needs a clean exit
                w.process.terminate()
                w.process.join(2.0)
            if w.process.is_alive():
                w.process.kill()
                w.process.join()
            w.tasks.close()
            w.results.close()
        self._thread.join(2.0)
        with self._lock:
            for slot in self._slots:
                _free_shm(slot.shm)
            self._slots.clear()

    def __enter__(self) -> "DecodePool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def worker_pids(self) -> list[int]:
        """The worker processes' ids (tests check that none survives :meth:`close`)."""
        return [w.process.pid for w in self._workers]

    # -- state changes (under the lock) ---------------------------------------------------------
    def _add_job(self, v: _Video, part: int, start: int, stop: int | None) -> None:
        job = _Job(self._next_job, v, part, start, stop)
        self._next_job += 1
        v.jobs.append(job)
        self._jobs[job.id] = job
        heapq.heappush(self._pending, (v.index, part, job.id))

    def _head(self) -> _Job | None:
        """The first job whose items the consumer has not all been handed: the one that must progress."""
        for v in self._videos:
            if v.failed or v.delivered == len(v.jobs):
                continue
            return v.jobs[v.delivered]
        return None

    def _pump(self) -> None:
        """Hand pending jobs to idle workers and slots to waiting workers."""
        if self._closed:
            return
        for w in self._workers:
            if w.job is None and self._pending:
                job = self._next_pending()
                if job is None:
                    break
                v = job.video
                spec = _JobSpec(job.id, v.path, job.start, job.stop, job.part == 0, self.settings,
                                crash=bool(self._crash_name) and Path(v.path).name == self._crash_name)
                job.state, job.worker, w.job = "running", w, job
                w.tasks.send(("job", spec))
        head = self._head()
        waiting = sorted((w for w in self._workers if w.waiting is not None and w.job is not None),
                         key=lambda w: (w.job.video.index, w.job.part))
        for w in waiting:
            job = w.job
            if job.state == "dropped":
                w.waiting = None
                w.tasks.send(("slot", None, None))
                continue
            # one slot stays free for the head job: the consumer waits on it, the others can wait; the
            # head gets one even past the limit when it holds none (the limit shrank under larger frames)
            holds = any(sl.job is job for sl in self._slots)
            if self._free_slots() > (0 if job is head else 1) or (job is head and not holds):
                slot = self._grant(job, w.waiting)
                w.waiting = None
                w.tasks.send(("slot", slot.index, slot.shm.name))

    def _next_pending(self) -> _Job | None:
        """The first pending job in (video, part) order, unless an earlier video's parts are not known
        yet (its first part has not reported the frame count): then nothing, so that jobs are always
        handed out in order and the head job is always running (module docstring)."""
        while self._pending:
            vi, _, jid = self._pending[0]
            job = self._jobs[jid]
            if job.state != "pending" or job.video.failed:
                heapq.heappop(self._pending)
                continue
            if self.split_frames and any(u.header is None and not u.failed for u in self._videos[:vi]):
                return None
            heapq.heappop(self._pending)
            return job
        return None

    def _free_slots(self) -> int:
        return self.max_slots - sum(1 for s in self._slots if s.job is not None)

    def _grant(self, job: _Job, nbytes: int) -> _Slot:
        free = [s for s in self._slots if s.job is None]
        fitting = [s for s in free if s.size >= nbytes]
        if fitting:
            slot = min(fitting, key=lambda s: s.size)
        elif len(self._slots) < self.max_slots or not free:
            slot = _Slot(len(self._slots), shared_memory.SharedMemory(create=True, size=nbytes), nbytes)
            self._slots.append(slot)
        else:  # a free slot too small for this video's frames: replace it by a larger one
            slot = free[0]
            _free_shm(slot.shm)
            slot.shm, slot.size = shared_memory.SharedMemory(create=True, size=nbytes), nbytes
        slot.job = job
        return slot

    def _free(self, index: int) -> None:
        slot = self._slots[index]
        slot.job, slot.sent = None, False

    def _release(self, index: int) -> None:
        """The consumer is done with slot ``index``."""
        with self._lock:
            if index < len(self._slots):
                self._free(index)
            self._pump()

    def _deliver(self, job: _Job, item: tuple[str, Any]) -> None:
        """Hand ``item`` of ``job`` to the consumer, or hold it until the video's earlier parts are in."""
        v = job.video
        if v.failed or job.state == "dropped":
            if item[0] == "batch":
                self._free(item[1]["slot"])
            return
        if v.delivered != job.part:
            job.held.append(item)
            return
        v.out.put(item)
        if item[0] in ("end", "part_end"):
            v.delivered += 1
            if v.delivered < len(v.jobs):
                nxt = v.jobs[v.delivered]
                held, nxt.held = nxt.held, []
                for it in held:
                    self._deliver(nxt, it)

    def _fail_video(self, v: _Video, error: BaseException) -> None:
        """Stop ``v``'s jobs and hand the consumer ``error`` (slots of its undelivered items freed)."""
        if v.failed:
            return
        v.failed = True
        for job in v.jobs:
            for item in job.held:
                if item[0] == "batch":
                    self._free(item[1]["slot"])
            job.held = []
            if job.state in ("pending", "running"):
                job.state = "dropped"
        v.out.put(("error", error))

    def _drop_video(self, v: _Video) -> None:
        """Nobody will read ``v``: free everything it holds."""
        self._fail_video(v, DecodeFallback("dropped"))
        while True:
            try:
                kind, value = v.out.get_nowait()
            except queue.Empty:
                break
            if kind == "batch":
                self._free(value["slot"])

    # -- the dispatcher thread ------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._closed:
            with self._lock:
                conns = {w.results: w for w in self._workers}
                sentinels = {w.process.sentinel: w for w in self._workers}
            try:
                ready = wait_any(list(conns) + list(sentinels), timeout=_POLL_S)
            except (OSError, ValueError):
                ready = []
            with self._lock:
                if self._closed:
                    return
                for r in ready:
                    if r in conns:
                        self._read(conns[r])
                for r in ready:
                    w = sentinels.get(r)
                    if w is not None and w in self._workers and not w.process.is_alive():
                        self._replace(w)
                self._pump()

    def _read(self, w: _Worker) -> None:
        """Handle every message worker ``w`` has sent."""
        try:
            while w.results.poll():
                self._handle(w, w.results.recv())
        except (EOFError, OSError):
            pass  # it died: its sentinel says so

    def _handle(self, w: _Worker, msg: tuple) -> None:
        kind, jid = msg[0], msg[1]
        job = self._jobs.get(jid)
        if job is None:
            return
        v = job.video
        if kind == "header":
            fps, h, wd, n = msg[2:]
            v.header = (fps, h, wd, n)
            v.out.put(("header", v.header))
            if job.stop is not None and n > job.stop:  # a long video: its later parts
                for part, start in enumerate(range(job.stop, n, self.split_frames), start=1):
                    self._add_job(v, part, start, start + self.split_frames)
                v.jobs[-1].stop = None  # the last part goes to the video's end, whatever it is
        elif kind == "slot?":
            w.waiting = msg[2]
            # the bound in bytes: fewer slots for larger frames (never fewer than 3)
            self.max_slots = max(3, min(self._slot_limit, self.max_bytes // max(1, msg[2])))
        elif kind == "batch":
            _, _, slot, first, ranges, shape = msg
            self._slots[slot].sent = True
            self._deliver(job, ("batch", {"slot": slot, "first": first, "ranges": ranges, "shape": shape}))
        elif kind == "end":
            final, n_frames, n_resampled, n_clips = msg[2:]
            self._job_done(w, job)
            if not final and n_frames != job.stop:
                # the container holds fewer frames than it said: decode it the one-worker way
                self._fail_video(v, DecodeFallback(f"{v.path}: part [{job.start}, {job.stop}) ended at frame {n_frames}"))
            else:
                self._deliver(job, ("end", (n_frames, n_resampled, n_clips)) if final else ("part_end", None))
        elif kind in ("error", "cancelled"):
            self._job_done(w, job)
            if kind == "error":
                self._fail_video(v, DecodeFallback(msg[2]))

    def _job_done(self, w: _Worker, job: _Job) -> None:
        w.job, w.waiting = None, None
        if job.state == "running":
            job.state = "done"
        for slot in self._slots:  # a slot granted for a batch the job never sent
            if slot.job is job and not slot.sent:
                self._free(slot.index)

    def _replace(self, w: _Worker) -> None:
        """Worker ``w`` died: fail the video it was decoding, start another worker."""
        self._workers.remove(w)
        code = w.process.exitcode
        job = w.job
        if job is not None and not self._closed:
            why = f"signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
            part = f" (frames {job.start}..{'end' if job.stop is None else job.stop - 1})" if len(job.video.jobs) > 1 else ""
            log.error("%s: the decode worker died (%s)%s", job.video.path, why, part)
            self._job_done(w, job)
            self._fail_video(job.video, DecodeWorkerCrashed(f"{job.video.path}: the decode worker crashed ({why}) decoding this video"))
        w.tasks.close()
        w.results.close()
        if not self._closed:
            self._workers.append(_Worker(self._ctx))


def _close_shm(shm: shared_memory.SharedMemory) -> None:
    try:
        shm.close()
    except BufferError:  # a batch view still referenced somewhere: the mapping goes with it
        pass


def _free_shm(shm: shared_memory.SharedMemory) -> None:
    _close_shm(shm)
    try:
        shm.unlink()
    except FileNotFoundError:
        pass


class PooledVideo:
    """One video as the decode pool delivers it: ``fps``, ``height``, ``width``, ``num_frames`` (the
    container's count) and ``path`` once open, and an iterator of the packed batches
    (:class:`extractors.stream.ClipBatch`, then one ``DecodeEnd``) in clip order, as
    :func:`extractors.stream.clip_batches` yields them. Reading it raises :class:`DecodeFallback` or
    :class:`DecodeWorkerCrashed` (module docstring)."""

    def __init__(self, pool: DecodePool, video: _Video) -> None:
        self._pool = pool
        self._video = video
        self.path = Path(video.path)
        self._done = False
        self._held: set[int] = set()  # slots handed out as batches and not released yet
        kind, value = self._get()
        if kind != "header":
            self.close()
            raise value if isinstance(value, BaseException) else RuntimeError(f"{video.path}: no header from the decode pool")
        self.fps, self.height, self.width, self.num_frames = value

    def _release(self, index: int) -> None:
        if index in self._held:
            self._held.discard(index)
            self._pool._release(index)

    def _get(self) -> tuple[str, Any]:
        while True:
            try:
                return self._video.out.get(timeout=_POLL_S)
            except queue.Empty:
                if not self._pool._thread.is_alive() or self._pool._closed:
                    raise RuntimeError("the decode pool stopped") from None

    def __iter__(self) -> "PooledVideo":
        return self

    def __next__(self) -> ClipBatch | DecodeEnd:
        while not self._done:
            kind, value = self._get()
            if kind == "part_end":
                continue
            if kind == "end":
                self._done = True
                return DecodeEnd(*value)
            if kind == "error":
                self._done = True
                raise value
            slot = self._pool._slots[value["slot"]]
            shape = value["shape"]
            view = np.ndarray(shape, np.uint8, buffer=slot.shm.buf[: int(np.prod(shape))])
            index = slot.index
            if self._pool.pin_memory:
                if self._pool._pinned is None:
                    self._pool._pinned = BufferPool(pin_memory=True, keep=4)
                pinned = self._pool._pinned
                frames = pinned.get(tuple(shape))
                frames.copy_(torch.from_numpy(view))
                del view
                self._pool._release(index)
                return ClipBatch(value["first"], frames, value["ranges"], release=lambda t=frames: pinned.put(t))
            self._held.add(index)
            return ClipBatch(value["first"], torch.from_numpy(view), value["ranges"],
                             release=lambda i=index: self._release(i))
        raise StopIteration

    def close(self) -> None:
        """Stop reading: the video's remaining jobs are cancelled and its slots freed. Idempotent."""
        with self._pool._lock:
            self._done = True
            for index in list(self._held):  # batches the consumer dropped on an error
                self._release(index)
            self._pool._drop_video(self._video)
            self._pool._pump()
