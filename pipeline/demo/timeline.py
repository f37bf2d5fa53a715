"""The demo videos' size, frame rate and classes, and their seeds, lengths and anomaly intervals, all
derived from the video id."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

from pipeline.core.manifest import VideoRecord


log = logging.getLogger("pipeline.demo")

DEMO_MANIFEST: Path = Path(__file__).resolve().parents[2] / "data_manifests" / "demo.csv"

WIDTH, HEIGHT, FPS = 320, 240, 30
MIN_FRAMES, MAX_FRAMES = 112, 160
ANOMALY_CLASSES = ("FastObject", "RunningCrowd", "Falling")
#: bump when the rendering changes: already generated videos are then rendered again
GENERATOR_VERSION = 1
#: H.264 settings of the mp4 videos and JPEG quality of the frame folders. One thread and no
#: macroblock-tree rate control: with mbtree, libx264's output bytes vary from run to run even
#: for identical frames (seen with PyAV 18's libx264); without it they are reproducible.
X264_OPTIONS = {"crf": "18", "preset": "medium", "threads": "1", "x264-params": "mbtree=0"}
JPEG_QUALITY = 90

# (min, max) interval lengths per class, in frames, for derived intervals
_INTERVAL_LENGTHS = {"FastObject": (34, 60), "RunningCrowd": (44, 70), "Falling": (54, 70)}
STATE_DIR = ".demo_state"




def _seed(video_id: str, purpose: str) -> int:
    """A 64-bit seed from the id and what it is for (independent streams per purpose)."""
    digest = hashlib.sha256(f"wsvad-demo/{purpose}/{video_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def video_rng(video_id: str, purpose: str) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(_seed(video_id, purpose)))


def demo_video_length(video_id: str) -> int:
    """Number of frames of a demo video, 112..160, derived from its id."""
    return MIN_FRAMES + _seed(video_id, "length") % (MAX_FRAMES - MIN_FRAMES + 1)


def derive_interval(video_id: str, cls: str) -> tuple[int, int]:
    """The anomaly interval ``(start, end)`` (end exclusive) a video of class ``cls`` gets from its id.

    Used for training videos (whose manifest rows carry no interval) and to write the test rows.
    """
    if cls not in _INTERVAL_LENGTHS:
        raise ValueError(f"{video_id}: unknown demo anomaly class {cls!r}; known: {', '.join(ANOMALY_CLASSES)}")
    n = demo_video_length(video_id)
    rng = video_rng(video_id, "interval")
    lo, hi = _INTERVAL_LENGTHS[cls]
    length = int(rng.integers(lo, hi + 1))
    start = int(rng.integers(10, n - length - 10 + 1))
    return start, start + length


def event_interval(video: VideoRecord) -> tuple[int, int] | None:
    """The interval in which ``video``'s anomalous event happens; ``None`` for a normal video.

    Test videos: the manifest interval (exactly one, inside the video). Training videos: derived
    from the id. Raises ValueError naming the video when the row cannot be rendered.
    """
    if video.label == 0:
        if video.intervals:
            raise ValueError(f"{video.id}: a normal video cannot have anomaly intervals")
        return None
    if video.cls not in ANOMALY_CLASSES:
        raise ValueError(
            f"{video.id}: unknown demo anomaly class {video.cls!r}; known: {', '.join(ANOMALY_CLASSES)}"
        )
    n = demo_video_length(video.id)
    if not video.intervals:
        if video.split == "test":
            raise ValueError(f"{video.id}: an anomalous test video needs its interval in the manifest")
        return derive_interval(video.id, video.cls)
    if len(video.intervals) != 1:
        raise ValueError(f"{video.id}: demo videos hold one anomalous event, the manifest gives {len(video.intervals)}")
    start, end = video.intervals[0]
    if not (0 <= start < end <= n):
        raise ValueError(f"{video.id}: interval {start}-{end} is not inside the video's {n} frames")
    if end - start < 2:
        raise ValueError(f"{video.id}: interval {start}-{end} is too short for an event (2 frames at least)")
    return start, end


def demo_ground_truth(video: VideoRecord) -> np.ndarray:
    """Per-frame 0/1 labels (uint8, one per frame) of a demo video."""
    gt = np.zeros(demo_video_length(video.id), np.uint8)
    iv = event_interval(video)
    if iv is not None:
        gt[iv[0] : iv[1]] = 1
    return gt
