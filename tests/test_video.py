"""pipeline.core.video: decoding video files and frame folders against known synthetic frames."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.core.video import DecordVideo, VideoDecodeError, natural_key, open_video

H, W, N = 48, 64, 40


def synthetic_frames(n: int = N, h: int = H, w: int = W) -> np.ndarray:
    """Smooth moving gradients plus a moving square and a moving bar: every frame differs."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    out = np.empty((n, h, w, 3), np.uint8)
    for t in range(n):
        f = np.empty((h, w, 3))
        f[..., 0] = 128 + 90 * np.sin((xx + 2 * t) / 9.0)
        f[..., 1] = 128 + 90 * np.sin((yy - 1.5 * t) / 7.0 + xx / 23.0)
        f[..., 2] = 128 + 80 * np.cos((xx + yy + 3 * t) / 11.0)
        x0 = (t * 2) % (w - 12)
        f[8:20, x0 : x0 + 12] = (235, 235, 235)  # a moving bright square
        y0 = (t * 3) % (h - 6)
        f[y0 : y0 + 6] *= 0.6  # a moving dark band
        out[t] = np.round(f).astype(np.uint8)
    return out


def write_mp4(
    path: Path, frames: np.ndarray, pix_fmt: str = "yuv444p", crf: int = 0, gop: int = 250, faststart: bool = False
) -> Path:
    import av

    with av.open(str(path), "w", format="mp4", options={"movflags": "faststart"} if faststart else {}) as c:
        s = c.add_stream("libx264", rate=30)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        s.options = {"crf": str(crf), "preset": "fast", "threads": "1", "g": str(gop)}
        for i, f in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(f, format="rgb24")
            vf.pts = i
            for p in s.encode(vf):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def write_folder(
    folder: Path, frames: np.ndarray, ext: str = ".png", names: list[str] | None = None, quality: int = 95
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    names = names or [f"{i:03d}{ext}" for i in range(len(frames))]
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if ext == ".jpg" else []
    for name, f in zip(names, frames):
        assert cv2.imwrite(str(folder / name), cv2.cvtColor(f, cv2.COLOR_RGB2BGR), params)
    return folder


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def read_chunks(src, chunk: int) -> tuple[list[int], np.ndarray]:
    starts, chunks = [], []
    for start, frames in src.iter_chunks(chunk):
        assert frames.dtype == np.uint8 and frames.ndim == 4 and frames.shape[-1] == 3
        assert frames.flags["C_CONTIGUOUS"]
        assert 1 <= len(frames) <= chunk
        starts.append(start)
        chunks.append(frames)
    return starts, np.concatenate(chunks)


@pytest.fixture(scope="module")
def truth() -> np.ndarray:
    return synthetic_frames()


@pytest.fixture(scope="module")
def mp4(tmp_path_factory, truth) -> Path:
    return write_mp4(tmp_path_factory.mktemp("v") / "clip.mp4", truth)


# --- video files ---------------------------------------------------------------------------


def test_mp4_matches_true_frames(mp4, truth):
    src = open_video(mp4)
    assert isinstance(src, DecordVideo)
    assert (src.height, src.width, src.num_frames) == (H, W, N)
    assert src.fps == pytest.approx(30.0)
    assert src.frames_decoded is None
    _, frames = read_chunks(src, 64)
    assert frames.shape == (N, H, W, 3)
    assert src.frames_decoded == N
    assert min(psnr(a, b) for a, b in zip(frames, truth)) > 35


def test_chunk_boundaries_do_not_change_frames(mp4, monkeypatch):
    src = open_video(mp4)
    requested: list[int] = []
    reader = src._reader
    orig = reader.get_batch

    class Spy:
        def __getattr__(self, name):
            return getattr(reader, name)

        def get_batch(self, idx):
            requested.append(len(idx))
            return orig(idx)

    src._reader = Spy()
    starts7, f7 = read_chunks(src, 7)
    assert max(requested) <= 7  # memory bounded by the chunk size
    starts64, f64 = read_chunks(src, 64)
    _, f1 = read_chunks(src, 1)
    assert starts7 == list(range(0, N, 7)) and starts64 == [0]
    assert np.array_equal(f7, f64) and np.array_equal(f1, f64)


def test_grayscale_video_has_three_channels(tmp_path, truth):
    gray = np.repeat(truth[..., 1:2], 3, axis=-1)
    path = write_mp4(tmp_path / "gray.mp4", gray, pix_fmt="gray")
    _, frames = read_chunks(open_video(path), 16)
    assert frames.shape == (N, H, W, 3)
    assert np.abs(frames[..., 0].astype(int) - frames[..., 2]).max() <= 2
    # the decoder may map the luma range; the content must still be the same picture
    assert np.corrcoef(frames[..., 0].ravel(), gray[..., 0].ravel())[0, 1] > 0.99


def test_truncated_container_decodes_up_to_last_good_frame(tmp_path, caplog):
    truth = synthetic_frames(100)
    full = write_mp4(tmp_path / "full.mp4", truth, gop=10, faststart=True)  # index first
    data = full.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: int(len(data) * 0.6)])
    results = []
    for chunk in (7, 64):
        src = open_video(cut)
        with caplog.at_level(logging.WARNING, logger="pipeline.core.video"):
            starts, frames = read_chunks(src, chunk)
        assert src.frames_decoded == len(frames)
        assert 20 <= src.frames_decoded <= src.num_frames < 100
        assert starts[0] == 0
        assert min(psnr(a, b) for a, b in zip(frames, truth)) > 35
        results.append(frames)
    assert np.array_equal(results[0], results[1])
    if len(results[0]) < open_video(cut).num_frames:
        assert "can be decoded" in caplog.text and "cut.mp4" in caplog.text


