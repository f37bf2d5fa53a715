"""The static scene of a demo video: a plaza with a facade, paving, grass and street furniture."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.demo.drawing import SHIFT, draw_disc, draw_ellipse, draw_line, draw_poly, draw_rect, fixed_point, value_noise
from pipeline.demo.timeline import HEIGHT, WIDTH, video_rng


_PAVING = [(150, 148, 142), (178, 168, 150), (158, 118, 104), (118, 118, 122), (170, 160, 138)]
_FACADE = [(172, 170, 164), (150, 84, 66), (204, 192, 160), (96, 112, 130), (188, 164, 130)]
_GRASS = [(78, 118, 52), (92, 128, 60), (70, 104, 56)]
SKIN = [(232, 196, 168), (204, 156, 124), (168, 118, 88), (116, 80, 60), (240, 206, 182)]
HAIR = [(32, 26, 22), (74, 52, 36), (126, 94, 54), (206, 176, 116), (96, 96, 96), (18, 18, 18)]
SHIRT = [
    (196, 40, 40), (40, 72, 164), (44, 132, 64), (222, 200, 60), (236, 236, 236), (32, 32, 38),
    (124, 124, 130), (232, 122, 40), (112, 52, 132), (60, 152, 172), (172, 92, 60), (240, 172, 184),
]
PANTS = [(42, 52, 84), (30, 30, 36), (92, 92, 98), (164, 144, 112), (62, 72, 112), (84, 62, 46)]
SHOES = [(26, 26, 26), (210, 210, 210), (92, 62, 42)]
CAR = [(180, 30, 30), (30, 60, 150), (225, 225, 228), (30, 30, 34), (150, 152, 158), (40, 110, 60), (230, 190, 40)]


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


def make_scene(video_id: str) -> Scene:
    import cv2

    rng = video_rng(video_id, "scene")
    H, W = HEIGHT, WIDTH
    fb = int(rng.integers(46, 62))
    y0 = fb - float(rng.uniform(12, 20))
    k = float(rng.uniform(88, 100)) / (200 - y0)  # a person with feet at y=200 is 88-100 px tall
    light = float(rng.uniform(0.85, 1.08))
    img = np.zeros((H, W, 3))

    # ground: paving colour modulated by smooth noise, a perspective tile grid, stains
    pav = np.array(_PAVING[rng.integers(len(_PAVING))], float) * light
    n1 = value_noise(rng, H, W, 40, 3)
    n2 = value_noise(rng, H, W, 6, 2)
    ground = pav[None, None, :] * (0.82 + 0.3 * n1 + 0.12 * n2)[..., None]
    img[:] = ground
    grid = np.zeros((H, W), np.uint8)
    tile = float(rng.uniform(0.18, 0.32))  # tile size in "person heights"
    vx = float(rng.uniform(100, 220))
    y = fb + 2.0
    while y < H:
        cv2.line(grid, fixed_point(0, y), fixed_point(W, y), 255, 1, cv2.LINE_AA, SHIFT)
        y += tile * k * (y - y0) * 0.55
    for i in range(-40, 41):
        xb = vx + i * tile * k * (H - y0)  # where the line meets the bottom edge
        cv2.line(grid, fixed_point(vx + (xb - vx) * (fb - y0) / (H - y0), fb), fixed_point(xb, H), 255, 1, cv2.LINE_AA, SHIFT)
    img *= (1 - 0.16 * grid / 255.0)[..., None]
    stains = value_noise(rng, H, W, 18, 2)
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
    draw_poly(grass_mask, pts, (255, 255, 255))
    gcol = np.array(_GRASS[rng.integers(len(_GRASS))], float) * light
    gn = value_noise(rng, H, W, 4, 2)
    grass = gcol[None, None, :] * (0.7 + 0.55 * gn + 0.2 * n1)[..., None]
    a = (grass_mask / 255.0)[..., None]
    img = img * (1 - a) + grass * a

    # facade: wall colour with texture, windows, a door/shop front, a curb line
    fac = np.array(_FACADE[rng.integers(len(_FACADE))], float) * light
    fn = value_noise(rng, fb, W, 8, 2)
    img[:fb] = fac[None, None, :] * (0.88 + 0.2 * fn)[..., None]
    glass = np.array([64, 78, 92], float) * float(rng.uniform(0.8, 1.3))
    win_w, win_h = float(rng.uniform(14, 24)), float(rng.uniform(10, 16))
    gap = float(rng.uniform(10, 22))
    x = float(rng.uniform(2, 14))
    door = int(rng.integers(1, 5))
    i = 0
    while x < W:
        if i == door:  # a shop front / door reaching the ground
            draw_poly(img, [(x, fb - 30), (x + 28, fb - 30), (x + 28, fb), (x, fb)], glass * 0.7)
            draw_line(img, (x + 14, fb - 30), (x + 14, fb), fac * 0.6, 1)
            x += 28 + gap
        else:
            for wy in (fb - 2 * win_h - 14, fb - win_h - 6):
                if wy > 2:
                    draw_rect(img, x - 1, wy - 1, x + win_w + 1, wy + win_h + 1, fac * 0.7)
                    draw_rect(img, x, wy, x + win_w, wy + win_h, glass * float(rng.uniform(0.8, 1.25)))
                    draw_line(img, (x + win_w / 2, wy), (x + win_w / 2, wy + win_h), fac * 0.75, 1)
            x += win_w + gap
        i += 1
    draw_poly(img, [(0, fb - 1), (W, fb - 1), (W, fb + 3), (0, fb + 3)], fac * 0.6 + 60)  # curb
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
            draw_ellipse(smask, (x + shadow_dx * s * 0.3, y + 1), (bw * 0.6, 0.06 * s), 255)
            for lx in (x - bw * 0.4, x + bw * 0.4):
                draw_line(img, (lx, y), (lx, y - 0.24 * s), wood * 0.5, max(1, 0.03 * s))
            draw_rect(img, x - bw / 2, y - 0.26 * s, x + bw / 2, y - 0.21 * s, wood)  # seat
            draw_rect(img, x - bw / 2, y - 0.46 * s, x + bw / 2, y - 0.38 * s, wood * 0.9)  # backrest
            draw_line(img, (x - bw * 0.4, y - 0.46 * s), (x - bw * 0.4, y - 0.24 * s), wood * 0.5, max(1, 0.025 * s))
            draw_line(img, (x + bw * 0.4, y - 0.46 * s), (x + bw * 0.4, y - 0.24 * s), wood * 0.5, max(1, 0.025 * s))
        elif kind == "lamp":
            top = y - 1.9 * s
            draw_line(smask, (x, y), (x + shadow_dx * 1.9 * s, y + 0.08 * s), 255, max(1, 0.05 * s))
            pole = np.array((52, 58, 56), float)
            draw_line(img, (x, y), (x, top), pole, max(1, 0.045 * s))
            draw_line(img, (x, top), (x + 0.18 * s, top - 0.02 * s), pole, max(1, 0.035 * s))
            draw_ellipse(img, (x + 0.2 * s, top + 0.02 * s), (0.08 * s, 0.035 * s), (230, 226, 200))
            draw_line(img, (x - 0.04 * s, y), (x + 0.04 * s, y), pole * 0.8, max(1, 0.06 * s))
        elif kind == "bin":
            bw, bh = 0.16 * s, 0.38 * s
            col = np.array([(50, 90, 60), (70, 70, 74), (40, 60, 100)][rng.integers(3)], float)
            draw_ellipse(smask, (x + shadow_dx * s * 0.2, y + 1), (bw * 0.9, 0.04 * s), 255)
            draw_poly(img, [(x - bw, y - bh), (x + bw, y - bh), (x + bw * 0.85, y), (x - bw * 0.85, y)], col)
            draw_rect(img, x - bw * 1.1, y - bh - 0.04 * s, x + bw * 1.1, y - bh, col * 0.7)
        else:  # tree in a round planter
            r = 0.55 * s
            draw_ellipse(smask, (x + shadow_dx * s * 1.2, y + 0.04 * s), (r * 1.1, r * 0.3), 255)
            draw_line(img, (x, y), (x, y - 1.3 * s), (82, 60, 42), max(2, 0.07 * s))
            draw_ellipse(img, (x, y), (0.3 * s, 0.08 * s), (120, 118, 112))
            leaf = np.array(_GRASS[rng.integers(len(_GRASS))], float) * 0.8
            for _ in range(7):
                cx, cy = x + float(rng.normal(0, r * 0.35)), y - 1.55 * s + float(rng.normal(0, r * 0.3))
                draw_disc(img, (cx, cy), r * float(rng.uniform(0.45, 0.7)), leaf * float(rng.uniform(0.75, 1.2)))
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
