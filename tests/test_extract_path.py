"""The extract stage's fast path: device-side preprocessing equal to the old per-clip CPU path,
stored feature dtype, frame-rate resampling with source-frame clip ranges, the background decode
thread (errors reach the caller, no thread is left behind), precision settings and cache keys.

All on tiny synthetic videos with the cheap ``test_motion`` extractor and a tiny random Conv3d
network; seconds in all.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from conftest import moving_square_video, register_test_extractor, write_video
from extractors import EXTRACTORS
from extractors.base import ClipExtractor
from extractors.transforms import crop_names, resize_frames, spatial_crops
from stages.config import build_config
from pipeline.core.store import StageDir
from pipeline.core.video import BackgroundIterator, FrameRateResampler, VideoDecodeError, open_video
from extractors.stream import extract_video, iter_clip_features
from stages.extract import ExtractStage


class TinyConv3d(ClipExtractor):
    """A random 2-layer Conv3d network (fixed seed) with a mean/std normalisation, 16-D output."""

    feature_dim = 16
    crop_size = 24
    resize = ("short", 28)
    registry_name = "test_tiny_conv3d"

    def __init__(self, device: str = "cpu") -> None:
        super().__init__(device=device)
        g = torch.Generator().manual_seed(0)
        self.model = torch.nn.Sequential(
            torch.nn.Conv3d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(8, 16, 3, stride=2),
            torch.nn.AdaptiveAvgPool3d(1), torch.nn.Flatten(),
        )
        with torch.no_grad():
            for p in self.model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        self.model.eval().to(self.device)
        self.mean = torch.tensor([110.0, 100.0, 90.0]).view(3, 1, 1, 1)

    @property
    def weights_checksum(self) -> str:
        return "tiny"

    def normalize(self, clips: torch.Tensor) -> torch.Tensor:
        return (clips - self.mean.to(clips.device)) / 58.0

    def features(self, clips: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(clips).float()


def old_reference(cfg, extractor, path: Path, target_fps: float = 0.0) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Features the way the extract stage computed them before the device path: every clip resized
    and cropped on the CPU on its own (float frames), ``extract.batch_clips`` clips concatenated,
    normalised and fed to the network."""
    src = open_video(path)
    frames = src.read_all()
    n = len(frames)
    if target_fps:
        r = FrameRateResampler(src.fps, target_fps)
        frames = frames[[r.source_index(j) for j in range(r.n_output(n))]]
    e, L = cfg.extract, cfg.extract.clip_len
    clips = []
    for s in range(0, len(frames), L):
        clip = frames[s : s + L]
        if len(clip) < L:
            if e.partial_clip == "drop":
                break
            clip = np.concatenate([clip, np.repeat(clip[-1:], L - len(clip), axis=0)])
        x = resize_frames(torch.from_numpy(clip), extractor.resize, e.resize_dtype)
        clips.append(spatial_crops(x, extractor.crop_size, e.crops, e.crop_order).permute(0, 2, 1, 3, 4))
    feats = []
    for b in range(0, len(clips), e.batch_clips):
        x = extractor.normalize(torch.cat(clips[b : b + e.batch_clips]))
        f = extractor.features(x).float().numpy()
        feats.append(f.reshape(-1, len(crop_names(e.crops, e.crop_order)), f.shape[-1]))
    ranges = [(s, min(s + L, n)) for s in range(0, len(clips) * L, L)] if not target_fps else []
    return np.concatenate(feats), ranges


@pytest.fixture(scope="module")
def video25(tmp_path_factory) -> Path:
    """70 frames at 25 fps, 64x48: four full clips and a 6-frame partial one."""
    path = tmp_path_factory.mktemp("v") / "v25.mp4"
    write_video(path, moving_square_video(70, 30, seed=3), fps=25)
    return path


def config(*sets: str):
    register_test_extractor()
    return build_config(sets=["extract.backbone=test_motion", *sets])


