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

from pathlib import Path

from pipeline.core.stage import GeneratedData
from pipeline.demo.timeline import ANOMALY_CLASSES, DEMO_MANIFEST, FPS, GENERATOR_VERSION, HEIGHT, MAX_FRAMES, MIN_FRAMES, WIDTH, X264_OPTIONS, demo_ground_truth, demo_video_length, derive_interval, event_interval, video_rng
from pipeline.demo.drawing import draw_disc, draw_ellipse, draw_line, draw_poly, draw_rect, fixed_point, shaded, value_noise
from pipeline.demo.scene import Scene, make_scene
from pipeline.demo.people import Look, Pose, Walker, draw_person, make_walkers, person_extent, person_geometry, person_shadow, walk_pose
from pipeline.demo.events import Event, Falling, FastObject, RunningCrowd, draw_vehicle, vehicle_shadow
from pipeline.demo.render import event_pixels, render_frames
from pipeline.demo.writer import generate_demo_dataset, rgb_to_i420
from pipeline.demo.rows import demo_manifest_rows, main, write_demo_manifest


def _generate(root: Path, progress: bool) -> None:
    generate_demo_dataset(root, progress=progress)


#: the demo as a dataset made on demand: ``data.manifest = 'demo'`` (see ``pipeline.core.stage.GeneratedData``)
DEMO_DATA = GeneratedData(manifest=DEMO_MANIFEST, root="demo_data", generate=_generate)

__all__ = [
    "ANOMALY_CLASSES",
    "DEMO_MANIFEST",
    "Event",
    "FPS",
    "Falling",
    "FastObject",
    "GENERATOR_VERSION",
    "HEIGHT",
    "Look",
    "MAX_FRAMES",
    "MIN_FRAMES",
    "Pose",
    "RunningCrowd",
    "Scene",
    "WIDTH",
    "Walker",
    "X264_OPTIONS",
    "demo_ground_truth",
    "demo_manifest_rows",
    "demo_video_length",
    "derive_interval",
    "draw_disc",
    "draw_ellipse",
    "draw_line",
    "draw_person",
    "draw_poly",
    "draw_rect",
    "draw_vehicle",
    "event_interval",
    "event_pixels",
    "fixed_point",
    "generate_demo_dataset",
    "main",
    "make_scene",
    "make_walkers",
    "person_extent",
    "person_geometry",
    "person_shadow",
    "render_frames",
    "rgb_to_i420",
    "shaded",
    "value_noise",
    "vehicle_shadow",
    "video_rng",
    "walk_pose",
    "write_demo_manifest",
    "DEMO_DATA",
]
