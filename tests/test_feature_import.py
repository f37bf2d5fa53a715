"""Importing published features (RTFM, Roc-Ng, Sultani) as extract artifacts; validation errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.cli import main
from pipeline.core.store import StageDir


def manifest(path: Path, rows: list[tuple[str, str, int, str]]) -> Path:
    """rows: (id, split, label, intervals); video paths need not exist for clip formats."""
    lines = ["id,path,split,label,class,intervals"]
    for vid, split, label, iv in rows:
        lines.append(f"{vid},videos/{vid}.mp4,{split},{label},{'Anomaly' if label else 'Normal'},{iv}")
    path.write_text("\n".join(lines) + "\n")
    return path


ROWS = [("a0", "train", 1, ""), ("a1", "train", 1, ""), ("n0", "train", 0, ""), ("n1", "train", 0, ""),
        ("ta", "test", 1, "32-64"), ("tn", "test", 0, "")]


def planted(t: int, d: int, anomalous: bool, rng: np.random.Generator) -> np.ndarray:
    x = rng.normal(0, 0.01, (t, d)).astype(np.float32)
    x[:, 1] += 1.0  # a shared background direction
    if anomalous:
        x[2:4, 0] += 3.0  # clips 2-3 = frames 32-63
    return x


def extract_dir(run_dir: Path) -> StageDir:
    latest = json.loads((run_dir / "latest.json").read_text())
    return StageDir(run_dir / latest["extract"])


def run_all(run_dir: Path) -> int:
    return main(["-q", "run", "--stage", "all", "--run-dir", str(run_dir), "--config", str(run_dir / "config.yaml"),
                 "--set", "train.iterations=100", "--set", "train.batch_abnormal=2", "--set", "train.batch_normal=2"])


def test_rtfm_format_trains_and_evaluates(tmp_path, capsys):
    rng = np.random.default_rng(0)
    feats = tmp_path / "feats"
    feats.mkdir()
    for vid, _, label, _ in ROWS:
        x = planted(6, 2048, bool(label), rng)
        np.save(feats / f"{vid}_i3d.npy", np.repeat(x[:, None], 10, axis=1))
    m = manifest(tmp_path / "m.csv", ROWS)
    run = tmp_path / "run"
    assert main(["-q", "import-features", "--format", "rtfm", "--root", str(feats), "--manifest", str(m), "--run-dir", str(run)]) == 0
    assert "next: pipeline run --stage all" in capsys.readouterr().out
    sd = extract_dir(run)
    meta, arrays = sd.load_item("ta")
    assert arrays["features"].shape == (6, 10, 2048)
    assert meta["clip_ranges"][2] == [32, 48] and meta["n_frames"] == 96
    assert meta["crops"][0] == "rtfm_0" and meta["extractor"] == "import:rtfm"
    assert run_all(run) == 0
    latest = json.loads((run / "latest.json").read_text())
    metrics = json.loads((run / latest["evaluate"] / "metrics.json").read_text())
    assert metrics["auc"] > 0.9


def test_roc_ng_five_crops_and_bad_files(tmp_path):
    rng = np.random.default_rng(1)
    feats = tmp_path / "feats"
    feats.mkdir()
    for vid, _, label, _ in ROWS:
        x = planted(5, 1024, bool(label), rng)
        for k in range(5):
            np.save(feats / f"{vid}__{k}.npy", x + k * 0.01)
    # broken inputs: wrong dimension, NaN, a crop with another clip count
    np.save(feats / "n1__0.npy", np.zeros((5, 512), np.float32))
    bad = planted(5, 1024, False, rng)
    bad[1, 3] = np.nan
    np.save(feats / "tn__2.npy", bad)
    np.save(feats / "a1__4.npy", planted(7, 1024, True, rng))
    m = manifest(tmp_path / "m.csv", ROWS)
    run = tmp_path / "run"
    code = main(["-q", "import-features", "--format", "roc-ng", "--root", str(feats), "--manifest", str(m), "--run-dir", str(run)])
    assert code == 1
    sd = extract_dir(run)
    errors = {f["video"]: f["error"] for f in sd.failures()}
    assert set(errors) == {"n1", "tn", "a1"}
    assert "n1__0.npy: feature dimension 512, expected 1024" in errors["n1"]
    assert "tn__2.npy: contains NaN" in errors["tn"]
    assert "different clip counts" in errors["a1"]
    meta, arrays = sd.load_item("a0")
    assert arrays["features"].shape == (5, 5, 1024)
    assert meta["crops"] == ["c", "tl", "tr", "bl", "br"]
    assert np.allclose(arrays["features"][:, 3], np.load(feats / "a0__3.npy"))


def test_missing_root_and_file_are_clear(tmp_path, capsys):
    m = manifest(tmp_path / "m.csv", ROWS[:1])
    code = main(["-q", "import-features", "--format", "rtfm", "--root", str(tmp_path / "nope"), "--manifest", str(m), "--run-dir", str(tmp_path / "r")])
    assert code == 1
    assert "nope: feature folder not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    code = main(["-q", "import-features", "--format", "rtfm", "--root", str(tmp_path / "empty"), "--manifest", str(m), "--run-dir", str(tmp_path / "r2")])
    assert code == 1
    assert "no feature file 'a0.npy'" in capsys.readouterr().out


def test_real_sultani_features(shared, tmp_path):
    src = shared / "sultani_c3d" / "SampleVideos"
    names = sorted(p.stem for p in src.glob("*.txt"))
    assert len(names) == 10
    rows = [(n, "train", 0 if n.startswith("Normal") else 1, "") for n in names]
    rows.append(("Explosion008_x264_copy", "test", 1, "0-10"))  # a test video without its video file
    (tmp_path / "feats").mkdir()
    for n in names:
        (tmp_path / "feats" / f"{n}.txt").write_bytes((src / f"{n}.txt").read_bytes())
    (tmp_path / "feats" / "Explosion008_x264_copy.txt").write_bytes((src / "Explosion008_x264.txt").read_bytes())
    m = manifest(tmp_path / "m.csv", rows)
    run = tmp_path / "run"
    code = main(["-q", "import-features", "--format", "sultani", "--root", str(tmp_path / "feats"), "--manifest", str(m), "--run-dir", str(run)])
    assert code == 1  # the test video cannot be aligned to frames without its file
    sd = extract_dir(run)
    [failure] = sd.failures()
    assert failure["video"] == "Explosion008_x264_copy" and "video file is needed" in failure["error"]
    meta, arrays = sd.load_item("Explosion008_x264")
    x = arrays["features"][:, 0]
    assert x.shape == (32, 4096) and meta["units"] == "segments"
    assert np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-3)  # the released rows are unit-norm
    assert np.allclose(x, np.loadtxt(src / "Explosion008_x264.txt", dtype=np.float32))
    # the segment stage passes the 32 segments through unchanged
    assert main(["-q", "run", "--stage", "segment", "--run-dir", str(run), "--config", str(run / "config.yaml")]) == 1
    latest = json.loads((run / "latest.json").read_text())
    _, seg = StageDir(run / latest["segment"]).load_item("Explosion008_x264")
    assert np.allclose(seg["segments"][0], x, atol=1e-6)
