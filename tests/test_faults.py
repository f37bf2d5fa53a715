"""Fault injection: kill -9 at random points, corrupt cached artifacts, a full disk.

Each test compares against an uninterrupted run with the same seed on the same tiny dataset
(tests/test_runner.py's: 8 training and 4 test videos, the ``test_motion`` extractor).
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import write_launcher
from pipeline.core import store as cache
from pipeline.cli import main
from pipeline.core.store import StageDir
from test_runner import by_stage, cli_args, make_dataset, make_runner


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("fault_data"))


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory):
    """An uninterrupted run: its reports by stage."""
    return by_stage(make_runner(dataset, tmp_path_factory.mktemp("reference")).run(["evaluate"]))


def metrics(report) -> dict:
    m = json.loads((report.path / "metrics.json").read_text())
    return {k: m[k] for k in ("auc", "ap", "far")}


def weights(train_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(train_dir / "model.pt", weights_only=True)["state_dict"]


def items(sd_path: Path) -> dict[str, bytes]:
    sd = StageDir(sd_path)
    return {f"{vid}.{name}": sd.item_file(vid, name).read_bytes() for vid in sd.complete_items()
            for name in sd.load_meta(vid)["_files"]}


def assert_cache_sound(run_dir: Path) -> None:
    """No temporary leftovers is not required mid-run, but every complete item must verify."""
    for stage_dir in (run_dir / "cache").glob("*/*"):
        sd = StageDir(stage_dir)
        for vid in sd.complete_items():
            sd.load_item(vid)  # raises CorruptArtifact on a bad checksum


class Events:
    """The launcher's event log: which videos started and finished, how many training steps ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def lines(self) -> list[list[str]]:
        return [ln.split() for ln in self.path.read_text().splitlines()] if self.path.is_file() else []

    def count(self, kind: str) -> int:
        return sum(1 for e in self.lines() if e[0] == kind)

    def redone(self) -> list[str]:
        """Videos started again after they had finished."""
        finished: set[str] = set()
        out = []
        for e in self.lines():
            if e[0] == "done":
                finished.add(e[1])
            elif e[0] == "start" and e[1] in finished:
                out.append(e[1])
        return out


class Child:
    """A ``pipeline`` CLI run in a child process, with the few ``multiprocessing.Process`` methods the
    kill helpers use. A fresh interpreter (not ``fork``): forking this multithreaded test process
    (torch, PyAV and decode threads from earlier tests) could leave a lock held in the child, which
    then hung in a futex."""

    def __init__(self, args: list[str], env: dict[str, str], launcher: Path) -> None:
        self.popen = subprocess.Popen([sys.executable, str(launcher), *args], env={**os.environ, **env})
        self.pid = self.popen.pid

    def is_alive(self) -> bool:
        return self.popen.poll() is None

    def join(self, timeout: float | None = None) -> None:
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    @property
    def exitcode(self) -> int | None:
        return self.popen.poll()


def launch(run_dir: Path, manifest: Path, log: Path, slow: float) -> Child:
    """``pipeline run --stage evaluate`` in a child process, with the test hooks logging to ``log``."""
    args = cli_args(run_dir, manifest, "evaluate")
    env = {"WSVAD_TEST_EVENTS": str(log), "WSVAD_TEST_SLOW": str(slow)}
    return Child(args, env, write_launcher(log.parent))


def kill_when(proc: Child, events: Events, kind: str, delay: float) -> bool:
    """SIGKILL ``proc`` ``delay`` seconds after its next ``kind`` event; False if it ended first."""
    n0 = events.count(kind)
    deadline = time.time() + 600  # a hang guard, generous for a loaded CI machine
    while events.count(kind) == n0 and proc.is_alive() and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(delay)
    if not proc.is_alive():
        proc.join()
        return False
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    return True


