"""Distributed extraction: torchrun with two gloo processes on the CPU against a single-process run.

The workers run ``tests/conftest.py``'s LAUNCHER (the ``pipeline`` CLI with the cheap ``test_motion``
extractor registered), started with ``python -m torch.distributed.run`` as torchrun would be.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import moving_square_video, register_test_extractor, write_launcher, write_video
from stages.config import build_config
from pipeline.core.distributed import estimate_frames, from_env, shard
from pipeline.core.runner import Runner
from pipeline.core.stage import StageReport
from pipeline.runs import make_context
from pipeline.core.store import StageDir
from stages import all_stages
from test_runner import cli_args

LONG = 192  # frames of the long video; the five others have 48
SETTINGS = ["extract.backbone=test_motion", "extract.crops=center"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """One long video and five short ones: shards balanced by frames, not by count."""
    root = tmp_path_factory.mktemp("dist_data")
    rows = ["id,path,split,label,class,intervals"]
    for i in range(6):
        n = LONG if i == 0 else 48
        write_video(root / f"v{i}.mp4", moving_square_video(n, 16 if i % 2 else None, seed=i))
        rows.append(f"v{i},v{i}.mp4,train,{i % 2},{'Square' if i % 2 else 'Normal'},")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root / "manifest.csv"


def run_in_process(manifest: Path, run_dir: Path) -> StageReport:
    register_test_extractor()
    cfg = build_config(sets=[f"data.manifest={manifest}", *SETTINGS])
    return Runner(make_context(cfg, run_dir, progress=False), all_stages()).run(["extract"])[0]


def torchrun(manifest: Path, run_dir: Path, nproc: int, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    launcher = write_launcher(run_dir.parent)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           str(launcher), *cli_args(run_dir, manifest, "extract", SETTINGS)]
    # a store of its own: the in-process reference run's items must not be this job's cache
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "WSVAD_STORE": str(run_dir.parent / "store"), **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=full_env)


def events(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines()] if path.is_file() else []


def item_files(sd: StageDir) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(sd.items.iterdir())}


def test_shard_balances_frames_longest_first():
    ids = ["a", "b", "c", "d", "e", "f"]
    shares = shard(ids, [192, 48, 48, 48, 48, 48], 2)
    assert shares == [["a", "f"], ["b", "c", "d", "e"]]  # 240 / 192 frames, not 3 / 3 videos
    assert shard(ids, [1] * 6, 4) == [["a", "e"], ["b", "f"], ["c"], ["d"]]
    assert shard([], [], 3) == [[], [], []]
    # ties are broken by id, so the plan does not depend on the manifest's order
    assert shard(["y", "x"], [5, 5], 2) == [["x"], ["y"]]


def test_estimate_frames(tmp_path, data):
    assert estimate_frames(data.parent / "v0.mp4") == LONG
    folder = tmp_path / "frames"
    folder.mkdir()
    import cv2

    for i in range(3):
        cv2.imwrite(str(folder / f"{i}.png"), np.zeros((8, 8, 3), np.uint8))
    assert estimate_frames(folder) == 3
    (tmp_path / "text.mp4").write_text("not a video")
    assert estimate_frames(tmp_path / "text.mp4") == 1
    assert estimate_frames(tmp_path / "missing.mp4") == 1


def test_not_distributed_without_torchrun_environment():
    assert from_env({}) is None
    assert from_env({"RANK": "0", "WORLD_SIZE": "1"}) is None


def test_two_ranks_equal_one_process(data, tmp_path):
    ref = StageDir(run_in_process(data, tmp_path / "single").path)
    log = tmp_path / "events.txt"
    out = torchrun(data, tmp_path / "dist" / "run", 2, {"WSVAD_TEST_EVENTS": str(log)})
    assert out.returncode == 0, out.stdout + out.stderr
    dist = StageDir(tmp_path / "dist" / "run" / ref.path.relative_to(tmp_path / "single"))
    assert dist.is_done() and item_files(dist) == item_files(ref)  # same cache key, byte-identical items
    done = {vid: rank for kind, vid, rank in events(log) if kind == "done"}
    assert sorted(done) == [f"v{i}" for i in range(6)]
    assert {v for v, r in done.items() if r == done["v0"]} == {"v0", "v5"}  # the long video and one short
    assert len(set(done.values())) == 2
    assert re.search(r"extract +computed +6 +0 +0 ", out.stdout)  # rank 0 prints the whole job's summary, once
    assert out.stdout.count("stage      state") == 1
    for vid in dist.complete_items():  # the items verify like any others
        meta, arrays = dist.load_item(vid)
        assert arrays["features"].shape == (len(meta["clip_ranges"]), 1, 7)


def test_dead_rank_loses_only_its_video_and_a_rerun_completes(data, tmp_path, monkeypatch):
    ref = StageDir(run_in_process(data, tmp_path / "single").path)
    log = tmp_path / "events.txt"
    run_dir = tmp_path / "dist" / "run"
    # rank 1 (the four short videos) is killed with SIGKILL as its third video starts
    out = torchrun(data, run_dir, 2, {"WSVAD_TEST_EVENTS": str(log), "WSVAD_TEST_KILL_AT": "1:3", "WSVAD_TEST_SLOW": "0.3"})
    assert out.returncode != 0
    sd = StageDir(run_dir / ref.path.relative_to(tmp_path / "single"))
    assert not sd.is_done()
    finished = [vid for kind, vid, rank in events(log) if kind == "done"]
    assert {"v1", "v2"} <= set(finished)  # rank 1's two videos before it died are kept
    complete = sd.complete_items()
    assert set(finished) <= set(complete) and len(complete) < 6
    before = {p.name: p.stat().st_mtime_ns for p in sd.items.iterdir()}

    # rerun with another world size (one process, on the job's store): only the missing videos are computed
    monkeypatch.setenv("WSVAD_STORE", str(run_dir.parent / "store"))
    rerun = run_in_process(data, run_dir)
    assert rerun.path == sd.path and sd.is_done()
    assert (rerun.computed, rerun.cached) == (6 - len(complete), len(complete))
    for p in sd.items.iterdir():  # finished items are untouched
        if p.name.split(".")[0] in {sd.stem(v) for v in complete}:
            assert before[p.name] == p.stat().st_mtime_ns, p.name
    assert item_files(sd) == item_files(ref)
    assert not list(sd.items.glob(".*.tmp"))
