"""Dual TV-L1 optical flow in PyTorch, batched over frame pairs, on the CPU or a GPU.

The scheme is the duality-based TV-L1 of

    C. Zach, T. Pock, H. Bischof, "A Duality Based Approach for Realtime TV-L1 Optical Flow",
    DAGM 2007,

in the form of J. Sanchez, E. Meinhardt-Llopis, G. Facciolo, "TV-L1 Optical Flow Estimation",
Image Processing On Line 3 (2013), pp. 137-150 (coarse-to-fine pyramid, several warps per scale,
an alternation of a pointwise thresholding step for the auxiliary field ``v`` and Chambolle's
projection for the dual variables ``p``). OpenCV's ``cv::optflow::DualTVL1OpticalFlow`` (opencv_contrib,
``modules/optflow/src/tvl1flow.cpp``) descends from that IPOL code; this module follows OpenCV's
implementation choices, so that both give the same flow within a small fraction of a pixel
(``tests/test_tvl1.py``):

- input: 8-bit grey values converted to float **without rescaling** (values in [0, 255]);
- pyramid: each level is ``cv::resize`` of the previous float level by ``scale_step`` (bilinear with
  half-pixel centres, no anti-aliasing, sizes rounded to nearest), stopping before a side < 16;
- per scale: gradients of I1 by centred differences (one-sided, halved, at the borders), then per warp
  I1 and its gradients are warped with ``cv::remap`` bicubic (a = -0.75, zeros outside the image),
  ``rho_c = I1w - I1wx u1 - I1wy u2 - I0``;
- iterations: at most ``outer_iterations`` x ``inner_iterations`` per warp; a 5x5 median filter of
  ``u`` (replicated borders) starts each outer iteration; the dual variables use forward differences
  (zero at the last column / row) and the matching backward-difference divergence; they are reset to
  zero at the start of each scale only;
- stopping rule: a warp ends when the sum over the image of the squared update of ``u`` is at most
  ``epsilon**2 * H * W``;
- between scales the flow is resized (bilinear) to the finer level's size and multiplied by
  ``1 / scale_step``.

Batching and the stopping rule (the one difference from OpenCV): the number of iterations OpenCV
runs is data-dependent. Here every pair of a batch runs in lock step; a pair whose update fell to
``epsilon`` is *frozen* by a mask (its ``u`` and ``p`` no longer change, and it is not median
filtered) until the next warp, which gives each pair exactly the iterations OpenCV would run on it.
On a GPU no value is read back to the host inside the iterations; once per outer iteration (every
30 inner iterations by default) one boolean is read to stop early when every pair of the batch is
frozen (``early_exit=False`` removes that read too, at the cost of always running the maximum). On
the CPU, where reading a value back costs nothing, the batch stops as soon as every pair is frozen,
and a batch of one pair skips the masks. The
remaining differences are float rounding (summation order of the stopping sum, the resize and
interpolation arithmetic), which can move a pair's stopping point by an iteration.

Only OpenCV's default ``gamma = 0`` (no illumination term) is implemented.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

#: OpenCV stops building the pyramid before a level whose width or height is below this.
MIN_LEVEL_SIDE = 16
#: the thresholding step divides by |grad I1|^2 only above float32's machine epsilon (as OpenCV).
FLT_EPSILON = float(torch.finfo(torch.float32).eps)


@dataclass(frozen=True)
class TVL1Params:
    """Parameters of Dual TV-L1; the defaults are OpenCV's (``DualTVL1OpticalFlow_create()``).

    Attributes:
        tau: time step of the dual (Chambolle) projection; ``tau <= 0.25`` for convergence
            (Zach et al. 2007, Sec. 3; OpenCV default 0.25).
        lambda_: weight of the data term (OpenCV 0.15).
        theta: coupling of ``u`` and ``v`` (OpenCV 0.3).
        nscales: pyramid levels (OpenCV 5).
        warps: warps per level (OpenCV 5).
        epsilon: stopping threshold on the RMS update per pixel (OpenCV 0.01).
        inner_iterations, outer_iterations: iteration caps per warp (OpenCV 30 and 10).
        scale_step: pyramid down-scaling factor (OpenCV 0.8).
        median_filtering: median filter size applied to the flow at each outer iteration (OpenCV 5;
            1 or 0 = none; only 3 and 5 are what OpenCV supports on float images).
    """

    tau: float = 0.25
    lambda_: float = 0.15
    theta: float = 0.3
    nscales: int = 5
    warps: int = 5
    epsilon: float = 0.01
    inner_iterations: int = 30
    outer_iterations: int = 10
    scale_step: float = 0.8
    median_filtering: int = 5

    def __post_init__(self) -> None:
        if self.nscales < 1 or self.warps < 1 or self.inner_iterations < 1 or self.outer_iterations < 1:
            raise ValueError("nscales, warps, inner_iterations and outer_iterations must be >= 1")
        if not 0 < self.scale_step < 1:
            raise ValueError(f"scale_step must be in (0, 1), got {self.scale_step}")
        if self.median_filtering > 1 and self.median_filtering % 2 == 0:
            raise ValueError(f"median_filtering must be odd, got {self.median_filtering}")
        if not (self.tau > 0 and self.theta > 0 and self.lambda_ > 0 and self.epsilon >= 0):
            raise ValueError("tau, theta and lambda_ must be > 0 and epsilon >= 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------------
# Image operations, each as OpenCV does them, on [B, H, W] float32 tensors


def _linear_resize_matrix(n_in: int, n_out: int, scale: float, device: torch.device) -> torch.Tensor:
    """``[n_out, n_in]`` weights of ``cv::resize`` INTER_LINEAR along one axis, built on ``device``
    (no host-to-device copy, which on a GPU would wait for the queued work).

    ``scale`` is source pixels per destination pixel; destination pixel ``d`` samples the source at
    ``(d + 0.5) * scale - 0.5``, clamped to the first / last source pixel (no anti-aliasing).
    """
    s = (torch.arange(n_out, dtype=torch.float64, device=device) + 0.5) * scale - 0.5
    i0 = torch.floor(s)
    frac = s - i0
    outside = (i0 < 0) | (i0 >= n_in - 1)
    i0 = i0.clamp(0, n_in - 1)
    frac = torch.where(outside, torch.zeros_like(frac), frac).to(torch.float32)
    i0 = i0.long()
    i1 = torch.clamp(i0 + 1, max=n_in - 1)
    m = torch.zeros(n_out, n_in, dtype=torch.float32, device=device)
    rows = torch.arange(n_out, device=device)
    m.index_put_((rows, i0), 1.0 - frac, accumulate=True)
    m.index_put_((rows, i1), frac, accumulate=True)
    return m


def resize_linear(x: torch.Tensor, size: tuple[int, int], scale: tuple[float, float] | None = None) -> torch.Tensor:
    """Bilinear resize of ``x`` ``[B, H, W]`` float32 to ``size = (h, w)`` as ``cv::resize`` INTER_LINEAR.

    ``scale`` (source pixels per destination pixel, ``(sy, sx)``) defaults to ``H / h, W / w``; OpenCV
    uses ``1 / fx`` instead when called with a scale factor (the pyramid), which differs from the
    size ratio once the size is rounded. Two small matrix products (rows, then columns).
    """
    _, h_in, w_in = x.shape
    h, w = size
    sy, sx = scale if scale is not None else (h_in / h, w_in / w)
    ry = _linear_resize_matrix(h_in, h, sy, x.device)
    rx = _linear_resize_matrix(w_in, w, sx, x.device)
    return torch.matmul(torch.matmul(ry, x), rx.t())


def _odd_even_merge_sort(n: int) -> list[tuple[int, int]]:
    """Comparators ``(a, b)``, ``a < b``, of Batcher's odd-even merge sort over ``n`` wires (the
    network for the next power of two, without the comparators that touch a wire ``>= n``: those
    wires would hold +inf, which no comparator moves)."""
    size = 1
    while size < n:
        size *= 2
    comps = []
    p = 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        comps.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return [(a, b) for a, b in comps if b < n]


@functools.lru_cache(maxsize=None)
def _median_network(n: int) -> tuple[tuple[int, int, bool, bool], ...]:
    """The comparators of :func:`_odd_even_merge_sort` that the middle output depends on, each with
    which of its outputs (min, max) is read later: 113 comparators, 202 min/max for 25 values."""
    need = {n // 2}
    kept = []
    for a, b in reversed(_odd_even_merge_sort(n)):
        if a in need or b in need:
            kept.append((a, b, a in need, b in need))
            need |= {a, b}
    return tuple(reversed(kept))


def median_blur(x: torch.Tensor, k: int) -> torch.Tensor:
    """``k x k`` median filter of ``x`` ``[B, H, W]`` with replicated borders (``cv::medianBlur``;
    equal to it, ``tests/test_tvl1.py``).

    A selection network of elementwise min / max over the ``k * k`` shifted views of the padded
    image: no ``[B, H, W, k * k]`` copy and no per-pixel sort (8x faster than ``Tensor.median`` over
    unfolded patches on the CPU), and on a GPU a fixed sequence of elementwise kernels.
    """
    r = k // 2
    h, w = x.shape[1:]
    padded = F.pad(x[:, None], (r, r, r, r), mode="replicate")[:, 0]
    wires: list[Any] = [padded[:, dy : dy + h, dx : dx + w] for dy in range(k) for dx in range(k)]
    for a, b, need_min, need_max in _median_network(k * k):
        lo = torch.minimum(wires[a], wires[b]) if need_min else None
        hi = torch.maximum(wires[a], wires[b]) if need_max else None
        wires[a], wires[b] = lo, hi
    return wires[(k * k) // 2]


def centered_gradient(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dx, dy)`` of ``x`` ``[B, H, W]``: ``0.5 (x[i+1] - x[i-1])`` inside, ``0.5 (x[1] - x[0])`` and
    ``0.5 (x[-1] - x[-2])`` at the borders (a replicated border does exactly that)."""
    p = F.pad(x[:, None], (1, 1, 1, 1), mode="replicate")[:, 0]
    dx = 0.5 * (p[:, 1:-1, 2:] - p[:, 1:-1, :-2])
    dy = 0.5 * (p[:, 2:, 1:-1] - p[:, :-2, 1:-1])
    return dx, dy


