"""RTFM's ResNet-50 I3D (``resnet50_i3d_rtfm``): geometry, weight layouts, and an independent reference.

The real weights cannot be fetched here. The reference below is a small re-implementation of Tushar-N's
``I3Res50`` forward (pytorch-resnet3d ``models/resnet.py``, as described there: plain ``Conv3d`` /
``BatchNorm3d`` / pools, no pytorchvideo), under its module names, with random weights and random BN
statistics. Its state dict is saved as Tushar-N's ``.pth`` and, renamed by the rules of Tushar-N's
``utils/convert_weights.py`` (written out again here, not taken from the module under test), as a
Caffe2 pickle in Python 2's format; both must load into the pytorchvideo-block network and give the
reference's features. CPU cost: about 0.3 s per 16x224x224 clip and forward.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import struct
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import moving_square_video, write_video
from extractors import weights as weights_mod
from extractors.i3d_r50 import RTFM_MEAN, RTFM_STD
from extractors.i3d_r50_rtfm import (
    RTFM_I3D_K400,
    RTFM_I3D_URL,
    ResNet50I3dRtfmExtractor,
    build_rtfm_i3d_r50,
    load_rtfm_i3d_r50,
    rtfm_i3d_features,
    rtfm_weight_names,
)
from extractors.registry import EXTRACTORS
from extractors.weights import WeightsError, pin_path
from pipeline.cli import main

# --------------------------------------------------------------------------------------------------
# The independent reference: Tushar-N's I3Res50 forward, from its description

#: Tushar-N ``I3Res50``: ``temp_conv`` per block of layer1..layer4 (1: 3x1x1 first conv, 0: 1x1x1).
TEMP_CONV = ([1, 1, 1], [1, 0, 1, 0], [1, 0, 1, 0, 1, 0], [0, 1, 0])


class RefBottleneck(nn.Module):
    """conv1 (t x 1 x 1) -> conv2 (1 x 3 x 3, spatial stride) -> conv3 (1 x 1 x 1), BN after each, ReLU
    after the first two and after the sum with the (projected) input."""

    def __init__(self, c_in: int, width: int, temp_conv: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(c_in, width, (1 + 2 * temp_conv, 1, 1), padding=(temp_conv, 0, 0), bias=False)
        self.bn1 = nn.BatchNorm3d(width)
        self.conv2 = nn.Conv3d(width, width, (1, 3, 3), stride=(1, stride, stride), padding=(0, 1, 1), bias=False)
        self.bn2 = nn.BatchNorm3d(width)
        self.conv3 = nn.Conv3d(width, 4 * width, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(4 * width)
        self.downsample = None
        if stride != 1 or c_in != 4 * width:
            self.downsample = nn.Sequential(
                nn.Conv3d(c_in, 4 * width, 1, stride=(1, stride, stride), bias=False), nn.BatchNorm3d(4 * width)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class RefI3Res50(nn.Module):
    """Stem 5x7x7 stride 2 (pad 2, 3, 3) -> max-pool 2x3x3 stride 2 (no pad) -> layer1 -> max-pool 2x1x1
    -> layer2..4 -> mean over T, H, W (-> fc)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(3, 64, (5, 7, 7), stride=2, padding=(2, 3, 3), bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        c_in = 64
        for i, flags in enumerate(TEMP_CONV):
            width = 64 * 2**i
            blocks = [RefBottleneck(c_in if j == 0 else 4 * width, width, t, 2 if (i > 0 and j == 0) else 1)
                      for j, t in enumerate(flags)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            c_in = 4 * width
        self.fc = nn.Linear(2048, 400)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool3d(F.relu(self.bn1(self.conv1(x))), (2, 3, 3), (2, 2, 2))
        x = F.max_pool3d(self.layer1(x), (2, 1, 1), (2, 1, 1))
        x = self.layer4(self.layer3(self.layer2(x)))
        return x.mean(dim=(2, 3, 4))


def caffe2_name(tushar: str) -> str:
    """Tushar-N key -> Caffe2 blob, the inverse of the renaming in Tushar-N's ``utils/convert_weights.py``."""
    bn = {"weight": "s", "bias": "b", "running_mean": "rm", "running_var": "riv"}
    fixed = {"conv1.weight": "conv1_w", "fc.weight": "pred_w", "fc.bias": "pred_b"}
    if tushar in fixed:
        return fixed[tushar]
    if m := re.fullmatch(r"bn1\.(\w+)", tushar):
        return f"res_conv1_bn_{bn[m[1]]}"
    if m := re.fullmatch(r"layer(\d)\.(\d)\.conv(\d)\.weight", tushar):
        return f"res{int(m[1]) + 1}_{m[2]}_branch2{'abc'[int(m[3]) - 1]}_w"
    if m := re.fullmatch(r"layer(\d)\.(\d)\.bn(\d)\.(\w+)", tushar):
        return f"res{int(m[1]) + 1}_{m[2]}_branch2{'abc'[int(m[3]) - 1]}_bn_{bn[m[4]]}"
    if m := re.fullmatch(r"layer(\d)\.(\d)\.downsample\.0\.weight", tushar):
        return f"res{int(m[1]) + 1}_{m[2]}_branch1_w"
    if m := re.fullmatch(r"layer(\d)\.(\d)\.downsample\.1\.(\w+)", tushar):
        return f"res{int(m[1]) + 1}_{m[2]}_branch1_bn_{bn[m[3]]}"
    raise AssertionError(f"no Caffe2 name for {tushar}")


class Py2Pickler(pickle._Pickler):  # the pure-Python pickler: its dispatch table can be extended
    """Protocol 2 with ``bytes`` written as Python 2 ``str`` (BINSTRING), as Caffe2's cPickle wrote them."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def write_caffe2_pickle(path: Path, blobs: dict, py2: bool = False) -> Path:
    """``{"blobs": blobs}`` as Caffe2's ``save_model_params`` writes it (``py2``: names and array data as
    Python 2 byte strings, readable only with ``encoding="latin1"``)."""
    with open(path, "wb") as fh:
        if py2:
            Py2Pickler(fh, protocol=2).dump({b"blobs": {k.encode(): v for k, v in blobs.items()}})
        else:
            pickle.dump({"blobs": blobs}, fh, protocol=4)
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------------
# Fixtures (module scope: each file is written once)


@pytest.fixture(scope="module")
def reference() -> RefI3Res50:
    """The reference network with random weights and BN statistics (activations stay O(1))."""
    torch.manual_seed(0)
    ref = RefI3Res50()
    with torch.no_grad():
        for module in ref.modules():
            if isinstance(module, nn.BatchNorm3d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
    return ref.eval()


@pytest.fixture(scope="module")
def tushar_state(reference: RefI3Res50) -> dict[str, torch.Tensor]:
    """The reference's tensors as Tushar-N's converter saved them (no BN step counters)."""
    return {k: v.clone() for k, v in reference.state_dict().items() if not k.endswith("num_batches_tracked")}


@pytest.fixture(scope="module")
def blobs(tushar_state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The same tensors under their Caffe2 blob names."""
    return {caffe2_name(k): v.numpy().copy() for k, v in tushar_state.items()}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, reference: RefI3Res50, tushar_state: dict,
          blobs: dict) -> dict[str, Path]:
    """The weights in each layout, every file under the other layout's extension (formats go by content)."""
    folder = tmp_path_factory.mktemp("rtfm_weights")
    training = {f"{k}_momentum": np.full(v.shape, 0.01, np.float32)  # SGD state of the trainable blobs
                for k, v in blobs.items() if not k.endswith(("_rm", "_riv"))}
    # the iteration counter as a numpy scalar, as Caffe2's FetchBlob may hand it over
    caffe2 = {**blobs, **training, "lr": np.array([1e-4], np.float32), "model_iter": np.int64(400000)}
    out = {"caffe2_py2": write_caffe2_pickle(folder / "i3d_r50_kinetics.pth", caffe2, py2=True)}
    out["tushar_legacy"] = folder / "tushar_legacy.pkl"  # torch < 1.6 format, as the converter wrote it
    torch.save(tushar_state, out["tushar_legacy"], _use_new_zipfile_serialization=False)
    out["tushar_zip"] = folder / "tushar_zip.pkl"  # saved by a recent torch from I3Res50: with BN counters
    torch.save(reference.state_dict(), out["tushar_zip"])
    return out