def test_fallback_decoding_lines_up_with_decord(mp4, truth):
    """A decord failure mid-video switches to sequential decoding without skipping or repeating."""
    src = open_video(mp4)
    reader = src._reader

    class Failing:
        def __getattr__(self, name):
            return getattr(reader, name)

        def get_batch(self, idx):
            if max(idx) >= 17:
                raise RuntimeError("simulated decoder failure")
            return reader.get_batch(idx)

    src._reader = Failing()
    starts, frames = read_chunks(src, 8)
    assert starts[:3] == [0, 8, 16] and len(frames) == N == src.frames_decoded
    assert min(psnr(a, b) for a, b in zip(frames, truth)) > 35
    _, reference = read_chunks(open_video(mp4), 64)
    assert np.array_equal(frames, reference)


def test_import_does_not_load_decord():
    code = "import sys, pipeline.core.video; assert 'decord' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


# --- frame folders -------------------------------------------------------------------------


def test_jpeg_folder(tmp_path, truth):
    folder = write_folder(tmp_path / "jpg", truth, ".jpg", quality=95)
    src = open_video(folder, folder_fps=12.5)
    assert (src.num_frames, src.height, src.width, src.fps) == (N, H, W, 12.5)
    _, frames = read_chunks(src, 16)
    assert src.frames_decoded == N
    assert min(psnr(a, b) for a, b in zip(frames, truth)) > 30


def test_png_folder_exact_and_natural_order(tmp_path, truth):
    names = [f"{i + 1}.png" for i in range(N)]  # 1.png, 2.png, ..., 10.png: natural order needed
    folder = write_folder(tmp_path / "png", truth, names=names)
    (folder / "notes.txt").write_text("not a frame")
    src = open_video(folder)
    assert src.fps == 30.0 and src.num_frames == N
    _, f7 = read_chunks(src, 7)
    _, f64 = read_chunks(src, 64)
    assert np.array_equal(f7, truth) and np.array_equal(f64, truth)


def test_natural_key():
    assert sorted(["10.jpg", "2.jpg", "1.jpg", "frame_11.png", "frame_9.png"], key=natural_key) == [
        "1.jpg", "2.jpg", "10.jpg", "frame_9.png", "frame_11.png"
    ]


def test_grayscale_images_have_three_channels(tmp_path, truth):
    folder = tmp_path / "gray"
    folder.mkdir()
    for i, f in enumerate(truth[:5]):
        cv2.imwrite(str(folder / f"{i:06d}.png"), f[..., 0])
    _, frames = read_chunks(open_video(folder), 64)
    assert frames.shape == (5, H, W, 3)
    for c in range(3):
        assert np.array_equal(frames[..., c], truth[:5, ..., 0])