def test_sigkill_at_random_points_of_extract_and_train(dataset, reference, tmp_path):
    """Four kill -9 at seeded random times (two while extracting, two while training), then a rerun:
    same features, weights and metrics as the uninterrupted run; no finished video extracted
    twice; at most the steps since the last checkpoint trained twice."""
    rng = random.Random(9)
    run_dir, events = tmp_path / "run", Events(tmp_path / "events.txt")
    kills = [("start", rng.uniform(0.0, 1.2)) for _ in range(2)] + [("step", rng.uniform(0.0, 0.9)) for _ in range(2)]
    killed = 0
    for kind, delay in kills:
        proc = launch(run_dir, dataset, events.path, slow=0.1)
        killed += kill_when(proc, events, kind, delay)
        assert_cache_sound(run_dir)
    assert killed >= 3  # the delays are drawn inside the work, so the kills land in it
    steps_before = events.count("step")
    proc = launch(run_dir, dataset, events.path, slow=0.0)
    proc.join(900)  # a hang guard only: a loaded 2-core machine took over 120 s here
    assert proc.exitcode == 0
    assert events.redone() == []
    assert 0 < steps_before  # training was interrupted at least once with steps done
    assert events.count("step") <= 60 + 2 * 20  # two kills in training lose < checkpoint_every steps each

    latest = json.loads((run_dir / "latest.json").read_text())
    assert items(run_dir / latest["extract"]) == items(reference["extract"].path)
    ref_w, w = weights(reference["train"].path), weights(run_dir / latest["train"])
    assert all(torch.equal(ref_w[k], w[k]) for k in ref_w)
    m = json.loads((run_dir / latest["evaluate"] / "metrics.json").read_text())
    assert {k: m[k] for k in ("auc", "ap", "far")} == metrics(reference["evaluate"])
    assert_cache_sound(run_dir)
    for stage_dir in (run_dir / "cache").glob("*/*"):
        assert not list(StageDir(stage_dir).items.glob(".*.tmp"))


def test_corrupt_feature_files_are_recomputed_not_used(dataset, reference, tmp_path):
    runner = make_runner(dataset, tmp_path)
    ext = by_stage(runner.run(["segment"]))["extract"]
    good = items(ext.path)
    sd = StageDir(ext.path)
    # same size, other bytes (the checksum in the marker catches it when segment reads it) ...
    f = sd.item_file("test1", "features")
    data = bytearray(f.read_bytes())
    data[-8:] = b"\xff" * 8
    f.write_bytes(bytes(data))
    # ... and a file cut short by another tool or a full disk (the recorded size catches it)
    g = sd.item_file("train2", "features")
    g.write_bytes(g.read_bytes()[:100])

    # a new segment setting reads every extract item again
    reports = by_stage(make_runner(dataset, tmp_path, ["segment.num_segments=16"]).run(["segment"]))
    assert reports["extract"].computed == 2 and reports["extract"].path == ext.path
    assert reports["segment"].state == "computed" and not reports["segment"].failed
    assert reports["segment"].cached + reports["segment"].computed == 12
    assert items(ext.path) == good
    assert_cache_sound(tmp_path)


