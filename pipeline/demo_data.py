"""The deterministic demo dataset: small synthetic surveillance scenes, generated, never downloaded.

Every video is a 320x240, 30 fps view of a pedestrian plaza (a building facade at the top, paving
and grass with benches, lamp posts, bins and trees, a camera timestamp overlay) in which 2-5
people walk at pedestrian speed. Anomalous videos add, for one interval, one of three events:

- ``FastObject``: a car or a motorbike crossing the plaza at 10-20 px/frame (two crossings for long
  intervals);
- ``RunningCrowd``: 6-12 people running across together at about 6-10 px/frame;
- ``Falling``: a tall person close to the camera stumbles, falls flat, struggles on the ground and
  gets up again.

Outside its interval an anomalous video is a normal scene (the event's objects are not drawn, the
falling person walks normally), so the frame-level ground truth is exact: the interval holds
exactly the frames in which the event is visible or ongoing.

Everything is derived from the manifest row: scene layout, people and the video length come from
the video id (``seed = sha256(id)``); the anomaly interval of a test video is the manifest's (the
source of truth), that of a training video (whose row carries none) is derived from the id too.
Frames are drawn with integer OpenCV primitives and numpy on a seeded ``Generator``, so the same
row renders the same bytes on every call.

The manifest (``data_manifests/demo.csv``) lists 20 training videos (10 normal, 10 anomalous) and
10 test videos (5 normal, 5 anomalous); three test videos are JPEG frame folders, the others
H.264 mp4 files. ``generate_demo_dataset(root)`` writes them all (resumable, atomic per video).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from pipeline.manifest import Manifest, VideoRecord, load_manifest

log = logging.getLogger("pipeline.demo_data")

DEMO_MANIFEST: Path = Path(__file__).resolve().parents[1] / "data_manifests" / "demo.csv"

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
_STATE_DIR = ".demo_state"


# ----------------------------------------------------------------------------------------------
# seeds, lengths, intervals
# ----------------------------------------------------------------------------------------------


def _seed(video_id: str, purpose: str) -> int:
    """A 64-bit seed from the id and what it is for (independent streams per purpose)."""
    digest = hashlib.sha256(f"wsvad-demo/{purpose}/{video_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _rng(video_id: str, purpose: str) -> np.random.Generator:
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
    rng = _rng(video_id, "interval")
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


# ----------------------------------------------------------------------------------------------
# drawing helpers (integer OpenCV primitives with 4 bits of sub-pixel precision)
# ----------------------------------------------------------------------------------------------

_SHIFT = 4
_ONE = 1 << _SHIFT


def _p(x: float, y: float) -> tuple[int, int]:
    return (math.floor(x * _ONE + 0.5), math.floor(y * _ONE + 0.5))


def _c(color: Sequence[float] | float) -> tuple[int, int, int]:
    if isinstance(color, (int, float, np.integer, np.floating)):
        return (int(max(0, min(255, round(float(color))))),) * 3
    return tuple(int(max(0, min(255, round(v)))) for v in color)  # type: ignore[return-value]


def _shade(color: Sequence[float], f: float) -> tuple[int, int, int]:
    return _c([v * f for v in color])


def _line(img: np.ndarray, a: tuple[float, float], b: tuple[float, float], color, thickness: float) -> None:
    import cv2

    cv2.line(img, _p(*a), _p(*b), _c(color), max(1, int(round(thickness))), cv2.LINE_AA, _SHIFT)


def _disc(img: np.ndarray, c: tuple[float, float], r: float, color) -> None:
    import cv2

    cv2.circle(img, _p(*c), max(_ONE // 2, int(round(r * _ONE))), _c(color), -1, cv2.LINE_AA, _SHIFT)


def _poly(img: np.ndarray, pts: Sequence[tuple[float, float]], color) -> None:
    import cv2

    arr = np.array([_p(x, y) for x, y in pts], np.int32)
    cv2.fillPoly(img, [arr], _c(color), cv2.LINE_AA, _SHIFT)


def _rect(img: np.ndarray, x0: float, y0: float, x1: float, y1: float, color) -> None:
    _poly(img, [(x0, y0), (x1, y0), (x1, y1), (x0, y1)], color)


def _ellipse(img: np.ndarray, c: tuple[float, float], axes: tuple[float, float], color, angle: float = 0.0) -> None:
    import cv2

    ax = (max(1, int(round(axes[0] * _ONE))), max(1, int(round(axes[1] * _ONE))))
    cv2.ellipse(img, _p(*c), ax, angle, 0, 360, _c(color), -1, cv2.LINE_AA, _SHIFT)


def _value_noise(rng: np.random.Generator, h: int, w: int, cell: float, octaves: int = 3) -> np.ndarray:
    """Smooth noise in [0, 1]: bilinear (smoothstep) interpolation of random grids, summed octaves.

    Only elementwise float arithmetic, so the result is the same on every machine.
    """
    out = np.zeros((h, w))
    amp, total = 1.0, 0.0
    for o in range(octaves):
        c = max(1.5, cell / (2**o))
        grid = rng.random((int(h / c) + 3, int(w / c) + 3))
        ys, xs = np.arange(h) / c, np.arange(w) / c
        y0, x0 = ys.astype(np.int64), xs.astype(np.int64)
        fy, fx = ys - y0, xs - x0
        fy, fx = fy * fy * (3 - 2 * fy), fx * fx * (3 - 2 * fx)
        g00, g01 = grid[y0][:, x0], grid[y0][:, x0 + 1]
        g10, g11 = grid[y0 + 1][:, x0], grid[y0 + 1][:, x0 + 1]
        top = g00 * (1 - fx) + g01 * fx
        bottom = g10 * (1 - fx) + g11 * fx
        out += amp * (top * (1 - fy)[:, None] + bottom * fy[:, None])
        total += amp
        amp *= 0.5
    return out / total


# ----------------------------------------------------------------------------------------------
# the static scene
# ----------------------------------------------------------------------------------------------

_PAVING = [(150, 148, 142), (178, 168, 150), (158, 118, 104), (118, 118, 122), (170, 160, 138)]
_FACADE = [(172, 170, 164), (150, 84, 66), (204, 192, 160), (96, 112, 130), (188, 164, 130)]
_GRASS = [(78, 118, 52), (92, 128, 60), (70, 104, 56)]
_SKIN = [(232, 196, 168), (204, 156, 124), (168, 118, 88), (116, 80, 60), (240, 206, 182)]
_HAIR = [(32, 26, 22), (74, 52, 36), (126, 94, 54), (206, 176, 116), (96, 96, 96), (18, 18, 18)]
_SHIRT = [
    (196, 40, 40), (40, 72, 164), (44, 132, 64), (222, 200, 60), (236, 236, 236), (32, 32, 38),
    (124, 124, 130), (232, 122, 40), (112, 52, 132), (60, 152, 172), (172, 92, 60), (240, 172, 184),
]
_PANTS = [(42, 52, 84), (30, 30, 36), (92, 92, 98), (164, 144, 112), (62, 72, 112), (84, 62, 46)]
_SHOES = [(26, 26, 26), (210, 210, 210), (92, 62, 42)]
_CAR = [(180, 30, 30), (30, 60, 150), (225, 225, 228), (30, 30, 34), (150, 152, 158), (40, 110, 60), (230, 190, 40)]


@dataclass
class Scene:
    """Camera geometry and the rendered static background of one video."""

    background: np.ndarray  # uint8 [H, W, 3]
    facade_bottom: int  # y of the facade/ground boundary
    y0: float  # the horizon: figure height is k * (y_feet - y0)
    k: float
    shadow_dx: float  # shadow offset per pixel of figure height (sun direction)
    shadow_dark: float  # shadow multiplier (0.55 strong sun .. 0.8 overcast)
    clock: int  # seconds since midnight at frame 0, for the timestamp overlay
    camera: int
    date: str

    def person_height(self, y_feet: float) -> float:
        return self.k * (y_feet - self.y0)


def _make_scene(video_id: str) -> Scene:
    import cv2

    rng = _rng(video_id, "scene")
    H, W = HEIGHT, WIDTH
    fb = int(rng.integers(46, 62))
    y0 = fb - float(rng.uniform(12, 20))
    k = float(rng.uniform(88, 100)) / (200 - y0)  # a person with feet at y=200 is 88-100 px tall
    light = float(rng.uniform(0.85, 1.08))
    img = np.zeros((H, W, 3))

    # ground: paving colour modulated by smooth noise, a perspective tile grid, stains
    pav = np.array(_PAVING[rng.integers(len(_PAVING))], float) * light
    n1 = _value_noise(rng, H, W, 40, 3)
    n2 = _value_noise(rng, H, W, 6, 2)
    ground = pav[None, None, :] * (0.82 + 0.3 * n1 + 0.12 * n2)[..., None]
    img[:] = ground
    grid = np.zeros((H, W), np.uint8)
    tile = float(rng.uniform(0.18, 0.32))  # tile size in "person heights"
    vx = float(rng.uniform(100, 220))
    y = fb + 2.0
    while y < H:
        cv2.line(grid, _p(0, y), _p(W, y), 255, 1, cv2.LINE_AA, _SHIFT)
        y += tile * k * (y - y0) * 0.55
    for i in range(-40, 41):
        xb = vx + i * tile * k * (H - y0)  # where the line meets the bottom edge
        cv2.line(grid, _p(vx + (xb - vx) * (fb - y0) / (H - y0), fb), _p(xb, H), 255, 1, cv2.LINE_AA, _SHIFT)
    img *= (1 - 0.16 * grid / 255.0)[..., None]
    stains = _value_noise(rng, H, W, 18, 2)
    img *= np.where(stains > 0.68, 0.9, 1.0)[..., None]

    # grass: a patch on one side (or along the bottom)
    grass_mask = np.zeros((H, W), np.uint8)
    side = int(rng.integers(3))
    if side == 0:
        xe = float(rng.uniform(30, 70))
        pts = [(0, fb + 20), (xe, fb + 20), (xe + 40, H), (0, H)]
    elif side == 1:
        xs = float(rng.uniform(250, 290))
        pts = [(xs, fb + 20), (W, fb + 20), (W, H), (xs - 40, H)]
    else:
        yt = float(rng.uniform(222, 232))
        pts = [(0, yt), (W, yt + float(rng.uniform(-6, 6))), (W, H), (0, H)]
    _poly(grass_mask, pts, (255, 255, 255))
    gcol = np.array(_GRASS[rng.integers(len(_GRASS))], float) * light
    gn = _value_noise(rng, H, W, 4, 2)
    grass = gcol[None, None, :] * (0.7 + 0.55 * gn + 0.2 * n1)[..., None]
    a = (grass_mask / 255.0)[..., None]
    img = img * (1 - a) + grass * a

    # facade: wall colour with texture, windows, a door/shop front, a curb line
    fac = np.array(_FACADE[rng.integers(len(_FACADE))], float) * light
    fn = _value_noise(rng, fb, W, 8, 2)
    img[:fb] = fac[None, None, :] * (0.88 + 0.2 * fn)[..., None]
    glass = np.array([64, 78, 92], float) * float(rng.uniform(0.8, 1.3))
    win_w, win_h = float(rng.uniform(14, 24)), float(rng.uniform(10, 16))
    gap = float(rng.uniform(10, 22))
    x = float(rng.uniform(2, 14))
    door = int(rng.integers(1, 5))
    i = 0
    while x < W:
        if i == door:  # a shop front / door reaching the ground
            _poly(img, [(x, fb - 30), (x + 28, fb - 30), (x + 28, fb), (x, fb)], glass * 0.7)
            _line(img, (x + 14, fb - 30), (x + 14, fb), fac * 0.6, 1)
            x += 28 + gap
        else:
            for wy in (fb - 2 * win_h - 14, fb - win_h - 6):
                if wy > 2:
                    _rect(img, x - 1, wy - 1, x + win_w + 1, wy + win_h + 1, fac * 0.7)
                    _rect(img, x, wy, x + win_w, wy + win_h, glass * float(rng.uniform(0.8, 1.25)))
                    _line(img, (x + win_w / 2, wy), (x + win_w / 2, wy + win_h), fac * 0.75, 1)
            x += win_w + gap
        i += 1
    _poly(img, [(0, fb - 1), (W, fb - 1), (W, fb + 3), (0, fb + 3)], fac * 0.6 + 60)  # curb
    img[fb + 3 : fb + 5] *= 0.8

    shadow_dx = float(rng.choice([-0.35, -0.2, 0.2, 0.35]))
    shadow_dark = float(rng.uniform(0.55, 0.78))

    # street furniture, each with a shadow; positions away from the very centre where possible
    def scale(y: float) -> float:
        return k * (y - y0)

    smask = np.zeros((H, W), np.uint8)
    items: list[tuple[float, str, float]] = []
    for _ in range(int(rng.integers(1, 4))):
        items.append((float(rng.uniform(fb + 20, 215)), "bench", float(rng.uniform(10, 310))))
    for _ in range(int(rng.integers(1, 4))):
        y = float(rng.uniform(fb + 10, 225))
        items.append((y, "lamp", float(rng.choice([rng.uniform(8, 90), rng.uniform(230, 312)]))))
    for _ in range(int(rng.integers(0, 3))):
        items.append((float(rng.uniform(fb + 15, 220)), "bin", float(rng.uniform(10, 310))))
    for _ in range(int(rng.integers(0, 3))):
        y = float(rng.uniform(fb + 25, 200))
        items.append((y, "tree", float(rng.choice([rng.uniform(0, 60), rng.uniform(260, 320)]))))
    items.sort()
    wood = np.array([(120, 84, 52), (96, 70, 50), (70, 74, 80)][rng.integers(3)], float) * light
    for y, kind, x in items:
        s = scale(y)
        if kind == "bench":
            bw = 0.75 * s
            _ellipse(smask, (x + shadow_dx * s * 0.3, y + 1), (bw * 0.6, 0.06 * s), 255)
            for lx in (x - bw * 0.4, x + bw * 0.4):
                _line(img, (lx, y), (lx, y - 0.24 * s), wood * 0.5, max(1, 0.03 * s))
            _rect(img, x - bw / 2, y - 0.26 * s, x + bw / 2, y - 0.21 * s, wood)  # seat
            _rect(img, x - bw / 2, y - 0.46 * s, x + bw / 2, y - 0.38 * s, wood * 0.9)  # backrest
            _line(img, (x - bw * 0.4, y - 0.46 * s), (x - bw * 0.4, y - 0.24 * s), wood * 0.5, max(1, 0.025 * s))
            _line(img, (x + bw * 0.4, y - 0.46 * s), (x + bw * 0.4, y - 0.24 * s), wood * 0.5, max(1, 0.025 * s))
        elif kind == "lamp":
            top = y - 1.9 * s
            _line(smask, (x, y), (x + shadow_dx * 1.9 * s, y + 0.08 * s), 255, max(1, 0.05 * s))
            pole = np.array((52, 58, 56), float)
            _line(img, (x, y), (x, top), pole, max(1, 0.045 * s))
            _line(img, (x, top), (x + 0.18 * s, top - 0.02 * s), pole, max(1, 0.035 * s))
            _ellipse(img, (x + 0.2 * s, top + 0.02 * s), (0.08 * s, 0.035 * s), (230, 226, 200))
            _line(img, (x - 0.04 * s, y), (x + 0.04 * s, y), pole * 0.8, max(1, 0.06 * s))
        elif kind == "bin":
            bw, bh = 0.16 * s, 0.38 * s
            col = np.array([(50, 90, 60), (70, 70, 74), (40, 60, 100)][rng.integers(3)], float)
            _ellipse(smask, (x + shadow_dx * s * 0.2, y + 1), (bw * 0.9, 0.04 * s), 255)
            _poly(img, [(x - bw, y - bh), (x + bw, y - bh), (x + bw * 0.85, y), (x - bw * 0.85, y)], col)
            _rect(img, x - bw * 1.1, y - bh - 0.04 * s, x + bw * 1.1, y - bh, col * 0.7)
        else:  # tree in a round planter
            r = 0.55 * s
            _ellipse(smask, (x + shadow_dx * s * 1.2, y + 0.04 * s), (r * 1.1, r * 0.3), 255)
            _line(img, (x, y), (x, y - 1.3 * s), (82, 60, 42), max(2, 0.07 * s))
            _ellipse(img, (x, y), (0.3 * s, 0.08 * s), (120, 118, 112))
            leaf = np.array(_GRASS[rng.integers(len(_GRASS))], float) * 0.8
            for _ in range(7):
                cx, cy = x + float(rng.normal(0, r * 0.35)), y - 1.55 * s + float(rng.normal(0, r * 0.3))
                _disc(img, (cx, cy), r * float(rng.uniform(0.45, 0.7)), leaf * float(rng.uniform(0.75, 1.2)))
    sm = (smask / 255.0)[..., None]
    img *= 1 - (1 - shadow_dark) * sm * 0.8

    # lens vignetting
    yy, xx = np.mgrid[0:H, 0:W]
    r2 = ((xx - W / 2) / (W / 2)) ** 2 + ((yy - H / 2) / (H / 2)) ** 2
    img *= (1 - 0.12 * r2)[..., None]
    bg = np.clip(np.floor(img + 0.5), 0, 255).astype(np.uint8)
    date = f"2024-{int(rng.integers(1, 13)):02d}-{int(rng.integers(1, 29)):02d}"
    clock, camera = int(rng.integers(7 * 3600, 19 * 3600)), int(rng.integers(1, 17))
    return Scene(bg, fb, y0, k, shadow_dx, shadow_dark, clock, camera, date)


# ----------------------------------------------------------------------------------------------
# people
# ----------------------------------------------------------------------------------------------


@dataclass
class Look:
    skin: tuple
    hair: tuple
    shirt: tuple
    pants: tuple
    shoes: tuple
    build: float  # width factor
    long_sleeves: bool

    @staticmethod
    def random(rng: np.random.Generator) -> "Look":
        return Look(
            _SKIN[rng.integers(len(_SKIN))],
            _HAIR[rng.integers(len(_HAIR))],
            _SHIRT[rng.integers(len(_SHIRT))],
            _PANTS[rng.integers(len(_PANTS))],
            _SHOES[rng.integers(len(_SHOES))],
            float(rng.uniform(0.9, 1.15)),
            bool(rng.random() < 0.5),
        )


@dataclass
class Pose:
    """Joint angles in radians; legs/arms are ``(angle from straight down, bend)``, positive forward.

    ``theta`` rotates the whole body forward around the feet (0 upright, pi/2 lying face down).
    """

    legs: tuple[tuple[float, float], tuple[float, float]] = ((0.0, 0.0), (0.0, 0.0))
    arms: tuple[tuple[float, float], tuple[float, float]] = ((0.0, 0.2), (0.0, 0.2))
    lean: float = 0.0
    head: float = 0.0
    theta: float = 0.0
    lift: float = 0.0  # extra height of the pivot (running flight phase), in person heights


def walk_pose(phase: float, run: bool = False) -> Pose:
    s, c = math.sin(phase), math.cos(phase)
    if run:
        legs = tuple(
            (0.75 * math.sin(phase + d), 0.35 + 1.1 * max(0.0, math.sin(phase + d + 2.0))) for d in (0.0, math.pi)
        )
        arms = tuple((-0.85 * math.sin(phase + d), 1.5) for d in (0.0, math.pi))
        return Pose(legs, arms, lean=0.3, lift=0.04 * abs(c))  # type: ignore[arg-type]
    legs = tuple((0.42 * math.sin(phase + d), 0.08 + 0.5 * max(0.0, math.sin(phase + d + 1.9))) for d in (0.0, math.pi))
    arms = tuple((-0.38 * math.sin(phase + d), 0.25) for d in (0.0, math.pi))
    return Pose(legs, arms, lean=0.05 + 0.01 * s)  # type: ignore[arg-type]


_THIGH, _SHIN, _UPPER, _FORE = 0.25, 0.25, 0.16, 0.16


def _person_geometry(pose: Pose, h: float, build: float) -> dict:
    """Joint positions in the figure's frame (x forward, y up, pixels; feet pivot at the origin)."""
    ext = [_THIGH * math.cos(a) + _SHIN * math.cos(a - k) for a, k in pose.legs]
    hip = (0.0, max(ext) + pose.lift)
    legs = []
    for a, k in pose.legs:
        knee = (hip[0] + _THIGH * math.sin(a), hip[1] - _THIGH * math.cos(a))
        ankle = (knee[0] + _SHIN * math.sin(a - k), knee[1] - _SHIN * math.cos(a - k))
        legs.append((knee, ankle, (ankle[0] + 0.07, ankle[1])))
    up = (math.sin(pose.lean), math.cos(pose.lean))
    neck = (hip[0] + 0.3 * up[0], hip[1] + 0.3 * up[1])
    shoulder = (hip[0] + 0.27 * up[0], hip[1] + 0.27 * up[1])
    hu = (math.sin(pose.lean + pose.head), math.cos(pose.lean + pose.head))
    head = (neck[0] + 0.085 * hu[0], neck[1] + 0.085 * hu[1])
    arms = []
    for b, e in pose.arms:
        elbow = (shoulder[0] + _UPPER * math.sin(b), shoulder[1] - _UPPER * math.cos(b))
        hand = (elbow[0] + _FORE * math.sin(b + e), elbow[1] - _FORE * math.cos(b + e))
        arms.append((elbow, hand))
    ct, st = math.cos(pose.theta), math.sin(pose.theta)

    def rot(p: tuple[float, float]) -> tuple[float, float]:
        return (p[0] * ct + p[1] * st, -p[0] * st + p[1] * ct)

    rise = 0.0
    if pose.theta != 0.0:
        # a tilted or lying body rests on the ground: its lowest part (feet, knees, hips, trunk,
        # head; not the hands) touches it, neither floating nor sinking
        parts = [(hip, 0.07), (neck, 0.07), (head, 0.068)]
        for knee, ankle, toe in legs:
            parts += [(knee, 0.035), (ankle, 0.0), (toe, 0.0)]
        rise = max(r * build - rot(q)[1] for q, r in parts)

    def tf(p: tuple[float, float]) -> tuple[float, float]:
        x, y = rot(p)
        return (x * h, (y + rise) * h)

    return {
        "hip": tf(hip),
        "neck": tf(neck),
        "shoulder": tf(shoulder),
        "head": tf(head),
        "legs": [tuple(tf(q) for q in (hip,) + leg) for leg in legs],
        "arms": [tuple(tf(q) for q in (shoulder,) + arm) for arm in arms],
    }


