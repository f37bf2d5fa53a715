"""`pipeline score` through feature presets: a run trained on imported public features scores a new
video with the preset that reproduces them, and a preset or weights file that would give other
features is refused (issue 17)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import moving_square_video, write_video
from extractors.base import ClipExtractor
from pipeline.cli import FEATURE_PRESETS, main
from test_feature_import import ROWS, manifest, planted
from test_score import _score, data, run  # noqa: F401  (module fixtures: a trained run of its own features)


class StandIn(ClipExtractor):
    """Stands in for the preset's network (whose weights cannot be had here): 2048-D features of the
    clip's mean colour, the geometry small so that a test decodes in milliseconds."""

    feature_dim = 2048
    crop_size = 32
    resize = ("short", 32)
    registry_name = "resnet50_i3d_rtfm"

    def __init__(self, weights=None, device="cpu"):
        super().__init__(weights=weights, device=device)

    @property
    def weights_checksum(self) -> str:
        return "stand-in"

    def normalize(self, clips):
        return clips / 255.0

    def features(self, clips):
        return clips.mean(dim=(2, 3, 4)).repeat(1, 683)[:, :2048]


@pytest.fixture(scope="module")
def imported_run(tmp_path_factory) -> Path:
    """A Sultani MIL detector trained on RTFM-format [T, 10, 2048] files."""
    tmp = tmp_path_factory.mktemp("imported")
    rng = np.random.default_rng(0)
    feats = tmp / "feats"
    feats.mkdir()
    for vid, _, label, _ in ROWS:
        np.save(feats / f"{vid}_i3d.npy", np.repeat(planted(6, 2048, bool(label), rng)[:, None], 10, axis=1))
    m = manifest(tmp / "m.csv", ROWS)
    run_dir = tmp / "run"
    assert main(["-q", "import-features", "--format", "rtfm", "--root", str(feats), "--manifest", str(m),
                 "--run-dir", str(run_dir)]) == 0
    assert main(["-q", "run", "--stage", "train", "--run-dir", str(run_dir), "--config", str(run_dir / "config.yaml"),
                 "--set", "train.iterations=20", "--set", "train.batch_abnormal=2", "--set", "train.batch_normal=2"]) == 0
    return run_dir


def test_cli_presets_are_the_presets() -> None:
    from extractors.presets import PRESETS
    from pipeline.core.config import ExtractConfig
    import dataclasses

    field = {f.name: f for f in dataclasses.fields(ExtractConfig)}["preset"]
    assert FEATURE_PRESETS == tuple(PRESETS) == field.metadata["choices"]


def test_imported_rtfm_run_scores_through_the_rtfm_preset(imported_run, tmp_path, capsys, monkeypatch):
    built = []

    def build(extract_cfg, device):
        built.append(dataclass_values(extract_cfg))
        return StandIn(weights=extract_cfg.weights or None)

    import extractors.build

    monkeypatch.setattr(extractors.build, "build_extractor", build)
    video = tmp_path / "new.mp4"
    write_video(video, moving_square_video(40), fps=25)
    weights = tmp_path / "i3d_r50_kinetics.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, weights)
    code, out, err = _score(capsys, video, "--run-dir", imported_run, "--out", tmp_path / "o", "--weights", weights)
    assert code == 0, err
    cfg = built[0]
    assert cfg["backbone"] == "resnet50_i3d_rtfm" and cfg["partial_clip"] == "cycle" and cfg["crops"] == "10"
    assert cfg["resize_round"] == "floor" and cfg["weights"] == str(weights) and not cfg["import_format"]
    doc = json.loads((tmp_path / "o" / "new.json").read_text())
    assert doc["extractor"]["preset"] == "rtfm" and doc["extractor"]["partial_clip"] == "cycle"
    assert doc["clip_ranges"] == [[0, 16], [16, 32], [32, 40]]  # the partial clip kept, as RTFM's loader did
    # the preset of another public set is refused before any video is read, in one line
    code, out, err = _score(capsys, video, "--run-dir", imported_run, "--out", tmp_path / "o2", "--preset", "xd_violence")
    assert code == 2 and "imported rtfm features, which preset rtfm reproduces" in err and "Traceback" not in err
    assert not (tmp_path / "o2" / "new.json").exists()


def test_preset_or_weights_other_than_the_runs_features_are_refused(run, data, tmp_path, capsys):  # noqa: F811
    code, _, err = _score(capsys, data.parent / "test1.mp4", "--run-dir", run, "--out", tmp_path / "o", "--preset", "rtfm")
    assert code == 2 and "not made with preset rtfm" in err and "extract.backbone" in err
    other = tmp_path / "other.pt"
    torch.save({"w": torch.ones(3)}, other)
    code, _, err = _score(capsys, data.parent / "test1.mp4", "--run-dir", run, "--out", tmp_path / "o", "--weights", other)
    assert code == 2 and "differs from the weights the run's features were extracted with" in err
    # its settings (test_motion, centre crop) are no preset's, not even the defaults
    code, _, err = _score(capsys, data.parent / "test1.mp4", "--run-dir", run, "--out", tmp_path / "o", "--preset", "default")
    assert code == 2 and "extract.crops: preset default has '10', the run has 'center'" in err
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").glob("*.json"))


def dataclass_values(obj) -> dict:
    import dataclasses

    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
