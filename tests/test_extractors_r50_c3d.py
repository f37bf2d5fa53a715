"""ResNet-50 I3D (``resnet50_i3d``) and C3D fc6 (``c3d_fc6``) extractors, and pin-on-first-use weights.

The real weights cannot be fetched here, so every test uses randomly initialised networks saved in
``tmp_path`` and passed as the local override (``extract.weights``); downloads are mocked, the network is
never touched. CPU cost: a ResNet-50 I3D clip takes about 1 s (more on a loaded machine), a C3D clip 0.3 s.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import moving_square_video, write_video
from extractors import EXTRACTORS
from extractors import weights as weights_mod
from extractors.c3d import C3D, C3D_MEAN_BGR, C3dFc6Extractor, port_to_c3d_names
from extractors.i3d_inception import I3D_K400_RGB
from extractors.i3d_r50 import (
    I3D_R50_K400,
    I3D_R50_URL,
    ResNet50I3dExtractor,
    build_i3d_r50,
    i3d_r50_features,
    load_state_dict_checked,
    read_state_dict,
)
from extractors.weights import (
    WeightsError,
    WeightSpec,
    cached_weights_path,
    default_weights_sha256,
    fetch_weights,
    pin_path,
    pinned_sha256,
)
from pipeline.cli import main
from pipeline.core.errors import StageError


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha_file(path: Path) -> str:
    return _sha(path.read_bytes())


# --------------------------------------------------------------------------------------------------
# Fixtures: random-init weights saved locally, extractors built from them (once per module)


@pytest.fixture(scope="module")
def r50_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init ResNet-50 I3D in pytorchvideo's checkpoint layout ``{"model_state": ...}``."""
    torch.manual_seed(0)
    model = build_i3d_r50()
    path = tmp_path_factory.mktemp("r50") / "I3D_8x8_R50_random.pyth"
    torch.save({"model_state": model.state_dict(), "epoch": 1, "cfg": "TRAIN: {}"}, path)
    return path


@pytest.fixture(scope="module")
def c3d_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init C3D saved with the DavideA port's key names (``conv1``, ``conv2``, ``conv3a``, ...)."""
    torch.manual_seed(0)
    state = C3D().state_dict()
    port = {k.replace("conv1a.", "conv1.").replace("conv2a.", "conv2."): v for k, v in state.items()}
    assert "conv1.weight" in port and "conv1a.weight" not in port
    path = tmp_path_factory.mktemp("c3d") / "c3d_random.pickle"
    torch.save(port, path)
    return path


@pytest.fixture(scope="module")
def r50(r50_file: Path) -> ResNet50I3dExtractor:
    return EXTRACTORS.get("resnet50_i3d", weights=str(r50_file), device="cpu")


