"""Feature presets (extract.preset) and the rules they select: trailing-clip rules on odd lengths, the
long-side rounding of torchvision's Resize, the preset layer under --config/--set, metadata and cache
keys, and the presets' preprocessing against torchvision + PIL on real frames."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_video
from extractors.base import ClipExtractor
from extractors.clip_rules import PARTIAL_CLIP_RULES, clip_count, clip_ranges, fill_order
from extractors.presets import PRESET_FOR_IMPORT, PRESET_KEYS, PRESETS, differences
from extractors.stream import extract_video, network_input
from extractors.transforms import resized_size
from pipeline.core.config import ConfigError
from stages.config import build_config
from stages.extract import ExtractStage
from stages.flow import flow_clip_indices


class FrameMeans(ClipExtractor):
    """Feature = the mean value of each of the clip's 16 input frames (16-D), so that a test reads
    which frame went where."""

    feature_dim = 16
    crop_size = 16
    resize = ("short", 16)
    registry_name = "test_frame_means"

    @property
    def weights_checksum(self) -> str:
        return "frame-means"

    def normalize(self, clips: torch.Tensor) -> torch.Tensor:
        return clips

    def features(self, clips: torch.Tensor) -> torch.Tensor:
        return clips.mean(dim=(1, 3, 4))  # [N, T]


def grey_video(path: Path, n: int) -> np.ndarray:
    """``n`` uniform grey 48x64 frames, frame i of value ``20 + 3 i``; returns those values."""
    values = 20 + 3 * np.arange(n)
    frames = np.repeat(values.astype(np.uint8)[:, None, None, None], 48 * 64 * 3, axis=1).reshape(n, 48, 64, 3)
    write_video(path, frames, fps=25)
    return values.astype(np.float32)


@pytest.mark.parametrize("n", [1, 15, 16, 17, 31, 32, 33, 70])
def test_clip_counts_on_odd_lengths(n: int) -> None:
    assert clip_count(n, 16, "pad") == clip_count(n, 16, "cycle") == -(-n // 16)
    assert clip_count(n, 16, "drop") == n // 16
    assert clip_count(n, 16, "exclude_last_frame") == (n - 1) // 16
    for rule in PARTIAL_CLIP_RULES:
        ranges = clip_ranges(n, 16, rule)
        assert len(ranges) == clip_count(n, 16, rule) and all(b - a <= 16 for a, b in ranges)
    with pytest.raises(ValueError, match="unknown extract.partial_clip"):
        clip_count(n, 16, "loop")


def test_fill_orders() -> None:
    assert fill_order(6, 16, "pad") == [0, 1, 2, 3, 4, 5] + [5] * 10
    assert fill_order(6, 16, "cycle") == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 0, 1, 2, 3]
    assert fill_order(16, 16, "cycle") == list(range(16))
    # the flow stream fills a partial clip the same way, capped at the last flow field
    assert flow_clip_indices(64, 70, 16, 69, "cycle") == [64, 65, 66, 67, 68, 68, 64, 65, 66, 67, 68, 68, 64, 65, 66, 67]
    assert flow_clip_indices(64, 70, 16, 69, "pad") == [64, 65, 66, 67, 68] + [68] * 11


def test_trailing_clip_rules_on_a_real_decode(tmp_path: Path) -> None:
    ex = FrameMeans()
    videos = {n: tmp_path / f"g{n}.mp4" for n in (64, 65, 70)}
    values = {n: grey_video(p, n) for n, p in videos.items()}

    def run(n: int, rule: str, batch: int = 3):
        cfg = build_config(sets=["extract.crops=none", f"extract.partial_clip={rule}", f"extract.batch_clips={batch}"])
        return extract_video(cfg, ex, videos[n])

    for rule in PARTIAL_CLIP_RULES:
        for n in videos:
            feats, meta = run(n, rule)
            assert len(feats) == clip_count(n, 16, rule), (rule, n)
            assert [tuple(r) for r in meta["clip_ranges"]] == clip_ranges(n, 16, rule)
            assert meta["partial_clip"] == rule
    v = values[70]
    pad, _ = run(70, "pad")
    cyc, _ = run(70, "cycle", batch=8)
    np.testing.assert_allclose(pad[4, 0], v[[64, 65, 66, 67, 68, 69] + [69] * 10], atol=1.0)
    np.testing.assert_allclose(cyc[4, 0], v[[64, 65, 66, 67, 68, 69] * 2 + [64, 65, 66, 67]], atol=1.0)
    np.testing.assert_array_equal(pad[:4], cyc[:4])  # full clips do not depend on the rule
    # exclude_last_frame: a video of exactly 4 clips gives 3; one more frame gives the 4th
    assert len(run(64, "exclude_last_frame")[0]) == 3 and len(run(65, "exclude_last_frame")[0]) == 4


@pytest.mark.parametrize("h,w", [(288, 352), (240, 320), (360, 640), (720, 1280), (240, 310), (310, 240)])
def test_floor_rounding_is_torchvision_resize(h: int, w: int) -> None:
    from PIL import Image
    from torchvision import transforms as T

    want = T.Resize(256)(Image.new("RGB", (w, h))).size[::-1]  # PIL size is (w, h)
    assert resized_size(h, w, ("short", 256, "floor")) == want
    if (h, w) in ((288, 352), (240, 310)):  # 312.9 and 330.7: rounding and truncation differ here
        assert resized_size(h, w, ("short", 256)) != want


def test_caffe_centre_crop_is_integer_halving() -> None:
    from extractors.transforms import crop_boxes, spatial_crops

    assert crop_boxes(128, 171, 112)["c"] == (8, 30)  # torchvision: round(29.5)
    assert crop_boxes(128, 171, 112, "caffe")["c"] == (8, 29)  # C3D's video_data_layer: 59 / 2 in integers
    x = torch.arange(171.0).expand(1, 3, 128, 171)
    assert spatial_crops(x, 112, "center", "caffe")[0, 0, 0, 0, 0] == 29
    cfg = build_config(sets=["extract.preset=sultani"]).extract
    assert cfg.crop_order == "caffe" and cfg.c3d_mean == "sports1m" and cfg.target_fps == 30.0


def test_preset_layer_sits_under_config_and_set() -> None:
    for name, p in PRESETS.items():
        assert tuple(p.settings) == PRESET_KEYS
        cfg = build_config(sets=[f"extract.preset={name}"]).extract
        assert cfg.preset == name and not differences(name, cfg)
    cfg = build_config(sets=["extract.preset=rtfm", "extract.crops=5"]).extract
    assert cfg.crops == "5" and cfg.backbone == "resnet50_i3d_rtfm" and cfg.partial_clip == "cycle"
    assert differences("rtfm", cfg) == ["extract.crops: preset rtfm has '10', the run has '5'"]
    # a value from a --config layer overrides the preset given by --set, as any setting does
    cfg = build_config([{"extract": {"resize_round": "round"}}], sets=["extract.preset=xd_violence"]).extract
    assert cfg.resize_round == "round" and cfg.weights == "rgb_imagenet" and cfg.crop_order == "roc-ng"
    with pytest.raises(ConfigError, match="unknown extract.preset .i3d.; presets: default, rtfm"):
        build_config(sets=["extract.preset=i3d"])
    assert PRESET_FOR_IMPORT == {"rtfm": "rtfm", "roc-ng": "xd_violence", "sultani": "sultani"}
    # the default preset is the defaults: choosing it changes nothing
    assert build_config(sets=["extract.preset=default"]).extract == build_config().extract


def test_preset_enters_metadata_and_keys_only_when_not_default(tmp_path: Path) -> None:
    stage = ExtractStage()
    default_inputs = stage.config_inputs(build_config())
    assert "extract.preset" not in default_inputs and "extract.resize_round" not in default_inputs
    xd = stage.config_inputs(build_config(sets=["extract.preset=xd_violence"]))
    assert xd["extract.preset"] == "xd_violence" and xd["extract.partial_clip"] == "exclude_last_frame"
    grey_video(tmp_path / "g.mp4", 40)
    cfg = build_config(sets=["extract.preset=xd_violence", "extract.crops=none"])
    _, meta = extract_video(cfg, FrameMeans(), tmp_path / "g.mp4")
    assert meta["preset"] == "xd_violence" and meta["crop_order"] == "roc-ng"
    assert meta["resize"] == ["short", 16, "floor"] and len(meta["clip_ranges"]) == 2  # (40 - 1) // 16


class _Preprocessing(ClipExtractor):
    """The geometry and normalisation of a preset's network without the network (features = input)."""

    feature_dim = 0
    crop_size = 224
    resize = ("short", 256)
    registry_name = "test_preprocessing"

    def __init__(self, mean: float, std: float) -> None:
        super().__init__()
        self.mean, self.std = mean, std

    @property
    def weights_checksum(self) -> str:
        return "none"

    def normalize(self, clips: torch.Tensor) -> torch.Tensor:
        return (clips - self.mean) / self.std

    def features(self, clips: torch.Tensor) -> torch.Tensor:
        return clips


