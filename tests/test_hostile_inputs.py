"""Hostile and broken inputs through the whole pipeline: each is a clear error naming the file,
the run goes on with every other video, the summary lists every failure and the exit status is 1.

Decoder-level checks of the same inputs are in tests/test_video.py, manifest rows in
tests/test_manifest.py, weights in tests/test_i3d_inception.py.
"""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from conftest import ROOT, moving_square_video, register_test_extractor
from pipeline.cli import main
from pipeline.core.errors import CorruptArtifact
from pipeline.core.store import StageDir
from test_runner import by_stage, cli_args, make_dataset, make_runner
from test_video import write_mp4

#: broken inputs added to the 12 good videos of tests/test_runner.py: id -> (path, what the error says)
BROKEN = {
    "missing": ("missing.mp4", "no such video file"),
    "text": ("text.mp4", "not a readable video"),
    "zero": ("zero.mp4", "empty file (0 bytes)"),
    "emptydir": ("emptydir", "empty frame folder"),
    "mixed": ("mixed", "all frames must have one size"),
    "badimage": ("badimage", "not a readable JPEG/PNG image"),
    "black": ("black.mp4", "non-finite features"),
}


def latest(run_dir: Path) -> dict[str, Path]:
    return {k: run_dir / v for k, v in json.loads((run_dir / "latest.json").read_text()).items()}


def nan_on_black_frames(monkeypatch) -> None:
    """``test_motion`` returns NaN for an all-black clip (a stand-in for an extractor that overflows)."""
    from extractors import EXTRACTORS

    cls = EXTRACTORS.get_class(register_test_extractor())
    orig = cls.features

    def features(self, clips):
        out = orig(self, clips)
        black = clips.flatten(1).abs().amax(1) < 1e-6
        out[black] = float("nan")
        return out

    monkeypatch.setattr(cls, "features", features)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> Path:
    """The 12 good videos, the BROKEN ones, a grayscale video, a container that reports more frames
    than it holds, and a test video whose anomaly interval ends after its last frame."""
    root = tmp_path_factory.mktemp("hostile")
    manifest = make_dataset(root)
    (root / "text.mp4").write_text("this is not a video\n")
    (root / "zero.mp4").write_bytes(b"")
    write_mp4(root / "short.mp4", moving_square_video(10))
    (root / "emptydir").mkdir()
    frames = moving_square_video(20)
    for folder in ("mixed", "badimage"):
        (root / folder).mkdir()
        for i, f in enumerate(frames):
            cv2.imwrite(str(root / folder / f"{i:03d}.png"), f[..., ::-1])
    cv2.imwrite(str(root / "mixed" / "007.png"), np.zeros((40, 40, 3), np.uint8))
    (root / "badimage" / "005.png").write_bytes(b"not a png")
    write_mp4(root / "black.mp4", np.zeros((32, 48, 64, 3), np.uint8))
    gray = moving_square_video(40, seed=3)
    write_mp4(root / "gray.mp4", np.repeat(gray[..., 1:2], 3, axis=-1), pix_fmt="gray")
    full = write_mp4(root / "full.mp4", moving_square_video(100, seed=4), gop=10, faststart=True)
    (root / "cut.mp4").write_bytes(full.read_bytes()[: int(full.stat().st_size * 0.6)])
    full.unlink()
    rows = [f"{vid},{path},train,0,Normal," for vid, (path, _) in BROKEN.items()]
    rows += ["short,short.mp4,train,0,Normal,", "gray,gray.mp4,train,0,Normal,", "cut,cut.mp4,train,0,Normal,", "late,train0.mp4,test,1,Square,16-500"]
    with manifest.open("a") as fh:
        fh.write("\n".join(rows) + "\n")
    return manifest


def test_broken_videos_fail_alone_and_are_listed(hostile, tmp_path, monkeypatch, capsys):
    nan_on_black_frames(monkeypatch)
    run_dir = tmp_path / "run"
    assert main(cli_args(run_dir, hostile)) == 1
    out = capsys.readouterr().out
    dirs = latest(run_dir)

    failures = {f["video"]: f for f in StageDir(dirs["extract"]).failures()}
    assert set(failures) == set(BROKEN)
    root = hostile.parent
    for vid, (path, reason) in BROKEN.items():
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(f"[extract] {vid}:"))
        assert str(root / path) in line and reason in line, line  # the summary names file and reason
        assert reason in failures[vid]["error"]
    mixed = failures["mixed"]["error"]
    assert "007.png" in mixed and "40x40" in mixed
    assert "005.png" in failures["badimage"]["error"]

    # everything else is extracted and cached: grayscale as three channels, the truncated
    # container up to its last decodable frame
    ext = StageDir(dirs["extract"])
    good = {f"train{i}" for i in range(8)} | {f"test{i}" for i in range(4)} | {"gray", "cut", "late", "short"}
    assert set(ext.complete_items()) == good
    # shorter than one clip: one clip padded with its last frame (extract.partial_clip=pad, the
    # default; with drop it is an error, tests/test_extract_path.py::test_broken_file_and_short_video_raise)
    assert ext.load_meta("short")["clip_ranges"] == [[0, 10]]
    cut = ext.load_meta("cut")
    assert 20 <= cut["n_frames"] < 100 and len(cut["clip_ranges"]) == -(-cut["n_frames"] // 16)
    assert ext.load_item("gray")[1]["features"].shape == (3, 1, 7)

    # the interval past the end of 'late' is an evaluation failure naming the manifest; the
    # metrics are computed over the other test videos
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("[evaluate] late:"))
    assert str(hostile) in line and "16-500 ends after the video's 48 frames" in line
    metrics = json.loads((dirs["evaluate"] / "metrics.json").read_text())
    assert [f["video"] for f in metrics["failed_videos"]] == ["late"]
    assert metrics["auc"] > 0.9
    assert f"{len(BROKEN) + 1} failure(s)" in out

    # a rerun retries only the failed videos, and still fails on them
    capsys.readouterr()
    assert main(cli_args(run_dir, hostile, "extract")) == 1
    assert "extract    partial          0      16       7" in capsys.readouterr().out


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_file_without_read_permission(tmp_path):
    from pipeline.core.video import VideoDecodeError, open_video

    path = tmp_path / "locked.mp4"
    write_mp4(path, moving_square_video(20))
    path.chmod(0)
    with pytest.raises(VideoDecodeError, match="locked.mp4"):
        open_video(path).read_all()