@pytest.fixture(scope="module")
def clip() -> torch.Tensor:
    """One normalised 16x224x224 clip."""
    g = torch.Generator().manual_seed(1)
    return (torch.rand(1, 3, 16, 224, 224, generator=g) * 255 - RTFM_MEAN) / RTFM_STD


@pytest.fixture(scope="module")
def ref_features(reference: RefI3Res50, clip: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return reference.features(clip)


# --------------------------------------------------------------------------------------------------
# Network geometry


def test_stem_pools_kernels_and_head_are_tushar_ns() -> None:
    model = build_rtfm_i3d_r50()
    stem, res2, pool2, *stages, head = model.blocks
    assert (stem.conv.kernel_size, stem.conv.stride, stem.conv.padding) == ((5, 7, 7), (2, 2, 2), (2, 3, 3))
    assert isinstance(stem.pool, nn.MaxPool3d)
    assert (stem.pool.kernel_size, stem.pool.stride, stem.pool.padding) == ((2, 3, 3), (2, 2, 2), (0, 0, 0))
    assert isinstance(pool2, nn.MaxPool3d)
    assert (pool2.kernel_size, pool2.stride, pool2.padding) == ((2, 1, 1), (2, 1, 1), 0)
    assert isinstance(head.pool, nn.AdaptiveAvgPool3d) and head.proj.weight.shape == (400, 2048)
    for stage, flags, spatial in zip([res2, *stages], TEMP_CONV, (1, 2, 2, 2), strict=True):
        assert len(stage.res_blocks) == len(flags)
        for j, (block, t) in enumerate(zip(stage.res_blocks, flags)):
            b = block.branch2
            assert b.conv_a.kernel_size == (1 + 2 * t, 1, 1) and b.conv_a.stride == (1, 1, 1)
            assert b.conv_a.padding == (t, 0, 0)
            assert b.conv_b.kernel_size == (1, 3, 3) and b.conv_b.padding == (0, 1, 1)
            assert b.conv_b.stride == ((1, spatial, spatial) if j == 0 else (1, 1, 1))
            assert b.conv_c.kernel_size == (1, 1, 1)
            assert (block.branch1_conv is not None) == (j == 0)
        assert stage.res_blocks[0].branch1_conv.stride == (1, spatial, spatial)
    assert all(m.eps == 1e-5 for m in model.modules() if isinstance(m, nn.BatchNorm3d))
    assert not any(m.bias is not None for m in model.modules() if isinstance(m, nn.Conv3d))


def test_map_shapes_and_feature_is_the_mean_of_res5(clip: torch.Tensor) -> None:
    model = build_rtfm_i3d_r50()
    shapes: list[tuple[int, ...]] = []
    res5: list[torch.Tensor] = []
    for block in model.blocks[:-1]:
        block.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    model.blocks[5].register_forward_hook(lambda m, i, o: res5.append(o))
    with torch.inference_mode():
        feats = rtfm_i3d_features(model, clip)
        logits = model(clip)
        projected = model.blocks[-1].proj(feats)
    expected_shapes = [(1, 64, 4, 55, 55), (1, 256, 4, 55, 55), (1, 256, 2, 55, 55), (1, 512, 2, 28, 28),
                       (1, 1024, 2, 14, 14), (1, 2048, 2, 7, 7)]
    assert shapes == expected_shapes * 2  # stem (after its pool), res2, pool, res3, res4, res5; two forwards
    assert feats.shape == (1, 2048) and feats.dtype == torch.float32
    expected = res5[0].double().sum(dim=(2, 3, 4)) / (2 * 7 * 7)
    assert torch.allclose(feats.double(), expected, atol=1e-6)
    assert (feats >= 0).all() and feats.abs().sum() > 0
    assert torch.allclose(logits, projected, atol=1e-5)  # the classifier reads the feature


def test_too_small_clips_are_refused() -> None:
    model = build_rtfm_i3d_r50()
    with pytest.raises(ValueError, match="too small"):
        rtfm_i3d_features(model, torch.zeros(1, 3, 6, 32, 32))
    with pytest.raises(ValueError, match=r"\[N, 3, T, H, W\]"):
        rtfm_i3d_features(model, torch.zeros(1, 2, 16, 32, 32))
    with torch.inference_mode():
        assert rtfm_i3d_features(model, torch.zeros(2, 3, 7, 5, 5)).shape == (2, 2048)


# --------------------------------------------------------------------------------------------------
# Weight names and layouts


def test_the_267_caffe2_blobs_of_the_converter() -> None:
    names = rtfm_weight_names()
    reference_keys = [k for k in RefI3Res50().state_dict() if not k.endswith("num_batches_tracked")]
    assert len(names) == len(reference_keys) == 267
    assert {n.tushar for n in names} == set(reference_keys)
    assert {n.tushar: n.caffe2 for n in names} == {k: caffe2_name(k) for k in reference_keys}
    assert {"res_conv1_bn_riv", "res2_0_branch1_w", "res4_5_branch2c_bn_riv", "res5_0_branch1_bn_s"} <= {
        n.caffe2 for n in names}
    model_keys = {k for k in build_rtfm_i3d_r50().state_dict() if not k.endswith("num_batches_tracked")}
    assert {n.model for n in names} == model_keys


@pytest.mark.parametrize("layout", ["caffe2_py2", "tushar_legacy", "tushar_zip"])
def test_each_layout_gives_the_reference_features(
    layout: str, files: dict[str, Path], blobs: dict[str, np.ndarray], clip: torch.Tensor,
    ref_features: torch.Tensor,
) -> None:
    """The pytorchvideo-block network with the reference's weights equals the reference forward."""
    model = load_rtfm_i3d_r50(files[layout])
    state = model.state_dict()
    for n in rtfm_weight_names():  # every tensor landed where the converter's names say
        assert np.array_equal(state[n.model].numpy(), blobs[n.caffe2]), n
    with torch.inference_mode():
        feats = rtfm_i3d_features(model, clip)
    diff = (feats - ref_features).abs().max().item()
    assert ref_features.abs().max() > 0.1 and (ref_features > 0).float().mean() > 0.5  # not a degenerate case
    assert diff < 1e-5, f"max abs difference {diff:.3g} from the reference"


def test_the_python2_pickle_needs_latin1(files: dict[str, Path]) -> None:
    """The Caffe2 file above really holds Python 2 byte strings (what ``encoding="latin1"`` is for)."""
    with open(files["caffe2_py2"], "rb") as fh, pytest.raises(UnicodeDecodeError):
        pickle.load(fh)  # default encoding ASCII: the arrays' raw bytes do not decode


def _blob_problems(blobs: dict[str, np.ndarray], problem: str) -> tuple[dict[str, np.ndarray], list[str]]:
    """A copy of ``blobs`` with ``problem`` ('missing', 'extra', 'shape'), and the names the error must give."""
    bad = dict(blobs)
    if problem == "missing":
        del bad["res4_5_branch2c_bn_riv"]
        return bad, ["1 tensors missing from the file: res4_5_branch2c_bn_riv"]
    if problem == "extra":
        bad["res6_0_branch2a_w"] = np.zeros((2, 2), np.float32)
        return bad, ["1 tensors not in the model: res6_0_branch2a_w"]
    bad["pred_w"] = np.zeros((10, 2048), np.float32)
    return bad, ["1 tensors wrong shape: pred_w: file (10, 2048), model (400, 2048)"]


@pytest.mark.parametrize("problems", [["missing"], ["extra"], ["shape"], ["missing", "extra", "shape"]])
def test_caffe2_mismatches_are_listed_by_blob_name(
    problems: list[str], blobs: dict[str, np.ndarray], tmp_path: Path
) -> None:
    bad, lines = dict(blobs), []
    for problem in problems:
        bad, expected = _blob_problems(bad, problem)
        lines += expected
    path = write_caffe2_pickle(tmp_path / "bad.pkl", bad)
    with pytest.raises(WeightsError) as info:
        load_rtfm_i3d_r50(path)
    message = str(info.value).splitlines()
    assert message[0].startswith(str(path)) and len(message) == 1 + len(problems)
    assert sorted(line.strip() for line in message[1:]) == sorted(lines)


def test_tushar_mismatches_are_listed_by_key(tushar_state: dict[str, torch.Tensor], tmp_path: Path) -> None:
    bad = dict(tushar_state)
    del bad["layer3.5.bn3.running_var"]
    bad["layer2.0.conv2.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save(bad, path)
    with pytest.raises(WeightsError) as info:
        load_rtfm_i3d_r50(path)
    text = str(info.value)
    assert text.startswith(str(path)) and "missing from the file: layer3.5.bn3.running_var" in text
    assert "wrong shape: layer2.0.conv2.weight: file (1,), model (128, 128, 1, 3, 3)" in text


def test_pickles_that_would_run_code_or_hold_other_things_are_refused(tmp_path: Path) -> None:
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"blobs": {"conv1_w": Evil()}}, protocol=2))
    with pytest.raises(WeightsError, match=r"refusing to load the global (posix|os|nt)\.system") as info:
        load_rtfm_i3d_r50(path)
    assert str(info.value).startswith(str(path)) and not marker.exists()

    not_arrays = write_caffe2_pickle(tmp_path / "ints.pkl", {"conv1_w": 3, "pred_b": [1.0]})
    with pytest.raises(WeightsError, match="2 blobs are not float arrays: 'conv1_w' \\(int\\), 'pred_b' \\(list\\)"):
        load_rtfm_i3d_r50(not_arrays)
    listing = tmp_path / "list.pkl"
    listing.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(WeightsError, match="pickled list: neither"):
        load_rtfm_i3d_r50(listing)
    garbage = tmp_path / "garbage.pkl"
    garbage.write_bytes(b"\x00not a pickle")
    with pytest.raises(WeightsError, match="not a readable"):
        load_rtfm_i3d_r50(garbage)


