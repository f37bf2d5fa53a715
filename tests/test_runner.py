"""Stage runner: caching, cache keys, resume, --force, failures and status, on tiny synthetic videos.

Uses the cheap ``test_motion`` extractor (tests/conftest.py) so that a whole run takes seconds;
the real Inception-I3D runs in tests/test_demo_e2e.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import moving_square_video, register_test_extractor, write_video
from pipeline.cli import main
from stages.config import build_config
from pipeline.core.runner import Runner
from pipeline.core.status import stage_status
from pipeline.runs import make_context
from pipeline.core.store import StageDir
from stages import all_stages


def make_dataset(root: Path, broken: bool = False) -> Path:
    """8 training and 4 test videos (half anomalous: a fast yellow square), plus a manifest."""
    rows = ["id,path,split,label,class,intervals"]
    k = 0
    for split, n in (("train", 8), ("test", 4)):
        for i in range(n):
            label = i % 2
            length = 48 + 8 * (i % 3)  # 48, 56, 64 frames: some end with a partial clip
            start = 16 if label else None
            write_video(root / f"{split}{i}.mp4", moving_square_video(length, start, seed=k))
            iv = f"{start}-{length}" if (label and split == "test") else ""
            rows.append(f"{split}{i},{split}{i}.mp4,{split},{label},{'Square' if label else 'Normal'},{iv}")
            k += 1
    if broken:
        (root / "broken.mp4").write_text("this is not a video\n")
        rows.append("broken,broken.mp4,train,0,Normal,")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root / "manifest.csv"


SETTINGS = [
    "extract.backbone=test_motion",
    "extract.crops=center",
    "train.iterations=60",
    "train.batch_abnormal=4",
    "train.batch_normal=4",
    "train.checkpoint_every=20",
    "train.hidden=[16,8]",
]


def make_runner(manifest: Path, run_dir: Path, extra: list[str] = ()) -> Runner:
    register_test_extractor()
    cfg = build_config(sets=[f"data.manifest={manifest}", *SETTINGS, *extra])
    return Runner(make_context(cfg, run_dir, progress=False), all_stages())


def cli_args(run_dir: Path, manifest: Path, stage: str = "all", settings: list[str] = SETTINGS) -> list[str]:
    """``pipeline`` CLI arguments of a quiet ``run --stage STAGE`` with ``settings`` on ``manifest``."""
    return ["-q", "run", "--stage", stage, "--run-dir", str(run_dir)] + [
        a for s in [f"data.manifest={manifest}", *settings] for a in ("--set", s)
    ]


def by_stage(reports):
    return {r.stage: r for r in reports}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"))


def test_full_run_then_everything_cached(dataset, tmp_path):
    reports = by_stage(make_runner(dataset, tmp_path).run(["evaluate"]))
    assert reports["extract"].computed == 12 and reports["segment"].computed == 12
    assert reports["train"].state == "computed" and reports["evaluate"].state == "computed"
    metrics = json.loads((reports["evaluate"].path / "metrics.json").read_text())
    assert metrics["auc"] > 0.9  # the fast yellow square is obvious to this feature
    assert (reports["evaluate"].path / "report.html").is_file()
    assert (tmp_path / "config.yaml").is_file()

    again = by_stage(make_runner(dataset, tmp_path).run(["evaluate"]))
    assert [again[s].computed for s in ("extract", "segment", "train", "evaluate")] == [0, 0, 0, 0]
    assert again["extract"].cached == 12
    status = {r["stage"]: r for r in stage_status(make_runner(dataset, tmp_path))}
    assert all(r["state"] == "done" for r in status.values())
    assert "up to date" in status["train"]["why"]


def test_training_setting_keeps_features_crop_change_does_not(dataset, tmp_path):
    first = by_stage(make_runner(dataset, tmp_path).run(["evaluate"]))
    status = {r["stage"]: r for r in stage_status(make_runner(dataset, tmp_path, ["train.lr=0.002"]))}
    assert status["extract"]["state"] == "done" and status["segment"]["state"] == "done"
    assert status["train"]["state"] == "stale" and "train.lr: 0.01 -> 0.002" in status["train"]["why"]
    assert status["evaluate"]["state"] == "stale"

    lr = by_stage(make_runner(dataset, tmp_path, ["train.lr=0.002"]).run(["evaluate"]))
    assert lr["extract"].computed == 0 and lr["segment"].computed == 0
    assert lr["extract"].path == first["extract"].path
    assert lr["train"].state == "computed" and lr["evaluate"].state == "computed"
    assert lr["train"].path != first["train"].path

    for change in ("extract.crops=5", "extract.clip_len=8", "extract.partial_clip=drop"):
        status = {r["stage"]: r for r in stage_status(make_runner(dataset, tmp_path, [change]))}
        assert status["extract"]["state"] == "stale", change
        assert change.split("=")[0] in status["extract"]["why"]


def test_rerun_computes_only_missing_items_and_force_redoes(dataset, tmp_path):
    runner = make_runner(dataset, tmp_path)
    ext = by_stage(runner.run(["extract"]))["extract"]
    from pipeline.core.store import StageDir

    sd = StageDir(ext.path)
    items = sd.items
    mtimes = {p.name: p.stat().st_mtime_ns for p in items.iterdir()}
    # as if killed before finishing: one item's marker gone, the DONE marker not yet written,
    # a half-written temp file left behind (by an older version: no writer tag)
    sd.item_meta_path("train3").unlink()
    (ext.path / "DONE").unlink()
    (items / f".{sd.stem('train5')}.features.npy.abc.tmp").write_bytes(b"\x93NUMPY half")
    status = {r["stage"]: r for r in stage_status(make_runner(dataset, tmp_path))}
    assert status["extract"]["state"] == "partial" and "11/12" in status["extract"]["why"]
    # no failures.jsonl was written, so none is pointed to (issue 19)
    assert "none failed" in status["extract"]["why"] and "failures.jsonl" not in status["extract"]["why"]

    again = by_stage(make_runner(dataset, tmp_path).run(["extract"]))["extract"]
    assert again.computed == 1 and again.cached == 11
    assert not list(items.glob(".*.tmp"))
    for p in items.iterdir():
        if not p.name.startswith(sd.stem("train3") + "."):
            assert p.stat().st_mtime_ns == mtimes[p.name], p.name

    forced = by_stage(make_runner(dataset, tmp_path).run(["extract"], force={"extract"}))["extract"]
    assert forced.computed == 12


def test_corrupt_item_is_detected(dataset, tmp_path):
    from pipeline.core.errors import CorruptArtifact

    ext = by_stage(make_runner(dataset, tmp_path).run(["extract"]))["extract"]
    from pipeline.core.store import StageDir

    sd = StageDir(ext.path)
    f = sd.item_file("test1", "features")
    data = bytearray(f.read_bytes())
    data[-4:] = b"\x00\x00\x80\x7f"  # same size, different content
    f.write_bytes(bytes(data))
    with pytest.raises(CorruptArtifact, match="checksum"):
        sd.load_item("test1")
    f.write_bytes(bytes(data[:-100]))  # truncated: no longer counts as complete
    assert not sd.item_complete("test1")


def test_broken_video_is_recorded_and_others_go_on(tmp_path, capsys):
    manifest = make_dataset(tmp_path / "data", broken=True)
    register_test_extractor()
    args = ["run", "--stage", "all", "--run-dir", str(tmp_path / "run"), "--set", f"data.manifest={manifest}"]
    for s in SETTINGS:
        args += ["--set", s]
    assert main(["-q", *args]) == 1
    out = capsys.readouterr().out
    assert "broken" in out and "broken.mp4" in out.replace("\\", "/") or "VideoDecodeError" in out
    latest = json.loads((tmp_path / "run" / "latest.json").read_text())
    ext_dir = tmp_path / "run" / latest["extract"]
    failures = [json.loads(line) for line in (ext_dir / "failures.jsonl").read_text().splitlines()]
    assert [f["video"] for f in failures] == ["broken"] and failures[0]["stage"] == "extract"
    from pipeline.core.store import StageDir

    assert len(StageDir(ext_dir).complete_items()) == 12
    assert (tmp_path / "run" / latest["evaluate"] / "metrics.json").is_file()


def test_training_resumes_to_the_same_weights(dataset, tmp_path, monkeypatch):
    ref = by_stage(make_runner(dataset, tmp_path / "a").run(["train"]))["train"]
    ref_state = torch.load(ref.path / "model.pt", weights_only=True)["state_dict"]

    # interrupt the second run at step 50 (after the checkpoint at step 40)
    calls = {"n": 0}
    orig = torch.optim.Adagrad.step

    def crashing_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 50:
            raise KeyboardInterrupt
        return orig(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adagrad, "step", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        make_runner(dataset, tmp_path / "b").run(["train"])
    monkeypatch.setattr(torch.optim.Adagrad, "step", orig)
    ckpt = next((tmp_path / "b" / "cache" / "train").glob("*/checkpoint.pt"))
    assert torch.load(ckpt, weights_only=True)["step"] == 40

    resumed = by_stage(make_runner(dataset, tmp_path / "b").run(["train"]))["train"]
    state = torch.load(resumed.path / "model.pt", weights_only=True)["state_dict"]
    for k in ref_state:
        assert torch.equal(ref_state[k], state[k]), k
    log_rows = (resumed.path / "train_log.csv").read_text().splitlines()
    assert len(log_rows) == 1 + 60


def test_memory_mapped_bank_trains_the_same_weights(dataset, tmp_path, monkeypatch):
    """A bank over ``train.mmap_over_gb`` is read from a memory-mapped file: same training, no copy."""
    from stages import train as train_stage

    ref = by_stage(make_runner(dataset, tmp_path / "ram").run(["train"]))["train"]
    mapped_shapes = []
    orig = train_stage._bank_storage

    def spy(shape, limit_gb, folder):
        arr = orig(shape, limit_gb, folder)
        if isinstance(arr, np.memmap):
            mapped_shapes.append(shape)
        return arr

    monkeypatch.setattr(train_stage, "_bank_storage", spy)
    # train.* settings enter the train key, but mmap_over_gb is key=False: a different run dir keeps it apart
    mapped = by_stage(make_runner(dataset, tmp_path / "map", ["train.mmap_over_gb=0"]).run(["train"]))["train"]
    assert mapped_shapes == [(8, 1, 32, 7)]  # 8 training videos, 1 crop, 32 segments, test_motion's 7-D
    assert mapped.path.name == ref.path.name  # the setting does not change the cache key
    assert not (mapped.path / "bank.npy").exists()  # removed once training is done
    a = torch.load(ref.path / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(mapped.path / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_mapped_bank_is_copied_to_the_gpu_only_when_it_fits(tmp_path, monkeypatch):
    """In RAM: to the device whole. Memory-mapped: stays mapped on the CPU; on CUDA copied in
    chunks when it takes at most half the GPU's free memory (decided here with a given free size,
    the copy itself recorded: no GPU needed)."""
    from stages import train as train_stage

    data = np.arange(10 * 3 * 4, dtype=np.float32).reshape(10, 3, 4)
    mm = np.lib.format.open_memmap(tmp_path / "bank.npy", mode="w+", dtype=np.float32, shape=data.shape)
    mm[:] = data
    feats = torch.from_numpy(mm)
    nbytes = data.nbytes
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert torch.equal(train_stage.bank_on_device(feats, cpu, limit_gb=4.0), feats)
    assert train_stage.bank_on_device(feats, cpu, limit_gb=0.0) is feats  # mapped, CPU: read in place
    copies = []
    monkeypatch.setattr(train_stage, "copy_in_chunks", lambda src, device: copies.append((src, device)) or "on-gpu")
    assert train_stage.bank_on_device(feats, cuda, 0.0, free_bytes=2 * nbytes - 1) is feats  # over half: stays
    assert train_stage.bank_on_device(feats, cuda, 0.0, free_bytes=2 * nbytes) == "on-gpu"
    assert copies == [(feats, cuda)]
    monkeypatch.undo()
    for chunk in (1, 3 * 4 * 4 * 3, 10**9):  # smaller than a row, three rows, everything
        out = train_stage.copy_in_chunks(feats, cpu, chunk_bytes=chunk)
        assert torch.equal(out, feats) and out.data_ptr() != feats.data_ptr()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_whole_run_on_cuda_matches_the_cpu_run(dataset, tmp_path):
    """Extract and train on the GPU: the same clips, features equal to the CPU's up to float
    rounding, and an AUC as good."""
    cpu = by_stage(make_runner(dataset, tmp_path / "cpu", ["extract.device=cpu", "train.device=cpu"]).run(["evaluate"]))
    gpu = by_stage(make_runner(dataset, tmp_path / "gpu", ["extract.device=cuda", "train.device=cuda"]).run(["evaluate"]))
    a = StageDir(cpu["extract"].path).load_item("train0")[1]["features"]
    b = StageDir(gpu["extract"].path).load_item("train0")[1]["features"]
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)
    auc = [json.loads((r["evaluate"].path / "metrics.json").read_text())["auc"] for r in (cpu, gpu)]
    assert auc[1] > 0.9 and abs(auc[1] - auc[0]) < 0.05


def test_validation_selection_never_uses_test_videos(dataset, tmp_path):
    r = by_stage(make_runner(dataset, tmp_path, ["train.selection=val", "train.val_every=20", "train.val_fraction=0.25"]).run(["train"]))["train"]
    assert r.summary["val_videos"] == 2 and r.summary["train_videos"] == 6
    assert r.summary["selected_step"] in (20, 40, 60)


def test_frame_mapping_from_clip_ranges():
    from stages.evaluate import frames_from_units

    scores, covered = frames_from_units(np.array([0.2, 0.8]), [(0, 16), (16, 20)], 24)
    assert np.allclose(scores[:16], 0.2) and np.allclose(scores[16:20], 0.8)
    assert covered[:20].all() and not covered[20:].any()
    # overlapping units (a short video's repeated segments) average
    scores, _ = frames_from_units(np.array([0.2, 0.6]), [(0, 16), (0, 16)], 16)
    assert np.allclose(scores, 0.4)


def test_training_and_evaluation_never_import_decord(dataset, tmp_path):
    """After extraction, `run --stage evaluate` (train + evaluate) loads no decoder."""
    import subprocess
    import sys

    make_runner(dataset, tmp_path).run(["segment"])
    script = (
        "import sys; sys.path.insert(0, {tests!r})\n"
        "from conftest import register_test_extractor; register_test_extractor()\n"
        "from pipeline.cli import main\n"
        "code = main(['-q', 'run', '--stage', 'evaluate', '--run-dir', {run!r}] + sum([['--set', s] for s in {sets!r}], []))\n"
        "assert code == 0, code\n"
        "assert 'decord' not in sys.modules, 'decord was imported'\n"
        "print('OK')\n"
    ).format(tests=str(Path(__file__).parent), run=str(tmp_path), sets=[f"data.manifest={dataset}", *SETTINGS])
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout + out.stderr


def test_a_batch_larger_than_the_training_set_is_warned(caplog):
    """Issue 19: the published batches (30-40 videos of each class) silently repeat videos on a small dataset."""
    import logging
    from types import SimpleNamespace

    from stages.train import warn_small_training_set

    with caplog.at_level(logging.WARNING, logger="stages.train"):
        warn_small_training_set(SimpleNamespace(batch_abnormal=30, batch_normal=4), n_abnormal=6, n_normal=4)
    assert len(caplog.records) == 1
    assert "train.batch_abnormal=30 asks for more videos than the 6 anomalous training videos" in caplog.text
