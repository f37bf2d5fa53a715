"""The per-video store (issue 18): items keyed per video, shared between manifests and run
directories, recomputed when a file changes; artifacts under the user's umask; migration of a run
directory made before the store. Uses the cheap ``test_motion`` extractor (tests/conftest.py)."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest

from conftest import moving_square_video, register_test_extractor, write_video
from pipeline.cli import main
from pipeline.core.runner import Runner
from pipeline.core.store import StageDir, fingerprint, remove_stale_temps, temp_prefix
from pipeline.runs import make_context
from stages import all_stages
from stages.config import build_config

ROOT = Path(__file__).resolve().parent
SETTINGS = ["extract.backbone=test_motion", "extract.crops=center", "train.iterations=20", "train.batch_abnormal=2",
            "train.batch_normal=2", "train.checkpoint_every=10", "train.hidden=[16,8]", "evaluate.plots=false"]


def write_videos(root: Path, n: int) -> list[str]:
    """``n`` short videos ``v0..`` (odd ones anomalous; the last two for testing), rows of a manifest
    (no header)."""
    rows = []
    for i in range(n):
        path = root / f"v{i}.mp4"
        if not path.exists():
            write_video(path, moving_square_video(32 + 8 * (i % 2), 8 if i % 2 else None, seed=i))
        split, iv = ("test", "8-40" if i % 2 else "") if i >= n - 2 else ("train", "")
        rows.append(f"v{i},v{i}.mp4,{split},{i % 2},{'Square' if i % 2 else 'Normal'},{iv}")
    return rows


def manifest(path: Path, rows: list[str]) -> Path:
    path.write_text("id,path,split,label,class,intervals\n" + "\n".join(rows) + "\n")
    return path


def extract(manifest_path: Path, run_dir: Path, store: Path | None = None):
    register_test_extractor()
    cfg = build_config(sets=[f"data.manifest={manifest_path}", *SETTINGS])
    reports = Runner(make_context(cfg, run_dir, progress=False, store=store), all_stages()).run(["extract"])
    return {r.stage: r for r in reports}["extract"]


def test_a_grown_manifest_computes_only_its_new_videos(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rows = write_videos(data, 6)
    first = extract(manifest(data / "four.csv", rows[:4]), tmp_path / "run")
    assert (first.computed, first.cached) == (4, 0)
    grown = extract(manifest(data / "four.csv", rows), tmp_path / "run")
    assert (grown.computed, grown.cached) == (2, 4)  # the check: 4 videos, grown to 6, 2 computed
    fewer = extract(manifest(data / "four.csv", rows[1:3]), tmp_path / "run")
    assert (fewer.computed, fewer.cached) == (0, 2)  # removing videos computes nothing
    # another manifest naming the same files differently, in another run directory: shared work
    renamed = [r.replace("v", "clip_", 1) for r in rows]
    other = extract(manifest(data / "other.csv", renamed), tmp_path / "elsewhere")
    assert (other.computed, other.cached) == (0, 6)
    a, b = StageDir(grown.path), StageDir(other.path)
    assert a.items == b.items and a.stem("v3") == b.stem("clip_3")
    np.testing.assert_array_equal(a.load_item("v3")[1]["features"], b.load_item("clip_3")[1]["features"])


def test_a_changed_video_file_is_computed_again(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rows = write_videos(data, 3)
    m = manifest(data / "m.csv", rows)
    before = StageDir(extract(m, tmp_path / "run").path)
    old_key = before.stem("v1")
    write_video(data / "v1.mp4", moving_square_video(48, 8, seed=99))  # a new recording under the same name
    again = extract(m, tmp_path / "run")
    assert (again.computed, again.cached) == (1, 2)
    after = StageDir(again.path)
    assert after.stem("v1") != old_key and after.stem("v0") == before.stem("v0")
    assert after.load_meta("v1")["n_frames"] == 48


def test_fingerprint_sees_size_time_and_content(tmp_path):
    f = tmp_path / "a.bin"
    f.write_bytes(b"x" * 1000)
    one = fingerprint(f)
    f.write_bytes(b"y" * 1000)
    os.utime(f, ns=(one["mtime_ns"], one["mtime_ns"]))  # same size, same time, other bytes
    assert fingerprint(f) != one
    folder = tmp_path / "frames"
    folder.mkdir()
    (folder / "000001.jpg").write_bytes(b"j")
    two = fingerprint(folder)
    (folder / "000002.jpg").write_bytes(b"k")
    assert fingerprint(folder)["files"] == two["files"] + 1
    assert fingerprint(tmp_path / "missing") == {"missing": True}


def test_the_sweeper_keeps_a_live_writers_temporaries(tmp_path):
    mine = tmp_path / (temp_prefix("a.npy") + "x.tmp")  # this process: alive
    dead = tmp_path / ".b.npy.abc.tmp"  # an older version's name: no writer to ask
    other_host = tmp_path / ".c.npy.hsomewhere_else-p1.abc.tmp"  # a writer on another machine
    for p in (mine, dead, other_host):
        p.write_bytes(b"partial")
    assert remove_stale_temps(tmp_path) == 1
    assert mine.exists() and not dead.exists() and other_host.exists()
    assert remove_stale_temps(tmp_path, other_hosts_after_s=0.0) == 1 and not other_host.exists()


def test_artifacts_follow_the_umask(tmp_path):
    """Issue 18: every report, CSV and model was 0600; under umask 022 others can read them all."""
    data = tmp_path / "data"
    data.mkdir()
    m = manifest(data / "m.csv", write_videos(data, 4))
    store = tmp_path / "store"
    old = os.umask(0o022)
    try:
        assert main(["-q", "run", "--stage", "all", "--run-dir", str(tmp_path / "run"), "--store", str(store),
                     *[a for s in [f"data.manifest={m}", *SETTINGS] for a in ("--set", s)]]) == 0
    finally:
        os.umask(old)
    files = [p for p in [*(tmp_path / "run").rglob("*"), *store.rglob("*")] if p.is_file() and p.name != ".lock"]
    assert len(files) > 20
    private = [str(p) for p in files if stat.S_IMODE(p.stat().st_mode) & 0o044 != 0o044]
    assert private == []


def old_layout_run(tmp_path: Path) -> tuple[Path, Path]:
    """A run directory written by the layout before the store (tests/data/old_layout_run, made by
    commit d8af0d4 on tests/test_runner.py's dataset), its manifest pointed at a fresh copy of it."""
    from test_runner import make_dataset

    m = make_dataset(tmp_path / "data")
    run = tmp_path / "run"
    shutil.copytree(ROOT / "data" / "old_layout_run", run)
    cfg = (run / "config.yaml").read_text().replace("/tmp/oldfix/data/manifest.csv", str(m))
    (run / "config.yaml").write_text(cfg)
    return run, m


def test_an_old_run_directory_is_refused_then_migrated_without_recomputing(tmp_path, capsys):
    run, _ = old_layout_run(tmp_path)
    metrics_before = json.loads(next((run / "cache" / "evaluate").glob("*/metrics.json")).read_text())
    args = ["-q", "run", "--stage", "evaluate", "--run-dir", str(run), "--config", str(run / "config.yaml")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pipeline migrate --run-dir" in err and "earlier version" in err

    register_test_extractor()
    assert main(["status", "--run-dir", str(run)]) == 0  # status says how to migrate, too
    assert "pipeline migrate --run-dir" in capsys.readouterr().out
    assert main(["-q", "migrate", "--run-dir", str(run)]) == 0
    assert "24 per-video items moved" in capsys.readouterr().out  # 12 videos' features and segments
    register_test_extractor()
    cfg = build_config([json.loads(json.dumps(__import__("yaml").safe_load((run / "config.yaml").read_text())))])
    reports = {r.stage: r for r in Runner(make_context(cfg, run, progress=False), all_stages()).run(["evaluate"])}
    assert {s: (r.state, r.computed) for s, r in reports.items() if s != "evaluate"} == {
        "extract": ("done", 0), "segment": ("done", 0), "train": ("done", 0)}
    # evaluate's version rose since that run directory was written (3: the training-chosen threshold),
    # so it runs again, on the migrated features and the cached model: the same figures
    metrics = json.loads((reports["evaluate"].path / "metrics.json").read_text())
    assert {k: metrics[k] for k in ("auc", "ap", "far")} == {k: metrics_before[k] for k in ("auc", "ap", "far")}
    assert not (run / "unmigrated").exists()


def test_migrated_features_are_bit_identical_to_a_fresh_extraction(tmp_path, capsys):
    """The features the old layout computed and those this version computes are the same bytes."""
    run, m = old_layout_run(tmp_path)
    assert main(["-q", "migrate", "--run-dir", str(run)]) == 0
    register_test_extractor()
    sets = [f"data.manifest={m}", "extract.backbone=test_motion", "extract.crops=center"]
    migrated = StageDir(next((run / "cache" / "extract").glob("*")))
    fresh = extract_with(sets, tmp_path / "fresh", tmp_path / "fresh_store")
    assert fresh.computed == 12
    fresh_sd = StageDir(fresh.path)
    for vid in migrated.complete_items():
        assert migrated.item_file(vid, "features").read_bytes() == fresh_sd.item_file(vid, "features").read_bytes()


def extract_with(sets: list[str], run_dir: Path, store: Path):
    cfg = build_config(sets=sets)
    return {r.stage: r for r in Runner(make_context(cfg, run_dir, progress=False, store=store), all_stages()).run(["extract"])}["extract"]


def test_status_counts_items_another_run_computed(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    m = manifest(data / "m.csv", write_videos(data, 3))
    extract(m, tmp_path / "a")
    register_test_extractor()
    cfg = build_config(sets=[f"data.manifest={m}", *SETTINGS])
    from pipeline.core.status import stage_status

    rows = {r["stage"]: r for r in stage_status(Runner(make_context(cfg, tmp_path / "b", progress=False), all_stages()))}
    assert rows["extract"]["state"] == "done" and "3/3 videos' items already in the shared store" in rows["extract"]["why"]


@pytest.mark.parametrize("bad", ["{", '{"items": 3}'])
def test_an_unreadable_index_is_a_corrupt_artifact(tmp_path, bad):
    from pipeline.core.errors import CorruptArtifact

    (tmp_path / "index.json").write_text(bad)
    with pytest.raises(CorruptArtifact, match="index.json"):
        StageDir(tmp_path)