@pytest.mark.parametrize("name", ["rtfm", "xd_violence"])
def test_preset_preprocessing_is_torchvision_on_pil(shared: Path, name: str) -> None:
    """16 real frames, cut to 240x310 (whose long side 330.7 truncates to 330 under torchvision's
    Resize), through the preset's resize, crops, order and normalisation, against the authors' chain:
    PIL images -> torchvision Resize(256) -> TenCrop/FiveCrop(224) -> x255 -> normalise."""
    import decord
    from PIL import Image
    from torchvision import transforms as T

    frames = decord.VideoReader(str(shared / "videos" / "v_GGSY1Qvo990.mp4"))[:16].asnumpy()[:, :, :310].copy()
    cfg = build_config(sets=[f"extract.preset={name}"]).extract
    mean, std = (114.75, 57.375) if name == "rtfm" else (127.5, 127.5)  # RTFM issue 21; [-1, 1]
    ours = network_input(_Preprocessing(mean, std), torch.from_numpy(frames)[None], cfg.crops, cfg.crop_order,
                         cfg.resize_dtype, cfg.resize_round)  # [C, 3, 16, 224, 224]

    pil = [T.Resize(256)(Image.fromarray(f)) for f in frames]
    assert pil[0].size == (330, 256)
    crops = [T.TenCrop(224)(im) if cfg.crops == "10" else T.FiveCrop(224)(im) for im in pil]  # per frame
    if cfg.crop_order == "roc-ng":  # centre first, then the corners (extractors/transforms.py)
        crops = [(c[4], *c[:4], *c[5:][4:], *c[5:][:4]) if len(c) == 10 else (c[4], *c[:4]) for c in crops]
    ref = torch.stack([
        torch.stack([T.functional.pil_to_tensor(frame_crops[k]).float() for frame_crops in crops], dim=1)
        for k in range(len(crops[0]))
    ])  # [C, 3, 16, 224, 224] in [0, 255]
    ref = (ref - mean) / std
    assert ours.shape == ref.shape
    rel = (ours - ref).norm() / ref.norm()
    off = ((ours - ref).abs() * std > 0.5).float().mean()
    # torch's uint8 resize is PIL's algorithm; a few values differ by 1 (extractors/transforms.py)
    assert rel < 1e-2 and off < 0.01 and ((ours - ref).abs() * std).max() <= 1.0 + 1e-4
