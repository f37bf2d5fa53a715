"""Resizing and spatial crops in torch (pytorchvideo's transforms are broken with current torchvision).

Crop orders:

- ``torchvision``: torchvision's ``TenCrop``/``FiveCrop`` order: top-left, top-right, bottom-left,
  bottom-right, centre, then the same five of the horizontally flipped image (10-crop). RTFM's
  features used ``TenCrop`` (RTFM issues 21 and 33). Crop ``tl_flip`` is the top-left crop *of the
  mirrored frame*, i.e. the mirrored top-right crop, as ``ten_crop`` computes it (``five_crop`` of
  ``hflip(img)``, torchvision/transforms/functional.py); likewise ``tr_flip`` is the mirrored
  top-left, ``bl_flip``/``br_flip`` the mirrored bottom-right/bottom-left, ``c_flip`` the mirrored
  centre (one pixel to the left when ``W - s`` is odd). Before 2026-12 this module mirrored each crop
  in place, which swapped crops 5/6 and 7/8 relative to ``TenCrop``; the extract stage's cache key
  records the rule, so no feature of the old order is reused.
- ``caffe``: torchvision's order, with the centre crop where Caffe's data layers put it,
  ``(H - s) // 2`` (C3D v1.0's ``video_data_layer.cpp``; Sultani et al.'s C3D features), where
  torchvision rounds ``(H - s) / 2``: they differ when ``H - s`` is odd (171 - 112 = 59: 29 or 30).
- ``roc-ng``: the Roc-Ng / XD-Violence files ``__0``..``__9``: centre, then the four corners
  (tl, tr, bl, br), then the same five crops of the flipped frame. Roc-Ng/XDVioDet's README states
  only that ``__0`` is the centre and ``__1``..``__4`` the corners; the corners' order and the flipped
  ``__5``..``__9`` of the 10-crop UCF-Crime files are not documented, and are assumed to follow
  torchvision's (corner order and flipped-frame crops). (UR-DMU's own extractor, ``feature_extract/i3d_extract.py``
  ``oversample_data``, uses yet another order: tl, tr, centre, bl, br, then their flips.)

Resize precision (``extract.resize_dtype``, :data:`RESIZE_DTYPES`):

- ``uint8`` (default): the resized frames are whole numbers in [0, 255], as in the pipelines that made
  the public features (torchvision's ``Resize`` on PIL images: RTFM issue 21's ``GroupResize``, from
  Tushar-N/pytorch-resnet3d ``utils/gtransforms.py``; JPEG
  frames resized with PIL). On the CPU this is torch's uint8 antialiased bilinear kernel, PIL's
  fixed-point algorithm (a horizontal pass rounded to uint8, then a vertical one). On the two real
  clips in ``../shared/data/videos`` with the short side resized to 256 it equals PIL on 99.8 % and
  99.98 % of the values, the others off by 1 (other sizes: at least 98.8 %). CUDA has no uint8
  kernel, so there the same two passes run in float32, each rounded half up: equal to the CPU
  kernel on 99.8 % and 99.97 % of those values (other sizes: at least 98.4 %, within 2;
  ``benchmarks/resize_precision.py``). On the CPU it is
  also 1.7-4x faster than ``float32`` (resize, crops and normalisation: ``BENCHMARKS.md``).
- ``float32``: frames become float32 first and the antialiased resize is not rounded (10-16 % of
  the values differ from PIL's, by under 1).
- ``opencv``: OpenCV's ``cv2.resize(..., INTER_LINEAR)``: bilinear from the four nearest pixels with
  no antialiasing (a downscale skips pixels), rounded to whole numbers; the resize of pipelines built
  on OpenCV (MIST's ``opencv_videovision/functional.py`` ``resize``, used by its
  ``datasets/dataset.py``). Float32 arithmetic here, where OpenCV's uint8 kernel uses 11-bit fixed
  point, so about 10 % of the values differ from OpenCV's, by 1 (``tests/test_transforms.py``); the
  antialiased rules differ from it by about 15 on average where a downscale meets fine detail.

:func:`resize_frames` and :func:`spatial_crops` work on one clip; :func:`preprocess_clips` is the
extract stage's batched path: uint8 clips already on the network's device are resized there (the
same resize as :func:`resize_frames`, so the values are identical), normalised once per resized
frame (or per crop, when a single crop holds fewer pixels), and cropped with one copy per crop
straight into the network's input layout, in pieces of at most ``max_elements`` input values.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

#: default input values per piece of :func:`preprocess_clips` (2**22: one 16-frame 320x240 clip or
#: 8 frames of 480x360, so the CPU holds at most one clip's float intermediates at a time, each under
#: glibc's 32 MB mmap threshold; the extract stage passes :data:`RESIZE_MAX_ELEMENTS_CUDA` on a GPU,
#: where fewer, larger kernels are faster)
RESIZE_MAX_ELEMENTS = 2**22
#: 2**28 float32 values = 1 GiB: a batch of eight 16-frame 1080p clips in about two pieces
RESIZE_MAX_ELEMENTS_CUDA = 2**28

_CORNERS = ("tl", "tr", "bl", "br")

#: values of ``extract.crop_order`` (module docstring); ``caffe`` is torchvision's order with Caffe's
#: centre crop position (:func:`crop_boxes`)
CROP_ORDERS = ("torchvision", "roc-ng", "caffe")

#: values of ``extract.resize_dtype`` (module docstring)
RESIZE_DTYPES = ("uint8", "float32", "opencv")


def crop_names(crops: str, order: str = "torchvision") -> list[str]:
    """Names of the crops in output order, e.g. ``["tl", "tr", "bl", "br", "c", "tl_flip", ...]``.

    ``crops``: ``"10"``, ``"5"``, ``"center"`` or ``"none"`` (the whole resized frame).
    """
    if crops == "none":
        return ["full"]
    if crops == "center":
        return ["c"]
    if order not in CROP_ORDERS:
        raise ValueError(f"unknown crop order {order!r}; orders: {', '.join(CROP_ORDERS)}")
    five = ["c", *_CORNERS] if order == "roc-ng" else [*_CORNERS, "c"]
    if crops == "5":
        return five
    if crops == "10":
        return five + [f"{n}_flip" for n in five]
    raise ValueError(f"unknown crop setting {crops!r}")


#: ``extract.crops`` of a feature file holding this many crops per clip (imported files; score)
CROP_SETTING_FOR_COUNT = {1: "center", 5: "5", 10: "10"}


def resized_size(h: int, w: int, resize: tuple) -> tuple[int, int]:
    """Output ``(height, width)`` of :func:`resize_frames` for ``h x w`` frames.

    ``("short", s)`` rounds the long side to the nearest pixel; ``("short", s, "floor")`` truncates it,
    as torchvision's ``Resize(int)`` does (``int(s * long / short)``, ``_compute_resized_output_size``
    in ``torchvision/transforms/functional.py``; ``extract.resize_round``)."""
    if resize[0] == "short":
        s = int(resize[1])
        rule = resize[2] if len(resize) > 2 else "round"
        if rule not in ("round", "floor"):
            raise ValueError(f"unknown long-side rounding {rule!r} in resize spec {resize!r}")
        long_side = (lambda x: int(x)) if rule == "floor" else round
        return (s, max(1, long_side(w * s / h))) if h <= w else (max(1, long_side(h * s / w)), s)
    if resize[0] == "fixed":
        return (int(resize[1]), int(resize[2]))
    raise ValueError(f"unknown resize spec {resize!r}")


def resize_frames(frames: torch.Tensor, resize: tuple, dtype: str = "uint8") -> torch.Tensor:
    """Resize uint8 frames.

    Args:
        frames: ``[T, H, W, 3]`` uint8 RGB.
        resize: ``("short", s)``: short side to ``s``, aspect kept (long side rounded);
            ``("fixed", h, w)``: exactly ``h x w``.
        dtype: resize precision, ``"uint8"`` or ``"float32"`` (module docstring).
    Returns:
        ``[T, 3, h, w]`` float32 in [0, 255] (bilinear with antialiasing; whole numbers for ``"uint8"``),
        channels-last, the layout of the permuted input frames.
    """
    h, w = frames.shape[1:3]
    return _resize(frames, resized_size(h, w, resize), dtype).to(torch.float32, memory_format=torch.channels_last)


def spatial_crops(x: torch.Tensor, size: int, crops: str, order: str = "torchvision") -> torch.Tensor:
    """Crop resized frames.

    Args:
        x: ``[T, 3, H, W]`` float32 with ``H, W >= size`` (any size for ``crops="none"``).
        size: crop side.
    Returns:
        ``[C, T, 3, size, size]`` (``[1, T, 3, H, W]`` for ``"none"``), C = len(crop_names(crops)).
    """
    if crops == "none":
        return x.unsqueeze(0)
    h, w = x.shape[-2:]
    if h < size or w < size:
        raise ValueError(f"frames of {h}x{w} are smaller than the {size}x{size} crop")
    boxes = crop_boxes(h, w, size, order)
    out = []
    for name in crop_names(crops, order):
        if name.endswith("_flip"):  # box `name` of the mirrored frame: the mirrored box (y0, W - x0 - s)
            y0, x0 = boxes[name[:-5]]
            out.append(x[..., y0 : y0 + size, w - x0 - size : w - x0].flip(-1))
        else:
            y0, x0 = boxes[name]
            out.append(x[..., y0 : y0 + size, x0 : x0 + size])
    return torch.stack(out)


def crop_boxes(h: int, w: int, size: int, order: str = "torchvision") -> dict[str, tuple[int, int]]:
    """Top-left corner ``(y, x)`` of each named crop, as :func:`spatial_crops` places them.

    The centre crop starts at ``round((H - s) / 2)`` as torchvision's ``CenterCrop`` places it, or, for
    ``order="caffe"``, at ``(H - s) // 2`` as Caffe's data layers compute it in integer arithmetic
    (C3D v1.0 ``video_data_layer.cpp``: a 112 crop of a 171-wide frame starts at column 29, not 30)."""
    if order == "caffe":
        top, left = (h - size) // 2, (w - size) // 2
    else:
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))  # as torchvision CenterCrop
    return {"tl": (0, 0), "tr": (0, w - size), "bl": (h - size, 0), "br": (h - size, w - size), "c": (top, left)}


def _interpolate(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


def _resize(frames: torch.Tensor, size: tuple[int, int], dtype: str) -> torch.Tensor:
    """Resize ``[N, H, W, 3]`` uint8 frames to ``size`` ``(h, w)`` with the precision ``dtype``.

    Returns ``[N, 3, h, w]``:

    - ``"uint8"`` on the CPU: uint8 with channels-last strides (a view of ``frames`` when the size
      does not change), from torch's uint8 kernel, which reads and writes that layout fastest
      (5.2 ms per 16 frames of 480x360 against 17.5 ms for ``"float32"`` with its conversion,
      2-core EPYC; ``benchmarks/preprocess_clips.py``).
    - ``"uint8"`` elsewhere (CUDA has no uint8 antialiased kernel): float32, planar, whole numbers:
      the width pass, then the height pass, each rounded half up and clamped as the uint8 kernel
      rounds its passes.
    - ``"float32"``: float32, planar, unrounded (clamped to [0, 255]). The planar kernel runs about
      1.8x faster on the CPU than the channels-last one, with bit-identical values.
    - ``"opencv"``: float32, planar, whole numbers: bilinear without antialiasing, rounded half up.
    """
    if dtype not in RESIZE_DTYPES:
        raise ValueError(f"unknown resize dtype {dtype!r}; expected one of {RESIZE_DTYPES}")
    n, h, w, _ = frames.shape
    if dtype == "uint8" and frames.device.type == "cpu":
        x = frames.permute(0, 3, 1, 2)
        return _interpolate(x, size) if tuple(size) != (h, w) else x
    x = torch.empty((n, 3, h, w), dtype=torch.float32, device=frames.device)
    x.copy_(frames.permute(0, 3, 1, 2))
    if dtype == "uint8":
        return _rounded_passes(x, size)
    if tuple(size) == (h, w):
        return x
    if dtype == "opencv":
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=False)
        return x.add_(0.5).floor_().clamp_(0, 255)
    return _interpolate(x, size).clamp_(0, 255)


def _rounded_passes(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The uint8 kernel's two rounded passes in float32, for devices without it: ``[N, 3, H, W]``
    float32 whole numbers -> ``[N, 3, h, w]`` float32 whole numbers in [0, 255]."""
    h, w = x.shape[-2:]
    if size[1] != w:
        x = _interpolate(x, (h, size[1])).add_(0.5).floor_().clamp_(0, 255)
    if size[0] != h:
        x = _interpolate(x, tuple(size)).add_(0.5).floor_().clamp_(0, 255)
    return x


