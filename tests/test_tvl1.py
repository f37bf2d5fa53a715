"""TV-L1 in PyTorch (extractors/tvl1.py) against OpenCV's Dual TV-L1, and the flow interface."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from extractors.flow import (
    compute_flow,
    dequantize_flow,
    get_flow_method,
    iter_flow,
    preprocess_flow_clips,
    quantize_flow,
    resize_flow,
)
from extractors.tvl1 import (
    TVL1Params,
    median_blur,
    pyramid_sizes,
    resize_linear,
    to_gray_uint8,
    tvl1_flow,
    warp_bicubic,
)

cv2 = pytest.importorskip("cv2")
if not hasattr(cv2, "optflow"):
    pytest.skip("opencv-contrib (cv2.optflow) is not installed", allow_module_level=True)


def epe(a: np.ndarray, b: np.ndarray) -> float:
    """Mean end-point difference of two ``[..., 2]`` flows, pixels."""
    return float(np.sqrt(((a - b) ** 2).sum(-1)).mean())


def textured(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth random texture, uint8 ``[h, w]``."""
    rng = np.random.default_rng(seed)
    small = rng.random((h // 4 + 2, w // 4 + 2)).astype(np.float32) * 255
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC).clip(0, 255).astype(np.uint8)


# -- building blocks, each against the OpenCV call it reproduces ---------------------------------


def test_gray_is_bit_exact_with_opencv():
    rgb = np.random.default_rng(0).integers(0, 256, (2, 300, 400, 3), dtype=np.uint8)
    ours = to_gray_uint8(torch.from_numpy(rgb)).numpy()
    assert np.array_equal(ours, np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in rgb]))


