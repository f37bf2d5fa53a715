"""C3D's Sports-1M mean cube (``extract.c3d_mean``): the BlobProto reader, the per-position subtraction in
``preprocess_clips``, the extractor's wiring, the offline fallback and the cache key.

Synthetic throughout: the cube files are written here by a tiny protobuf writer with the field numbers of
C3D-v1.0's ``src/caffe/proto/caffe.proto`` (BlobProto: num 1, channels 2, length 3, height 4, width 5,
data 6 packed); downloads are mocked; the C3D network is random-init and built once.
"""

from __future__ import annotations

import logging
import urllib.error
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import extractors.c3d as c3d_mod
from extractors import weights as weights_mod
from extractors.build import build_extractor
from extractors.c3d import (
    C3D,
    C3D_MEAN_BGR,
    C3D_MEAN_SHAPE,
    C3dFc6Extractor,
    git_blob_sha1,
    load_c3d_mean,
    read_blobproto,
)
from extractors.stream import network_input
from extractors.transforms import crop_boxes, preprocess_clips, resize_frames, spatial_crops
from extractors.weights import WeightsError
from pipeline.core.config import ExtractConfig, key_fields
from pipeline.core.errors import StageError
from pipeline.core.store import sha256_file


# -- a tiny protobuf writer (wire format: varint tags, length-delimited and 32-bit fields) -------------

def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field_varint(number: int, value: int) -> bytes:
    return varint(number << 3) + varint(value)