def _output(shape: tuple[int, ...], device: torch.device, memory_format: torch.memory_format,
            buffer: torch.Tensor | None) -> torch.Tensor:
    """The first ``shape[0]`` rows of ``buffer`` when they fit ``shape``, else a new tensor."""
    if (
        buffer is not None
        and buffer.dtype == torch.float32
        and buffer.device == torch.device(device)
        and tuple(buffer.shape[1:]) == tuple(shape[1:])
        and buffer.shape[0] >= shape[0]
        and buffer.is_contiguous(memory_format=memory_format)
    ):
        return buffer[: shape[0]]
    return torch.empty(shape, dtype=torch.float32, device=device, memory_format=memory_format)


def _frame_mean_on(frame_mean: torch.Tensor | None, shape: tuple[int, int, int, int],
                   device: torch.device) -> torch.Tensor | None:
    """``frame_mean`` as float32 on ``device``, checked to be ``shape`` ``(3, T, h, w)``."""
    if frame_mean is None:
        return None
    if tuple(frame_mean.shape) != shape:
        raise ValueError(
            f"frame_mean has shape {tuple(frame_mean.shape)}; these clips need {shape} "
            "([3, T, h, w] of the resized clip)"
        )
    return frame_mean.to(device=device, dtype=torch.float32)