def garble(path: Path) -> None:
    """Flip one byte in the middle of ``path`` (same size: only a checksum can tell)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def count_steps(monkeypatch) -> dict:
    calls = {"n": 0}
    orig = torch.optim.Adagrad.step

    def counted(self, *a, **k):
        calls["n"] += 1
        return orig(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adagrad, "step", counted)
    return calls


def test_corrupt_checkpoint_restarts_and_corrupt_model_is_retrained(dataset, reference, tmp_path, monkeypatch):
    ref_w = weights(reference["train"].path)
    train_dir = by_stage(make_runner(dataset, tmp_path).run(["train"]))["train"].path
    # as if killed after the last checkpoint, before model.pt, and the checkpoint then garbled
    for name in ("DONE", "model.pt", "model.pt.sha256"):
        (train_dir / name).unlink()
    garble(train_dir / "checkpoint.pt")
    steps = count_steps(monkeypatch)
    reports = by_stage(make_runner(dataset, tmp_path).run(["evaluate"]))
    assert reports["train"].path == train_dir and steps["n"] == 60  # started over from step 0 ...
    w = weights(train_dir)
    assert all(torch.equal(ref_w[k], w[k]) for k in ref_w)  # ... to the same weights
    assert len((train_dir / "train_log.csv").read_text().splitlines()) == 1 + 60
    assert metrics(reports["evaluate"]) == metrics(reference["evaluate"])

    # a garbled model.pt of a finished train stage: evaluate notices, train rewrites it from its
    # last checkpoint (no step redone), evaluate runs on it
    garble(train_dir / "model.pt")
    (reports["evaluate"].path / "DONE").unlink()
    steps["n"] = 0
    again = by_stage(make_runner(dataset, tmp_path).run(["evaluate"]))
    assert steps["n"] == 0
    assert again["train"].state == "computed" and again["train"].path == train_dir
    w = weights(train_dir)
    assert all(torch.equal(ref_w[k], w[k]) for k in ref_w)
    assert metrics(again["evaluate"]) == metrics(reference["evaluate"])


def disk_full_at(monkeypatch, name: str, nth: int = 1) -> dict:
    """Make the ``nth`` write of a file named ``name`` fail with ENOSPC after some of its bytes
    (a temporary file ``.<name>.*.tmp`` is what gets written); returns the count of such writes."""
    seen = {"n": 0}
    orig = cache._write_file

    def write(path: Path, data: bytes) -> None:
        if re.fullmatch(rf"\.{re.escape(name)}\.h\w*-p\d+\.[^.]+\.tmp", path.name):
            seen["n"] += 1
            if seen["n"] == nth:
                with open(path, "wb") as fh:
                    fh.write(data[: len(data) // 2])
                raise OSError(errno.ENOSPC, "No space left on device")
        orig(path, data)

    monkeypatch.setattr(cache, "_write_file", write)
    return seen


def run_dir_relative(report) -> Path:
    """A stage folder's path below its run directory (``cache/<stage>/<key>``)."""
    return report.path.relative_to(report.path.parents[2])


def test_disk_full_while_extracting(dataset, reference, tmp_path, monkeypatch, capsys):
    args = cli_args(tmp_path, dataset, "extract")
    make_runner(dataset, tmp_path)  # registers test_motion
    orig = cache._write_file
    # the item's file is named by its key in the store, the same as the reference run's
    seen = disk_full_at(monkeypatch, StageDir(reference["extract"].path).stem("train5") + ".features.npy")
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "disk full" in err and "video train5" in err and ".features.npy" in err and "rerun" in err
    assert seen["n"] == 1
    sd = StageDir(tmp_path / run_dir_relative(reference["extract"]))
    assert not list(sd.items.glob(".*.tmp"))  # the partial file is gone
    done = sd.complete_items()
    assert "train5" not in done and {"train0", "train4"} <= set(done)  # earlier videos survive
    assert_cache_sound(tmp_path)

    monkeypatch.setattr(cache, "_write_file", orig)  # space freed
    again = by_stage(make_runner(dataset, tmp_path).run(["extract"]))["extract"]
    assert again.computed == 12 - len(done) and again.cached == len(done)
    assert items(sd.path) == items(reference["extract"].path)


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(dataset, reference, tmp_path, monkeypatch):
    make_runner(dataset, tmp_path).run(["segment"])
    orig = cache._write_file
    disk_full_at(monkeypatch, "checkpoint.pt", nth=2)  # the step-40 checkpoint; the step-20 one is on disk
    from pipeline.core.errors import StageError

    with pytest.raises(StageError, match=r"checkpoint\.pt: disk full"):
        make_runner(dataset, tmp_path).run(["train"])
    ckpt = next((tmp_path / "cache" / "train").glob("*/checkpoint.pt"))
    assert cache.verified_torch_load(ckpt)["step"] == 20
    assert not list(ckpt.parent.glob(".*.tmp"))
    monkeypatch.setattr(cache, "_write_file", orig)
    train = by_stage(make_runner(dataset, tmp_path).run(["train"]))["train"]
    w, ref_w = weights(train.path), weights(reference["train"].path)
    assert all(torch.equal(ref_w[k], w[k]) for k in ref_w)
