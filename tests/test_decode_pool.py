"""Decode workers (extractors/decode_pool.py): features byte-identical to the one-worker path, long
videos split into parts, failures and crashes confined to their video, nothing left after Ctrl-C.

Uses the cheap ``test_motion`` extractor (tests/conftest.py) on tiny synthetic videos; with
``extract.batch_clips=2`` a part of a long video is 8 * 2 * 16 = 256 frames, so the 700-frame video
is decoded as three jobs by different workers.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import moving_square_video, register_test_extractor, write_video
from extractors import decode_pool
from extractors.decode_pool import CRASH_ENV, DecodePool, DecodeSettings
from pipeline.core.runner import Runner
from pipeline.core.store import StageDir
from pipeline.runs import make_context
from stages import all_stages
from stages.config import build_config

#: video name -> frames: a partial clip, a long video split into three parts, whole clips only,
#: one clip and a frame
LENGTHS = {"short": 40, "long": 700, "whole": 64, "tiny": 17}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pool-data")
    rows = ["id,path,split,label,class,intervals"]
    for i, (name, n) in enumerate(LENGTHS.items()):
        write_video(root / f"{name}.mp4", moving_square_video(n, anomalous_from=n // 2, seed=i))
        rows.append(f"{name},{name}.mp4,train,{i % 2},C,")
    (root / "broken.mp4").write_text("this is not a video\n")
    rows.insert(2, "broken,broken.mp4,train,0,C,")  # between two good videos
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root / "manifest.csv"


def run_extract(manifest: Path, run_dir: Path, workers: int, extra: list[str] = ()) -> tuple[Runner, object]:
    register_test_extractor()
    cfg = build_config(sets=[f"data.manifest={manifest}", "extract.backbone=test_motion", "extract.crops=center",
                             "extract.batch_clips=2", "extract.chunk_frames=48",
                             f"extract.decode_workers={workers}", *extra])
    # a store per run: the second run must compute its items, not find the first one's
    runner = Runner(make_context(cfg, run_dir, progress=False, store=run_dir / "store"), all_stages())
    report = runner.run(["extract"])[0]
    assert report.computed == len(LENGTHS) - (CRASH_ENV in os.environ) and report.cached == 0
    return runner, report


def items(report) -> dict[str, tuple[bytes, dict]]:
    sd = StageDir(report.path)
    out = {}
    for vid in sd.complete_items():
        meta, arrays = sd.load_item(vid)
        out[vid] = (arrays["features"].tobytes(), meta)
    return out


@pytest.mark.parametrize("settings", [
    ["extract.partial_clip=pad"],
    ["extract.partial_clip=exclude_last_frame"],
    ["extract.partial_clip=cycle", "extract.target_fps=20"],  # resampled: one job per video
])
def test_two_workers_give_the_one_worker_features_byte_for_byte(dataset, tmp_path, settings):
    _, one = run_extract(dataset, tmp_path / "one", 1, settings)
    _, two = run_extract(dataset, tmp_path / "two", 2, settings)
    a, b = items(one), items(two)
    assert sorted(a) == sorted(LENGTHS)
    assert set(b) == set(a)
    for vid in a:
        assert b[vid][0] == a[vid][0], vid
        assert b[vid][1] == a[vid][1], vid
    # the corrupt video fails with the one-worker path's own error; the others went on
    assert [(f["video"], f["error"]) for f in two.failed] == [(f["video"], f["error"]) for f in one.failed]
    assert [f["video"] for f in two.failed] == ["broken"] and "VideoDecodeError" in two.failed[0]["error"]


@pytest.mark.parametrize("bound", [{"max_batches": 3}, {"max_bytes": 1}])  # the fewest slots, by count or bytes
def test_long_video_is_split_into_parts_on_batch_boundaries(dataset, bound):
    settings = DecodeSettings(clip_len=16, batch_clips=2, chunk_frames=48, partial_clip="pad", target_fps=0.0, folder_fps=30.0)
    path = dataset.parent / "long.mp4"
    with DecodePool(2, settings, **bound) as pool:  # few slots: the head job must still progress
        assert pool.split_frames == 256
        pool.submit([("long", str(path))])
        video = pool.take("long")
        firsts, ranges, end = [], [], None
        for item in video:
            if hasattr(item, "ranges"):
                firsts.append(item.first)
                ranges += item.ranges
                item.release()
            else:
                end = item
        video.close()
        assert [len(pool._videos[0].jobs)] == [3] and len(pool._slots) <= 3
    assert firsts == list(range(0, 44, 2))
    assert ranges == [(16 * i, min(16 * i + 16, 700)) for i in range(44)]
    assert (end.n_frames, end.n_clips) == (700, 44)


def test_a_crashing_worker_fails_only_its_video(dataset, tmp_path, monkeypatch):
    _, one = run_extract(dataset, tmp_path / "one", 1)
    monkeypatch.setenv(CRASH_ENV, "whole.mp4")
    _, two = run_extract(dataset, tmp_path / "two", 2)
    failed = {f["video"]: f["error"] for f in two.failed}
    assert sorted(failed) == ["broken", "whole"]
    assert failed["whole"].startswith("DecodeWorkerCrashed: ") and "whole.mp4" in failed["whole"]
    a, b = items(one), items(two)
    assert sorted(b) == ["long", "short", "tiny"]
    assert all(b[v] == a[v] for v in b)


def test_ctrl_c_leaves_no_worker_no_shared_memory_and_no_partial_item(dataset, tmp_path, monkeypatch):
    pools: list[DecodePool] = []
    init = DecodePool.__init__

    def tracked(self, *a, **k):
        init(self, *a, **k)
        pools.append(self)

    monkeypatch.setattr(DecodePool, "__init__", tracked)
    names: list[str] = []
    grant = DecodePool._grant

    def grant_tracked(self, job, nbytes):
        slot = grant(self, job, nbytes)
        names.append(slot.shm.name)
        return slot

    monkeypatch.setattr(DecodePool, "_grant", grant_tracked)
    from extractors import EXTRACTORS

    register_test_extractor()
    cls = EXTRACTORS.get_class("test_motion")
    features = cls.features
    calls = [0]

    def interrupted(self, clips):
        calls[0] += 1
        if calls[0] == 6:  # inside the long video, with later videos decoded ahead
            raise KeyboardInterrupt
        return features(self, clips)

    monkeypatch.setattr(cls, "features", interrupted)
    runner = None
    with pytest.raises(KeyboardInterrupt):
        register_test_extractor()
        cfg = build_config(sets=[f"data.manifest={dataset}", "extract.backbone=test_motion", "extract.crops=center",
                                 "extract.batch_clips=2", "extract.decode_workers=2"])
        runner = Runner(make_context(cfg, tmp_path / "run", progress=False), all_stages())
        runner.run(["extract"])
    assert len(pools) == 1 and pools[0]._closed
    for pid in pools[0].worker_pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert multiprocessing.active_children() == []
    assert names and not [n for n in names if Path("/dev/shm", n.lstrip("/")).exists()]
    sd = runner.stage_dir("extract", runner.inputs_of("extract", {}), {})
    complete = set(sd.complete_items())
    assert "long" not in complete
    stems = {sd.stem(v) for v in complete}
    leftovers = [p.name for p in sd.items.iterdir() if not any(p.name.startswith(s) for s in stems)]
    assert leftovers == []


def test_default_worker_count_shares_the_cores_among_local_ranks(monkeypatch) -> None:
    from extractors.decode_pool import default_workers

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_workers("cpu") == 1 and default_workers("cuda:0") == 15
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun, 4 GPUs on this host
    assert default_workers("cuda:1") == 3