@pytest.fixture(scope="module")
def c3d(c3d_file: Path) -> C3dFc6Extractor:
    return EXTRACTORS.get("c3d_fc6", weights=str(c3d_file), device="cpu")


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty weights cache and no network: every download raises URLError. Returns the cache dir."""
    monkeypatch.setenv("WSVAD_CACHE", str(tmp_path / "cache"))

    def refuse(url: str, dest: Path) -> None:
        raise urllib.error.URLError("network is unreachable (test)")

    def no_urlopen(*args: object, **kwargs: object) -> None:
        raise AssertionError("a test tried to open a URL")

    monkeypatch.setattr(weights_mod, "_download", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", no_urlopen)
    return tmp_path / "cache"


# --------------------------------------------------------------------------------------------------
# Registry and preprocessing constants


def test_registered_with_their_input_geometry() -> None:
    assert {"resnet50_i3d", "c3d_fc6", "i3d_inception"} <= set(EXTRACTORS.list())
    r50_cls = EXTRACTORS.get_class("resnet50_i3d")
    c3d_cls = EXTRACTORS.get_class("c3d_fc6")
    geometry = {cls: (cls.feature_dim, cls.clip_len, cls.crop_size, cls.resize) for cls in (r50_cls, c3d_cls)}
    assert geometry[r50_cls] == (2048, 16, 224, ("short", 256))
    assert geometry[c3d_cls] == (4096, 16, 112, ("fixed", 128, 171))
    assert r50_cls.weights_spec.url == I3D_R50_URL
    assert r50_cls.weights_spec.sha256 is None and c3d_cls.weights_spec.sha256 is None  # nothing published


def test_r50_normalisation_is_rtfms(r50: ResNet50I3dExtractor) -> None:
    pixels = torch.tensor([0.0, 114.75, 255.0]).view(1, 3, 1, 1, 1)  # one value per channel
    out = r50.normalize(pixels)
    assert out.dtype == torch.float32 and out.shape == pixels.shape
    expected = [(0 - 114.75) / 57.375, 0.0, (255 - 114.75) / 57.375]  # -2.0, 0.0, 2.4444...
    assert out.flatten().tolist() == pytest.approx(expected, abs=1e-6)
    assert expected[2] == pytest.approx(2.444444, abs=1e-6)
    # same mean and std for every channel: channel order is left as is (RGB)
    same = r50.normalize(torch.full((1, 3, 1, 1, 1), 255.0)).flatten()
    assert torch.allclose(same, torch.full((3,), (255 - 114.75) / 57.375))


def test_c3d_normalisation_is_bgr_minus_caffe_mean(c3d: C3dFc6Extractor) -> None:
    rgb = torch.zeros(2, 3, 1, 1, 1)
    rgb[0, :, 0, 0, 0] = torch.tensor([10.0, 20.0, 30.0])  # R, G, B
    rgb[1, :, 0, 0, 0] = torch.tensor([255.0, 0.0, 0.0])  # pure red
    out = c3d.normalize(rgb)
    assert out.dtype == torch.float32 and out.shape == rgb.shape
    assert C3D_MEAN_BGR == (90.25, 97.66, 101.41)
    # channel 0 = blue - 90.25, 1 = green - 97.66, 2 = red - 101.41
    assert out[0].flatten().tolist() == pytest.approx([30 - 90.25, 20 - 97.66, 10 - 101.41], abs=1e-4)
    assert out[1].flatten().tolist() == pytest.approx([-90.25, -97.66, 255 - 101.41], abs=1e-4)


def test_in_place_normalisations_equal_normalize(r50: ResNet50I3dExtractor, c3d: C3dFc6Extractor) -> None:
    """``normalize_`` (what the extract stage runs) gives ``normalize``'s values bit for bit, also on
    a strided view such as a crop of the network-input buffer, and writes only into that view."""
    from extractors.i3d_inception import InceptionI3dExtractor

    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (2, 3, 4, 12, 14), generator=g).float().contiguous(memory_format=torch.channels_last_3d)
    for name, normalize, in_place in (
        ("r50", r50.normalize, r50.normalize_),
        ("c3d", c3d.normalize, c3d.normalize_),
        ("i3d", lambda x: InceptionI3dExtractor.normalize(None, x), lambda x: InceptionI3dExtractor.normalize_(None, x)),
    ):
        whole = pixels.clone()
        assert in_place(whole).data_ptr() == whole.data_ptr() and torch.equal(whole, normalize(pixels)), name
        frame = pixels.clone()
        view = frame[:, :, 1:3, 2:10, 3:11]  # strided, as a crop of the buffer
        in_place(view)
        assert torch.equal(view, normalize(pixels[:, :, 1:3, 2:10, 3:11])), name
        untouched = torch.ones_like(frame, dtype=torch.bool)
        untouched[:, :, 1:3, 2:10, 3:11] = False
        assert torch.equal(frame[untouched], pixels[untouched]), name


# --------------------------------------------------------------------------------------------------
# Features


def test_r50_features_shape_and_projection(r50: ResNet50I3dExtractor) -> None:
    """[N, 2048] float32; ``head.proj(feature)`` equals the model's own logits (the vector before projection)."""
    gen = torch.Generator().manual_seed(0)
    clips = torch.randint(0, 256, (2, 3, 16, 224, 224), generator=gen).float()
    *_, res5_stage, head = r50.model.blocks
    captured: list[torch.Tensor] = []
    hook = res5_stage.register_forward_hook(lambda module, args, out: captured.append(out))
    try:
        feats = r50.features(r50.normalize(clips))
    finally:
        hook.remove()
    assert feats.shape == (2, 2048) and feats.dtype == torch.float32
    assert torch.isfinite(feats).all() and (feats >= 0).all()
    assert not torch.equal(feats[0], feats[1])
    assert not r50.model.training
    (res5,) = captured
    assert res5.shape == (2, 2048, 8, 7, 7)
    with torch.inference_mode():
        logits = head(res5)  # pool -> dropout (identity in eval) -> proj -> global average
        torch.testing.assert_close(head.proj(feats), logits, rtol=1e-4, atol=1e-5)
        with pytest.raises(ValueError, match="too small"):
            i3d_r50_features(r50.model, torch.zeros(1, 3, 4, 32, 32))


