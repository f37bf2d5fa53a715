"""``pipeline score``: per-frame scores of new videos with a trained run, offline and online, and its errors.

Runs are trained on tests/test_runner.py's tiny dataset with the cheap ``test_motion`` extractor.
"""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import moving_square_video, write_video
from pipeline.cli import main
from test_runner import make_dataset, make_runner


def register_clip_detector() -> str:
    """``test_clip_mil``: Sultani's MLP, but scoring every clip at test time (a causal clip-level detector)."""
    from models import DETECTORS, register_detector
    from models.sultani_mil import SultaniMIL, SultaniMILConfig

    if "test_clip_mil" not in DETECTORS:

        @dataclass
        class ClipMILConfig(SultaniMILConfig):
            pass

        @register_detector("test_clip_mil")
        class ClipMIL(SultaniMIL):
            Config = ClipMILConfig
            input_level = "clips"
            causal = True

    return "test_clip_mil"


def register_rgb_extractor() -> str:
    """``test_rgb``: mean R, G, B per clip (3-D), another feature space than ``test_motion``."""
    from extractors import EXTRACTORS
    from extractors.base import ClipExtractor

    if "test_rgb" not in EXTRACTORS:

        @EXTRACTORS.register("test_rgb")
        class RGBExtractor(ClipExtractor):
            feature_dim = 3
            crop_size = 32
            resize = ("short", 32)

            @classmethod
            def expected_checksum(cls, weights=None):
                return "test-rgb-v1"

            @property
            def weights_checksum(self) -> str:
                return "test-rgb-v1"

            def normalize(self, clips):
                return clips / 255.0

            def features(self, clips):
                return clips.mean(dim=(2, 3, 4))

    return "test_rgb"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("score_data"))


@pytest.fixture(scope="module")
def run(data, tmp_path_factory) -> Path:
    """A Sultani MIL run, trained and evaluated."""
    run_dir = tmp_path_factory.mktemp("score_run")
    make_runner(data, run_dir).run(["evaluate"])
    return run_dir


@pytest.fixture(scope="module")
def clip_run(data, tmp_path_factory) -> Path:
    """A run of the clip-level causal test detector, trained and evaluated."""
    register_clip_detector()
    run_dir = tmp_path_factory.mktemp("score_clip_run")
    make_runner(data, run_dir, ["train.method=test_clip_mil"]).run(["evaluate"])
    return run_dir


def _latest(run_dir: Path) -> dict[str, Path]:
    return {k: run_dir / v for k, v in json.loads((run_dir / "latest.json").read_text()).items()}