def no_decode_threads() -> bool:
    deadline = time.time() + 5
    while time.time() < deadline:
        if not [t for t in threading.enumerate() if t.name.startswith("wsvad-decode")]:
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize("crops,order", [("10", "torchvision"), ("10", "roc-ng"), ("5", "torchvision"), ("center", "torchvision")])
@pytest.mark.parametrize("make", [lambda: EXTRACTORS.get("test_motion"), TinyConv3d], ids=["test_motion", "conv3d"])
def test_device_path_equals_old_cpu_path(video25: Path, crops: str, order: str, make) -> None:
    register_test_extractor()
    ex = make()
    for batch, chunk, prefetch in ((8, 128, 2), (3, 20, 0)):
        cfg = config(f"extract.crops={crops}", f"extract.crop_order={order}", f"extract.batch_clips={batch}",
                     f"extract.chunk_frames={chunk}", f"extract.prefetch_batches={prefetch}")
        ref, ref_ranges = old_reference(cfg, ex, video25)
        feats, meta = extract_video(cfg, ex, video25)
        assert feats.dtype == np.float32 and feats.shape == ref.shape == (5, len(crop_names(crops, order)), ex.feature_dim)
        assert np.array_equal(feats, ref)  # bit for bit: the same float ops on the same layout
        assert [tuple(r) for r in meta["clip_ranges"]] == ref_ranges == [(0, 16), (16, 32), (32, 48), (48, 64), (64, 70)]
        assert meta["n_frames"] == meta["n_frames_resampled"] == 70 and meta["target_fps"] is None


def test_device_path_bitwise_on_cpu_and_drop(video25: Path) -> None:
    ex = TinyConv3d()
    # the same ops in the same order on the CPU, for any batching and either resize precision
    for batch, dtype in ((1, "uint8"), (3, "uint8"), (3, "float32")):
        cfg = config("extract.crops=10", "extract.partial_clip=drop", f"extract.batch_clips={batch}",
                     "extract.chunk_frames=24", f"extract.resize_dtype={dtype}")
        ref, _ = old_reference(cfg, ex, video25)
        feats, meta = extract_video(cfg, ex, video25)
        assert np.array_equal(feats, ref)
    assert meta["clip_ranges"] == [[0, 16], [16, 32], [32, 48], [48, 64]] and meta["n_frames"] == 70


def test_feature_dtype_float16_is_stored_and_readable(video25: Path, tmp_path: Path) -> None:
    from pipeline.core.store import StageDir
    from stages.segment import pool_segments

    ex = TinyConv3d()
    f32, _ = extract_video(config("extract.crops=center"), ex, video25)
    f16, meta = extract_video(config("extract.crops=center", "extract.feature_dtype=float16"), ex, video25)
    assert f16.dtype == np.float16 and meta["feature_dtype"] == "float16"
    np.testing.assert_array_equal(f16, f32.astype(np.float16))
    out = StageDir(tmp_path / "stage")
    out.items.mkdir(parents=True, exist_ok=True)
    out.save_item("v", {"features": f16}, meta)
    _, arrays = out.load_item("v")
    assert arrays["features"].dtype == np.float16
    assert torch.from_numpy(arrays["features"]).dtype == torch.float16
    seg = pool_segments(arrays["features"], [(0, 2), (2, 5)], l2=True)
    assert seg.dtype == np.float32 and seg.shape == (1, 2, 16)
    # what online scoring sees equals what is stored
    got = np.stack([f for _, _, f in iter_clip_features(config("extract.crops=center", "extract.feature_dtype=float16"), ex, video25)])
    assert got.dtype == np.float32 and np.array_equal(got, f16.astype(np.float32))


def test_feature_dtype_overflow_is_refused(video25: Path) -> None:
    ex = TinyConv3d()
    ex.features = lambda clips: torch.full((clips.shape[0], 4), 1e6)  # type: ignore[method-assign]
    with pytest.raises(ValueError, match="feature_dtype=float16"):
        extract_video(config("extract.crops=center", "extract.feature_dtype=float16"), ex, video25)