@pytest.mark.parametrize(
    "row, message",
    [
        ("train0,train0.mp4,train,0,Normal,", "duplicate id 'train0'"),
        ("up,../train0.mp4,train,0,Normal,", "escapes the data root"),
        ("abs,/etc/passwd,train,0,Normal,", "is absolute"),
        ("lbl,train0.mp4,train,2,Normal,", "label '2' is not 0 or 1"),
        ("lbl,train0.mp4,train,yes,Normal,", "label 'yes' is not 0 or 1"),
        ("neg,train0.mp4,test,1,X,-5-10", "bad interval"),
    ],
)
def test_bad_manifest_rows_stop_before_any_work(hostile, tmp_path, row, message, capsys):
    manifest = tmp_path / "m.csv"
    manifest.write_text(hostile.read_text() + row + "\n")
    n = len(manifest.read_text().splitlines())
    code = main(cli_args(tmp_path / "run", manifest) + ["--set", f"data.root={hostile.parent}"])
    err = capsys.readouterr().err
    assert code == 2 and f"{manifest}:{n}:" in err and message in err, err
    assert not (tmp_path / "run" / "cache").exists()


def test_nan_and_wrong_width_features_in_the_cache(tmp_path):
    """Features written by another tool (valid checksums) that hold NaN or have another width are
    refused where they are read, naming the file; the other videos go on."""
    manifest = make_dataset(tmp_path / "data")
    reports = by_stage(make_runner(manifest, tmp_path / "run").run(["extract"]))
    ext = StageDir(reports["extract"].path)
    meta, arrays = ext.load_item("train2")
    bad = arrays["features"].copy()
    bad[1, 0, 3] = np.inf
    ext.save_item("train2", {"features": bad}, {k: v for k, v in meta.items() if k != "_files"})
    meta, arrays = ext.load_item("train3")
    ext.save_item("train3", {"features": arrays["features"][..., :5]}, {k: v for k, v in meta.items() if k != "_files"})

    reports = by_stage(make_runner(manifest, tmp_path / "run").run(["evaluate"]))
    errors = {f["video"]: f["error"] for f in reports["segment"].failed}
    assert set(errors) == {"train2", "train3"}
    assert str(ext.item_file("train2", "features")) in errors["train2"] and "NaN or infinite" in errors["train2"]
    assert str(ext.item_file("train3", "features")) in errors["train3"] and "5-D, expected 7-D" in errors["train3"]
    assert reports["train"].summary["train_videos"] == 6 and reports["evaluate"].summary["auc"] > 0.9

    # a test video's segments of another width than the detector's: left out of the metrics, listed
    seg = StageDir(reports["segment"].path)
    meta, arrays = seg.load_item("test1")
    seg.save_item("test1", {"segments": arrays["segments"][..., :6]}, {k: v for k, v in meta.items() if k != "_files"})
    (reports["evaluate"].path / "DONE").unlink()
    again = by_stage(make_runner(manifest, tmp_path / "run").run(["evaluate"]))["evaluate"]
    assert [f["video"] for f in again.failed] == ["test1"]
    assert str(seg.item_file("test1", "segments")) in again.failed[0]["error"] and "6-D, expected 7-D" in again.failed[0]["error"]


def test_checkpoint_holding_code_is_refused(tmp_path):
    """model.pt is read with weights_only=True: a pickle that would build an arbitrary object is refused."""
    from pipeline.core.store import atomic_torch_save
    from stages.train import load_detector

    sd = StageDir(tmp_path)
    atomic_torch_save(tmp_path / "model.pt", {"method": "sultani_mil", "payload": Path("/etc/passwd")})
    with pytest.raises(CorruptArtifact, match="model.pt: unreadable checkpoint"):
        load_detector(sd)


def test_every_torch_load_is_weights_only():
    """No torch.load in the pipeline can run pickled code: each passes weights_only=True."""
    offenders = []
    for folder in ("pipeline", "stages", "models", "extractors"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                        and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                    ok = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                             for k in node.keywords)
                    if not ok:
                        offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []
    assert torch.load  # the check above is about this function