def test_pyramid_resize_and_flow_upscale_match_cv2_resize():
    x = np.random.default_rng(1).random((60, 80)).astype(np.float32) * 255
    down = cv2.resize(x, None, fx=0.8, fy=0.8, interpolation=cv2.INTER_LINEAR)
    ours = resize_linear(torch.from_numpy(x)[None], down.shape, (1.25, 1.25))[0].numpy()
    np.testing.assert_allclose(ours, down, atol=1e-3)
    up = cv2.resize(down, (80, 60), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_allclose(resize_linear(torch.from_numpy(down)[None], (60, 80))[0].numpy(), up, atol=1e-3)
    assert pyramid_sizes(240, 320, TVL1Params()) == [(240, 320), (192, 256), (154, 205), (123, 164), (98, 131)]
    assert pyramid_sizes(20, 40, TVL1Params()) == [(20, 40), (16, 32)]  # a side of 16 is allowed
    assert pyramid_sizes(19, 40, TVL1Params()) == [(19, 40)]  # 15 is not


def test_median_matches_cv2_median_blur():
    rng = np.random.default_rng(2)
    smooth = rng.standard_normal((31, 40)).astype(np.float32)
    ties = rng.integers(0, 4, (31, 40)).astype(np.float32)  # many equal values
    for x in (smooth, ties):
        for k in (3, 5):
            np.testing.assert_array_equal(median_blur(torch.from_numpy(x)[None], k)[0].numpy(), cv2.medianBlur(x, k))


def test_bicubic_warp_matches_cv2_remap_with_zero_border():
    rng = np.random.default_rng(3)
    x = rng.random((40, 50)).astype(np.float32) * 255
    u = (rng.standard_normal((40, 50)) * 3).astype(np.float32)
    v = (rng.standard_normal((40, 50)) * 3).astype(np.float32)
    gx, gy = np.meshgrid(np.arange(50, dtype=np.float32), np.arange(40, dtype=np.float32))
    ref = cv2.remap(x, gx + u, gy + v, cv2.INTER_CUBIC)  # BORDER_CONSTANT 0 by default
    ours = warp_bicubic(torch.from_numpy(x)[None, None], torch.from_numpy(u)[None], torch.from_numpy(v)[None])
    np.testing.assert_allclose(ours[0, 0].numpy(), ref, atol=0.02)


# -- whole flows ------------------------------------------------------------------------------


def test_known_translation_is_recovered():
    base = textured(72, 96)
    moved = np.roll(base, shift=(1, 2), axis=(0, 1))  # frame 1 = frame 0 moved by dx=2, dy=1
    flow = compute_flow(np.stack([base, moved]), "tvl1_torch")[0]
    inner = flow[8:-8, 8:-8]
    assert np.abs(inner[..., 0] - 2).mean() < 0.05 and np.abs(inner[..., 1] - 1).mean() < 0.05


def test_batched_pairs_equal_pairs_solved_alone():
    """Masks freeze converged pairs: each pair gets the iterations it would get on its own."""
    frames = np.stack([textured(48, 64, s) for s in range(2)] + [np.roll(textured(48, 64, 0), 3, axis=1)])
    i0 = torch.from_numpy(frames[[0, 1, 0]])
    i1 = torch.from_numpy(frames[[1, 0, 2]])
    together = tvl1_flow(i0, i1).numpy()
    for k in range(3):
        alone = tvl1_flow(i0[k : k + 1], i1[k : k + 1]).numpy()[0]
        assert epe(together[k], alone) < 1e-3


def test_torch_and_opencv_agree_on_synthetic_frames_through_the_interface():
    frames = np.stack([np.roll(textured(48, 64, 5), (t, 2 * t), axis=(0, 1)) for t in range(3)])
    rgb = np.repeat(frames[..., None], 3, axis=-1)
    ours = compute_flow(rgb, "tvl1_torch", batch_pairs=2)
    ref = compute_flow(frames, "tvl1_opencv")
    assert ours.shape == ref.shape == (2, 48, 64, 2) and ours.dtype == np.float32
    assert epe(ours, ref) < 0.05


def _real_pairs(shared, n: int = 2) -> list[tuple[str, np.ndarray]]:
    """Grey frames from the shared real data: ``n - 1`` pairs of Ped2 (360x240 as is; slow walkers,
    about 0.09 px) and ``n`` pairs of an ActivityNet clip (resized to 320x240; about 1.6 px)."""
    from PIL import Image

    from pipeline.core.video import open_video

    out = []
    folder = shared / "ucsd_ped2" / "testing" / "frames" / "04"
    ped = np.stack([np.array(Image.open(folder / f"{i:03d}.jpg").convert("L")) for i in range(40, 40 + n)])
    out.append(("ucsd_ped2/04", ped))
    with open_video(shared / "videos" / "v_ZNVhz7ctTq0.mp4") as src:
        _, chunk = next(src.iter_chunks(64))
    rgb = np.stack([cv2.resize(f, (320, 240), interpolation=cv2.INTER_AREA) for f in chunk[30 : 31 + n]])
    out.append(("videos/v_ZNVhz7ctTq0", to_gray_uint8(torch.from_numpy(rgb)).numpy()))
    return out


def test_real_frames_mean_epe_against_opencv_below_0_3_px(shared):
    """The issue's agreement criterion, on real surveillance and real video frames."""
    for name, gray in _real_pairs(shared):
        ref = compute_flow(gray, "tvl1_opencv")
        ours = compute_flow(gray, "tvl1_torch", batch_pairs=len(gray) - 1)
        err = epe(ours, ref)
        moving = np.sqrt((ref**2).sum(-1)).mean()
        assert err < 0.3, f"{name}: mean EPE {err:.3f} px against OpenCV"
        assert err < 0.5 * moving, f"{name}: EPE {err:.3f} is not small next to the motion ({moving:.3f} px)"


# -- chunks, storage, network input --------------------------------------------------------------


def test_iter_flow_over_chunks_equals_the_whole_video():
    frames = np.stack([np.roll(textured(32, 40, 7), t, axis=1) for t in range(5)])
    whole = compute_flow(frames, "tvl1_torch")
    method = get_flow_method("tvl1_torch", batch_pairs=3)
    pieces = list(iter_flow(iter([frames[:2], frames[2:3], frames[3:]]), method))
    np.testing.assert_allclose(np.concatenate(pieces), whole, atol=1e-4)


def test_quantized_storage_error_is_bounded():
    flow = np.linspace(-25, 25, 1001, dtype=np.float32).reshape(-1, 1).repeat(2, 1)
    clipped = flow.clip(-20, 20)
    u8 = dequantize_flow(quantize_flow(flow, "uint8")).numpy()
    f16 = dequantize_flow(quantize_flow(flow, "float16")).numpy()
    assert quantize_flow(flow, "uint8").dtype == np.uint8
    assert np.abs(u8 - clipped).max() <= 20 / 255 + 1e-5
    assert np.abs(f16 - clipped).max() <= 0.008


def test_resize_scales_vectors_and_flip_negates_dx():
    flow = torch.zeros(1, 240, 320, 2)
    flow[..., 0], flow[..., 1] = 3.0, -1.5
    big = resize_flow(flow, (256, 341))
    assert big.shape == (1, 256, 341, 2)
    assert torch.allclose(big[..., 0], torch.tensor(3.0 * 341 / 320))
    assert torch.allclose(big[..., 1], torch.tensor(-1.5 * 256 / 240))
    x = preprocess_flow_clips(big[None].repeat(1, 16, 1, 1, 1) * 10, 224, "10")  # clipped at 20
    assert x.shape == (10, 2, 16, 224, 224)
    assert torch.allclose(x[:5, 0], torch.tensor(1.0)) and torch.allclose(x[5:, 0], torch.tensor(-1.0))
    assert torch.allclose(x[:, 1], torch.tensor(-16.0 / 20.0))


def test_bad_input_is_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="at least 2 frames"):
        compute_flow(np.zeros((1, 32, 32), np.uint8))
    with pytest.raises(ValueError, match="too small"):
        compute_flow(np.zeros((2, 8, 32), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        compute_flow(np.zeros((2, 32, 32), np.float32))
    with pytest.raises(ValueError, match="unknown flow method"):
        compute_flow(np.zeros((2, 32, 32), np.uint8), "farneback")


@pytest.mark.gpu
def test_cuda_flow_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    frames = np.stack([np.roll(textured(96, 128, 9), (t, 2 * t), axis=(0, 1)) for t in range(5)])
    i0, i1 = torch.from_numpy(frames[:-1]), torch.from_numpy(frames[1:])
    cpu = tvl1_flow(i0, i1).numpy()
    gpu = tvl1_flow(i0.cuda(), i1.cuda()).cpu().numpy()
    assert epe(gpu, cpu) < 0.02
    fused = tvl1_flow(i0.cuda(), i1.cuda(), compile=True).cpu().numpy()
    assert epe(fused, cpu) < 0.02


def moving_texture_pairs(h: int = 48, w: int = 64, n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    frames = np.stack([np.roll(textured(h, w, 9), (t, 2 * t), axis=(0, 1)) for t in range(n + 1)])
    return torch.from_numpy(frames[:-1]), torch.from_numpy(frames[1:])


def test_compiled_iteration_on_cpu_matches_eager(monkeypatch) -> None:
    """``compile=True`` on the CPU (inductor's C++ backend; about 20 s to compile here): the fused
    iteration really runs (no fallback) and gives the eager flow up to float rounding."""
    import shutil

    from extractors import tvl1

    if not (shutil.which("g++") or shutil.which("c++")):
        pytest.skip("no C++ compiler for torch.compile's CPU backend")
    monkeypatch.setattr(tvl1, "_compiled", {})
    i0, i1 = moving_texture_pairs()
    eager = tvl1_flow(i0, i1).numpy()
    fused = tvl1_flow(i0, i1, compile=True).numpy()
    assert not tvl1._compiled["iteration"].failed
    assert epe(fused, eager) < 0.02


def test_compile_failure_falls_back_to_eager(monkeypatch, caplog) -> None:
    """A backend that cannot compile (e.g. no C++ compiler) costs one warning, not the flow."""
    from extractors import tvl1

    def broken_compile(fn, **kwargs):
        def call(*args):
            raise RuntimeError("backend failed: no C++ compiler found\nmore detail")
        return call

    monkeypatch.setattr(tvl1, "_compiled", {})
    monkeypatch.setattr(torch, "compile", broken_compile)
    i0, i1 = moving_texture_pairs(n=2)
    with caplog.at_level("WARNING", logger="extractors.tvl1"):
        flow = tvl1_flow(i0, i1, compile=True).numpy()
    assert np.array_equal(flow, tvl1_flow(i0, i1).numpy())
    warnings = [r.getMessage() for r in caplog.records if "torch.compile failed" in r.getMessage()]
    assert len(warnings) == 1 and "RuntimeError: backend failed: no C++ compiler found" in warnings[0]
