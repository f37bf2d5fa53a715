"""Drawing helpers: integer OpenCV primitives with 4 bits of sub-pixel precision, value noise."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np



SHIFT = 4
_ONE = 1 << SHIFT


def fixed_point(x: float, y: float) -> tuple[int, int]:
    return (math.floor(x * _ONE + 0.5), math.floor(y * _ONE + 0.5))


def _c(color: Sequence[float] | float) -> tuple[int, int, int]:
    if isinstance(color, (int, float, np.integer, np.floating)):
        return (int(max(0, min(255, round(float(color))))),) * 3
    return tuple(int(max(0, min(255, round(v)))) for v in color)  # type: ignore[return-value]


def shaded(color: Sequence[float], f: float) -> tuple[int, int, int]:
    return _c([v * f for v in color])


def draw_line(img: np.ndarray, a: tuple[float, float], b: tuple[float, float], color, thickness: float) -> None:
    import cv2

    cv2.line(img, fixed_point(*a), fixed_point(*b), _c(color), max(1, int(round(thickness))), cv2.LINE_AA, SHIFT)


def draw_disc(img: np.ndarray, c: tuple[float, float], r: float, color) -> None:
    import cv2

    cv2.circle(img, fixed_point(*c), max(_ONE // 2, int(round(r * _ONE))), _c(color), -1, cv2.LINE_AA, SHIFT)


def draw_poly(img: np.ndarray, pts: Sequence[tuple[float, float]], color) -> None:
    import cv2

    arr = np.array([fixed_point(x, y) for x, y in pts], np.int32)
    cv2.fillPoly(img, [arr], _c(color), cv2.LINE_AA, SHIFT)


def draw_rect(img: np.ndarray, x0: float, y0: float, x1: float, y1: float, color) -> None:
    draw_poly(img, [(x0, y0), (x1, y0), (x1, y1), (x0, y1)], color)


def draw_ellipse(img: np.ndarray, c: tuple[float, float], axes: tuple[float, float], color, angle: float = 0.0) -> None:
    import cv2

    ax = (max(1, int(round(axes[0] * _ONE))), max(1, int(round(axes[1] * _ONE))))
    cv2.ellipse(img, fixed_point(*c), ax, angle, 0, 360, _c(color), -1, cv2.LINE_AA, SHIFT)


def value_noise(rng: np.random.Generator, h: int, w: int, cell: float, octaves: int = 3) -> np.ndarray:
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