def test_resampler_rule() -> None:
    r = FrameRateResampler(25, 30)
    assert [r.source_index(j) for j in range(12)] == [0, 0, 1, 2, 3, 4, 5, 5, 6, 7, 8, 9]
    assert r.n_output(250) == 300
    assert r.select(0, 10) + [o + 10 for o in r.select(10, 15)] == [r.source_index(j) for j in range(30)]
    with pytest.raises(ValueError):
        r.select(40, 5)  # not where the previous chunk ended
    ntsc = FrameRateResampler(30000 / 1001, 25)
    assert ntsc.ratio.numerator == 1200 and ntsc.ratio.denominator == 1001
    assert ntsc.n_output(108_000) == 90_090  # an hour of NTSC video, no drift
    assert FrameRateResampler(30, 30).identity


def check_tiling(ranges: list[list[int]], n_frames: int) -> None:
    """Ranges start at 0, end at ``n_frames``, move forward, never leave a gap."""
    assert ranges[0][0] == 0 and ranges[-1][1] == n_frames
    for (a, b), (c, d) in zip(ranges, ranges[1:]):
        assert a < b and c < d and a < c and b <= d
        assert c <= b  # no gap (at most one shared frame when upsampling)


def test_target_fps_upsamples_25_to_30(tmp_path: Path) -> None:
    from stages.evaluate import frames_from_units

    path = tmp_path / "u.mp4"
    write_video(path, moving_square_video(160, 60, seed=1), fps=25)
    native, nmeta = extract_video(config("extract.crops=center"), EXTRACTORS.get("test_motion"), path)
    cfg = config("extract.crops=center", "extract.target_fps=30", "extract.chunk_frames=23", "extract.batch_clips=5")
    feats, meta = extract_video(cfg, EXTRACTORS.get("test_motion"), path)
    assert len(native) == 10 and len(feats) == 12  # 1.2x the clips (RTFM issue 78)
    assert meta["n_frames"] == 160 and meta["n_frames_resampled"] == 192 and meta["fps"] == 25.0
    assert meta["target_fps"] == 30.0 and meta["clip_fps"] == 30.0
    ranges = meta["clip_ranges"]
    check_tiling(ranges, 160)
    r = FrameRateResampler(25, 30)
    for k, (a, b) in enumerate(ranges):  # each clip's range holds exactly the source frames it shows
        shown = {r.source_index(j) for j in range(16 * k, 16 * k + 16)}
        assert (a, b - 1) == (min(shown), max(shown))
    _, covered = frames_from_units(np.ones(len(ranges)), [tuple(x) for x in ranges], meta["n_frames"])
    assert covered.all()
    ref, _ = old_reference(cfg, EXTRACTORS.get("test_motion"), path, target_fps=30)
    assert np.array_equal(feats, ref)


