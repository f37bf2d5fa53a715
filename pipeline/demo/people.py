"""People: their looks, walking poses, drawing and shadows, and the walkers of a scene."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipeline.demo.drawing import draw_disc, draw_ellipse, draw_line, shaded
from pipeline.demo.scene import HAIR, PANTS, SHIRT, SHOES, SKIN, Scene
from pipeline.demo.timeline import WIDTH, video_rng


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
            SKIN[rng.integers(len(SKIN))],
            HAIR[rng.integers(len(HAIR))],
            SHIRT[rng.integers(len(SHIRT))],
            PANTS[rng.integers(len(PANTS))],
            SHOES[rng.integers(len(SHOES))],
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


def person_geometry(pose: Pose, h: float, build: float) -> dict:
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
    g = person_geometry(pose, h, look.build)

    def im(p: tuple[float, float]) -> tuple[float, float]:
        return (x + facing * p[0], y - p[1])

    b = look.build
    leg_t, arm_t, torso_t = 0.075 * h * b, 0.05 * h * b, 0.15 * h * b
    far, near = (0, 1)
    # far limbs first, in a darker shade
    for idx, shade in ((far, 0.72), (near, 1.0)):
        hip, knee, ankle, toe = (im(q) for q in g["legs"][idx])
        draw_line(img, hip, knee, shaded(look.pants, shade), leg_t)
        draw_line(img, knee, ankle, shaded(look.pants, shade), leg_t * 0.9)
        draw_line(img, ankle, toe, shaded(look.shoes, shade), leg_t * 0.8)
        if idx == far:
            sh, el, ha = (im(q) for q in g["arms"][far])
            draw_line(img, sh, el, shaded(look.shirt, 0.72), arm_t)
            draw_line(img, el, ha, shaded(look.shirt if look.long_sleeves else look.skin, 0.72), arm_t * 0.9)
            draw_disc(img, ha, arm_t * 0.55, shaded(look.skin, 0.72))
    hip, neck = im(g["hip"]), im(g["neck"])
    draw_disc(img, hip, 0.075 * h * b, look.pants)
    draw_line(img, hip, neck, look.shirt, torso_t)
    hc = im(g["head"])
    r = 0.068 * h
    draw_disc(img, hc, r, look.skin)
    # hair on the back/top of the head
    ux, uy = g["head"][0] - g["neck"][0], g["head"][1] - g["neck"][1]
    n = math.hypot(ux, uy) or 1.0
    hair = (g["head"][0] + (0.35 * ux / n - 0.25 * uy / n) * r, g["head"][1] + (0.35 * uy / n + 0.25 * ux / n) * r)
    draw_disc(img, im(hair), r * 0.8, look.hair)
    sh, el, ha = (im(q) for q in g["arms"][near])
    draw_line(img, sh, el, shaded(look.shirt, 0.92), arm_t)
    draw_line(img, el, ha, look.shirt if look.long_sleeves else look.skin, arm_t * 0.9)
    draw_disc(img, ha, arm_t * 0.55, look.skin)


def person_shadow(mask: np.ndarray, scene: Scene, x: float, y: float, h: float, facing: int, pose: Pose) -> None:
    """Add a figure's ground shadow (a soft ellipse, longer when lying) to ``mask``."""
    st = abs(math.sin(pose.theta))
    length = 0.2 * h + 0.32 * h * st
    cx = x + facing * 0.47 * h * st + scene.shadow_dx * h * 0.35 * (1 - st)
    draw_ellipse(mask, (cx, y + 0.01 * h), (length, 0.05 * h + 0.03 * h * st), 200)


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


def make_walkers(video_id: str, scene: Scene) -> list[Walker]:
    rng = video_rng(video_id, "walkers")
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