def test_c3d_fc6_shape_and_relu(c3d: C3dFc6Extractor) -> None:
    gen = torch.Generator().manual_seed(0)
    clips = c3d.normalize(torch.randint(0, 256, (2, 3, 16, 112, 112), generator=gen).float())
    captured: list[torch.Tensor] = []
    hook = c3d.model.fc6.register_forward_hook(lambda module, args, out: captured.append(out))
    try:
        feats = c3d.features(clips)
    finally:
        hook.remove()
    assert feats.shape == (2, 4096) and feats.dtype == torch.float32
    assert torch.isfinite(feats).all() and (feats >= 0).all()  # after ReLU (C3D's in-place relu6 on fc6-1)
    (pre,) = captured  # the fc6 layer's own output, before the ReLU
    assert (pre < 0).any()
    torch.testing.assert_close(pre.clamp(min=0), feats)
    assert c3d.model.fc8.out_features == 487
    with pytest.raises(ValueError, match="16x112x112"):
        c3d.features(torch.zeros(1, 3, 16, 64, 64))  # wrong crop size: pool5 is not 1x4x4


def test_c3d_pool5_windows() -> None:
    """Caffe's ceil-mode pool5 windows start at 0, 2, 4, 6; the port's padded ones at -1, 1, 3, 5."""
    x = torch.arange(7.0).view(1, 1, 1, 1, 7).expand(1, 1, 2, 7, 7)  # value = column index
    caffe = C3D(pool5="caffe").pool5(x)
    port = C3D(pool5="port").pool5(x)
    assert caffe.shape == port.shape == (1, 1, 1, 4, 4)
    assert caffe[0, 0, 0, 0].tolist() == [1.0, 3.0, 5.0, 6.0]
    assert port[0, 0, 0, 0].tolist() == [0.0, 2.0, 4.0, 6.0]
    with pytest.raises(ValueError, match="pool5"):
        C3D(pool5="same")


# --------------------------------------------------------------------------------------------------
# Weights through the local override


def test_r50_local_weights_land(r50: ResNet50I3dExtractor, r50_file: Path) -> None:
    saved = torch.load(r50_file, weights_only=True)["model_state"]
    state = r50.model.state_dict()
    for key in ("blocks.0.conv.weight", "blocks.4.res_blocks.3.branch2.norm_b.running_var", "blocks.6.proj.weight"):
        assert torch.equal(state[key], saved[key]), key
    digest = _sha_file(r50_file)
    assert r50.weights_checksum == digest
    assert ResNet50I3dExtractor.expected_checksum(str(r50_file)) == digest


def test_c3d_port_weights_land(c3d: C3dFc6Extractor, c3d_file: Path) -> None:
    saved = torch.load(c3d_file, weights_only=True)
    state = c3d.model.state_dict()
    assert torch.equal(state["conv1a.weight"], saved["conv1.weight"])  # the port's name, renamed
    assert torch.equal(state["conv2a.bias"], saved["conv2.bias"])
    assert torch.equal(state["fc6.weight"], saved["fc6.weight"])
    digest = _sha_file(c3d_file)
    assert c3d.weights_checksum == digest == C3dFc6Extractor.expected_checksum(str(c3d_file))
    renamed = port_to_c3d_names({"conv1.weight": saved["conv1.weight"], "conv3a.bias": saved["conv3a.bias"]})
    assert list(renamed) == ["conv1a.weight", "conv3a.bias"]


def test_checkpoint_layouts_and_strict_loading(tmp_path: Path) -> None:
    """Bare state dict, ``{"model_state": ...}``, ``module.`` prefixes; every mismatch is listed."""
    net = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    state = {k: torch.randn_like(v.float()).to(v.dtype) for k, v in net.state_dict().items()}
    variants = {
        "bare.pt": state,
        "wrapped.pyth": {"model_state": state, "epoch": 7},
        "dataparallel.pt": {f"module.{k}": v for k, v in state.items()},
    }
    for name, obj in variants.items():
        torch.save(obj, tmp_path / name)
        read = read_state_dict(tmp_path / name, "toy")
        assert set(read) == set(state), name
        assert all(torch.equal(read[k], state[k]) for k in state), name

    without_counter = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    load_state_dict_checked(net, without_counter, tmp_path / "bare.pt", "toy")  # BN counters are optional
    assert torch.equal(net[0].weight, state["0.weight"])

    broken = dict(state)
    del broken["0.bias"]
    broken["2.weight"] = torch.zeros(1)
    broken["1.weight"] = torch.zeros(5)
    with pytest.raises(WeightsError) as info:
        load_state_dict_checked(net, broken, tmp_path / "broken.pt", "toy")
    message = str(info.value)
    assert str(tmp_path / "broken.pt") in message
    assert "missing from the file: 0.bias" in message
    assert "not in the model: 2.weight" in message
    assert "1.weight: file (5,), model (2,)" in message

    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(WeightsError, match=r"holds a list, not a toy state dict"):
        read_state_dict(tmp_path / "list.pt", "toy")