def forward_gradient(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward differences of ``u`` ``[B, H, W]``; zero in the last column (x) / last row (y)."""
    ux = F.pad(u[:, :, 1:] - u[:, :, :-1], (0, 1))
    uy = F.pad(u[:, 1:, :] - u[:, :-1, :], (0, 0, 0, 1))
    return ux, uy


def divergence(px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
    """Backward-difference divergence of ``(px, py)`` ``[B, H, W]`` (values before the first column /
    row count as zero): minus the adjoint of :func:`forward_gradient`."""
    return px - F.pad(px[:, :, :-1], (1, 0)) + py - F.pad(py[:, :-1, :], (0, 0, 1, 0))


def warp_bicubic(images: torch.Tensor, u1: torch.Tensor, u2: torch.Tensor) -> torch.Tensor:
    """``images`` ``[B, C, H, W]`` sampled at ``(x + u1, y + u2)`` like ``cv::remap`` INTER_CUBIC with
    float maps and a zero constant border: bicubic a = -0.75, taps outside the image read 0.
    Returns ``[B, C, H, W]``.

    OpenCV 5 samples float images at the exact float coordinates (checked against ``cv2.remap``:
    within 0.006 grey levels); OpenCV 4 rounded them to 1/32 pixel first (``INTER_BITS``).
    """
    _, _, h, w = images.shape
    ys = torch.arange(h, device=images.device, dtype=images.dtype).view(1, h, 1)
    xs = torch.arange(w, device=images.device, dtype=images.dtype).view(1, 1, w)
    mx = xs + u1
    my = ys + u2
    # normalised for align_corners=True: -1 and 1 are the centres of the first and last pixels
    grid = torch.stack((mx * (2.0 / max(w - 1, 1)) - 1.0, my * (2.0 / max(h - 1, 1)) - 1.0), dim=-1)
    return F.grid_sample(images, grid, mode="bicubic", padding_mode="zeros", align_corners=True)


def to_gray_uint8(frames: torch.Tensor) -> torch.Tensor:
    """RGB ``[..., 3]`` uint8 -> grey ``[...]`` uint8, bit-exact with ``cv2.cvtColor(RGB2GRAY)``
    (BT.601 weights in OpenCV's 15-bit fixed point: 9798 R + 19235 G + 3735 B, rounded; checked on
    every value class in ``tests/test_tvl1.py``)."""
    if frames.dtype != torch.uint8 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 RGB frames [..., 3], got {frames.dtype} {tuple(frames.shape)}")
    f = frames.to(torch.int32)
    g = (f[..., 0] * 9798 + f[..., 1] * 19235 + f[..., 2] * 3735 + (1 << 14)) >> 15
    return g.to(torch.uint8)


# --------------------------------------------------------------------------------------------------
# The solver


def pyramid_sizes(h: int, w: int, params: TVL1Params) -> list[tuple[int, int]]:
    """``(h, w)`` of each pyramid level, finest first, as OpenCV builds it (sizes rounded to nearest,
    half to even; no level with a side below 16)."""
    sizes = [(h, w)]
    for _ in range(1, params.nscales):
        ph, pw = sizes[-1]
        nh, nw = round(ph * params.scale_step), round(pw * params.scale_step)
        if nh < MIN_LEVEL_SIDE or nw < MIN_LEVEL_SIDE:
            break
        sizes.append((nh, nw))
    return sizes


def _iteration(
    u1: torch.Tensor, u2: torch.Tensor, p11: torch.Tensor, p12: torch.Tensor, p21: torch.Tensor,
    p22: torch.Tensor, mask: torch.Tensor | None, i1wx: torch.Tensor, i1wy: torch.Tensor, rho_c: torch.Tensor,
    grad: torch.Tensor, l_t: float, theta: float, taut: float,
) -> tuple[torch.Tensor, ...]:
    """One inner iteration for every pair (``[B, h, w]`` tensors): thresholding step for ``v``, primal
    step for ``u``, dual step for ``p``; pairs whose ``mask`` ``[B, 1, 1]`` is False keep their values
    (``mask=None``: every pair moves). Returns the new ``u1, u2, p11, p12, p21, p22`` and each pair's
    squared update ``[B]`` (OpenCV's stopping sum). A pure function of tensors, so that
    ``torch.compile`` can fuse it into a few kernels."""

    def keep(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        return new if mask is None else torch.where(mask, new, old)

    # thresholding step: v = u + step * grad(I1w), the step chosen by where rho falls (OpenCV estimateV)
    rho = rho_c + i1wx * u1 + i1wy * u2
    lt_grad = l_t * grad
    safe_grad = torch.where(grad > FLT_EPSILON, grad, torch.ones_like(grad))
    step = torch.where(
        rho < -lt_grad,
        l_t,
        torch.where(rho > lt_grad, -l_t, torch.where(grad > FLT_EPSILON, -rho / safe_grad, 0.0)),
    )
    new_u1 = u1 + step * i1wx + theta * divergence(p11, p12)
    new_u2 = u2 + step * i1wy + theta * divergence(p21, p22)
    error = ((new_u1 - u1) ** 2 + (new_u2 - u2) ** 2).sum(dim=(1, 2))
    u1 = keep(new_u1, u1)
    u2 = keep(new_u2, u2)
    # dual step: p = (p + taut grad u) / (1 + taut |grad u|)
    u1x, u1y = forward_gradient(u1)
    u2x, u2y = forward_gradient(u2)
    ng1 = 1.0 + taut * torch.sqrt(u1x * u1x + u1y * u1y)
    ng2 = 1.0 + taut * torch.sqrt(u2x * u2x + u2y * u2y)
    p11 = keep((p11 + taut * u1x) / ng1, p11)
    p12 = keep((p12 + taut * u1y) / ng1, p12)
    p21 = keep((p21 + taut * u2x) / ng2, p21)
    p22 = keep((p22 + taut * u2y) / ng2, p22)
    return u1, u2, p11, p12, p21, p22, error


_compiled: dict[str, Any] = {}


class _CompiledOrEager:
    """The ``torch.compile``'d :func:`_iteration`, or the eager one from the first failure on.

    Compiling needs a working backend (on the CPU, inductor needs a C++ compiler); where it fails,
    the flow is still computed, by the eager iteration (the same arithmetic), after one warning.
    """

    def __init__(self) -> None:
        self.compiled: Any = torch.compile(_iteration, dynamic=True, fullgraph=True)
        self.failed = False

    def __call__(self, *args: Any) -> tuple[torch.Tensor, ...]:
        if not self.failed:
            try:
                return self.compiled(*args)
            except Exception as e:  # noqa: BLE001 - dynamo/inductor raise many types; eager re-raises real errors
                self.failed = True
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                log.warning("tvl1: torch.compile failed (%s: %s); using the eager iteration", type(e).__name__, first)
        return _iteration(*args)


def _iteration_fn(compile: bool) -> Any:
    """:func:`_iteration`, through ``torch.compile`` when asked (compiled once per process, with
    dynamic shapes for the pyramid levels; eager if compiling fails: :class:`_CompiledOrEager`)."""
    if not compile:
        return _iteration
    if "iteration" not in _compiled:
        _compiled["iteration"] = _CompiledOrEager()
    return _compiled["iteration"]


def _one_scale(
    i0: torch.Tensor, i1: torch.Tensor, u1: torch.Tensor, u2: torch.Tensor, params: TVL1Params,
    early_exit: bool, compile: bool, stats: dict[str, int] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Refine the flow ``(u1, u2)`` ``[B, h, w]`` at one pyramid level (see the module docstring)."""
    b, h, w = i0.shape
    stop = params.epsilon**2 * h * w
    l_t = params.lambda_ * params.theta
    taut = params.tau / params.theta
    i1x, i1y = centered_gradient(i1)
    to_warp = torch.stack((i1, i1x, i1y), dim=1)  # [B, 3, h, w]
    p11 = torch.zeros_like(u1)
    p12 = torch.zeros_like(u1)
    p21 = torch.zeros_like(u1)
    p22 = torch.zeros_like(u1)
    # on the CPU a value read back costs nothing: stop each warp as soon as every pair has met the
    # stopping rule (OpenCV's own loop), and a single pair needs no masks at all
    host_checks = i0.device.type == "cpu"
    masked = b > 1 or not host_checks or compile
    iterate = _iteration_fn(compile)
    for _ in range(params.warps):
        warped = warp_bicubic(to_warp, u1, u2)
        i1w, i1wx, i1wy = warped[:, 0], warped[:, 1], warped[:, 2]
        grad = i1wx * i1wx + i1wy * i1wy
        rho_c = i1w - i1wx * u1 - i1wy * u2 - i0
        active = torch.ones(b, dtype=torch.bool, device=i0.device)
        for n_outer in range(params.outer_iterations):
            if (early_exit or host_checks) and n_outer > 0 and not bool(active.any()):  # one host read
                break
            mask = active.view(b, 1, 1)
            if params.median_filtering > 1:
                u1m = median_blur(u1, params.median_filtering)
                u2m = median_blur(u2, params.median_filtering)
                u1, u2 = (torch.where(mask, u1m, u1), torch.where(mask, u2m, u2)) if masked else (u1m, u2m)
            for _ in range(params.inner_iterations):
                u1, u2, p11, p12, p21, p22, error = iterate(
                    u1, u2, p11, p12, p21, p22, mask if masked else None, i1wx, i1wy, rho_c, grad,
                    l_t, params.theta, taut,
                )
                if stats is not None:
                    stats["iterations"] = stats.get("iterations", 0) + 1
                active = active & (error > stop)
                mask = active.view(b, 1, 1)
                if host_checks and not bool(active.any()):
                    break
    return u1, u2


def tvl1_flow(
    i0: torch.Tensor,
    i1: torch.Tensor,
    params: TVL1Params | None = None,
    early_exit: bool = True,
    compile: bool = False,
    stats: dict[str, int] | None = None,
) -> torch.Tensor:
    """Dual TV-L1 flow from ``i0`` to ``i1`` for a batch of frame pairs.

    Args:
        i0, i1: ``[B, H, W]`` grey frames, uint8 (values 0-255) or float32 already in [0, 255]
            (OpenCV's scale for 8-bit input), on any device; H, W >= 16.
        params: solver parameters (OpenCV's defaults).
        early_exit: stop a warp's iterations once every pair has met the stopping rule (one host read
            per outer iteration); False always runs the maximum, with no host read at all.
        compile: run the inner iteration through ``torch.compile`` (fused kernels; the first call per
            pyramid shape compiles, which takes tens of seconds). Same arithmetic, so the same flow
            up to float rounding.
        stats: if given, ``stats["iterations"]`` counts the inner iterations run (per batch).
    Returns:
        ``[B, H, W, 2]`` float32 on the input's device: ``(dx, dy)`` in pixels such that
        ``i1(x + dx, y + dy) ~ i0(x, y)`` (OpenCV's convention).
    """
    params = params or TVL1Params()
    if i0.shape != i1.shape or i0.dim() != 3:
        raise ValueError(
            f"expected two [B, H, W] batches of the same shape, got {tuple(i0.shape)} and {tuple(i1.shape)}"
        )
    b, h, w = i0.shape
    if h < MIN_LEVEL_SIDE or w < MIN_LEVEL_SIDE:
        raise ValueError(f"frames of {h}x{w} are too small for TV-L1 (both sides must be >= {MIN_LEVEL_SIDE})")
    i0 = i0.to(torch.float32)
    i1 = i1.to(torch.float32)
    sizes = pyramid_sizes(h, w, params)
    level_scale = (1.0 / params.scale_step, 1.0 / params.scale_step)
    i0s, i1s = [i0], [i1]
    for size in sizes[1:]:
        i0s.append(resize_linear(i0s[-1], size, level_scale))
        i1s.append(resize_linear(i1s[-1], size, level_scale))
    hc, wc = sizes[-1]
    u1 = torch.zeros(b, hc, wc, dtype=torch.float32, device=i0.device)
    u2 = torch.zeros_like(u1)
    for s in range(len(sizes) - 1, -1, -1):
        u1, u2 = _one_scale(i0s[s], i1s[s], u1, u2, params, early_exit, compile, stats)
        if s > 0:
            u1 = resize_linear(u1, sizes[s - 1]) / params.scale_step
            u2 = resize_linear(u2, sizes[s - 1]) / params.scale_step
    return torch.stack((u1, u2), dim=-1)


def max_iterations(h: int, w: int, params: TVL1Params | None = None) -> int:
    """Upper bound on the inner iterations per pair at ``h x w`` (levels x warps x outer x inner)."""
    params = params or TVL1Params()
    return len(pyramid_sizes(h, w, params)) * params.warps * params.outer_iterations * params.inner_iterations


__all__ = [
    "TVL1Params",
    "centered_gradient",
    "divergence",
    "forward_gradient",
    "max_iterations",
    "median_blur",
    "pyramid_sizes",
    "resize_linear",
    "to_gray_uint8",
    "tvl1_flow",
    "warp_bicubic",
]