def person_extent(pose: Pose, h: float, build: float = 1.0) -> tuple[float, float]:
    """(min, max) forward offset from the feet pivot, in pixels, of the pixels drawn for a figure."""
    size = int(3.2 * h) + 16
    canvas = np.zeros((size, size), np.uint8)
    white = (255, 255, 255)
    cx, cy = size // 2, int(2.0 * h) + 8
    draw_person(canvas, Look(white, white, white, white, white, build, True), float(cx), float(cy), h, 1, pose)
    cols = np.flatnonzero(canvas.any(axis=0))
    if cols.size == 0:
        return 0.0, 0.0
    return float(cols[0] - cx), float(cols[-1] - cx)


def draw_person(img: np.ndarray, look: Look, x: float, y: float, h: float, facing: int, pose: Pose) -> None:
    """Draw a figure whose feet pivot is at image point ``(x, y)``, ``h`` px tall, facing +1 right / -1 left."""
    g = _person_geometry(pose, h, look.build)

    def im(p: tuple[float, float]) -> tuple[float, float]:
        return (x + facing * p[0], y - p[1])

    b = look.build
    leg_t, arm_t, torso_t = 0.075 * h * b, 0.05 * h * b, 0.15 * h * b
    far, near = (0, 1)
    # far limbs first, in a darker shade
    for idx, shade in ((far, 0.72), (near, 1.0)):
        hip, knee, ankle, toe = (im(q) for q in g["legs"][idx])
        _line(img, hip, knee, _shade(look.pants, shade), leg_t)
        _line(img, knee, ankle, _shade(look.pants, shade), leg_t * 0.9)
        _line(img, ankle, toe, _shade(look.shoes, shade), leg_t * 0.8)
        if idx == far:
            sh, el, ha = (im(q) for q in g["arms"][far])
            _line(img, sh, el, _shade(look.shirt, 0.72), arm_t)
            _line(img, el, ha, _shade(look.shirt if look.long_sleeves else look.skin, 0.72), arm_t * 0.9)
            _disc(img, ha, arm_t * 0.55, _shade(look.skin, 0.72))
    hip, neck = im(g["hip"]), im(g["neck"])
    _disc(img, hip, 0.075 * h * b, look.pants)
    _line(img, hip, neck, look.shirt, torso_t)
    hc = im(g["head"])
    r = 0.068 * h
    _disc(img, hc, r, look.skin)
    # hair on the back/top of the head
    ux, uy = g["head"][0] - g["neck"][0], g["head"][1] - g["neck"][1]
    n = math.hypot(ux, uy) or 1.0
    hair = (g["head"][0] + (0.35 * ux / n - 0.25 * uy / n) * r, g["head"][1] + (0.35 * uy / n + 0.25 * ux / n) * r)
    _disc(img, im(hair), r * 0.8, look.hair)
    sh, el, ha = (im(q) for q in g["arms"][near])
    _line(img, sh, el, _shade(look.shirt, 0.92), arm_t)
    _line(img, el, ha, look.shirt if look.long_sleeves else look.skin, arm_t * 0.9)
    _disc(img, ha, arm_t * 0.55, look.skin)


