"""Resizing and spatial crops in torch (pytorchvideo's transforms are broken with current torchvision).

Crop orders (PROTOCOLS.md, 'Features and clips'):

- ``torchvision``: torchvision's ``TenCrop``/``FiveCrop`` order: top-left, top-right, bottom-left,
  bottom-right, centre, then the same five of the horizontally flipped image (10-crop).
- ``roc-ng``: the Roc-Ng / XD-Violence files ``__0``..``__9``: centre, then the four corners
  (tl, tr, bl, br), then the flips of those five in the same order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_CORNERS = ("tl", "tr", "bl", "br")


def crop_names(crops: str, order: str = "torchvision") -> list[str]:
    """Names of the crops in output order, e.g. ``["tl", "tr", "bl", "br", "c", "tl_flip", ...]``.

    ``crops``: ``"10"``, ``"5"``, ``"center"`` or ``"none"`` (the whole resized frame).
    """
    if crops == "none":
        return ["full"]
    if crops == "center":
        return ["c"]
    five = [*_CORNERS, "c"] if order == "torchvision" else ["c", *_CORNERS]
    if crops == "5":
        return five
    if crops == "10":
        return five + [f"{n}_flip" for n in five]
    raise ValueError(f"unknown crop setting {crops!r}")


def resize_frames(frames: torch.Tensor, resize: tuple) -> torch.Tensor:
    """Resize uint8 frames.

    Args:
        frames: ``[T, H, W, 3]`` uint8 RGB.
        resize: ``("short", s)``: short side to ``s``, aspect kept (long side rounded);
            ``("fixed", h, w)``: exactly ``h x w``.
    Returns:
        ``[T, 3, h, w]`` float32 in [0, 255] (bilinear with antialiasing, clamped).
    """
    x = frames.permute(0, 3, 1, 2).float()
    h, w = x.shape[-2:]
    if resize[0] == "short":
        s = int(resize[1])
        size = (s, max(1, round(w * s / h))) if h <= w else (max(1, round(h * s / w)), s)
    elif resize[0] == "fixed":
        size = (int(resize[1]), int(resize[2]))
    else:
        raise ValueError(f"unknown resize spec {resize!r}")
    if size != (h, w):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True).clamp_(0, 255)
    return x


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
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))  # as torchvision CenterCrop
    boxes = {
        "tl": (0, 0),
        "tr": (0, w - size),
        "bl": (h - size, 0),
        "br": (h - size, w - size),
        "c": (top, left),
    }
    out = []
    for name in crop_names(crops, order):
        base, flip = (name[:-5], True) if name.endswith("_flip") else (name, False)
        y0, x0 = boxes[base]
        c = x[..., y0 : y0 + size, x0 : x0 + size]
        out.append(c.flip(-1) if flip else c)
    return torch.stack(out)
