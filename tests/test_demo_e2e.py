"""End to end on the demo data with the real Inception-I3D weights: the issue's acceptance checks.

- ``pipeline demo``: frame AUC above 0.80; a second run does no extraction or training and takes
  under 10 % of the first run's time; ``pipeline status`` says why each stage is up to date;
  ``--set train.lr=0.002`` reruns training and evaluation only.
- SIGKILL during extraction (a real ``kill -9`` of a real ``pipeline`` process), then rerun: it
  completes, no artifact is corrupt, finished videos are not recomputed.

Slow (minutes): marked ``slow``. Skipped when the I3D weights cannot be obtained (no network).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def i3d_weights():
    from extractors.i3d_inception import I3D_K400_RGB
    from extractors.weights import WeightsError, fetch_weights

    try:
        fetch_weights(I3D_K400_RGB)
    except WeightsError as e:
        pytest.skip(f"Inception-I3D weights unavailable: {e}")


def _json_summary(run_dir: Path) -> dict:
    latest = json.loads((run_dir / "latest.json").read_text())
    return {k: run_dir / v for k, v in latest.items()}


def test_demo_auc_cache_status_and_training_change(tmp_path, capsys):
    run_dir = tmp_path / "demo"
    t0 = time.time()
    assert main(["-q", "demo", "--run-dir", str(run_dir)]) == 0
    first = time.time() - t0
    out = capsys.readouterr().out
    assert "frame-level AUC" in out and "report.html" in out
    dirs = _json_summary(run_dir)
    metrics = json.loads((dirs["evaluate"] / "metrics.json").read_text())
    assert metrics["auc"] > 0.80, metrics
    assert metrics["videos"] == 10

    t0 = time.time()
    assert main(["-q", "demo", "--run-dir", str(run_dir)]) == 0
    second = time.time() - t0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1] and line.split()[0] in ("extract", "segment", "train", "evaluate")}
    assert all(rows[s][2] == "0" for s in rows), out  # computed column: nothing recomputed
    assert second < 0.1 * first, (first, second)

    assert main(["status", "--run-dir", str(run_dir)]) == 0
    status = capsys.readouterr().out
    for stage in ("extract", "segment", "train", "evaluate"):
        assert any(line.startswith(stage) and "done" in line and "up to date" in line for line in status.splitlines()), status

    assert main(["-q", "demo", "--run-dir", str(run_dir), "--set", "train.lr=0.002"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1] and line.split()[0] in ("extract", "segment", "train", "evaluate")}
    assert rows["extract"][2] == "0" and rows["segment"][2] == "0"
    assert rows["train"][1] == "computed" and rows["evaluate"][1] == "computed"


def test_sigkill_during_extraction_then_resume(tmp_path):
    from pipeline.demo import DEMO_MANIFEST, generate_demo_dataset

    # a small subset of the demo (4 training, 2 test videos) keeps this test short
    lines = DEMO_MANIFEST.read_text().splitlines()
    keep = [ln for ln in lines if ln.startswith(("id,", "train_000,", "train_001,", "train_002,", "train_003,", "test_000,", "test_001,"))]
    sub = tmp_path / "subset.csv"
    sub.write_text("\n".join(keep) + "\n")
    data = tmp_path / "data"
    manifest = generate_demo_dataset(data, sub, progress=False)
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "pipeline", "-q", "run", "--stage", "all", "--run-dir", str(run_dir),
        "--set", f"data.manifest={manifest.source}", "--set", "extract.crops=center",
        "--set", "train.iterations=50", "--set", "train.batch_abnormal=2", "--set", "train.batch_normal=2",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    from pipeline.core.store import StageDir

    sd = None
    deadline = time.time() + 300
    while time.time() < deadline:  # kill -9 once two videos are complete
        found = list((run_dir / "cache" / "extract").glob("*/index.json"))
        if found and len(StageDir(found[0].parent).complete_items()) >= 2:
            sd = StageDir(found[0].parent)
            break
        time.sleep(0.05)
    assert sd is not None, "extraction did not progress"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done_before = {vid: sd.item_meta_path(vid).stat().st_mtime_ns for vid in sd.complete_items()}
    assert 2 <= len(done_before) < 6
    assert not sd.done_marker.exists()

    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    for vid, mtime in done_before.items():
        assert sd.item_meta_path(vid).stat().st_mtime_ns == mtime, f"{vid} was recomputed"
    assert not list(sd.items.glob(".*.tmp"))
    assert sd.is_done() and len(sd.complete_items()) == 6
    for vid in sd.complete_items():
        sd.load_item(vid, verify=True)  # checksums match: nothing corrupt
    assert "computed" in result.stdout