def person_shadow(mask: np.ndarray, scene: Scene, x: float, y: float, h: float, facing: int, pose: Pose) -> None:
    """Add a figure's ground shadow (a soft ellipse, longer when lying) to ``mask``."""
    st = abs(math.sin(pose.theta))
    length = 0.2 * h + 0.32 * h * st
    cx = x + facing * 0.47 * h * st + scene.shadow_dx * h * 0.35 * (1 - st)
    _ellipse(mask, (cx, y + 0.01 * h), (length, 0.05 * h + 0.03 * h * st), 200)


@dataclass
class Walker:
    """A pedestrian on a straight path at constant speed, from the video's first frame."""

    look: Look
    x0: float
    y0: float
    vx: float
    vy: float
    size: float
    phase0: float
    stride: float  # pixels of travel per gait cycle, per pixel of height
    idle: bool = False

    def state(self, scene: Scene, t: int) -> tuple[float, float, float, int, Pose]:
        x, y = self.x0 + self.vx * t, self.y0 + self.vy * t
        h = scene.person_height(y) * self.size
        facing = 1 if self.vx >= 0 else -1
        if self.idle:
            sway = 0.04 * math.sin(self.phase0 + 0.08 * t)
            pose = Pose(((0.06, 0.02), (-0.06, 0.02)), ((0.1 + sway, 0.3), (-0.05 - sway, 0.5)), lean=sway * 0.5,
                        head=0.1 * math.sin(self.phase0 + 0.05 * t))
            return x, y, h, facing, pose
        dist = math.hypot(self.vx, self.vy) * t
        phase = self.phase0 + 2 * math.pi * dist / (self.stride * h)
        return x, y, h, facing, walk_pose(phase)


