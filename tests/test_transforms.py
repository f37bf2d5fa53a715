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
    # TenCrop's second five are the five crops of the mirrored frame: its top-left is the mirrored
    # top-right, and so on (torchvision ten_crop = five_crop of hflip(img))
    for flipped, mirrored in ((5, 1), (6, 0), (7, 3), (8, 2), (9, 4)):
        assert torch.equal(out[flipped], out[mirrored].flip(-1)), flipped
    roc = spatial_crops(x, 224, "10", "roc-ng")
    assert torch.equal(roc[0], out[4]) and torch.equal(roc[5], out[9]) and torch.equal(roc[6], out[5])


def test_ten_crop_is_torchvisions_on_pil() -> None:
    """Crops, order and flips equal torchvision's TenCrop on a PIL image, for even and odd margins."""
    import numpy as np
    from PIL import Image
    from torchvision import transforms as T

    g = np.random.default_rng(0)
    for h, w in ((256, 340), (256, 341), (257, 300)):
        img = g.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ours = spatial_crops(torch.from_numpy(img).permute(2, 0, 1)[None].float(), 224, "10")[:, 0]
        ref = torch.stack([T.functional.pil_to_tensor(c).float() for c in T.TenCrop(224)(Image.fromarray(img))])
        assert torch.equal(ours, ref), (h, w)


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


def smooth_frames(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """``[n, h, w, 3]`` uint8 frames with the smooth gradients and sharp edges of real images: a
    random 6x8 colour grid, bilinearly enlarged, with a hard-edged rectangle on top."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 6, 8, generator=g) * 255
    x = torch.nn.functional.interpolate(base, size=(h, w), mode="bilinear", align_corners=True)
    x[:, :, h // 4 : h // 2, w // 3 : w // 2] = torch.rand(n, 3, 1, 1, generator=g) * 255
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


@pytest.mark.parametrize("size", [(256, 341), (128, 171), (250, 300)], ids=["down", "c3d", "up"])
def test_uint8_resize_is_pils_and_the_float_passes_match_it(size: tuple[int, int]) -> None:
    """``resize_dtype="uint8"`` gives what torchvision's ``Resize`` gives on PIL images (the public
    features' pipeline); the float32 two-pass version used on CUDA gives the CPU kernel's values."""
    import numpy as np
    from PIL import Image

    from extractors.transforms import _rounded_passes

    frames = smooth_frames(4, 240, 320)
    out = resize_frames(frames, ("fixed", *size), "uint8")
    assert out.dtype == torch.float32 and torch.equal(out, out.round())
    pil = torch.stack([torch.from_numpy(np.array(Image.fromarray(f.numpy()).resize(size[::-1], Image.BILINEAR)))
                       for f in frames]).permute(0, 3, 1, 2).float()
    diff = (out - pil).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.02
    passes = _rounded_passes(frames.permute(0, 3, 1, 2).float(), size)
    diff = (passes - out).abs()  # a pass off by 1 can make the next off by 2 (module docstring)
    assert diff.max() <= 2 and (diff > 0).float().mean() < 0.02
    # the unrounded resize is a different (finer) thing, not an alias of the uint8 one
    fine = resize_frames(frames, ("fixed", *size), "float32")
    assert not torch.equal(fine, fine.round()) and (fine - out).abs().max() < 1.5  # two roundings
    with pytest.raises(ValueError, match="unknown resize dtype"):
        resize_frames(frames, ("short", 256), "float16")


@pytest.mark.parametrize("size", [(256, 340), (128, 171), (240, 320), (300, 400)], ids=["mist-i3d", "c3d", "same", "up"])
def test_opencv_resize_is_cv2_inter_linear(size: tuple[int, int]) -> None:
    """``resize_dtype="opencv"`` gives ``cv2.resize(INTER_LINEAR)``'s values (within OpenCV's
    fixed-point rounding), on frames downscaled 1.9x without antialiasing, the way MIST's datasets
    resize ShanghaiTech's 480x856 frames to 256x340."""
    import cv2

    frames = smooth_frames(3, 480, 856)
    frames[:, ::2, ::2] = 255 - frames[:, ::2, ::2]  # pixel-level detail, where antialiasing matters
    out = resize_frames(frames, ("fixed", *size), "opencv")
    assert out.dtype == torch.float32 and torch.equal(out, out.round())
    ref = torch.stack([torch.from_numpy(cv2.resize(f.numpy(), size[::-1], interpolation=cv2.INTER_LINEAR))
                       for f in frames]).permute(0, 3, 1, 2).float()
    diff = (out - ref).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.15  # OpenCV's 11-bit fixed point against float32
    smooth = resize_frames(frames, ("fixed", *size), "uint8")  # the antialiased rule is another resize
    if size[0] < 480:
        assert (smooth - ref).abs().mean() > 10 * diff.mean()