def _pieces(b: int, t: int, frames: int) -> list[tuple[int, int, int, int]]:
    """``(b0, b1, t0, t1)``: clips ``[b0, b1)``, frames ``[t0, t1)`` of each, at most ``frames``
    frames per piece (at least one): whole clips when one fits, else runs of one clip's frames.

    Frame-sized pieces keep a large frame's float intermediates small: a 16-frame 480x360 clip is
    33 MB of float32, above glibc's largest mmap threshold (32 MB), so each such piece was a fresh
    mmap whose pages all faulted in.
    """
    if frames >= t:
        per = frames // t
        return [(b0, min(b, b0 + per), 0, t) for b0 in range(0, b, per)]
    return [(bi, bi + 1, t0, min(t, t0 + frames)) for bi in range(b) for t0 in range(0, t, frames)]


def preprocess_clips(
    clips: torch.Tensor,
    resize: tuple,
    crop_size: int,
    crops: str,
    order: str = "torchvision",
    normalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
    normalize_after_crop: bool = False,
    memory_format: torch.memory_format = torch.contiguous_format,
    max_elements: int = RESIZE_MAX_ELEMENTS,
    buffer: torch.Tensor | None = None,
    resize_dtype: str = "uint8",
    normalize_in_place: Callable[[torch.Tensor], torch.Tensor] | None = None,
    frame_mean: torch.Tensor | None = None,
) -> torch.Tensor:
    """Batched resize + crops (+ normalisation) of uint8 clips, on whatever device ``clips`` is on.

    The values equal the per-clip path (:func:`resize_frames`, :func:`spatial_crops`, then
    ``normalize`` on the network input): the resize is the same call on the same frames (with
    the same ``resize_dtype``), crops are the same boxes, and a flipped crop is the same box of
    the flipped frame. ``normalize`` is applied once per resized frame, before cropping, which gives
    identical values when it is pointwise (each output value depends only on its own pixel's channel
    values: every per-channel scale / mean / std / channel reordering), or, when the crops hold fewer
    pixels than the resized frame (a single centre crop), once on the crops; set
    ``normalize_after_crop`` for a normalisation that is not pointwise.

    ``frame_mean`` (a mean per position of the resized clip, as C3D's Caffe video data layer
    subtracts its mean cube: ``extractors.c3d``) is subtracted from each resized clip before
    ``normalize`` and before the crops are cut, so each crop, flipped or not, sees the mean at its
    own position (the per-clip equivalent: :func:`resize_frames`, minus ``frame_mean`` permuted to
    ``[T, 3, h, w]``, then :func:`spatial_crops`).

    Memory: clips are processed in pieces holding at most ``max_elements`` input values (whole
    clips when one fits, else consecutive frames of one clip; at least one frame), each piece's
    float frames resized, normalised and copied into the output before the next piece starts, so
    besides the output only one piece's intermediates exist.

    Args:
        clips: ``[B, T, H, W, 3]`` uint8 RGB.
        resize: as :func:`resize_frames`.
        crop_size: crop side ``s``.
        crops: ``"10"``, ``"5"``, ``"center"`` or ``"none"`` (the whole resized frame).
        order: crop order (module docstring).
        normalize: the extractor's ``normalize``, taking and returning ``[N, 3, T, h, w]``;
            ``None`` leaves values in [0, 255].
        memory_format: layout of the returned tensor (``torch.channels_last_3d`` for cuDNN).
        max_elements: input values (``H * W * 3`` per frame) per piece.
        buffer: a float32 tensor to write the result into when its first rows fit: same trailing
            shape, device and layout, at least as many rows (the result is then a view of its first
            rows). Reusing one buffer across batches spares the allocation and, on the CPU, the
            page faults of touching a fresh 10-crop batch (770 MB for 8 clips at 224x224).
        resize_dtype: resize rule, ``"uint8"``, ``"float32"`` or ``"opencv"`` (module docstring).
        normalize_in_place: ``normalize`` done in place on the float32 tensor it is given (the
            extractor's ``normalize_``): then a pointwise normalisation runs on float frames this
            function owns (one scratch tensor reused by every piece) or on the output's crops,
            and allocates nothing per piece. Fresh temporaries of each piece's size cost their
            page faults every time on the CPU (about half the preprocessing time of 5 crops).
        frame_mean: ``[3, T, h, w]`` float32, RGB channel order, in the geometry of the RESIZED frame
            (``h, w`` = :func:`resized_size`; T = the clips' T), values on the [0, 255] pixel scale,
            subtracted from every clip before the crops (and before ``normalize``); ``None``: none.
    Returns:
        ``[B * C, 3, T, s, s]`` float32 (``[B, 3, T, h, w]`` for ``"none"``), clip-major: row
        ``b * C + c`` is clip ``b``'s crop ``c`` in ``crop_names(crops, order)`` order. Values in
        [0, 255] before ``normalize``.
    """
    if clips.dtype != torch.uint8 or clips.ndim != 5 or clips.shape[-1] != 3:
        raise ValueError(f"expected uint8 clips [B, T, H, W, 3], got {clips.dtype} {tuple(clips.shape)}")
    b, t, h, w, _ = clips.shape
    oh, ow = resized_size(h, w, resize)
    n_crops = len(crop_names(crops, order))
    cropped_area = n_crops * crop_size * crop_size if crops != "none" else oh * ow
    # a pointwise normalisation gives the same values either way: run it where there are fewer
    # pixels (on the resized frames for 10 and 5 crops, on each piece's crop for a single centre
    # crop); one that is not pointwise runs on the whole network input at the end
    late = normalize is not None and normalize_after_crop
    post = normalize if normalize is not None and not late and cropped_area < oh * ow else None
    pre = normalize if normalize is not None and not late and post is None else None
    if crops == "none":
        names, s = ["full"], 0
        out = _output((b, 3, t, oh, ow), clips.device, memory_format, buffer)
        view = out.view(b, 1, 3, t, oh, ow)
    else:
        if oh < crop_size or ow < crop_size:
            raise ValueError(f"frames of {oh}x{ow} are smaller than the {crop_size}x{crop_size} crop")
        names, s = crop_names(crops, order), crop_size
        out = _output((b * len(names), 3, t, s, s), clips.device, memory_format, buffer)
        view = out.view(b, len(names), 3, t, s, s)
    boxes = crop_boxes(oh, ow, s, order) if s else {}
    any_flip = any(n.endswith("_flip") for n in names)
    pieces = _pieces(b, t, max(1, max_elements // (h * w * 3)))
    in_place = normalize_in_place if normalize is not None and not late else None
    mean = _frame_mean_on(frame_mean, (3, t, oh, ow), clips.device)
    scratch = None  # float frames of the largest (first) piece, reused by the others
    for b0, b1, t0, t1 in pieces:
        p, pt = b1 - b0, t1 - t0
        x = _resize(clips[b0:b1, t0:t1].reshape(p * pt, h, w, 3), (oh, ow), resize_dtype)  # [p*pt, 3, oh, ow]
        x = x.unflatten(0, (p, pt)).permute(0, 2, 1, 3, 4)  # [p, 3, pt, oh, ow], a view
        if x.dtype == torch.uint8:
            # channels-last uint8 from the CPU kernel: as [p, 3, pt, oh, ow] already channels_last_3d,
            # so crops copy whole rows; made float once here when a mean or a pointwise normalisation
            # is applied to the resized frames (into the scratch when done in place, as the mean
            # always is), else each crop is converted as it is copied (or normalised)
            if pre is not None and in_place is None and mean is None:
                x = x.to(torch.float32, memory_format=memory_format)
            elif pre is not None or mean is not None:
                if scratch is None:  # the first piece is the largest
                    scratch = torch.empty_like(x, dtype=torch.float32, memory_format=memory_format)
                x = scratch[:p, :, :pt].copy_(x)
        elif s and memory_format != torch.contiguous_format and cropped_area > oh * ow:
            # when the crops hold more pixels than the frame (10 or 5 crops), one transposing copy of
            # the resized frames instead of one per crop: a planar frame copied into channels_last_3d
            # crops wrote 3 floats apart (10 copies of 320x240 frames: 3,000 frames/s), a
            # channels-last one writes whole rows (5,000 frames/s; 2-core EPYC)
            x = torch.empty_like(x, memory_format=memory_format).copy_(x)
        if mean is not None:
            # in place: float frames here are this function's own (the scratch, or what the float
            # resize and the layout copy allocated); the piece's own frames of the mean
            x.sub_(mean[:, t0:t1])
        if pre is not None:
            # pointwise: keeps the layout; in place on float frames that are this function's own
            # (the scratch, or what the float resize and the layout copy allocated)
            x = in_place(x) if in_place is not None else pre(x)
        if not s:
            view[b0:b1, 0, :, t0:t1].copy_(x)
            continue
        flipped = x.flip(-1) if any_flip else None  # one copy of the piece's frames
        for c, name in enumerate(names):
            if name.endswith("_flip"):
                y0, x0 = boxes[name[:-5]]  # the box of the mirrored frame (module docstring)
                crop = flipped[..., y0 : y0 + s, x0 : x0 + s]
            else:
                y0, x0 = boxes[name]
                crop = x[..., y0 : y0 + s, x0 : x0 + s]
            target = view[b0:b1, c, :, t0:t1]
            if post is not None and in_place is not None and crop.dtype == torch.uint8:
                # converted as copied, then normalised where it lies; a float crop is normalised
                # out of place (in place on the output's strided crop was 10 % slower:
                # benchmarks/preprocess_clips.py, centre crop, float32)
                in_place(target.copy_(crop))
            else:
                target.copy_(post(crop.float()) if post is not None else crop)
        del x, flipped
    if late:
        # written back into the output, which stays the caller's reusable buffer
        out.copy_(normalize(out))
    return out