def _make_walkers(video_id: str, scene: Scene) -> list[Walker]:
    rng = _rng(video_id, "walkers")
    walkers = []
    n = int(rng.integers(2, 6))
    for i in range(n):
        if i == 0 and rng.random() < 0.35:  # someone standing and waiting
            y = float(rng.uniform(scene.facade_bottom + 30, 215))
            walkers.append(Walker(Look.random(rng), float(rng.uniform(40, 280)), y, 0.0, 0.0,
                                  float(rng.uniform(0.92, 1.08)), float(rng.uniform(0, 6.3)), 1.0, idle=True))
            continue
        # feet positions: far ones more often, a near one (big) now and then
        y = float(rng.uniform(scene.facade_bottom + 22, 228)) if rng.random() < 0.8 else float(rng.uniform(200, 232))
        h = scene.person_height(y)
        speed = float(rng.uniform(1.0, 1.6)) * float(np.clip(h / 65, 0.75, 1.35))
        ang = float(rng.uniform(-0.3, 0.3))
        direction = 1 if rng.random() < 0.5 else -1
        vx, vy = direction * speed * math.cos(ang), speed * math.sin(ang) * 0.5
        x = float(rng.uniform(-30, WIDTH + 30))
        walkers.append(Walker(Look.random(rng), x, y, vx, vy, float(rng.uniform(0.92, 1.08)),
                              float(rng.uniform(0, 6.3)), float(rng.uniform(0.85, 1.0))))
    return walkers


