"""The anomalous events (FastObject, RunningCrowd, Falling); each is drawn only inside its interval."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from pipeline.demo.drawing import draw_disc, draw_ellipse, draw_line, draw_poly
from pipeline.demo.people import Look, Pose, Walker, draw_person, person_extent, person_geometry, walk_pose
from pipeline.demo.scene import CAR, Scene
from pipeline.demo.timeline import WIDTH, video_rng


class Event:
    start: int
    end: int

    def actors(self, scene: Scene, t: int) -> list[tuple[float, str, tuple]]:
        """``(y_feet, kind, args)`` to draw at frame ``t`` (only called for start <= t < end)."""
        raise NotImplementedError



class FastObject(Event):
    """One or two vehicles crossing at 10-20 px/frame; one is always visible inside the interval."""

    def __init__(self, video_id: str, scene: Scene, start: int, end: int, walkers: Sequence[Walker] = ()) -> None:
        rng = video_rng(video_id, "event")
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
            vehicles.append((kind, y, h, length, CAR[rng.integers(len(CAR))], Look.random(rng)))
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
        rng = video_rng(video_id, "event")
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
        rng = video_rng(video_id, "event")
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


EVENTS = {"FastObject": FastObject, "RunningCrowd": RunningCrowd, "Falling": Falling}


def draw_vehicle(img: np.ndarray, x_front: float, y: float, h: float, length: float, direction: int,
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
        draw_poly(img, [(X(0), base), (X(0), base - body_h * 0.55), (X(0.12 * length), base - body_h * 0.7),
                    (X(length), base - body_h * 0.75), (X(length), base)], col)
        roof = base - body_h * 1.55
        draw_poly(img, [(X(0.25 * length), base - body_h * 0.7), (X(0.38 * length), roof), (X(0.78 * length), roof),
                    (X(0.9 * length), base - body_h * 0.75)], col * 0.95)
        glass = (70, 86, 104)
        draw_poly(img, [(X(0.29 * length), base - body_h * 0.78), (X(0.4 * length), roof + 0.06 * body_h),
                    (X(0.56 * length), roof + 0.06 * body_h), (X(0.56 * length), base - body_h * 0.78)], glass)
        draw_poly(img, [(X(0.6 * length), base - body_h * 0.78), (X(0.6 * length), roof + 0.06 * body_h),
                    (X(0.76 * length), roof + 0.06 * body_h), (X(0.85 * length), base - body_h * 0.78)], glass)
        sill = base - body_h * 0.1
        draw_line(img, (X(0.02 * length), sill), (X(length * 0.98), sill), col * 0.6, max(1, 0.03 * h))
        draw_disc(img, (X(0.015 * length), base - body_h * 0.45), 0.04 * h, (250, 246, 210))
        draw_disc(img, (X(0.985 * length), base - body_h * 0.5), 0.035 * h, (200, 30, 30))
        for u in (0.18, 0.8):
            draw_disc(img, (X(u * length), y - wheel_r), wheel_r, (22, 22, 24))
            draw_disc(img, (X(u * length), y - wheel_r), wheel_r * 0.5, (150, 150, 156))
    else:  # motorbike with rider
        wheel_r = 0.16 * h
        for u in (0.15, 0.85):
            draw_disc(img, (X(u * length), y - wheel_r), wheel_r, (22, 22, 24))
            draw_disc(img, (X(u * length), y - wheel_r), wheel_r * 0.45, (120, 120, 126))
        draw_poly(img, [(X(0.18 * length), y - wheel_r * 1.6), (X(0.3 * length), y - wheel_r * 2.5),
                    (X(0.75 * length), y - wheel_r * 2.3), (X(0.85 * length), y - wheel_r * 1.2),
                    (X(0.4 * length), y - wheel_r * 1.1)], col)
        fork = ((X(0.15 * length), y - wheel_r), (X(0.28 * length), y - wheel_r * 3.0))
        draw_line(img, *fork, (40, 40, 44), max(1, 0.03 * h))
        seat_x, seat_y = X(0.55 * length), y - wheel_r * 2.45
        pose = Pose(((1.35, 1.6), (1.25, 1.5)), ((1.3, 0.2), (1.2, 0.3)), lean=0.55, head=-0.3)
        g_h = h * 0.95
        # put the rider's hips on the seat
        geo = person_geometry(pose, g_h, rider.build)
        draw_person(img, rider, seat_x - d * geo["hip"][0], seat_y + geo["hip"][1], g_h, d, pose)
        draw_disc(img, (X(0.02 * length), y - wheel_r * 2.2), 0.04 * h, (250, 246, 210))


def vehicle_shadow(mask: np.ndarray, x_front: float, y: float, h: float, length: float, direction: int) -> None:
    draw_ellipse(mask, (x_front - direction * length / 2, y + 0.01 * h), (length * 0.55, 0.07 * h), 220)
