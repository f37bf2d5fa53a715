"""Resize and crop transforms: sizes, the two crop orders, flips, exact pixel positions."""

from __future__ import annotations

import pytest
import torch

from extractors.transforms import crop_names, resize_frames, spatial_crops


def coords(h: int, w: int) -> torch.Tensor:
    """``[1, 3, h, w]`` frames whose channel 0 is the row index and channel 1 the column index."""
    y = torch.arange(h, dtype=torch.float32)[:, None].expand(h, w)
    x = torch.arange(w, dtype=torch.float32)[None, :].expand(h, w)
    return torch.stack([y, x, torch.zeros(h, w)])[None]


def test_crop_orders():
    assert crop_names("10", "torchvision") == ["tl", "tr", "bl", "br", "c", "tl_flip", "tr_flip", "bl_flip", "br_flip", "c_flip"]
    assert crop_names("10", "roc-ng")[:5] == ["c", "tl", "tr", "bl", "br"]
    assert crop_names("10", "roc-ng")[5] == "c_flip"
    assert crop_names("5") == ["tl", "tr", "bl", "br", "c"] and crop_names("center") == ["c"]


def test_crop_positions_and_flips():
    x = coords(256, 340)
    out = spatial_crops(x, 224, "10")
    assert out.shape == (10, 1, 3, 224, 224)
    tl, tr, bl, br, c = out[:5, 0]
    assert (tl[0, 0, 0], tl[1, 0, 0]) == (0, 0)
    assert (tr[0, 0, 0], tr[1, 0, 0]) == (0, 340 - 224)
    assert (bl[0, 0, 0], bl[1, 0, 0]) == (256 - 224, 0)
    assert (br[0, -1, -1], br[1, -1, -1]) == (255, 339)
    assert (c[0, 0, 0], c[1, 0, 0]) == (16, 58)  # round((256-224)/2), round((340-224)/2)
    assert torch.equal(out[5], out[0].flip(-1))
    roc = spatial_crops(x, 224, "10", "roc-ng")
    assert torch.equal(roc[0], out[4]) and torch.equal(roc[5], out[9])


def test_none_keeps_the_whole_frame_and_small_frames_are_refused():
    x = coords(100, 120)
    assert spatial_crops(x, 224, "none").shape == (1, 1, 3, 100, 120)
    with pytest.raises(ValueError, match="smaller than the 224x224 crop"):
        spatial_crops(x, 224, "center")


def test_resize_short_side_and_fixed():
    frames = torch.randint(0, 256, (4, 240, 320, 3), dtype=torch.uint8)
    out = resize_frames(frames, ("short", 256))
    assert out.shape == (4, 3, 256, 341) and out.dtype == torch.float32
    assert 0 <= out.min() and out.max() <= 255
    assert resize_frames(frames, ("fixed", 128, 171)).shape == (4, 3, 128, 171)
    tall = torch.zeros(1, 300, 200, 3, dtype=torch.uint8)
    assert resize_frames(tall, ("short", 100)).shape == (1, 3, 150, 100)
    # same size: values unchanged
    assert torch.equal(resize_frames(frames, ("short", 240)), frames.permute(0, 3, 1, 2).float())