def _score(capsys, *args) -> tuple[int, str, str]:
    code = main(["-q", "score", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_offline_scores_files_and_timestamps(run, data, tmp_path, capsys):
    out_dir = tmp_path / "out"
    code, out, err = _score(capsys, data.parent / "test1.mp4", data.parent / "test2.mp4", "--run-dir", run, "--out", out_dir)
    assert code == 0, err
    assert "test1.mp4: 56 frames at 30 fps, 4 clips (offline)" in out
    for vid, n in (("test1", 56), ("test2", 64)):
        rows = list(csv.reader((out_dir / f"{vid}.csv").open()))
        assert rows[0] == ["frame", "time_s", "score"] and len(rows) == 1 + n
        assert [int(r[0]) for r in rows[1:]] == list(range(n))
        assert [float(r[1]) for r in rows[1:]] == pytest.approx([i / 30 for i in range(n)], abs=1e-6)
        doc = json.loads((out_dir / f"{vid}.json").read_text())
        assert doc["fps"] == 30 and doc["n_frames"] == n and doc["mode"] == "offline"
        assert doc["method"] == "sultani_mil" and doc["units"]["level"] == "segments"
        assert len(doc["units"]["scores"]) == 32
        assert doc["clip_ranges"] == [[s, min(s + 16, n)] for s in range(0, n, 16)]
        assert doc["time_s"][-1] == pytest.approx((n - 1) / 30)
        assert doc["run_dir"] == str(run.resolve())
        assert doc["cache_keys"] == {k: p.name for k, p in _latest(run).items() if k in ("extract", "segment", "train")}
        assert doc["extractor"]["name"] == "test_motion"
        assert (out_dir / f"{vid}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        # a test video scored here gets the frame scores the evaluate stage gave it
        evaluated = np.load(_latest(run)["evaluate"] / "items" / f"{vid}.scores.npy")
        assert np.asarray(doc["scores"], np.float64) == pytest.approx(evaluated.astype(np.float64), abs=1e-6)
        assert [float(r[2]) for r in rows[1:]] == pytest.approx(evaluated.astype(np.float64), abs=1e-5)
    assert not list(out_dir.glob(".*.tmp"))


def test_default_out_dir_frame_folder_and_python_api(run, tmp_path, capsys):
    import cv2

    from pipeline.score import score_video_file

    frames = moving_square_video(40, 10, seed=3)
    folder = tmp_path / "cam01"
    folder.mkdir()
    for i, f in enumerate(frames):
        cv2.imwrite(str(folder / f"{i + 1}.png"), cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    code, out, err = _score(capsys, folder, "--run-dir", run)
    assert code == 0, err
    doc = json.loads((run / "scores" / "cam01.json").read_text())
    assert doc["n_frames"] == 40 and doc["fps"] == 30.0 and doc["clip_ranges"] == [[0, 16], [16, 32], [32, 40]]

    sv = score_video_file(run, folder)
    assert sv.n_frames == 40 and sv.times[15] == pytest.approx(0.5) and sv.mode == "offline"
    assert sv.scores == pytest.approx(np.asarray(doc["scores"], np.float32), abs=1e-6)
    assert np.isfinite(sv.scores).all() and ((sv.scores >= 0) & (sv.scores <= 1)).all()


def test_online_sultani_emits_one_score_per_clip_as_frames_arrive(run, data, tmp_path, monkeypatch, capsys):
    from pipeline.score import RunScorer
    from pipeline.core.video import VideoSource
    from stages.segment import pool_segments

    decoded = {"frames": 0}
    original = VideoSource.iter_chunks

    def tracking(self, chunk_frames=64):
        for start, frames in original(self, chunk_frames):
            decoded["frames"] = start + len(frames)
            yield start, frames

    monkeypatch.setattr(VideoSource, "iter_chunks", tracking)
    scorer = RunScorer(run)
    assert scorer.causal
    emitted = []
    for c in scorer.iter_online(data.parent / "test1.mp4"):  # 56 frames: 3 full clips + 8 frames
        # emitted as soon as the clip's frames are decoded, before any later frame is read
        assert decoded["frames"] == c.end, (c, decoded)
        emitted.append(c)
    assert [c.index for c in emitted] == [0, 1, 2, 3]
    assert [(c.start, c.end) for c in emitted] == [(0, 16), (16, 32), (32, 48), (48, 56)]
    assert emitted[1].t_start == pytest.approx(16 / 30) and emitted[3].t_end == pytest.approx(56 / 30)
    assert all(0 <= c.score <= 1 and c.latency_s > 0 for c in emitted)

    # each online score is the detector on the clip feature, L2-normalised as the segments are
    from extractors.stream import extract_video

    feats, _ = extract_video(scorer.cfg, scorer.extractor, data.parent / "test1.mp4")
    for c in emitted:
        x = torch.from_numpy(pool_segments(feats[c.index][None], [(0, 1)], l2=True))
        assert c.score == pytest.approx(float(scorer.model.score(x)[0]), abs=1e-6)

    # 4 clips: each of the 32 segments is a single clip, so offline scores equal the online ones
    offline = scorer.score(data.parent / "test1.mp4")
    assert offline.clip_scores == pytest.approx([c.score for c in emitted], abs=1e-6)

    # the callback API sees the same clips; the per-frame scores spread them over their frames
    seen = []
    sv = scorer.score(data.parent / "test1.mp4", online=True, on_clip=seen.append)
    assert [c.score for c in seen] == pytest.approx([c.score for c in emitted], abs=1e-7)
    assert sv.mode == "online" and sv.n_frames == 56 and len(sv.clips) == 4
    assert sv.scores[16:32] == pytest.approx([emitted[1].score] * 16, abs=1e-6)

    code, out, err = _score(capsys, data.parent / "test1.mp4", "--run-dir", run, "--out", tmp_path, "--online")
    assert code == 0, err
    doc = json.loads((tmp_path / "test1.json").read_text())
    assert doc["mode"] == "online" and len(doc["clip_latency_s"]) == 4 and "approximate" in doc["note"]
    assert doc["clip_scores"] == pytest.approx([c.score for c in emitted], abs=1e-6)


def test_online_equals_offline_for_a_causal_clip_level_detector(clip_run, data):
    from pipeline.score import RunScorer

    scorer = RunScorer(clip_run)
    assert scorer.input_level == "clips" and scorer.causal
    for vid in ("test0", "test1", "test2"):
        path = data.parent / f"{vid}.mp4"
        offline = scorer.score(path)
        online = scorer.score(path, online=True)
        assert online.clip_ranges == offline.clip_ranges
        assert online.scores == pytest.approx(offline.scores, abs=1e-6)
        evaluated = np.load(_latest(clip_run)["evaluate"] / "items" / f"{vid}.scores.npy")
        assert offline.scores == pytest.approx(evaluated, abs=1e-6)


def test_online_refused_for_a_non_causal_detector(run, data, monkeypatch, capsys):
    from models.sultani_mil import SultaniMIL

    monkeypatch.setattr(SultaniMIL, "causal", False)
    code, out, err = _score(capsys, data.parent / "test1.mp4", "--run-dir", run, "--online")
    assert code == 2
    assert err.count("\n") == 1 and "cannot run causally" in err and "model.pt" in err


def _one_line_error(err: str, *needles: str) -> None:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_missing_and_unreadable_videos_fail_alone(run, data, tmp_path, capsys):
    missing = tmp_path / "nope.mp4"
    code, out, err = _score(capsys, missing, "--run-dir", run, "--out", tmp_path / "o")
    assert code == 1
    _one_line_error(err, str(missing), "no such video file")

    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n")
    code, out, err = _score(capsys, text, "--run-dir", run, "--out", tmp_path / "o")
    assert code == 1
    _one_line_error(err, str(text), "not a readable video")

    # one failure never stops the others; a 5-frame video is one padded clip (extract.partial_clip=pad)
    short = tmp_path / "short.mp4"
    write_video(short, moving_square_video(5))
    code, out, err = _score(capsys, text, data.parent / "test0.mp4", missing, short, "--run-dir", run, "--out", tmp_path / "o")
    assert code == 1
    assert "Traceback" not in err and len(err.strip().splitlines()) == 2
    assert str(text) in err and str(missing) in err
    assert (tmp_path / "o" / "test0.csv").is_file() and not (tmp_path / "o" / "notes.csv").exists()
    assert json.loads((tmp_path / "o" / "short.json").read_text())["clip_ranges"] == [[0, 5]]
    assert "2 of 4 video(s) failed" in out


def test_run_dir_without_trained_detector(run, data, tmp_path, capsys):
    video = data.parent / "test0.mp4"
    code, out, err = _score(capsys, video, "--run-dir", tmp_path / "absent")
    assert code == 2
    _one_line_error(err, str(tmp_path / "absent"), "no such run directory")

    features_only = tmp_path / "features_only"
    make_runner(data, features_only).run(["segment"])
    code, out, err = _score(capsys, video, "--run-dir", features_only)
    assert code == 2
    _one_line_error(err, str(features_only), "no trained detector")

    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    model = _latest(copy)["train"] / "model.pt"
    model.unlink()
    code, out, err = _score(capsys, video, "--run-dir", copy)
    assert code == 2
    _one_line_error(err, str(model), "no trained detector")


def test_detector_trained_on_other_features(run, data, tmp_path, capsys):
    from models.sultani_mil import SultaniMIL, SultaniMILConfig

    video = data.parent / "test0.mp4"
    # 1. model.pt of a detector trained on 12-D features, in a run whose extractor gives 7-D
    copy = tmp_path / "dim"
    shutil.copytree(run, copy)
    model = _latest(copy)["train"] / "model.pt"
    saved = torch.load(model, weights_only=True)
    other = SultaniMIL(12, SultaniMILConfig(hidden=(16, 8)))
    saved.update(feature_dim=12, state_dict=other.state_dict())
    torch.save(saved, model)
    code, out, err = _score(capsys, video, "--run-dir", copy)
    assert code == 2
    _one_line_error(err, str(model), "trained on 12-D features", "7-D")

    # 2. the run's extractor changed after training (same run dir, `run --stage extract` with another one)
    register_rgb_extractor()
    copy = tmp_path / "extractor"
    shutil.copytree(run, copy)
    make_runner(data, copy, ["extract.backbone=test_rgb"]).run(["extract"])
    model = _latest(copy)["train"] / "model.pt"
    code, out, err = _score(capsys, video, "--run-dir", copy)
    assert code == 2
    _one_line_error(err, str(model), "trained on other features", "'test_motion'", "'test_rgb'")


def test_flow_modality_run_is_refused(run, data, tmp_path, capsys):
    """Scoring computes RGB features only: a run whose detector read flow features exits 2, naming the
    setting, instead of scoring RGB features of the same width."""
    copy = tmp_path / "flow"
    shutil.copytree(run, copy)
    cfg = copy / "config.yaml"
    text = cfg.read_text()
    assert "modality: rgb" in text
    cfg.write_text(text.replace("modality: rgb", "modality: rgb+flow"))
    code, out, err = _score(capsys, data.parent / "test0.mp4", "--run-dir", copy)
    assert code == 2
    _one_line_error(err, str(cfg), "rgb+flow", "extract.modality", "RGB features only")


def test_an_output_folder_that_cannot_be_written_fails_before_decoding(run, data, tmp_path, capsys, monkeypatch,
                                                                       read_only_mount):
    """Issue 19: with a read-only output folder, score computed the features first, then failed blaming the video."""
    import pipeline.score as score_module

    decoded = []
    monkeypatch.setattr(score_module.RunScorer, "score", lambda self, *a, **k: decoded.append(a) or None)
    code, out, err = _score(capsys, data.parent / "test0.mp4", "--run-dir", run, "--out", tmp_path / "ro")
    assert code == 2 and not decoded
    assert "ro: the output folder cannot be written (Read-only file system)" in err and err.count("\n") == 1


def test_method_chooses_among_the_detectors_trained_in_one_run_directory(data, tmp_path, capsys):
    """Issue 19: score took whatever detector ran last; --method picks the run's latest of that method."""
    register_clip_detector()
    run_dir = tmp_path / "both"
    make_runner(data, run_dir).run(["evaluate"])  # sultani_mil
    make_runner(data, run_dir, ["train.method=test_clip_mil"]).run(["evaluate"])  # the latest
    video = data.parent / "test0.mp4"
    for method, expected in ((None, "test_clip_mil"), ("sultani_mil", "sultani_mil"), ("test_clip_mil", "test_clip_mil")):
        out = tmp_path / f"o_{method}"
        code, _, err = _score(capsys, video, "--run-dir", run_dir, "--out", out, *(["--method", method] if method else []))
        assert code == 0, err
        doc = json.loads((out / "test0.json").read_text())
        assert doc["method"] == expected and doc["model"].endswith("model.pt")
    sultani = json.loads((tmp_path / "o_sultani_mil" / "test0.json").read_text())
    assert sultani["units"]["level"] == "segments"  # scored as its own training: 32-segment bags
    code, _, err = _score(capsys, video, "--run-dir", run_dir, "--method", "ar_net")
    assert code == 2 and "no detector trained with --method ar_net (trained here: sultani_mil, test_clip_mil)" in err


# -- issue 19: progress bars and resuming -----------------------------------------------------------

def _two_videos(data: Path, folder: Path) -> list[Path]:
    """Copies of two test videos (the shared dataset's files are never touched)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for vid in ("test1", "test2"):
        dest = folder / f"{vid}.mp4"
        shutil.copy2(data.parent / f"{vid}.mp4", dest)
        out.append(dest)
    return out


def _mtimes(out_dir: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(out_dir.iterdir())}


def test_a_second_run_reuses_every_video_scored_with_the_same_inputs(run, data, tmp_path, capsys):
    videos = _two_videos(data, tmp_path / "v")
    out_dir = tmp_path / "out"
    code, out, err = _score(capsys, *videos, "--run-dir", run, "--out", out_dir)
    assert code == 0, err
    assert "2 computed, 0 cached" in out
    assert sorted(p.name for p in out_dir.iterdir()) == [f"{v}.{e}" for v in ("test1", "test2") for e in ("csv", "json", "png")]
    before = _mtimes(out_dir)
    first = json.loads((out_dir / "test1.json").read_text())
    assert first["resume"]["inputs"]["mode"] == "offline"
    assert first["resume"]["inputs"]["video"]["path"] == str(videos[0].resolve())

    code, out, err = _score(capsys, *videos, "--run-dir", run, "--out", out_dir)
    assert code == 0, err
    assert "0 computed, 2 cached" in out
    assert f"{videos[0]}: cached: 56 frames at 30 fps, 4 clips (offline)" in out
    assert _mtimes(out_dir) == before  # nothing rewritten


def test_a_changed_video_model_or_mode_is_scored_again(run, data, tmp_path, capsys):
    import os

    from pipeline.core.store import atomic_torch_save

    videos = _two_videos(data, tmp_path / "v")
    out_dir = tmp_path / "out"
    assert _score(capsys, *videos, "--run-dir", run, "--out", out_dir)[0] == 0
    before = _mtimes(out_dir)

    # touching one file (a new modification time) recomputes that one only
    st = videos[1].stat()
    os.utime(videos[1], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    code, out, err = _score(capsys, *videos, "--run-dir", run, "--out", out_dir)
    assert code == 0 and "1 computed, 1 cached" in out, (out, err)
    after = _mtimes(out_dir)
    assert {k for k in after if after[k] != before[k]} == {"test2.csv", "test2.json", "test2.png"}

    # replacing a file by another video under the same name: recomputed, with the new video's scores
    shutil.copy2(data.parent / "test0.mp4", videos[0])
    code, out, err = _score(capsys, *videos, "--run-dir", run, "--out", out_dir)
    assert code == 0 and "1 computed, 1 cached" in out, (out, err)
    evaluated = np.load(_latest(run)["evaluate"] / "items" / "test0.scores.npy")
    assert json.loads((out_dir / "test1.json").read_text())["scores"] == pytest.approx(evaluated.astype(np.float64), abs=1e-6)

    # another mode is another result
    code, out, err = _score(capsys, videos[0], "--run-dir", run, "--out", out_dir, "--online")
    assert code == 0 and "1 computed, 0 cached" in out, (out, err)
    assert json.loads((out_dir / "test1.json").read_text())["mode"] == "online"

    # another model (same run directory, retrained weights): everything recomputed
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    model = _latest(copy)["train"] / "model.pt"
    saved = torch.load(model, weights_only=True)
    saved["state_dict"] = {k: v * 0.5 for k, v in saved["state_dict"].items()}
    atomic_torch_save(model, saved)
    out2 = tmp_path / "out2"
    assert _score(capsys, *videos, "--run-dir", run, "--out", out2)[0] == 0
    code, out, err = _score(capsys, *videos, "--run-dir", copy, "--out", out2)
    assert code == 0 and "2 computed, 0 cached" in out, (out, err)


def test_an_incomplete_result_is_not_reused(run, data, tmp_path, capsys):
    videos = _two_videos(data, tmp_path / "v")
    out_dir = tmp_path / "out"
    assert _score(capsys, *videos, "--run-dir", run, "--out", out_dir)[0] == 0
    (out_dir / "test1.png").unlink()  # a missing output file
    (out_dir / "test2.csv").write_text("frame,time_s,score\n")  # an output file changed since
    code, out, err = _score(capsys, *videos, "--run-dir", run, "--out", out_dir)
    assert code == 0 and "2 computed, 0 cached" in out, (out, err)
    assert (out_dir / "test1.png").is_file() and len((out_dir / "test2.csv").read_text().splitlines()) == 65


def test_after_an_interruption_a_rerun_computes_only_the_missing_videos(run, data, tmp_path, capsys, monkeypatch):
    import pipeline.score as score_module

    videos = _two_videos(data, tmp_path / "v")
    out_dir = tmp_path / "out"
    original = score_module.RunScorer.write
    calls = []

    def interrupted(self, sv, out, *a, **k):
        calls.append(sv.id)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, sv, out, *a, **k)

    monkeypatch.setattr(score_module.RunScorer, "write", interrupted)
    code, out, err = _score(capsys, *videos, "--run-dir", run, "--out", out_dir)
    assert code == 130 and "rerun the same command to resume" in err
    monkeypatch.setattr(score_module.RunScorer, "write", original)
    scored = []
    real_score = score_module.RunScorer.score
    monkeypatch.setattr(score_module.RunScorer, "score",
                        lambda self, path, *a, **k: scored.append(Path(path).name) or real_score(self, path, *a, **k))
    code, out, err = _score(capsys, *videos, "--run-dir", run, "--out", out_dir)
    assert code == 0, err
    assert scored == ["test2.mp4"] and "1 computed, 1 cached" in out


def test_an_interrupted_write_leaves_no_usable_result(run, data, tmp_path, capsys, monkeypatch):
    """Killed after the CSV and plot but before the JSON (written last): the stale JSON of an earlier
    result no longer matches the new files, so the video is scored again."""
    import pipeline.core.store as store

    videos = _two_videos(data, tmp_path / "v")[:1]
    out_dir = tmp_path / "out"
    assert _score(capsys, *videos, "--run-dir", run, "--out", out_dir, "--online")[0] == 0
    real = store.atomic_write_json

    def killed(dest, obj):
        raise KeyboardInterrupt

    monkeypatch.setattr(store, "atomic_write_json", killed)
    code, out, err = _score(capsys, *videos, "--run-dir", run, "--out", out_dir)
    assert code == 130
    monkeypatch.setattr(store, "atomic_write_json", real)
    assert json.loads((out_dir / "test1.json").read_text())["mode"] == "online"  # the old result's JSON
    code, out, err = _score(capsys, *videos, "--run-dir", run, "--out", out_dir)
    assert code == 0 and "1 computed, 0 cached" in out, (out, err)
    assert json.loads((out_dir / "test1.json").read_text())["mode"] == "offline"


def test_progress_bars_on_stderr_unless_quiet(run, data, tmp_path, capsys):
    videos = _two_videos(data, tmp_path / "v")
    code = main(["score", *map(str, videos), "--run-dir", str(run), "--out", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "score: 100%" in err and "2/2" in err and "video" in err  # the bar over videos
    assert "test1: " in err and "frame" in err  # the bar over one video's frames
    assert "score:" not in out and "2 computed, 0 cached" in out

    code = main(["-q", "score", *map(str, videos), "--run-dir", str(run), "--out", str(tmp_path / "out2")])
    out, err = capsys.readouterr()
    assert code == 0 and err == "" and "2 computed, 0 cached" in out


def test_a_demo_trained_detector_says_what_it_was_trained_on(run, data, tmp_path, capsys):
    """Issue 19: a detector trained on the synthetic demo flagged real pedestrians with no caveat."""
    demo_run = tmp_path / "demo_run"
    shutil.copytree(run, demo_run)
    cfg = (demo_run / "config.yaml").read_text()
    (demo_run / "config.yaml").write_text(cfg.replace(f"manifest: {data}", "manifest: demo"))
    assert "manifest: demo" in (demo_run / "config.yaml").read_text()
    out = tmp_path / "scores"
    assert main(["-q", "score", str(data.parent / "test1.mp4"), "--run-dir", str(demo_run), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert err.count("synthetic demo dataset") == 1 and "not whether it is anomalous" in err
    assert "synthetic demo dataset" in json.loads((out / "test1.json").read_text())["trained_on"]
    # a detector trained on the user's own manifest gets no caveat, only the record of its manifest
    assert main(["-q", "score", str(data.parent / "test1.mp4"), "--run-dir", str(run), "--out", str(tmp_path / "own")]) == 0
    assert "synthetic demo" not in capsys.readouterr().err
    assert json.loads((tmp_path / "own" / "test1.json").read_text())["trained_on"] == f"the videos of manifest {data}"


def test_method_of_a_detector_with_its_own_settings_trained_before_the_latest(data, tmp_path, capsys):
    """score --method X rebuilds X's training config from its checkpoint, whose record holds no
    train.method: it was read as the default detector's and refused X's own keys (train.alpha)."""
    from conftest import register_test_extractor
    from pipeline.core.runner import Runner
    from pipeline.runs import make_context
    from stages import all_stages
    from stages.config import build_config

    register_test_extractor()
    run_dir = tmp_path / "two"
    cfg = build_config(sets=[f"data.manifest={data}", "extract.backbone=test_motion", "extract.crops=center",
                             "train.iterations=20"], method="ar_net")
    Runner(make_context(cfg, run_dir, progress=False), all_stages()).run(["train"])
    make_runner(data, run_dir).run(["train"])  # sultani_mil, now the latest
    code, _, err = _score(capsys, data.parent / "test0.mp4", "--run-dir", run_dir, "--out", tmp_path / "o",
                          "--method", "ar_net")
    assert code == 0, err
    assert json.loads((tmp_path / "o" / "test0.json").read_text())["method"] == "ar_net"