def test_corrupt_or_wrong_local_files_are_refused_naming_the_file(tmp_path: Path, c3d_file: Path) -> None:
    truncated = tmp_path / "c3d_truncated.pickle"
    with open(c3d_file, "rb") as src:
        truncated.write_bytes(src.read(1 << 20))
    with pytest.raises(WeightsError, match="not a readable C3D Sports-1M checkpoint") as info:
        C3dFc6Extractor(weights=str(truncated))
    assert str(truncated) in str(info.value)

    garbage = tmp_path / "garbage.pyth"
    garbage.write_bytes(b"<html>not a checkpoint</html>")
    with pytest.raises(WeightsError, match="not a readable") as info:
        ResNet50I3dExtractor(weights=str(garbage))
    assert str(garbage) in str(info.value)

    other = tmp_path / "not_r50.pyth"
    torch.save({"model_state": {"fc.weight": torch.zeros(2, 2)}}, other)
    with pytest.raises(WeightsError, match="does not hold ResNet-50 I3D") as info:
        ResNet50I3dExtractor(weights=str(other))
    assert str(other) in str(info.value) and "not in the model: fc.weight" in str(info.value)

    with pytest.raises(WeightsError, match="does not exist"):
        C3dFc6Extractor(weights=str(tmp_path / "missing.pickle"))


def test_checkpoints_cannot_run_code(tmp_path: Path) -> None:
    sentinel = tmp_path / "pwned"
    evil = tmp_path / "evil.pyth"
    evil.write_bytes(b"cos\nsystem\n(S'touch " + str(sentinel).encode() + b"'\ntR.")
    with pytest.raises(WeightsError, match="not a readable"):
        read_state_dict(evil, "ResNet-50 I3D")
    assert not sentinel.exists()


# --------------------------------------------------------------------------------------------------
# Default weights: offline errors and pinning on first use (downloads mocked)


@pytest.mark.parametrize("cls", [ResNet50I3dExtractor, C3dFc6Extractor])
def test_offline_default_download_says_how_to_fix(cls: type, offline: Path) -> None:
    spec = cls.weights_spec
    dest = cached_weights_path(spec)
    assert dest == offline / "weights" / spec.filename
    with pytest.raises(WeightsError) as info:
        cls()
    message = str(info.value)
    assert spec.url in message
    assert str(dest) in message
    assert "--set extract.weights=PATH" in message
    assert "no sha256 is published" in message
    assert "network is unreachable (test)" in message
    assert isinstance(info.value.__cause__, urllib.error.URLError)
    # the cache key needs the weights too: the same message, as a one-line stage error
    with pytest.raises(StageError) as key_info:
        cls.expected_checksum()
    assert spec.url in str(key_info.value) and str(dest) in str(key_info.value)
    assert not pin_path(spec).exists()
    assert [p.name for p in (offline / "weights").iterdir()] == []  # no partial downloads left