# --- bad inputs ----------------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(VideoDecodeError, match="nope.mp4.*no such"):
        open_video(tmp_path / "nope.mp4")


def test_text_file_named_mp4(tmp_path):
    p = tmp_path / "fake.mp4"
    p.write_text("this is not a video\n" * 20)
    with pytest.raises(VideoDecodeError, match="fake.mp4"):
        open_video(p)


def test_zero_length_file(tmp_path):
    p = tmp_path / "empty.mp4"
    p.write_bytes(b"")
    with pytest.raises(VideoDecodeError, match="empty.mp4.*0 bytes"):
        open_video(p)


def test_empty_folder(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    (folder / "readme.txt").write_text("no images here")
    with pytest.raises(VideoDecodeError, match="frames.*empty frame folder"):
        open_video(folder)


def test_mixed_image_sizes_name_the_offending_image(tmp_path, truth):
    folder = write_folder(tmp_path / "mixed", truth[:10])
    cv2.imwrite(str(folder / "007.png"), cv2.resize(truth[7], (W // 2, H // 2)))
    src = open_video(folder)
    with pytest.raises(VideoDecodeError, match=r"007\.png.*32x24.*64x48"):
        read_chunks(src, 4)


@pytest.mark.parametrize("content", [b"", b"definitely not a jpeg"])
def test_unreadable_image(tmp_path, truth, content):
    folder = write_folder(tmp_path / "bad", truth[:6], ".jpg")
    (folder / "003.jpg").write_bytes(content)
    src = open_video(folder)
    with pytest.raises(VideoDecodeError, match=r"003\.jpg"):
        read_chunks(src, 64)


def test_unreadable_first_image_fails_at_open(tmp_path):
    folder = tmp_path / "badfirst"
    folder.mkdir()
    (folder / "000.jpg").write_bytes(b"garbage")
    with pytest.raises(VideoDecodeError, match=r"000\.jpg.*not a readable"):
        open_video(folder)


def test_bad_chunk_size(mp4):
    with pytest.raises(ValueError):
        next(open_video(mp4).iter_chunks(0))


def test_folder_decoding_threads_give_the_same_frames_and_first_error(tmp_path, truth):
    """Frames decoded by several threads equal one thread's, chunk by chunk; with two bad images
    the error names the first one in frame order, as one thread would."""
    from pipeline.core.video import FrameFolder

    frames = np.concatenate([truth, truth[::-1], truth])  # 3N frames
    folder = write_folder(tmp_path / "many", frames, ".jpg")
    one = read_chunks(FrameFolder(folder, threads=1), 7)
    four = read_chunks(FrameFolder(folder, threads=4), 7)
    assert np.array_equal(one[1], four[1]) and one[0] == four[0]
    from pipeline.core.video import _folder_pool

    assert _folder_pool(4)._max_workers == 4 and _folder_pool(2)._max_workers == 2  # as many as asked
    cv2.imwrite(str(folder / "011.jpg"), cv2.resize(frames[11], (W // 2, H // 2)))
    (folder / "014.jpg").write_bytes(b"definitely not a jpeg")  # the same chunk, a cheaper failure
    for threads in (1, 4):
        with pytest.raises(VideoDecodeError, match=r"011\.jpg: image is 32x24"):
            read_chunks(FrameFolder(folder, threads=threads), 16)


def test_an_unreadable_file_is_one_line_of_the_tools_own(tmp_path, capfd):
    """Issue 19: decord's C++ log line (``video_reader.cc:86: ERROR opening ...``) and FFmpeg's
    appeared beside the tool's message, whose reason was cut to "Error reading <path>..."."""
    from pipeline.core.video import VideoDecodeError, open_video

    bad = tmp_path / "notes.mp4"
    bad.write_text("this is not a video\n")
    with pytest.raises(VideoDecodeError) as e:
        open_video(bad)
    assert str(e.value) == f"{bad}: not a readable video: Invalid data found when processing input"
    out, err = capfd.readouterr()
    assert "video_reader.cc" not in err and "moov atom" not in err and err == ""