@pytest.mark.parametrize("target", [25.0, 12.0, 7.5])
def test_target_fps_downsampling_covers_skipped_frames(tmp_path: Path, target: float) -> None:
    path = tmp_path / "d.mp4"
    write_video(path, moving_square_video(100, None, seed=2), fps=30)
    ex = EXTRACTORS.get("test_motion")
    for partial in ("pad", "drop"):
        cfg = config("extract.crops=center", f"extract.target_fps={target}", "extract.chunk_frames=16",
                     f"extract.partial_clip={partial}")
        feats, meta = extract_video(cfg, ex, path)
        r = FrameRateResampler(30, target)
        n_out = r.n_output(100)
        assert meta["n_frames_resampled"] == n_out and meta["n_frames"] == 100
        assert len(feats) == (-(-n_out // 16) if partial == "pad" else n_out // 16)
        ranges = meta["clip_ranges"]
        if partial == "pad" or n_out % 16 == 0:
            check_tiling(ranges, 100)
        for k, (a, b) in enumerate(ranges):
            assert a == r.source_index(16 * k)
            nxt = 16 * (k + 1)
            assert b == (max(r.source_index(nxt - 1) + 1, r.source_index(nxt)) if nxt < n_out else 100)
        ref, _ = old_reference(cfg, ex, path, target_fps=target)
        assert np.array_equal(feats, ref)


def test_target_fps_equal_to_native_changes_nothing(video25: Path) -> None:
    register_test_extractor()
    ex = EXTRACTORS.get("test_motion")
    a, ma = extract_video(config(), ex, video25)
    b, mb = extract_video(config("extract.target_fps=25"), ex, video25)
    assert np.array_equal(a, b) and ma["clip_ranges"] == mb["clip_ranges"] and mb["target_fps"] == 25.0


def frame_folder_with_bad_frame(folder: Path, n: int = 60, bad: int = 40) -> Path:
    folder.mkdir(parents=True)
    for i, f in enumerate(moving_square_video(n)):
        assert cv2.imwrite(str(folder / f"{i:04d}.png"), cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    (folder / f"{bad:04d}.png").write_bytes(b"not an image")
    return folder


@pytest.mark.parametrize("prefetch", [2, 0])
def test_decode_error_in_the_worker_reaches_the_caller(tmp_path: Path, prefetch: int) -> None:
    folder = frame_folder_with_bad_frame(tmp_path / "frames")
    cfg = config("extract.crops=center", "extract.chunk_frames=8", "extract.batch_clips=2",
                 f"extract.prefetch_batches={prefetch}")
    got = []
    with pytest.raises(VideoDecodeError, match="0040.png"):
        for i, _, _ in iter_clip_features(cfg, EXTRACTORS.get("test_motion"), folder):
            got.append(i)
    assert got == [0, 1]  # the clips before the bad frame came out first
    assert no_decode_threads()


def test_broken_file_and_short_video_raise(tmp_path: Path) -> None:
    bad = tmp_path / "broken.mp4"
    bad.write_text("this is not a video\n")
    with pytest.raises(VideoDecodeError, match="broken.mp4"):
        extract_video(config(), EXTRACTORS.get("test_motion"), bad)
    short = tmp_path / "short.mp4"
    write_video(short, moving_square_video(10), fps=25)
    with pytest.raises(VideoDecodeError, match="short.mp4: 10 frames is shorter"):
        extract_video(config("extract.partial_clip=drop"), EXTRACTORS.get("test_motion"), short)
    with pytest.raises(VideoDecodeError, match=r"10 frames \(12 after resampling to 30 fps\)"):
        extract_video(config("extract.partial_clip=drop", "extract.target_fps=30"), EXTRACTORS.get("test_motion"), short)
    assert no_decode_threads()


def test_consumer_stopping_early_ends_the_thread(video25: Path) -> None:
    cfg = config("extract.crops=center", "extract.batch_clips=2", "extract.chunk_frames=16")
    it = iter_clip_features(cfg, EXTRACTORS.get("test_motion"), video25)
    assert next(it)[0] == 0
    assert [t for t in threading.enumerate() if t.name.startswith("wsvad-decode")]
    it.close()
    assert no_decode_threads()
    # one clip per batch (online scoring): decoded in the calling thread, nothing read ahead
    it = iter_clip_features(cfg, EXTRACTORS.get("test_motion"), video25, batch_clips=1)
    assert next(it)[0] == 0
    assert not [t for t in threading.enumerate() if t.name.startswith("wsvad-decode")]
    it.close()


def test_background_iterator() -> None:
    def gen():
        yield 1
        yield 2
        raise KeyError("boom")

    it = BackgroundIterator(gen(), depth=1, name="wsvad-decode-test")
    assert next(it) == 1 and next(it) == 2
    with pytest.raises(KeyError, match="boom"):
        next(it)
    with pytest.raises(StopIteration):
        next(it)
    assert not it.thread.is_alive()

    cleaned = threading.Event()

    def endless():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            cleaned.set()

    with BackgroundIterator(endless(), depth=2, name="wsvad-decode-test") as it2:
        assert [next(it2) for _ in range(5)] == [0, 1, 2, 3, 4]
    assert not it2.thread.is_alive() and cleaned.is_set()  # the generator was closed in its thread


def test_precision(video25: Path) -> None:
    ex = TinyConv3d()
    f32, _ = extract_video(config("extract.crops=center"), ex, video25)
    bf16, meta = extract_video(config("extract.crops=center", "extract.precision=bf16"), ex, video25)
    assert bf16.dtype == np.float32 and meta["precision"] == "bf16"
    assert not np.array_equal(bf16, f32)  # the convolutions really ran in bfloat16
    np.testing.assert_allclose(bf16, f32, rtol=0.05, atol=0.02)
    with pytest.raises(ValueError, match="fp16 needs CUDA"):
        next(iter_clip_features(config("extract.precision=fp16"), ex, video25))


def test_cache_key_fields() -> None:
    stage = ExtractStage()
    base = stage.config_inputs(config())
    for name in ("extract.target_fps", "extract.precision", "extract.feature_dtype"):
        assert name in ExtractStage.reads and name not in base  # neutral defaults keep old keys
    assert "extract.prefetch_batches" not in base and "extract.channels_last" not in base
    assert stage.config_inputs(config("extract.prefetch_batches=0", "extract.channels_last=false")) == base
    assert stage.config_inputs(config("extract.precision=bf16"))["extract.precision"] == "bf16"
    assert stage.config_inputs(config("extract.feature_dtype=float16"))["extract.feature_dtype"] == "float16"
    assert stage.config_inputs(config("extract.target_fps=30"))["extract.target_fps"] == 30.0
    # the resize precision changes every value: it is always in the key
    assert base["extract.resize_dtype"] == "uint8"
    assert stage.config_inputs(config("extract.resize_dtype=float32"))["extract.resize_dtype"] == "float32"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_path_matches_cpu(video25: Path) -> None:
    cpu = TinyConv3d()
    gpu = TinyConv3d(device="cuda")
    cfg = config("extract.crops=10")
    a, _ = extract_video(cfg, cpu, video25)
    b, _ = extract_video(cfg, gpu, video25)
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)
    c, _ = extract_video(config("extract.crops=10", "extract.precision=bf16"), gpu, video25)
    np.testing.assert_allclose(c, a, rtol=0.05, atol=0.02)


def test_real_i3d_bit_identical_to_the_old_path(tmp_path: Path) -> None:
    """The real Inception-I3D: the device path gives the old per-clip path's features bit for bit."""
    import urllib.error

    from extractors.i3d_inception import I3D_K400_RGB
    from extractors.weights import WeightsError, fetch_weights

    try:
        ckpt = fetch_weights(I3D_K400_RGB)
    except WeightsError as exc:
        if isinstance(exc.__cause__, (urllib.error.URLError, OSError)):
            pytest.skip(f"I3D weights not cached and no network to download them: {exc}")
        raise
    path = tmp_path / "i3d.mp4"
    write_video(path, moving_square_video(20, 8, h=240, w=320), fps=30)  # a clip and a padded 4-frame one
    ex = EXTRACTORS.get("i3d_inception", weights=str(ckpt), device="cpu")
    cfg = build_config(sets=["extract.crops=center", "extract.batch_clips=2"])
    feats, meta = extract_video(cfg, ex, path)
    ref, ranges = old_reference(cfg, ex, path)
    assert feats.shape == (2, 1, 1024) and np.array_equal(feats, ref)
    assert [tuple(r) for r in meta["clip_ranges"]] == ranges == [(0, 16), (16, 20)]


def test_resampled_run_evaluates_on_source_frames(tmp_path: Path) -> None:
    """A whole run with extract.target_fps: evaluation maps the clips back onto the source frames."""
    import json

    from test_runner import make_dataset, make_runner

    manifest = make_dataset(tmp_path / "data")
    reports = {r.stage: r for r in make_runner(manifest, tmp_path / "run", ["extract.target_fps=24"]).run(["evaluate"])}
    assert reports["evaluate"].state == "computed"
    meta = StageDir(reports["extract"].path).load_meta("test1")  # 56 frames at 30 fps -> 45 at 24 fps
    assert meta["n_frames"] == 56 and meta["n_frames_resampled"] == 45 and meta["target_fps"] == 24.0
    assert len(meta["clip_ranges"]) == 3
    check_tiling(meta["clip_ranges"], 56)
    metrics = json.loads((reports["evaluate"].path / "metrics.json").read_text())
    assert metrics["auc"] > 0.9


def test_float16_features_pool_like_float32() -> None:
    from stages.segment import pool_segments

    f = (np.random.default_rng(0).random((64, 2, 4096)) * 12).astype(np.float32)  # C3D fc6-like magnitudes
    bins = [(2 * i, 2 * i + 2) for i in range(32)]
    with np.errstate(over="ignore"):
        half = pool_segments(f.astype(np.float16), bins, l2=True)
    np.testing.assert_allclose(half, pool_segments(f.astype(np.float16).astype(np.float32), bins, l2=True), atol=1e-3)


def test_float16_features_through_a_clip_level_detector(tmp_path: Path) -> None:
    from models import DETECTORS
    from pipeline.core.runner import Runner
    from pipeline.runs import make_context
    from stages import all_stages
    from test_runner import make_dataset

    clip_level = [n for n in DETECTORS.list() if DETECTORS.get_class(n).input_level == "clips"]
    if not clip_level:
        pytest.skip("no clip-level detector registered")
    manifest = make_dataset(tmp_path / "data")
    register_test_extractor()
    cfg = build_config(sets=[f"data.manifest={manifest}", "extract.backbone=test_motion", "extract.crops=center",
                             "extract.feature_dtype=float16"], method=clip_level[0])
    if hasattr(cfg.train, "short_schedule"):
        cfg.train.short_schedule = True
    reports = {r.stage: r for r in Runner(make_context(cfg, tmp_path / "run", progress=False), all_stages()).run(["evaluate"])}
    assert reports["evaluate"].state == "computed"


def test_network_input_buffer_is_handed_from_video_to_video(video25: Path) -> None:
    """One extractor's later videos reuse the buffer its first video allocated (same features), and
    two videos extracted at once never share one."""
    import extractors.stream as extract

    ex = TinyConv3d()
    cfg = config("extract.crops=10", "extract.batch_clips=2")
    first, _ = extract_video(cfg, ex, video25)
    buf = extract._INPUT_BUFFERS[ex]
    assert buf.shape[0] == 2 * 10
    second, _ = extract_video(cfg, ex, video25)
    assert extract._INPUT_BUFFERS[ex] is buf and np.array_equal(first, second)
    # two generators interleaved: the first takes the buffer, the second allocates its own
    a = iter_clip_features(cfg, ex, video25)
    next(a)
    assert ex not in extract._INPUT_BUFFERS
    b = iter_clip_features(cfg, ex, video25)
    got_a = [f for _, _, f in a]
    got_b = [f for _, _, f in b]
    assert np.array_equal(np.stack(got_a), first[1:]) and np.array_equal(np.stack(got_b), first)
    del ex
    import gc

    gc.collect()
    assert buf.data_ptr() not in [t.data_ptr() for t in extract._INPUT_BUFFERS.values()]


def test_extract_stage_releases_its_network_before_training(tmp_path: Path, monkeypatch) -> None:
    """Once the extract stage's run ends, its network (and with it the input buffer) is gone, so
    training in the same process gets the memory back; a later run loads a network again."""
    import gc
    import weakref

    import stages.extract as extract
    from test_runner import make_dataset, make_runner

    runner = make_runner(make_dataset(tmp_path / "data"), tmp_path / "run")
    stage = runner.stages["extract"]
    seen: list = []
    original = extract.extract_video

    def spy(ctx, extractor, path):
        seen.append(weakref.ref(extractor))
        return original(ctx, extractor, path)

    monkeypatch.setattr(extract, "extract_video", spy)
    runner.run(["train"])
    n_first = len(seen)
    assert n_first == 12 and stage.extractor is None
    gc.collect()
    assert seen[0]() is None  # no reference left, the buffer's weak-keyed entry with it
    runner.run(["extract"], force={"extract"})
    assert len(seen) == 2 * n_first and stage.extractor is None