def field_bytes(number: int, payload: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def blobproto(array: np.ndarray, packed: bool = True, chunks: int = 1, extra: bytes = b"") -> bytes:
    """A C3D BlobProto of the 5-D ``array`` (num, channels, length, height, width); data (field 6) packed
    in ``chunks`` pieces, or unpacked (one 32-bit field per value); ``extra`` bytes after the dimensions."""
    out = b"".join(field_varint(n, d) for n, d in zip((1, 2, 3, 4, 5), array.shape)) + extra
    flat = np.ascontiguousarray(array, dtype="<f4").ravel()
    if packed:
        return out + b"".join(field_bytes(6, piece.tobytes()) for piece in np.array_split(flat, chunks))
    records = np.empty((flat.size, 5), np.uint8)
    records[:, 0] = 6 << 3 | 5
    records[:, 1:] = flat.view(np.uint8).reshape(-1, 4)
    return out + records.tobytes()


def random_cube(seed: int = 0) -> np.ndarray:
    """A plausible mean cube ``[3, 16, 128, 171]`` float32 in [60, 140], channels B, G, R."""
    return np.random.default_rng(seed).uniform(60, 140, C3D_MEAN_SHAPE).astype(np.float32)


def write_cube(path: Path, cube: np.ndarray, **kwargs) -> Path:
    path.write_bytes(blobproto(cube[None], **kwargs))
    return path


# -- the reader -------------------------------------------------------------------------------------

@pytest.mark.parametrize("packed, chunks", [(True, 1), (True, 3), (False, 1)])
def test_binaryproto_round_trips(tmp_path: Path, packed: bool, chunks: int) -> None:
    cube = random_cube()
    # an unknown varint field and a packed diff (field 7) are skipped
    extra = field_varint(99, 7) + field_bytes(7, np.ones(3, "<f4").tobytes())
    path = write_cube(tmp_path / "m.binaryproto", cube, packed=packed, chunks=chunks, extra=extra)
    raw = read_blobproto(path)
    assert raw.shape == (1, *C3D_MEAN_SHAPE) and raw.dtype == np.float32
    loaded = load_c3d_mean(path)
    assert loaded.dtype == torch.float32 and torch.equal(loaded, torch.from_numpy(cube))


def test_npy_is_read_in_the_same_layout(tmp_path: Path) -> None:
    cube = random_cube(1)
    np.save(tmp_path / "m.npy", cube.astype(np.float64))
    assert torch.equal(load_c3d_mean(tmp_path / "m.npy"), torch.from_numpy(cube))


def test_blobproto_without_length_is_one_frame(tmp_path: Path) -> None:
    path = tmp_path / "old.binaryproto"  # a 4-D Caffe blob: C3D's Blob::FromProto reads length 0 as 1
    data = np.arange(6, dtype="<f4")
    path.write_bytes(field_varint(1, 1) + field_varint(2, 3) + field_varint(4, 1) + field_varint(5, 2)
                     + field_bytes(6, data.tobytes()))
    assert read_blobproto(path).shape == (1, 3, 1, 1, 2)


def test_bad_mean_files_are_refused_naming_the_file(tmp_path: Path) -> None:
    cube = random_cube()
    good = blobproto(cube[None])
    cases = {
        "short.binaryproto": good[: len(good) - 1000],  # truncated inside the data
        "cut_varint.binaryproto": good[:8] + bytes([0x80]),  # a varint cut off at the end
        "unpacked_cut.binaryproto": blobproto(cube[None], packed=False)[:-2],
        "shape.binaryproto": blobproto(cube[:, :, :127][None]),  # 127 rows
        "count.binaryproto": field_varint(1, 1) + field_varint(2, 3) + field_bytes(6, b"\0" * 8),
        "bvlc.binaryproto": field_varint(1, 1) + field_varint(2, 3) + field_bytes(5, b"\0" * 12),
        "range.binaryproto": blobproto(cube[None] + 200),
        "wrong.txt": good,
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    np.save(tmp_path / "shape.npy", cube[:, :8])
    np.save(tmp_path / "ints.npy", cube.astype(np.int32))
    for name in [*cases, "shape.npy", "ints.npy", "missing.npy"]:
        with pytest.raises(WeightsError) as err:
            load_c3d_mean(tmp_path / name)
        message = str(err.value)
        assert str(tmp_path / name) in message and "\n" not in message, name
    with pytest.raises(WeightsError, match="3x16x127x171"):
        load_c3d_mean(tmp_path / "shape.binaryproto")
    with pytest.raises(WeightsError, match="truncated"):
        load_c3d_mean(tmp_path / "short.binaryproto")


# -- preprocess_clips with a frame mean ---------------------------------------------------------------

def by_hand(clips: torch.Tensor, resize: tuple, size: int, crops: str, order: str, mean: torch.Tensor,
            dtype: str, normalize=None) -> torch.Tensor:
    """Per clip: resize, subtract the mean at every position, cut the crops, normalise: ``[B*C, 3, T, s, s]``
    (``[B, 3, T, h, w]`` for ``"none"``)."""
    out = []
    for clip in clips:
        x = resize_frames(clip, resize, dtype) - mean.permute(1, 0, 2, 3)  # [T, 3, h, w]
        c = spatial_crops(x, size, crops, order).permute(0, 2, 1, 3, 4)  # [C, 3, T, s, s]
        out.append(normalize(c) if normalize is not None else c)
    return torch.cat(out)


def bgr_minus_one(x: torch.Tensor) -> torch.Tensor:
    return x.flip(1) - 1.0


@pytest.mark.parametrize("crops", ["center", "5", "10", "none"])
@pytest.mark.parametrize("order", ["torchvision", "roc-ng"])
def test_preprocess_clips_subtracts_the_mean_at_each_crops_position(crops: str, order: str) -> None:
    torch.manual_seed(0)
    clips = torch.randint(0, 256, (2, 4, 20, 26, 3), dtype=torch.uint8)
    resize, size = ("fixed", 14, 19), 9
    mean = torch.rand(3, 4, 14, 19) * 255  # every position different, so a misplaced crop shows
    for dtype in ("uint8", "float32"):
        for normalize, after, in_place in (
            (None, False, None),
            (bgr_minus_one, False, None),
            (bgr_minus_one, False, lambda x: x.copy_(bgr_minus_one(x))),
            (bgr_minus_one, True, None),
        ):
            want = by_hand(clips, resize, size, crops, order, mean, dtype, normalize)
            for max_elements, layout in ((1 << 22, torch.contiguous_format), (26 * 20 * 3 * 3, torch.channels_last_3d)):
                # 3 frames per piece: pieces of one clip's frames, the mean indexed by the piece's frames
                got = preprocess_clips(clips, resize, size, crops, order, normalize=normalize,
                                       normalize_after_crop=after, normalize_in_place=in_place,
                                       memory_format=layout, max_elements=max_elements, resize_dtype=dtype,
                                       frame_mean=mean)
                assert torch.equal(got, want), (dtype, after, in_place is not None, max_elements)
    plain = preprocess_clips(clips, resize, size, crops, order)
    assert not torch.equal(plain, preprocess_clips(clips, resize, size, crops, order, frame_mean=mean))


def test_preprocess_clips_refuses_a_mean_of_another_geometry() -> None:
    clips = torch.zeros(1, 4, 20, 26, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"\(3, 4, 14, 19\)"):
        preprocess_clips(clips, ("fixed", 14, 19), 9, "center", frame_mean=torch.zeros(3, 4, 9, 9))


# -- the extractor -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def network() -> C3D:
    torch.manual_seed(0)
    return C3D().eval()


@pytest.fixture
def make(network: C3D, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Builds a C3dFc6Extractor on the shared random network (no 300 MB weights file) with ``mean``."""
    monkeypatch.setattr(c3d_mod, "load_c3d", lambda path, pool5="caffe": network)
    weights = tmp_path / "c3d.pickle"
    weights.write_bytes(b"random network")  # unverified local file: only its sha256 is used

    def build(mean: str = "channel") -> C3dFc6Extractor:
        cfg = SimpleNamespace(backbone="c3d_fc6", weights=str(weights), c3d_mean=mean)
        return build_extractor(cfg, "cpu")

    return build


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty cache folder and a download that fails as without network."""
    monkeypatch.setenv("WSVAD_CACHE", str(tmp_path / "cache"))

    def refuse(url: str, dest: Path) -> None:
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(weights_mod, "_download", refuse)
    return tmp_path / "cache"


def video_clip(seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (1, 16, 96, 128, 3), dtype=np.uint8))


def test_the_cube_is_subtracted_in_bgr_at_the_crop_position(make, tmp_path: Path) -> None:
    cube = random_cube(2)
    extractor = make(str(write_cube(tmp_path / "m.binaryproto", cube)))
    assert extractor.frame_mean is not None and tuple(extractor.frame_mean.shape) == C3D_MEAN_SHAPE
    clips = video_clip()
    got = network_input(extractor, clips, "center", "torchvision", "uint8")  # [1, 3, 16, 112, 112]
    resized = resize_frames(clips[0], extractor.resize).permute(1, 0, 2, 3)  # [3, 16, 128, 171] RGB
    y0, x0 = crop_boxes(128, 171, 112)["c"]
    want = (resized.flip(0) - torch.from_numpy(cube))[:, :, y0:y0 + 112, x0:x0 + 112]  # BGR minus the cube
    torch.testing.assert_close(got[0], want, atol=1e-4, rtol=0)  # cube split as (cube - channel) + channel

    plain = make("channel")
    assert plain.frame_mean is None
    base = network_input(plain, clips, "center", "torchvision", "uint8")
    assert (got - base).abs().max() > 10  # the cube is far from the per-channel mean at some position
    assert not torch.allclose(extractor.features(got), plain.features(base), atol=1e-3)


def test_channel_mean_is_todays_input_bit_for_bit(make) -> None:
    clips = video_clip(3)
    got = network_input(make("channel"), clips, "10", "torchvision", "uint8")
    resized = resize_frames(clips[0], ("fixed", 128, 171))
    crops = spatial_crops(resized, 112, "10").permute(0, 2, 1, 3, 4)  # [10, 3, 16, 112, 112] RGB
    want = crops.flip(1) - torch.tensor(C3D_MEAN_BGR).view(1, 3, 1, 1, 1)
    assert torch.equal(got, want)


def test_sports1m_offline_warns_once_and_keys_as_channel(make, offline: Path, caplog) -> None:
    cfg = ExtractConfig(backbone="c3d_fc6", c3d_mean="sports1m")
    clips = video_clip(4)
    with caplog.at_level(logging.WARNING, logger="extractors.c3d"):
        assert C3dFc6Extractor.key_inputs(cfg) == C3dFc6Extractor.key_inputs(ExtractConfig()) == {}
        fallback = make("sports1m")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "extractors.c3d"]
    assert len(warnings) == 1 and "NOT Sultani" in warnings[0].getMessage()
    assert "\n" not in warnings[0].getMessage()
    assert fallback.frame_mean is None
    assert torch.equal(network_input(fallback, clips, "center", "torchvision", "uint8"),
                       network_input(make("channel"), clips, "center", "torchvision", "uint8"))


def test_sports1m_download_is_checked_against_the_release_git_blob(
    make, offline: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    served = write_cube(tmp_path / "served.binaryproto", random_cube(5))
    monkeypatch.setattr(weights_mod, "_download", lambda url, dest: dest.write_bytes(served.read_bytes()))
    cfg = ExtractConfig(backbone="c3d_fc6", c3d_mean="sports1m")
    with pytest.raises(StageError, match="git blob"):  # not C3D's file: refused, no silent fallback
        C3dFc6Extractor.key_inputs(cfg)
    monkeypatch.setattr(c3d_mod, "_SPORTS1M_RESOLVED", {})
    monkeypatch.setattr(c3d_mod, "C3D_MEAN_GIT_BLOB", git_blob_sha1(served))  # as if it were the release file
    assert C3dFc6Extractor.key_inputs(cfg) == {"c3d_mean_sha256": sha256_file(served)}
    extractor = make("sports1m")
    torch.testing.assert_close(extractor.frame_mean.flip(0) + torch.tensor(C3D_MEAN_BGR).view(3, 1, 1, 1),
                               load_c3d_mean(served), atol=1e-5, rtol=0)


def test_key_inputs_follow_the_cube_file(tmp_path: Path) -> None:
    a = write_cube(tmp_path / "a.binaryproto", random_cube(6))
    b = write_cube(tmp_path / "b.binaryproto", random_cube(7))
    np.save(tmp_path / "a.npy", random_cube(6))
    keys = [C3dFc6Extractor.key_inputs(ExtractConfig(c3d_mean=str(p))) for p in (a, b, tmp_path / "a.npy")]
    assert keys[0] == {"c3d_mean_sha256": sha256_file(a)}
    assert len({k["c3d_mean_sha256"] for k in keys}) == 3
    assert C3dFc6Extractor.key_inputs(ExtractConfig()) == {}
    with pytest.raises(StageError, match="no such file"):
        C3dFc6Extractor.key_inputs(ExtractConfig(c3d_mean=str(tmp_path / "nope.npy")))


def test_setting_defaults_to_channel_and_stays_out_of_the_config_key() -> None:
    cfg = ExtractConfig()
    assert cfg.c3d_mean == "channel" and "c3d_mean" not in key_fields(cfg)
    assert C3dFc6Extractor.config_options(cfg) == {"mean": "channel"}


def test_feature_metadata_names_the_cube(make, tmp_path: Path) -> None:
    from conftest import moving_square_video, write_video
    from extractors.stream import extract_video
    from pipeline.core.store import sha256_file
    from stages.config import build_config

    video = tmp_path / "v.mp4"
    write_video(video, moving_square_video(16, h=96, w=128))
    cfg = build_config(sets=["extract.crops=center", "extract.backbone=c3d_fc6"])
    cube = write_cube(tmp_path / "m.binaryproto", random_cube(4))
    _, meta = extract_video(cfg, make(str(cube)), video)
    assert meta["input_mean_sha256"] == sha256_file(cube)
    _, meta = extract_video(cfg, make("channel"), video)
    assert meta["input_mean_sha256"] is None
