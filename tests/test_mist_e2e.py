"""``pipeline run --method mist`` end to end on a subset of the demo, interrupted and resumed.

The backbone is the real Inception-I3D (Kinetics weights) fed 64x64 crops (``tiny_i3d``, registered
here) so the whole chain takes seconds on a CPU: extract -> mist_generator -> mist_pseudo -> train
(stage II) -> mist_extract -> mist_explain -> evaluate, then AR-Net on the fine-tuned features
(``extract.encoder``). Skipped when the I3D weights cannot be obtained (no network).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.store import StageDir
from pipeline.cli import main

_tiny = False


def register_tiny_i3d() -> str:
    """``tiny_i3d``: Inception-I3D with its real weights on 64-pixel frames and crops."""
    global _tiny
    from extractors import EXTRACTORS
    from extractors.i3d_inception import InceptionI3dExtractor

    if not _tiny:

        @EXTRACTORS.register("tiny_i3d")
        class TinyI3d(InceptionI3dExtractor):
            resize = ("short", 64)
            crop_size = 64

        _tiny = True
    return "tiny_i3d"


@pytest.fixture(scope="module")
def demo_subset(tmp_path_factory) -> Path:
    from extractors.i3d_inception import I3D_K400_RGB
    from extractors.weights import WeightsError, fetch_weights
    from pipeline.demo import DEMO_MANIFEST, generate_demo_dataset

    try:
        fetch_weights(I3D_K400_RGB)
    except WeightsError as e:
        pytest.skip(f"Inception-I3D weights unavailable: {e}")
    root = tmp_path_factory.mktemp("mist")
    keep = ("id,", "train_000,", "train_001,", "train_010,", "train_011,", "test_000,", "test_001,")
    lines = [ln for ln in DEMO_MANIFEST.read_text().splitlines() if ln.startswith(keep)]
    (root / "subset.csv").write_text("\n".join(lines) + "\n")
    return generate_demo_dataset(root / "data", root / "subset.csv", progress=False).source


def _rows(out: str) -> dict[str, list[str]]:
    stages = ("extract", "mist_generator", "mist_pseudo", "train", "mist_extract", "mist_explain", "evaluate")
    return {ln.split()[0]: ln.split() for ln in out.splitlines() if ln.split()[:1] and ln.split()[0] in stages}


def test_mist_chain_resumes_after_interruption_and_feeds_another_detector(demo_subset, tmp_path, capsys, monkeypatch):
    import stages.mist as mist_stages

    run_dir = tmp_path / "run"
    sets = [
        f"data.manifest={demo_subset}", f"extract.backbone={register_tiny_i3d()}", "extract.crops=center",
        "train.iterations=40", "train.sub_bags=4", "train.sub_bag_len=2", "train.topk=1", "train.feature_norm=l2",
        # ^ tiny_i3d's raw features (norm ~64) saturate G's sigmoid at the official lr 0.01 within 40 steps
        "train.batch_abnormal=2", "train.batch_normal=2", "train.checkpoint_every=20",
        "train.ft_epochs=2", "train.ft_freeze_epochs=1", "train.ft_batch_videos=1", "train.ft_clips_per_video=2",
        "train.ft_train_size=72x96", "train.ft_test_size=64x80",  # the official 256x340 / 240x320, scaled to tiny_i3d
        "train.explain=train_001",
    ]
    args = ["-q", "run", "--method", "mist", "--run-dir", str(run_dir)] + [a for s in sets for a in ("--set", s)]

    # interrupt stage II at its third step (epoch 1; epoch 0's two steps are checkpointed)
    calls = []
    real_step = mist_stages.finetune_step

    def step(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step(*a, **kw)

    monkeypatch.setattr(mist_stages, "finetune_step", step)
    assert main([*args, "--stage", "train"]) == 130
    capsys.readouterr()
    train_dir = next((run_dir / "cache" / "train").iterdir())
    assert (train_dir / "checkpoint.pt").is_file() and not (train_dir / "DONE").exists()
    stamps = {p: p.stat().st_mtime_ns for d in ("extract", "mist_generator", "mist_pseudo")
              for p in (run_dir / "cache" / d).glob("*/DONE")}
    assert len(stamps) == 3

    calls.clear()
    assert main([*args, "--stage", "train"]) == 0
    rows = _rows(capsys.readouterr().out)
    assert [rows[s][2] for s in ("extract", "mist_generator", "mist_pseudo")] == ["0", "0", "0"]  # nothing redone
    assert rows["train"][1] == "computed" and len(calls) == 2  # only epoch 1's two steps
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    log = (train_dir / "train_log.csv").read_text().splitlines()
    assert len(log) == 1 + 4  # header + the four steps of two epochs, none repeated
    assert (train_dir / "encoder.pt").is_file() and (train_dir / "model.pt").is_file()
    pseudo = next((run_dir / "cache" / "mist_pseudo").iterdir())
    assert sorted(p.name for p in (pseudo / "plots").iterdir()) == ["train_001.png", "train_011.png"]

    # the rest of the chain: re-extraction (a new key; the pretrained features stay), overlays, evaluation
    assert main([*args, "--stage", "evaluate"]) == 0
    rows = _rows(capsys.readouterr().out)
    assert rows["train"][2] == "0" and rows["mist_extract"][2] == "6" and rows["evaluate"][1] == "computed"
    latest = json.loads((run_dir / "latest.json").read_text())
    metrics = json.loads((run_dir / latest["evaluate"] / "metrics.json").read_text())
    assert 0.0 <= metrics["auc"] <= 1.0 and metrics["cache_keys"]["mist_extract"] != latest["extract"]
    overlays = list((run_dir / latest["mist_explain"] / "overlays" / "train_001").glob("*.png"))
    assert len(overlays) == len(StageDir(run_dir / latest["mist_extract"]).load_meta("train_001")["clip_ranges"])
    assert main(["status", "--run-dir", str(run_dir)]) == 0
    status = capsys.readouterr().out
    for stage in ("mist_generator", "mist_pseudo", "train", "mist_extract", "mist_explain", "evaluate"):
        assert any(ln.startswith(stage) and "done" in ln for ln in status.splitlines()), status

    # pipeline score on the MIST run: the fine-tuned encoder and E_SGA's head, as the evaluation scored
    from pipeline.core.manifest import load_manifest

    manifest = load_manifest(demo_subset)
    video = manifest.resolve(manifest.by_id()["test_001"])
    evaluated = np.load(run_dir / latest["evaluate"] / "items" / "test_001.scores.npy")
    _assert_scored_as_evaluated(capsys, video, run_dir, tmp_path / "scores", evaluated, "tiny_i3d+mist_sga")
    (train_dir / "encoder.pt").rename(train_dir / "moved.pt")  # no encoder: refuse, never the pretrained one
    assert main(["-q", "score", str(video), "--run-dir", str(run_dir)]) == 2
    assert "encoder.pt" in capsys.readouterr().err
    (train_dir / "moved.pt").rename(train_dir / "encoder.pt")

    # encoder-agnostic: AR-Net on features re-extracted with the fine-tuned encoder
    other = ["-q", "run", "--stage", "evaluate", "--method", "ar_net", "--run-dir", str(tmp_path / "arnet"),
             "--set", f"extract.encoder={train_dir / 'encoder.pt'}", "--set", "train.iterations=30",
             "--set", "train.batch_abnormal=2", "--set", "train.batch_normal=2"]
    other += [a for s in sets[:3] for a in ("--set", s)]
    assert main(other) == 0
    capsys.readouterr()
    latest = json.loads((tmp_path / "arnet" / "latest.json").read_text())
    stage_json = json.loads((tmp_path / "arnet" / latest["extract"] / "stage.json").read_text())
    assert "encoder_sha256" in stage_json["inputs"]
    item = StageDir(tmp_path / "arnet" / latest["extract"]).load_meta("test_001")
    assert item["extractor"] == "tiny_i3d+mist_sga" and item["feature_dim"] == 1024
    evaluated = np.load(tmp_path / "arnet" / latest["evaluate"] / "items" / "test_001.scores.npy")
    _assert_scored_as_evaluated(capsys, video, tmp_path / "arnet", tmp_path / "arnet_scores", evaluated, "tiny_i3d+mist_sga")


def _assert_scored_as_evaluated(capsys, video: Path, run_dir: Path, out: Path, evaluated: np.ndarray, extractor: str) -> None:
    """``pipeline score`` gives ``video`` the frame scores the run's evaluate stage gave it."""
    assert main(["-q", "score", str(video), "--run-dir", str(run_dir), "--out", str(out)]) == 0, capsys.readouterr().err
    capsys.readouterr()
    doc = json.loads((out / f"{video.stem}.json").read_text())
    assert doc["extractor"]["name"] == extractor
    assert doc["extractor"]["crops"] == "none"  # the official test-time input: whole frame, no crop (not extract.crops)
    scores = np.array([np.nan if s is None else s for s in doc["scores"]], np.float64)
    np.testing.assert_allclose(scores, evaluated, atol=1e-4)