# --------------------------------------------------------------------------------------------------
# The registered extractor


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty weights cache and no network. Returns the cache dir."""
    monkeypatch.setenv("WSVAD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(weights_mod, "_download", lambda url, dest: (_ for _ in ()).throw(
        urllib.error.URLError("network is unreachable (test)")))
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("a test tried to open a URL"))
    return tmp_path / "cache"


def test_registered_extractor_with_a_local_file(
    files: dict[str, Path], clip: torch.Tensor, ref_features: torch.Tensor
) -> None:
    cls = EXTRACTORS.get_class("resnet50_i3d_rtfm")
    assert cls is ResNet50I3dRtfmExtractor
    assert (cls.feature_dim, cls.clip_len, cls.crop_size, cls.resize) == (2048, 16, 224, ("short", 256))
    assert cls.weights_spec.url == RTFM_I3D_URL and cls.weights_spec.sha256 is None
    path = files["tushar_legacy"]
    assert cls.expected_checksum(str(path)) == _sha(path)
    extractor = EXTRACTORS.get("resnet50_i3d_rtfm", weights=str(path), device="cpu")
    assert extractor.weights_checksum == _sha(path)
    pixels = torch.tensor([0.0, 114.75, 255.0]).view(1, 3, 1, 1, 1)
    assert torch.allclose(extractor.normalize(pixels).flatten(), torch.tensor([-2.0, 0.0, 140.25 / 57.375]))
    in_place = pixels.clone()
    assert torch.equal(extractor.normalize_(in_place), extractor.normalize(pixels))
    raw = clip * RTFM_STD + RTFM_MEAN
    feats = extractor.features(extractor.normalize(raw))
    assert feats.shape == (1, 2048) and feats.dtype == torch.float32
    assert (feats - ref_features).abs().max() < 1e-4


def test_default_weights_are_the_caffe2_file_pinned_on_first_download(
    offline: Path, monkeypatch: pytest.MonkeyPatch, files: dict[str, Path], blobs: dict[str, np.ndarray]
) -> None:
    caffe2 = files["caffe2_py2"]
    monkeypatch.setattr(weights_mod, "_download", lambda url, dest: shutil.copyfile(caffe2, dest))
    assert ResNet50I3dRtfmExtractor.expected_checksum() == _sha(caffe2)  # downloads and pins
    assert pin_path(RTFM_I3D_K400).read_text().strip() == _sha(caffe2)
    extractor = ResNet50I3dRtfmExtractor()
    assert extractor.weights_checksum == _sha(caffe2)
    assert np.array_equal(extractor.model.blocks[0].conv.weight.detach().numpy(), blobs["conv1_w"])


def test_extract_stage_runs(files: dict[str, Path], tmp_path: Path) -> None:
    """``pipeline run --stage extract`` with a local weights file and one centre crop on a tiny video."""
    weights = files["tushar_zip"]
    data = tmp_path / "data"
    write_video(data / "v0.mp4", moving_square_video(16, anomalous_from=8))
    (data / "manifest.csv").write_text("id,path,split,label,class,intervals\nv0,v0.mp4,test,1,Square,8-16\n")
    run = tmp_path / "run"
    args = ["-q", "run", "--stage", "extract", "--run-dir", str(run)]
    for s in (f"data.manifest={data / 'manifest.csv'}", "extract.backbone=resnet50_i3d_rtfm",
              f"extract.weights={weights}", "extract.crops=center"):
        args += ["--set", s]
    assert main(args) == 0
    latest = json.loads((run / "latest.json").read_text())
    from pipeline.core.store import StageDir

    meta, arrays = StageDir(run / latest["extract"]).load_item("v0")
    feats = arrays["features"]
    assert feats.shape == (1, 1, 2048) and feats.dtype == np.float32 and np.isfinite(feats).all()
    assert meta["extractor"] == "resnet50_i3d_rtfm" and meta["weights_sha256"] == _sha(weights)
