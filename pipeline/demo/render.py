"""Rendering a demo video frame by frame, with its timestamp overlay, and its event pixels."""

from __future__ import annotations

from typing import Iterator

import numpy as np

from pipeline.core.manifest import VideoRecord
from pipeline.demo.events import EVENTS, Event, Falling, draw_vehicle, vehicle_shadow
from pipeline.demo.people import Look, draw_person, make_walkers, person_shadow
from pipeline.demo.scene import Scene, make_scene
from pipeline.demo.timeline import FPS, HEIGHT, WIDTH, demo_video_length, event_interval, video_rng


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
    scene = make_scene(video.id)
    walkers = make_walkers(video.id, scene)
    event: Event | None = None
    if interval is not None:
        event = EVENTS[video.cls](video.id, scene, *interval, walkers)
    noise_rng = video_rng(video.id, "noise")
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
                vehicle_shadow(mask, x_front, y, h, length, direction)
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
                draw_vehicle(frame, x_front, y, h, length, direction, color, rider, kind, tt)
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
    scene = make_scene(video.id)
    event = EVENTS[video.cls](video.id, scene, *interval, make_walkers(video.id, scene))
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
                draw_vehicle(canvas, x_front, y, h, length, direction, (255, 255, 255), white, kind, tt)
        out[t] = int((canvas.max(axis=2) > 0).sum())
    return out
