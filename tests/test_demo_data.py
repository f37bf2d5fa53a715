"""pipeline.demo: the generated demo dataset (manifest, determinism, ground truth, files)."""

from __future__ import annotations

import dataclasses
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pipeline import demo as demo_data
from pipeline.demo import writer as demo_writer
from pipeline.demo import (
    DEMO_MANIFEST,
    HEIGHT,
    WIDTH,
    demo_ground_truth,
    demo_manifest_rows,
    demo_video_length,
    event_interval,
    event_pixels,
    generate_demo_dataset,
    render_frames,
    rgb_to_i420,
)
from pipeline.core.manifest import VideoRecord, load_manifest, write_manifest
from pipeline.core.video import FrameFolder, open_video


@pytest.fixture(scope="module")
def manifest():
    return load_manifest(DEMO_MANIFEST, check_files=False)


@pytest.fixture(scope="module")
def rows(manifest):
    return manifest.by_id()


def render(video: VideoRecord) -> np.ndarray:
    return np.stack(list(render_frames(video)))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


# --- the manifest ------------------------------------------------------------------------------


def test_manifest_composition(manifest):
    train, test = manifest.split("train"), manifest.split("test")
    assert len(train) == 20 and len(test) == 10
    assert Counter(v.cls for v in train) == {"Normal": 10, "FastObject": 4, "RunningCrowd": 4, "Falling": 2}
    assert Counter(v.cls for v in test) == {"Normal": 5, "FastObject": 2, "RunningCrowd": 2, "Falling": 1}
    assert all(v.label == (v.cls != "Normal") for v in manifest.videos)
    assert [v.id for v in train] == [f"train_{i:03d}" for i in range(20)]
    assert [v.id for v in test] == [f"test_{i:03d}" for i in range(10)]
    folders = [v for v in manifest.videos if not v.path.endswith(".mp4")]
    assert len(folders) == 3 and all(v.split == "test" and v.path == f"frames/{v.id}" for v in folders)
    assert any(v.label for v in folders)
    assert all(v.path == f"videos/{v.id}.mp4" for v in manifest.videos if v not in folders)


def test_manifest_intervals(manifest):
    for v in manifest.videos:
        n = demo_video_length(v.id)
        if v.split == "train" or v.label == 0:
            assert v.intervals == ()
        else:
            assert len(v.intervals) == 1
            s, e = v.intervals[0]
            assert 0 <= s < e <= n and 32 <= e - s <= 70


def test_manifest_file_matches_generator(manifest):
    assert manifest.videos == demo_manifest_rows()


def test_lengths(manifest):
    lengths = [demo_video_length(v.id) for v in manifest.videos]
    assert all(112 <= n <= 160 for n in lengths)
    assert lengths == [demo_video_length(v.id) for v in manifest.videos]  # pure function of the id
    assert len(set(lengths)) > 10 and sum(n % 16 != 0 for n in lengths) >= 20


# --- ground truth ------------------------------------------------------------------------------


def test_ground_truth(manifest):
    for v in manifest.videos:
        gt = demo_ground_truth(v)
        n = demo_video_length(v.id)
        assert gt.dtype == np.uint8 and gt.shape == (n,)
        if v.label == 0:
            assert gt.sum() == 0
        elif v.split == "test":
            assert gt.tolist() == v.frame_labels(n)
        else:
            s, e = event_interval(v)
            assert gt.tolist() == [int(s <= t < e) for t in range(n)] and 32 <= e - s <= 70


def test_test_video_follows_manifest_interval(rows):
    """The manifest row is the source of truth: a different interval moves the event."""
    v = rows["test_001"]
    moved = dataclasses.replace(v, intervals=((60, 100),))
    assert demo_ground_truth(moved).nonzero()[0].tolist() == list(range(60, 100))
    px = event_pixels(moved)
    assert (px[60:100] > 0).all() and px[:60].sum() == 0 and px[100:].sum() == 0


@pytest.mark.parametrize("vid", ["test_001", "test_003", "test_004"])
def test_event_visible_exactly_inside_interval(rows, vid):
    gt = demo_ground_truth(rows[vid])
    px = event_pixels(rows[vid])
    assert ((px > 0) == (gt == 1)).all()


def test_bad_rows_are_rejected(rows):
    v = rows["test_003"]
    with pytest.raises(ValueError, match="test_003.*interval"):
        event_interval(dataclasses.replace(v, intervals=()))
    with pytest.raises(ValueError, match="test_003.*inside"):
        event_interval(dataclasses.replace(v, intervals=((100, 400),)))
    with pytest.raises(ValueError, match="test_003.*class"):
        event_interval(dataclasses.replace(v, cls="Explosion"))


# --- rendering ---------------------------------------------------------------------------------