def test_default_download_is_pinned_on_first_use(
    offline: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    spec = WeightSpec(name="toy", url="https://example.invalid/toy.pth", sha256=None, filename="toy.pth")
    payload = b"first download"
    calls: list[str] = []

    def serve(url: str, dest: Path) -> None:
        calls.append(url)
        dest.write_bytes(payload)

    monkeypatch.setattr(weights_mod, "_download", serve)
    assert pinned_sha256(spec) is None
    path = fetch_weights(spec)
    assert path == cached_weights_path(spec) and path.read_bytes() == payload
    assert pin_path(spec).read_text().strip() == _sha(payload) == pinned_sha256(spec)
    assert default_weights_sha256(spec) == _sha(payload)
    assert fetch_weights(spec) == path and calls == [spec.url]  # verified cache hit, no second download

    # a corrupt cached copy is fetched again, and the new download must match the pin
    path.write_bytes(b"bit rot")
    payload = b"the server now serves something else"
    with pytest.raises(WeightsError) as info:
        fetch_weights(spec)
    assert "does not verify" in str(info.value) and str(pin_path(spec)) in str(info.value)
    assert not path.exists()

    # a local file for such a spec is used as is (nothing to verify against), the cache is untouched
    local = tmp_path / "mine.pth"
    local.write_bytes(b"my own fine-tuned weights")
    assert fetch_weights(spec, local_path=local) == local


def test_file_put_in_the_cache_by_hand_is_pinned(offline: Path) -> None:
    spec = WeightSpec(name="toy", url="https://example.invalid/toy.pth", sha256=None, filename="toy.pth")
    dest = cached_weights_path(spec)
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"copied by hand")
    assert default_weights_sha256(spec) == _sha(b"copied by hand") == pin_path(spec).read_text().strip()


def test_published_checksums_ignore_pins(offline: Path) -> None:
    """Specs with a sha256 (Inception-I3D) behave as before: no pin file is read or written."""
    pin = pin_path(I3D_K400_RGB)
    pin.parent.mkdir(parents=True)
    pin.write_text("0" * 64 + "\n")
    assert pinned_sha256(I3D_K400_RGB) == I3D_K400_RGB.sha256
    assert default_weights_sha256(I3D_K400_RGB) == I3D_K400_RGB.sha256
    with pytest.raises(ValueError, match="needs a known sha256"):
        WeightSpec(name="x", url="u", sha256=None, filename="x", archive_member="a", archive_sha256="b")


def test_r50_default_weights_through_a_mocked_download(
    offline: Path, monkeypatch: pytest.MonkeyPatch, r50_file: Path
) -> None:
    monkeypatch.setattr(weights_mod, "_download", lambda url, dest: shutil.copyfile(r50_file, dest))
    digest = _sha_file(r50_file)
    assert ResNet50I3dExtractor.expected_checksum() == digest  # downloads and pins
    assert pin_path(I3D_R50_K400).read_text().strip() == digest
    extractor = ResNet50I3dExtractor()
    assert extractor.weights_checksum == digest
    saved = torch.load(r50_file, weights_only=True)["model_state"]
    assert torch.equal(extractor.model.state_dict()["blocks.1.res_blocks.0.branch1_conv.weight"],
                       saved["blocks.1.res_blocks.0.branch1_conv.weight"])


# --------------------------------------------------------------------------------------------------
# Through the runner


@pytest.mark.parametrize(
    ("backbone", "fixture", "dim", "n_frames", "ranges"),
    [
        ("resnet50_i3d", "r50_file", 2048, 16, [[0, 16]]),
        ("c3d_fc6", "c3d_file", 4096, 20, [[0, 16], [16, 20]]),  # a padded trailing clip
    ],
)
def test_extract_stage_runs(
    backbone: str, fixture: str, dim: int, n_frames: int, ranges: list[list[int]],
    request: pytest.FixtureRequest, tmp_path: Path,
) -> None:
    """``pipeline run --stage extract`` with a local weights file and one centre crop on a tiny video."""
    weights = request.getfixturevalue(fixture)
    data = tmp_path / "data"
    write_video(data / "v0.mp4", moving_square_video(n_frames, anomalous_from=8))
    (data / "manifest.csv").write_text(f"id,path,split,label,class,intervals\nv0,v0.mp4,test,1,Square,8-{n_frames}\n")
    run = tmp_path / "run"
    sets = [
        f"data.manifest={data / 'manifest.csv'}",
        f"extract.backbone={backbone}",
        f"extract.weights={weights}",
        "extract.crops=center",
    ]
    args = ["-q", "run", "--stage", "extract", "--run-dir", str(run)]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 0

    latest = json.loads((run / "latest.json").read_text())
    from pipeline.core.store import StageDir

    meta, arrays = StageDir(run / latest["extract"]).load_item("v0")
    feats = arrays["features"]
    assert feats.shape == (len(ranges), 1, dim) and feats.dtype == np.float32 and np.isfinite(feats).all()
    assert meta["extractor"] == backbone and meta["feature_dim"] == dim
    assert meta["weights_sha256"] == _sha_file(weights)
    assert meta["clip_ranges"] == ranges and meta["crops"] == ["c"]
    stage = json.loads((run / latest["extract"] / "stage.json").read_text())
    assert stage["inputs"]["weights_sha256"] == _sha_file(weights)
