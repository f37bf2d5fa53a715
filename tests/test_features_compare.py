"""``pipeline features compare`` (issue 17): a feature file against this project's extraction of a video."""

from __future__ import annotations

import csv

import numpy as np

from conftest import moving_square_video, register_test_extractor, write_video
from pipeline.cli import main
from pipeline.features import compare

SETS = ["--set", "extract.backbone=test_motion", "--set", "extract.crops=center"]


def make(tmp_path):
    register_test_extractor()
    video = tmp_path / "v.mp4"
    write_video(video, moving_square_video(56, 16, seed=3))  # 4 clips: 3 of 16 frames and a padded one of 8
    from extractors import EXTRACTORS
    from extractors.stream import extract_video
    from stages.config import build_config

    cfg = build_config(sets=["extract.backbone=test_motion", "extract.crops=center"])
    feats, _ = extract_video(cfg, EXTRACTORS.get("test_motion"), video)
    return video, feats


def test_the_same_features_match_and_every_row_is_written(tmp_path, capsys):
    video, feats = make(tmp_path)
    np.save(tmp_path / "same.npy", feats[:, 0])  # a [T, D] one-crop file
    assert main(["features", "compare", str(tmp_path / "same.npy"), str(video), *SETS, "--out", str(tmp_path / "c.csv")]) == 0
    out = capsys.readouterr().out
    assert "clips: ours 4, the file's 4" in out and "match: relative L2 < 0.01" in out
    rows = list(csv.DictReader((tmp_path / "c.csv").open()))
    assert len(rows) == 4 and all(float(r["relative_l2"]) == 0.0 and float(r["cosine"]) > 0.999999 for r in rows)


def test_other_features_and_clip_counts_are_reported(tmp_path, capsys):
    video, feats = make(tmp_path)
    other = feats.copy()
    other[1] *= 1.05  # clip 1 off by 5 %: relative L2 0.05 / 1.05
    np.save(tmp_path / "other.npy", other[:2])  # and two clips short
    assert main(["features", "compare", str(tmp_path / "other.npy"), str(video), *SETS]) == 1
    out = capsys.readouterr().out
    assert "ours has 2 more clip(s): compared the first 2" in out
    assert "max 0.0476 (clip 1, crop 0)" in out and "MISMATCH" in out


def test_preset_sets_the_rules_and_any_set_overrides_it(tmp_path, capsys):
    video, feats = make(tmp_path)
    np.save(tmp_path / "same.npy", feats[:, 0])
    # xd_violence cuts (56 - 1) // 16 = 3 clips where the file (padded partial clip) has 4
    sets = [*SETS, "--set", "extract.weights="]
    assert main(["features", "compare", str(tmp_path / "same.npy"), str(video), "--preset", "xd_violence", *sets]) == 1
    out = capsys.readouterr().out
    assert "preset xd_violence, test_motion, crops center" in out and "partial clip exclude_last_frame" in out
    assert "the file has 1 more clip(s)" in out
    # with the file's clip rule the clips align, but the preset's truncated long side (42 not 43) moves the crop
    sets += ["--set", "extract.partial_clip=pad"]
    assert main(["features", "compare", str(tmp_path / "same.npy"), str(video), "--preset", "xd_violence", *sets]) == 1
    assert "clips: ours 4, the file's 4" in capsys.readouterr().out
    sets += ["--set", "extract.resize_round=round"]
    assert main(["features", "compare", str(tmp_path / "same.npy"), str(video), "--preset", "xd_violence", *sets]) == 0


def test_inputs_that_cannot_be_compared_are_one_line_and_exit_2(tmp_path, capsys):
    video, feats = make(tmp_path)
    np.save(tmp_path / "wide.npy", np.zeros((3, 1024), np.float32))
    assert main(["features", "compare", str(tmp_path / "wide.npy"), str(video), *SETS]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ours 7-D, the file's 1024-D" in err
    (tmp_path / "junk.npy").write_text("not an array")
    assert main(["features", "compare", str(tmp_path / "junk.npy"), str(video), *SETS]) == 2
    assert "junk.npy: cannot read the feature file" in capsys.readouterr().err


def test_hand_computed_cosine_and_relative_l2():
    ours = np.array([[[3.0, 4.0]], [[1.0, 0.0]]])
    theirs = np.array([[[3.0, 4.0]], [[0.0, 1.0]]])
    cmp = compare(ours, theirs)
    np.testing.assert_allclose(cmp.cosine[:, 0], [1.0, 0.0])
    np.testing.assert_allclose(cmp.rel_l2[:, 0], [0.0, np.sqrt(2.0)])
    assert not cmp.matches(1e-2) and compare(ours[:1], theirs[:1]).matches(1e-2)