def reference_input(clips: torch.Tensor, crops: str, order: str, normalize, dtype: str = "uint8") -> torch.Tensor:
    """The per-clip path: resize each clip, cut its crops, then normalise: ``[B*C, 3, T, s, s]``."""
    out = [spatial_crops(resize_frames(c, ("short", 40), dtype), 32, crops, order).permute(0, 2, 1, 3, 4)
           for c in clips]
    return normalize(torch.cat(out))


@pytest.mark.parametrize("crops,order", [("10", "torchvision"), ("10", "roc-ng"), ("5", "torchvision"), ("center", "torchvision")])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last_3d], ids=["planar", "cl3d"])
@pytest.mark.parametrize("max_elements", [1, 5 * 36 * 44 * 3, 2**22], ids=["frame", "5frames", "clips"])
@pytest.mark.parametrize("dtype", ["uint8", "float32", "opencv"])
def test_preprocess_clips_equals_the_per_clip_path(crops: str, order: str, memory_format, max_elements: int,
                                                   dtype: str) -> None:
    """Bit for bit, whatever the resize precision, the piece size (single frames, runs of frames,
    whole clips), the output layout and where a pointwise (out of place or in place) or a
    positional normalisation runs."""
    from extractors.transforms import preprocess_clips

    g = torch.Generator().manual_seed(0)
    clips = torch.randint(0, 256, (3, 16, 36, 44, 3), dtype=torch.uint8, generator=g)
    mean = torch.tensor([110.0, 100.0, 90.0]).view(3, 1, 1, 1)
    pointwise = lambda x: (x - mean) / 58.0  # noqa: E731
    # not pointwise: depends on the position in the crop (as C3D's mean volume does)
    positional = lambda x: x - torch.arange(x.shape[-1], dtype=x.dtype)  # noqa: E731
    pointwise_ = lambda x: x.sub_(mean).div_(58.0)  # noqa: E731  (the same, in place)
    for normalize, after, in_place in ((pointwise, False, None), (pointwise, False, pointwise_), (positional, True, None)):
        ref = reference_input(clips, crops, order, normalize, dtype)
        out = preprocess_clips(clips, ("short", 40), 32, crops, order, normalize=normalize, normalize_after_crop=after,
                               memory_format=memory_format, max_elements=max_elements, resize_dtype=dtype,
                               normalize_in_place=in_place)
        assert out.is_contiguous(memory_format=memory_format) and out.shape == ref.shape
        assert torch.equal(out, ref)


def test_preprocess_clips_writes_into_the_buffer() -> None:
    """A fitting buffer (here dirty, and with spare rows) is filled and returned as a view of it,
    also when a positional normalisation runs at the end; one that does not fit is left alone."""
    from extractors.transforms import preprocess_clips

    clips = torch.randint(0, 256, (2, 16, 36, 44, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    positional = lambda x: x - torch.arange(x.shape[-1], dtype=x.dtype)  # noqa: E731
    cl = torch.channels_last_3d
    for crops, after in (("10", False), ("center", False), ("10", True)):
        norm = positional if after else (lambda x: x / 127.5 - 1)
        ref = preprocess_clips(clips, ("short", 40), 32, crops, normalize=norm, normalize_after_crop=after, memory_format=cl)
        buf = torch.full((30, 3, 16, 32, 32), float("nan")).contiguous(memory_format=cl)
        out = preprocess_clips(clips, ("short", 40), 32, crops, normalize=norm, normalize_after_crop=after,
                               memory_format=cl, buffer=buf)
        assert out.data_ptr() == buf.data_ptr() and torch.equal(out, ref)
    small = torch.zeros((5, 3, 16, 32, 32)).contiguous(memory_format=cl)
    out = preprocess_clips(clips, ("short", 40), 32, "10", memory_format=cl, buffer=small)
    assert out.data_ptr() != small.data_ptr() and not small.any()