# ----------------------------------------------------------------------------------------------
# the anomalous events; each is drawn only for frames inside its interval
# ----------------------------------------------------------------------------------------------


class Event:
    start: int
    end: int

    def actors(self, scene: Scene, t: int) -> list[tuple[float, str, tuple]]:
        """``(y_feet, kind, args)`` to draw at frame ``t`` (only called for start <= t < end)."""
        raise NotImplementedError



class FastObject(Event):
    """One or two vehicles crossing at 10-20 px/frame; one is always visible inside the interval."""

    def __init__(self, video_id: str, scene: Scene, start: int, end: int, walkers: Sequence[Walker] = ()) -> None:
        rng = _rng(video_id, "event")
        self.start, self.end = start, end
        L = end - start
        margin = 4.0
        # up to three vehicles (kind, lane, colour, rider) drawn first; then as many crossings as
        # it takes to keep their speed within 10-20 px/frame, consecutive crossings overlapping
        # by a third so that one vehicle is always well inside the frame
        vehicles = []
        for _ in range(3):
            kind = "car" if rng.random() < 0.6 else "moto"
            y = float(rng.uniform(135, 185))
            h = scene.person_height(y)
            length = (2.3 if kind == "car" else 1.25) * h
            vehicles.append((kind, y, h, length, _CAR[rng.integers(len(_CAR))], Look.random(rng)))
        direction = 1 if rng.random() < 0.5 else -1
        best = None
        for k in (1, 2, 3):
            # k windows of n frames overlapping by n // 3: L = k n - (k - 1) (n // 3)
            n = next((m for m in range(2, L + 2) if k * m - (k - 1) * (m // 3) >= L), L)
            over = n // 3 if k > 1 else 0
            windows, a = [], start
            for i in range(k):
                b = min(end, a + n) if i < k - 1 else end
                windows.append((a, b))
                a = b - over
            speeds = [(WIDTH - 2 * margin + vehicles[i][3]) / max(1, b - a - 1) for i, (a, b) in enumerate(windows)]
            bad = sum(max(0.0, 10 - v) + max(0.0, v - 20) for v in speeds)
            if best is None or bad < best[0] - 1e-9:
                best = (bad, windows, speeds)
        _, windows, speeds = best  # type: ignore[misc]
        self.passes = []
        for i, ((a, b), v) in enumerate(zip(windows, speeds)):
            kind, y, h, length, color, rider = vehicles[i]
            x_front0 = margin if b - a > 1 else (WIDTH + length) / 2
            self.passes.append((a, b, kind, y, h, length, v, x_front0, direction, color, rider))
            direction = -direction

    def actors(self, scene: Scene, t: int) -> list:
        out = []
        for a, b, kind, y, h, length, v, x_front0, direction, color, rider in self.passes:
            if a <= t < b:
                front = x_front0 + v * (t - a)  # in the direction of travel, from the entry edge
                if direction > 0:
                    x_front = front
                else:
                    x_front = WIDTH - front
                out.append((y, kind, (x_front, y, h, length, direction, color, rider, t)))
        return out


class RunningCrowd(Event):
    """6-12 people running across together; the first enters at the interval's first frame."""

    def __init__(self, video_id: str, scene: Scene, start: int, end: int, walkers: Sequence[Walker] = ()) -> None:
        rng = _rng(video_id, "event")
        self.start, self.end = start, end
        L = end - start
        n = int(rng.integers(6, 13))
        self.direction = 1 if rng.random() < 0.5 else -1
        v_target = float(rng.uniform(7.0, 9.0))
        yc = float(rng.uniform(150, 180))
        band = float(rng.uniform(30, 50))
        spread = float(np.clip(v_target * (L - 1) - WIDTH - 30, 50, 240))
        self.runners = []
        for i in range(n):
            y = float(np.clip(yc + rng.uniform(-band / 2, band / 2), scene.facade_bottom + 30, 215))
            size = float(rng.uniform(0.92, 1.08))
            h = scene.person_height(y) * size
            off = -spread * (i / max(1, n - 1)) + float(rng.uniform(-12, 12))
            self.runners.append([Look.random(rng), y, h, off, float(rng.uniform(0, 6.3)), float(rng.uniform(1.9, 2.3))])
        self.v_target = v_target
        # solve the common speed and entry offset so that the group enters at `start`, leaves after `end-1`
        margin = 4.0
        front = max(r[3] + person_extent(self._pose(r, start), r[2], r[0].build)[1] for r in self.runners)
        back = min(r[3] + person_extent(self._pose(r, end - 1), r[2], r[0].build)[0] for r in self.runners)
        self.x0 = margin - front
        self.v = (WIDTH - margin - self.x0 - back) / max(1, L - 1)

    def _pose(self, r: list, t: int) -> Pose:
        look, y, h, off, phase0, stride = r
        phase = phase0 + 2 * math.pi * self.v_target * (t - self.start) / (stride * h)
        return walk_pose(phase, run=True)

    def actors(self, scene: Scene, t: int) -> list:
        out = []
        for r in self.runners:
            look, y, h, off = r[:4]
            x = self.x0 + off + self.v * (t - self.start)
            if self.direction < 0:
                x = WIDTH - x
            out.append((y, "person", (look, x, y, h, self.direction, self._pose(r, t))))
        return out


class Falling(Event):
    """A tall person near the camera walks in, falls flat, struggles, gets up and walks on.

    The person walks normally before ``start`` and after ``end``; the interval covers the
    stumble, the fall, the struggle on the ground and getting up.
    """

    def __init__(self, video_id: str, scene: Scene, start: int, end: int, walkers: Sequence[Walker] = ()) -> None:
        rng = _rng(video_id, "event")
        self.start, self.end = start, end
        L = end - start
        self.look = Look.random(rng)
        size = float(rng.uniform(1.15, 1.22))
        self.speed = float(rng.uniform(1.6, 2.0))
        self.stride = 0.95
        self.t_fall = int(np.clip(round(L * 0.2), 6, 12))
        self.t_up = int(np.clip(round(L * 0.25), 6, 16))
        self.phase0 = float(rng.uniform(0, 6.3))
        self.wiggle = float(rng.uniform(0.3, 0.42))
        # where the person falls: near the camera, the lying body (feet to head, about 0.95 h)
        # around the frame centre; of the candidate spots, the one least hidden by passers-by
        candidates = [
            (f, float(y), float(dx)) for f in (1, -1) for y in (188, 192, 196) for dx in (0, -20, 20, -35, 35)
        ]
        order = rng.permutation(len(candidates))
        best, best_cost = None, float("inf")
        for i in order:
            facing, y, dx = candidates[i]
            h = scene.person_height(y) * size
            x_fall = WIDTH / 2 + dx - facing * 0.47 * h
            lo, hi = sorted((x_fall, x_fall + facing * 0.95 * h))
            cost = 0.0
            for t in range(max(0, start - 15), end):
                if t < start:
                    x = x_fall - facing * self.speed * (start - t)
                    box = (x - 0.25 * h, x + 0.25 * h, y - h, y)
                else:
                    box = (lo, hi, y - 0.35 * h, y)
                for w in walkers:
                    wx, wy, wh, _, _ = w.state(scene, t)
                    if wy < y - 0.1 * h:  # farther away: drawn behind the person
                        continue
                    ox = min(box[1], wx + 0.25 * wh) - max(box[0], wx - 0.25 * wh)
                    oy = min(box[3], wy) - max(box[2], wy - wh)
                    if ox > 0 and oy > 0:
                        cost += ox * oy
            if cost < best_cost - 1e-9:
                best, best_cost = (facing, y, dx), cost
        assert best is not None
        self.facing, self.y, dx = best
        self.h = scene.person_height(self.y) * size
        self.x_fall = WIDTH / 2 + dx - self.facing * 0.47 * self.h
        self.x_up = self.x_fall + self.facing * 0.45 * self.h  # where the person stands up

    def _walk(self, t: int) -> tuple[float, Pose]:
        if t < self.start:
            x = self.x_fall - self.facing * self.speed * (self.start - t)
            dist = -self.speed * (self.start - t)
        else:
            x = self.x_up + self.facing * self.speed * (t - self.end)
            dist = self.speed * (t - self.end) + 1000.0
        return x, walk_pose(self.phase0 + 2 * math.pi * dist / (self.stride * self.h))

    def walker_state(self, scene: Scene, t: int) -> tuple[float, float, float, int, Pose]:
        """The person outside the interval: an ordinary walker."""
        x, pose = self._walk(t)
        return x, self.y, self.h, self.facing, pose

    def pose_at(self, t: int) -> tuple[float, Pose]:
        tau = t - self.start
        L = self.end - self.start
        half_pi = math.pi / 2
        if tau < self.t_fall:  # stumble and fall: arms thrown forward, body tipping faster and faster
            u = (tau + 1) / self.t_fall
            theta = half_pi * u**2 * 1.02
            arms = ((1.2 + 1.4 * u, 0.1), (0.9 + 1.6 * u, 0.2))
            legs = ((0.45 * (1 - u) + 0.1, 0.4 + 0.5 * u), (-0.35 * (1 - u), 0.25))
            return self.x_fall, Pose(legs, arms, lean=0.25 * u, head=-0.3 * u, theta=theta)  # type: ignore[arg-type]
        if tau < L - self.t_up:  # on the ground, struggling: limbs flail, the body rocks
            w = (tau - self.t_fall) * self.wiggle
            theta = half_pi + 0.07 * math.sin(w * 0.7)
            # face down: backward angles point up, away from the ground; arms flap, legs kick
            arms = ((2.9 + 0.55 * math.sin(w), 0.3 + 0.4 * math.sin(w * 1.3)),
                    (2.5 - 0.6 * math.sin(w + 1.0), 0.5))
            legs = ((-0.15 + 0.25 * math.sin(w + 2.0), 0.3 + 1.3 * max(0.0, math.sin(w))),
                    (0.05 - 0.2 * math.sin(w + 0.5), 0.2 + 1.2 * max(0.0, math.sin(w + 2.5))))
            return self.x_fall, Pose(legs, arms, lean=-0.1 + 0.08 * math.sin(w), head=-0.7 + 0.3 * math.sin(w * 0.8),
                                     theta=theta)  # type: ignore[arg-type]
        # getting up: onto the knees, then upright, feet moving to where the hips were
        u = (tau - (L - self.t_up) + 1) / (self.t_up + 1)
        theta = half_pi * (1 - u) ** 1.5
        crouch = math.sin(math.pi * min(1.0, u * 1.2))
        legs = ((0.9 * crouch, 1.9 * crouch), (0.3 * crouch, 1.5 * crouch))
        arms = ((0.8 * (1 - u) + 0.3, 0.8), (1.2 * (1 - u) + 0.2, 0.6))
        x = self.x_fall + (self.x_up - self.x_fall) * u
        return x, Pose(legs, arms, lean=0.5 * crouch, head=-0.2 * (1 - u), theta=theta)  # type: ignore[arg-type]

    def actors(self, scene: Scene, t: int) -> list:
        x, pose = self.pose_at(t)
        return [(self.y, "person", (self.look, x, self.y, self.h, self.facing, pose))]


_EVENTS = {"FastObject": FastObject, "RunningCrowd": RunningCrowd, "Falling": Falling}


def _draw_vehicle(img: np.ndarray, x_front: float, y: float, h: float, length: float, direction: int,
                  color: tuple, rider: Look, kind: str, t: int) -> None:
    """A side view of a car or motorbike whose front is at ``x_front``; ``y`` is the ground line."""
    d = direction

    def X(u: float) -> float:  # u: distance back from the front, in px
        return x_front - d * u

    col = np.array(color, float)
    if kind == "car":
        body_h = 0.42 * h
        wheel_r = 0.14 * h
        base = y - wheel_r * 0.9
        _poly(img, [(X(0), base), (X(0), base - body_h * 0.55), (X(0.12 * length), base - body_h * 0.7),
                    (X(length), base - body_h * 0.75), (X(length), base)], col)
        roof = base - body_h * 1.55
        _poly(img, [(X(0.25 * length), base - body_h * 0.7), (X(0.38 * length), roof), (X(0.78 * length), roof),
                    (X(0.9 * length), base - body_h * 0.75)], col * 0.95)
        glass = (70, 86, 104)
        _poly(img, [(X(0.29 * length), base - body_h * 0.78), (X(0.4 * length), roof + 0.06 * body_h),
                    (X(0.56 * length), roof + 0.06 * body_h), (X(0.56 * length), base - body_h * 0.78)], glass)
        _poly(img, [(X(0.6 * length), base - body_h * 0.78), (X(0.6 * length), roof + 0.06 * body_h),
                    (X(0.76 * length), roof + 0.06 * body_h), (X(0.85 * length), base - body_h * 0.78)], glass)
        sill = base - body_h * 0.1
        _line(img, (X(0.02 * length), sill), (X(length * 0.98), sill), col * 0.6, max(1, 0.03 * h))
        _disc(img, (X(0.015 * length), base - body_h * 0.45), 0.04 * h, (250, 246, 210))
        _disc(img, (X(0.985 * length), base - body_h * 0.5), 0.035 * h, (200, 30, 30))
        for u in (0.18, 0.8):
            _disc(img, (X(u * length), y - wheel_r), wheel_r, (22, 22, 24))
            _disc(img, (X(u * length), y - wheel_r), wheel_r * 0.5, (150, 150, 156))
    else:  # motorbike with rider
        wheel_r = 0.16 * h
        for u in (0.15, 0.85):
            _disc(img, (X(u * length), y - wheel_r), wheel_r, (22, 22, 24))
            _disc(img, (X(u * length), y - wheel_r), wheel_r * 0.45, (120, 120, 126))
        _poly(img, [(X(0.18 * length), y - wheel_r * 1.6), (X(0.3 * length), y - wheel_r * 2.5),
                    (X(0.75 * length), y - wheel_r * 2.3), (X(0.85 * length), y - wheel_r * 1.2),
                    (X(0.4 * length), y - wheel_r * 1.1)], col)
        fork = ((X(0.15 * length), y - wheel_r), (X(0.28 * length), y - wheel_r * 3.0))
        _line(img, *fork, (40, 40, 44), max(1, 0.03 * h))
        seat_x, seat_y = X(0.55 * length), y - wheel_r * 2.45
        pose = Pose(((1.35, 1.6), (1.25, 1.5)), ((1.3, 0.2), (1.2, 0.3)), lean=0.55, head=-0.3)
        g_h = h * 0.95
        # put the rider's hips on the seat
        geo = _person_geometry(pose, g_h, rider.build)
        draw_person(img, rider, seat_x - d * geo["hip"][0], seat_y + geo["hip"][1], g_h, d, pose)
        _disc(img, (X(0.02 * length), y - wheel_r * 2.2), 0.04 * h, (250, 246, 210))


def _vehicle_shadow(mask: np.ndarray, x_front: float, y: float, h: float, length: float, direction: int) -> None:
    _ellipse(mask, (x_front - direction * length / 2, y + 0.01 * h), (length * 0.55, 0.07 * h), 220)


# ----------------------------------------------------------------------------------------------
# rendering
# ----------------------------------------------------------------------------------------------


def _osd_text(scene: Scene, t: int) -> str:
    s = scene.clock + t // FPS
    return f"CAM {scene.camera:02d}  {scene.date} {s // 3600 % 24:02d}:{s // 60 % 60:02d}:{s % 60:02d}"


# a 5x7 bitmap font for the timestamp overlay (OpenCV's text rendering differs between versions)
_GLYPHS = {
    "0": "01110 10001 10011 10101 11001 10001 01110", "1": "00100 01100 00100 00100 00100 00100 01110",
    "2": "01110 10001 00001 00010 00100 01000 11111", "3": "11110 00001 00001 01110 00001 00001 11110",
    "4": "00010 00110 01010 10010 11111 00010 00010", "5": "11111 10000 11110 00001 00001 10001 01110",
    "6": "00110 01000 10000 11110 10001 10001 01110", "7": "11111 00001 00010 00100 01000 01000 01000",
    "8": "01110 10001 10001 01110 10001 10001 01110", "9": "01110 10001 10001 01111 00001 00010 01100",
    "C": "01110 10001 10000 10000 10000 10001 01110", "A": "01110 10001 10001 11111 10001 10001 10001",
    "M": "10001 11011 10101 10101 10001 10001 10001", ":": "00000 01100 01100 00000 01100 01100 00000",
    "-": "00000 00000 00000 11111 00000 00000 00000", " ": "00000 00000 00000 00000 00000 00000 00000",
}
_GLYPH_BITS = {c: np.array([[b == "1" for b in row] for row in g.split()], bool) for c, g in _GLYPHS.items()}


def _draw_text(img: np.ndarray, text: str, x: int, y: int) -> None:
    """White 5x7 text with a dark outline, top-left corner at ``(x, y)``."""
    w = 6 * len(text)
    ink = np.zeros((9, w + 2), bool)
    for i, ch in enumerate(text):
        ink[1:8, 1 + 6 * i : 6 + 6 * i] = _GLYPH_BITS[ch]
    outline = ink.copy()
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            outline |= np.roll(np.roll(ink, dy, 0), dx, 1)
    region = img[y - 1 : y + 8, x - 1 : x + w + 1]
    region[outline[: region.shape[0], : region.shape[1]]] = (16, 16, 16)
    region[ink[: region.shape[0], : region.shape[1]]] = (236, 236, 236)


def render_frames(video: VideoRecord) -> Iterator[np.ndarray]:
    """The frames of a demo video: uint8 ``[240, 320, 3]`` RGB, ``demo_video_length(video.id)`` of them.

    Deterministic: the same row gives the same bytes on every call.
    """
    n = demo_video_length(video.id)
    interval = event_interval(video)
    scene = _make_scene(video.id)
    walkers = _make_walkers(video.id, scene)
    event: Event | None = None
    if interval is not None:
        event = _EVENTS[video.cls](video.id, scene, *interval, walkers)
    noise_rng = _rng(video.id, "noise")
    H, W = HEIGHT, WIDTH
    for t in range(n):
        frame = scene.background.copy()
        items: list[tuple[float, str, tuple]] = []
        for w in walkers:
            x, y, h, facing, pose = w.state(scene, t)
            if -h < x < W + h:
                items.append((y, "person", (w.look, x, y, h, facing, pose)))
        if isinstance(event, Falling) and not (event.start <= t < event.end):
            x, y, h, facing, pose = event.walker_state(scene, t)
            if -h < x < W + h:
                items.append((y, "person", (event.look, x, y, h, facing, pose)))
        if event is not None and event.start <= t < event.end:
            items += event.actors(scene, t)
        items.sort(key=lambda it: it[0])
        # shadows first (they darken the ground under everybody), then far-to-near drawing
        mask = np.zeros((H, W), np.uint8)
        for _, kind, args in items:
            if kind == "person":
                look, x, y, h, facing, pose = args
                person_shadow(mask, scene, x, y, h, facing, pose)
            else:
                x_front, y, h, length, direction = args[:5]
                _vehicle_shadow(mask, x_front, y, h, length, direction)
        if items:
            k = int(round((1 - scene.shadow_dark) * 256))
            f16 = frame.astype(np.uint16)
            factor = 256 - ((mask.astype(np.uint16) * k) >> 8)
            frame = ((f16 * factor[..., None]) >> 8).astype(np.uint8)
        for _, kind, args in items:
            if kind == "person":
                look, x, y, h, facing, pose = args
                draw_person(frame, look, x, y, h, facing, pose)
            else:
                x_front, y, h, length, direction, color, rider, tt = args
                _draw_vehicle(frame, x_front, y, h, length, direction, color, rider, kind, tt)
        # sensor noise (integers only), then the camera's timestamp overlay
        noise = noise_rng.integers(0, 7, (H, W), dtype=np.int16) - 3
        frame = np.clip(frame.astype(np.int16) + noise[..., None], 0, 255).astype(np.uint8)
        _draw_text(frame, _osd_text(scene, t), 4, 3)
        yield np.ascontiguousarray(frame)


def event_pixels(video: VideoRecord) -> np.ndarray:
    """Per frame, how many pixels the anomalous event changes (0 for normal frames); for checks.

    Renders each frame with and without the event's actors (the falling person counts only while
    not walking normally).
    """
    n = demo_video_length(video.id)
    out = np.zeros(n, np.int64)
    interval = event_interval(video)
    if interval is None:
        return out
    scene = _make_scene(video.id)
    event = _EVENTS[video.cls](video.id, scene, *interval, _make_walkers(video.id, scene))
    for t in range(n):
        if not (event.start <= t < event.end):
            continue
        canvas = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
        for _, kind, args in event.actors(scene, t):
            if kind == "person":
                look, x, y, h, facing, pose = args
                draw_person(canvas, Look((255,) * 3, (255,) * 3, (255,) * 3, (255,) * 3, (255,) * 3, look.build, True),
                            x, y, h, facing, pose)
            else:
                x_front, y, h, length, direction, color, rider, tt = args
                white = Look((255,) * 3, (255,) * 3, (255,) * 3, (255,) * 3, (255,) * 3, rider.build, True)
                _draw_vehicle(canvas, x_front, y, h, length, direction, (255, 255, 255), white, kind, tt)
        out[t] = int((canvas.max(axis=2) > 0).sum())
    return out


# ----------------------------------------------------------------------------------------------
# writing the dataset
# ----------------------------------------------------------------------------------------------


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

    from pipeline.cache import atomic_path

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
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a dataset is for everybody to read


def _write_frame_folder(video: VideoRecord, dest: Path) -> None:
    import cv2

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        for i, frame in enumerate(render_frames(video)):
            bgr = cv2.cvtColor(frame, cv2.COLOR_RGB2BGR)
            ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
            if not ok:
                raise RuntimeError(f"{video.id}: JPEG encoding failed for frame {i}")
            with open(tmp / f"{i:06d}.jpg", "wb") as fh:
                fh.write(buf.tobytes())
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _generate_one(video: VideoRecord, root: str) -> str:
    """Render and write one video (atomically), then its completion stamp; returns the id."""
    from pipeline.cache import atomic_write_text

    dest = Path(root) / video.path
    if _is_frame_folder(video):
        _write_frame_folder(video, dest)
    else:
        if dest.is_dir():
            shutil.rmtree(dest)
        _write_mp4(video, dest)
    atomic_write_text(Path(root) / _STATE_DIR / f"{video.id}.json", json.dumps({"stamp": _stamp(video)}) + "\n")
    return video.id


def _is_complete(video: VideoRecord, root: Path) -> bool:
    dest = root / video.path
    state = root / _STATE_DIR / f"{video.id}.json"
    if not dest.exists() or not state.is_file():
        return False
    try:
        return json.loads(state.read_text()).get("stamp") == _stamp(video)
    except (OSError, ValueError):
        return False


def _remove_stale_temps(root: Path, videos: list[VideoRecord], older_than_s: float = 120.0) -> None:
    """Remove temporaries left by killed runs (old enough not to belong to a running generator)."""
    now = time.time()
    folders = {(root / v.path).parent for v in videos} | {root / _STATE_DIR}
    for folder in folders:
        if not folder.is_dir():
            continue
        for p in folder.glob(".*.tmp"):
            try:
                if now - p.stat().st_mtime < older_than_s:
                    continue
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
            except OSError:
                pass


def generate_demo_dataset(
    root: str | Path, manifest_path: str | Path = DEMO_MANIFEST, progress: bool = True, workers: int | None = None
) -> Manifest:
    """Write every video of the demo manifest under ``root`` and return the manifest for ``root``.

    Videos already complete (same manifest row, same generator version: a stamp in
    ``root/.demo_state/<id>.json`` written after the video) are skipped, so an interrupted run
    resumes; each video is written to a temporary file or folder and renamed into place.
    Temporaries of killed runs older than two minutes are removed. The manifest is copied to
    ``root/manifest.csv``.

    Args:
        root: data root.
        manifest_path: the demo manifest (rows with paths ``videos/<id>.mp4`` or ``frames/<id>``).
        progress: show a tqdm progress bar.
        workers: processes rendering in parallel (default: up to 2, one per CPU core).
    """
    from pipeline.cache import atomic_write_bytes

    root = Path(root)
    manifest_path = Path(manifest_path)
    manifest = load_manifest(manifest_path, root, check_files=False)
    for v in manifest.videos:
        event_interval(v)  # validate every row before writing anything
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(root, manifest.videos)
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


# ----------------------------------------------------------------------------------------------
# the manifest itself
# ----------------------------------------------------------------------------------------------

_TRAIN_CLASSES = ["Normal", "FastObject", "Normal", "RunningCrowd", "Normal", "Falling", "Normal", "FastObject",
                  "Normal", "RunningCrowd", "Normal", "FastObject", "Normal", "RunningCrowd", "Normal", "Falling",
                  "Normal", "FastObject", "Normal", "RunningCrowd"]
_TEST_CLASSES = ["Normal", "FastObject", "Normal", "RunningCrowd", "Falling", "Normal", "FastObject", "Normal",
                 "RunningCrowd", "Normal"]
_TEST_FOLDERS = {"test_002", "test_006", "test_009"}


def demo_manifest_rows() -> list[VideoRecord]:
    """The rows of ``data_manifests/demo.csv`` (how the committed file was made)."""
    rows = []
    for split, classes in (("train", _TRAIN_CLASSES), ("test", _TEST_CLASSES)):
        for i, cls in enumerate(classes):
            vid = f"{split}_{i:03d}"
            path = f"frames/{vid}" if vid in _TEST_FOLDERS else f"videos/{vid}.mp4"
            label = 0 if cls == "Normal" else 1
            intervals = (derive_interval(vid, cls),) if (label and split == "test") else ()
            rows.append(VideoRecord(vid, path, split, label, cls, intervals))
    return rows


def write_demo_manifest(dest: str | Path = DEMO_MANIFEST) -> None:
    from pipeline.cache import atomic_write_text
    from pipeline.manifest import COLUMNS

    lines = [
        "# The demo dataset, generated by pipeline.demo_data (python -m pipeline.demo_data ROOT).",
        "# 320x240 30 fps synthetic plaza scenes, 112-160 frames each (length derived from the id).",
        "# Test intervals are frame ranges start-end, 0-based, end exclusive; training rows carry none.",
        ",".join(COLUMNS),
    ]
    for v in demo_manifest_rows():
        ivs = ";".join(f"{s}-{e}" for s, e in v.intervals)
        lines.append(",".join([v.id, v.path, v.split, str(v.label), v.cls, ivs]))
    atomic_write_text(Path(dest), "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Generate the demo dataset.")
    ap.add_argument("root", nargs="?", help="data root to write the videos under")
    ap.add_argument("--manifest", default=str(DEMO_MANIFEST))
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--write-manifest", action="store_true", help="rewrite data_manifests/demo.csv and exit")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.write_manifest:
        write_demo_manifest(Path(args.manifest))
        return
    if not args.root:
        ap.error("give the data root")
    generate_demo_dataset(Path(args.root), Path(args.manifest), workers=args.workers)


if __name__ == "__main__":
    main()