def test_render_is_deterministic(rows):
    v = rows["test_001"]
    a, b = render(v), render(v)
    assert a.shape == (demo_video_length(v.id), HEIGHT, WIDTH, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert a.std() > 20  # a textured scene, not a flat image


@pytest.mark.parametrize("vid", ["test_001", "test_003"])
def test_anomaly_outside_interval_is_the_normal_scene(rows, vid):
    """Frames outside the interval equal the same scene rendered as a normal video; inside they
    differ, and the fast event adds motion energy."""
    v = rows[vid]
    s, e = v.intervals[0]
    anomalous = render(v).astype(np.int16)
    normal = render(dataclasses.replace(v, label=0, cls="Normal", intervals=())).astype(np.int16)
    assert np.array_equal(anomalous[:s], normal[:s]) and np.array_equal(anomalous[e:], normal[e:])
    changed = (np.abs(anomalous - normal).max(axis=-1) > 30).mean(axis=(1, 2))
    assert changed[s:e].min() > 0 and changed[s:e].mean() > 0.02
    motion = lambda x: np.abs(np.diff(x, axis=0)).mean(axis=(1, 2, 3))  # noqa: E731
    assert motion(anomalous)[s : e - 1].mean() > 1.5 * motion(normal)[s : e - 1].mean()


def test_fall_is_big_and_central(rows):
    v = rows["test_004"]
    s, e = v.intervals[0]
    frames = render(v).astype(np.int16)
    normal = render(dataclasses.replace(v, label=0, cls="Normal", intervals=())).astype(np.int16)
    diff = np.abs(frames - normal).max(axis=-1) > 30  # the falling person vs. no person at all
    lying = diff[(s + e) // 2]
    ys, xs = np.nonzero(lying)
    assert lying.mean() > 0.02
    assert 60 < xs.mean() < 260 and 20 < ys.mean() < 220  # inside the centre crop of the extractor
    assert np.ptp(xs) > 80 and np.ptp(ys) < np.ptp(xs)  # lying flat: wider than tall
    standing = diff[s - 1]
    ys0, xs0 = np.nonzero(standing)
    assert np.ptp(ys0) > 80  # the same person, upright, before the fall


def test_rgb_to_i420():
    img = np.zeros((4, 6, 3), np.uint8)
    img[:2] = 255
    yuv = rgb_to_i420(img)
    assert yuv.shape == (6, 6) and yuv.dtype == np.uint8
    assert (yuv[:2] == 235).all() and (yuv[2:4] == 16).all()
    assert (yuv[4:] == 128).all()  # grey levels carry no chroma


# --- writing the dataset -----------------------------------------------------------------------


@pytest.fixture
def mini(tmp_path, rows):
    """A two-video manifest: a normal mp4 and an anomalous JPEG frame folder."""
    src = tmp_path / "mini.csv"
    write_manifest([rows["test_007"], rows["test_006"]], src)
    return src


def test_generate_decode_and_resume(tmp_path, mini, rows, monkeypatch):
    root = tmp_path / "data"
    m = generate_demo_dataset(root, mini, progress=False, workers=1)
    assert (root / "manifest.csv").read_bytes() == mini.read_bytes()
    assert [v.id for v in m.videos] == ["test_007", "test_006"] and m.root == root

    mp4 = open_video(root / "videos/test_007.mp4")
    decoded = mp4.read_all()
    truth = render(rows["test_007"])
    assert mp4.num_frames == mp4.frames_decoded == len(decoded) == demo_video_length("test_007")
    assert mp4.fps == pytest.approx(30.0) and (mp4.height, mp4.width) == (HEIGHT, WIDTH)
    assert min(psnr(a, b) for a, b in zip(decoded, truth)) > 30

    folder = open_video(root / "frames/test_006")
    assert isinstance(folder, FrameFolder)
    assert sorted(os.listdir(root / "frames/test_006"))[:2] == ["000000.jpg", "000001.jpg"]
    decoded = folder.read_all()
    truth = render(rows["test_006"])
    assert len(decoded) == demo_video_length("test_006")
    assert min(psnr(a, b) for a, b in zip(decoded, truth)) > 30

    # a second run finds everything complete and renders nothing
    def boom(*a, **k):
        raise AssertionError("re-rendered a complete video")

    monkeypatch.setattr(demo_writer, "_generate_one", boom)
    generate_demo_dataset(root, mini, progress=False, workers=1)


def test_interrupted_write_leaves_nothing_and_resumes(tmp_path, mini, monkeypatch):
    root = tmp_path / "data"
    real = demo_writer.render_frames

    def dying(video):
        for i, frame in enumerate(real(video)):
            if i == 20:
                raise KeyboardInterrupt  # as if killed mid-video
            yield frame

    monkeypatch.setattr(demo_writer, "render_frames", dying)
    with pytest.raises(KeyboardInterrupt):
        generate_demo_dataset(root, mini, progress=False, workers=1)
    leftovers = [p for p in root.rglob("*") if p.is_file() and not p.parent.name == ".demo_state"]
    assert leftovers == []
    assert not (root / "videos/test_007.mp4").exists()

    # an old temporary from a killed process is cleaned up; the rerun completes
    stale = root / "videos" / ".test_007.mp4.abc.tmp"
    stale.write_bytes(b"partial")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    monkeypatch.setattr(demo_writer, "render_frames", real)
    m = generate_demo_dataset(root, mini, progress=False, workers=1)
    assert not stale.exists()
    assert all(m.resolve(v).exists() for v in m.videos)
    assert open_video(root / "videos/test_007.mp4").num_frames == demo_video_length("test_007")


def test_changed_row_is_regenerated(tmp_path, rows, monkeypatch):
    src = tmp_path / "one.csv"
    v = rows["test_007"]
    write_manifest([v], src)
    root = tmp_path / "data"
    generate_demo_dataset(root, src, progress=False, workers=1)
    calls = []
    real = demo_writer._generate_one
    monkeypatch.setattr(demo_writer, "_generate_one", lambda video, r: calls.append(video.id) or real(video, r))
    generate_demo_dataset(root, src, progress=False, workers=1)
    assert calls == []
    # the same id relabelled as anomalous (another test interval) must be rendered again
    write_manifest([dataclasses.replace(v, label=1, cls="FastObject", intervals=((30, 70),))], src)
    generate_demo_dataset(root, src, progress=False, workers=1)
    assert calls == ["test_007"]


def test_demo_manifest_path():
    assert DEMO_MANIFEST == Path(demo_data.__file__).resolve().parents[2] / "data_manifests" / "demo.csv"
    assert DEMO_MANIFEST.is_file()
