"""The FAR / verdict threshold chosen without the test set (issue 19): Youden's J on the training
videos' video-level maxima, beside the fixed 0.5, and its fallbacks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.core.metrics import VideoScores, choose_threshold, false_alarm_rate, youden_threshold
from test_runner import by_stage, cli_args, make_dataset, make_runner


def test_youden_threshold_hand_computed():
    # video-level maxima: normals 0.2, 0.5, 0.35; abnormals 0.4, 0.8, 0.9.
    # "score >= t" at each distinct score, from the top: t=0.9 TPR 1/3 FPR 0 (J 1/3); 0.8: 2/3, 0
    # (J 2/3); 0.5: 2/3, 1/3 (1/3); 0.4: 1, 1/3 (2/3); 0.35: 1, 2/3 (1/3); 0.2: 1, 1 (0).
    # J ties at 0.8 and 0.4: the higher (fewer false alarms) wins; the threshold is the midpoint
    # between 0.8 and the next lower score 0.5, so "score > 0.65" splits the videos as ">= 0.8" did.
    labels = [0, 0, 0, 1, 1, 1]
    scores = [0.2, 0.5, 0.35, 0.4, 0.8, 0.9]
    r = youden_threshold(labels, scores)
    assert r["threshold"] == pytest.approx(0.65)
    assert r["tpr"] == pytest.approx(2 / 3) and r["fpr"] == 0.0 and r["youden_j"] == pytest.approx(2 / 3)
    s = np.array(scores)
    assert np.mean(s[np.array(labels) == 1] > r["threshold"]) == pytest.approx(r["tpr"])  # the same split with ">"
    # no ties: normals 0.1, 0.3; abnormals 0.25, 0.6, 0.7 -> ">= 0.6": TPR 2/3, FPR 0 (J 2/3) beats
    # ">= 0.25": 1, 1/2 (1/2) -> midpoint of 0.6 and 0.3
    r = youden_threshold([0, 0, 1, 1, 1], [0.1, 0.3, 0.25, 0.6, 0.7])
    assert r["threshold"] == pytest.approx(0.45) and r["youden_j"] == pytest.approx(2 / 3)


def test_youden_threshold_refuses_one_class_and_no_separation():
    with pytest.raises(ValueError, match="only normal"):
        youden_threshold([0, 0], [0.1, 0.9])
    with pytest.raises(ValueError, match="only anomalous"):
        youden_threshold([1, 1], [0.1, 0.9])
    with pytest.raises(ValueError, match="no training video"):
        youden_threshold([], [])
    # every abnormal video scored below every normal one: no threshold beats chance (J <= 0)
    with pytest.raises(ValueError, match="Youden"):
        youden_threshold([0, 0, 1, 1], [0.8, 0.9, 0.1, 0.2])


def test_choose_threshold_falls_back_to_the_fixed_one():
    one_class = choose_threshold("train_youden", 0.5, {"a": 0.3, "b": 0.9}, {"a": 0, "b": 0})
    assert one_class["threshold"] == 0.5 and one_class["threshold_rule"] == "fixed"
    assert "fell back" in one_class["threshold_note"] and "only normal" in one_class["threshold_note"]
    none = choose_threshold("train_youden", 0.5, {}, {})
    assert none["threshold"] == 0.5 and none["threshold_rule"] == "fixed" and "no training video" in none["threshold_note"]
    fixed = choose_threshold("fixed", 0.4, {"a": 0.3, "b": 0.9}, {"a": 0, "b": 1})
    assert fixed["threshold"] == 0.4 and fixed["threshold_rule"] == "fixed" and "fell back" not in fixed["threshold_note"]
    chosen = choose_threshold("train_youden", 0.5, {"a": 0.3, "b": 0.9, "c": 0.5}, {"a": 0, "b": 1, "c": 0})
    # ">= 0.9": TPR 1, FPR 0 -> midpoint of 0.9 and 0.5
    assert chosen["threshold"] == pytest.approx(0.7) and chosen["threshold_rule"] == "train_youden"
    assert chosen["threshold_train"]["videos"] == 3 and chosen["threshold_train"]["abnormal"] == 1
    with pytest.raises(ValueError):
        choose_threshold("test_youden", 0.5, {}, {})


def test_false_alarm_rate_counts_normal_videos_only():
    videos = [VideoScores("n", np.array([0.2, 0.4, 0.6, 0.8]), np.zeros(4), 0, "Normal"),
              VideoScores("a", np.array([0.9, 0.9]), np.array([1, 0]), 1, "Fight")]
    assert false_alarm_rate(videos, 0.5) == 0.5 and false_alarm_rate(videos, 0.3) == 0.75
    assert false_alarm_rate(videos[1:], 0.5) is None


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"))


def test_evaluate_reports_far_at_the_training_chosen_threshold(dataset, tmp_path, capsys):
    from pipeline.cli import main
    from pipeline.core.manifest import load_manifest

    runner = make_runner(dataset, tmp_path)
    ev = by_stage(runner.run(["evaluate"]))["evaluate"]
    m = json.loads((ev.path / "metrics.json").read_text())
    manifest = load_manifest(dataset)
    train = {v.id: v.label for v in manifest.split("train")}
    test = manifest.split("test")
    # the rule and the training videos it saw (every training video, no test video)
    assert m["threshold_rule"] == "train_youden" and m["config"]["evaluate"]["threshold_rule"] == "train_youden"
    maxima = m["threshold_train"]["max_scores"]
    assert set(maxima) == set(train)
    ids = sorted(maxima)
    assert m["threshold"] == pytest.approx(youden_threshold([train[i] for i in ids], [maxima[i] for i in ids])["threshold"])
    # FAR at the chosen threshold, from the saved test scores of the normal test videos
    normal = np.concatenate([np.load(ev.path / "items" / f"{v.id}.scores.npy") for v in test if v.label == 0])
    normal = normal[np.isfinite(normal)]
    assert m["far_at_threshold"] == pytest.approx(float(np.mean(normal > m["threshold"])))
    # 0.5 kept, unchanged
    assert m["far_threshold"] == 0.5 and m["far"] == pytest.approx(float(np.mean(normal > 0.5)))
    page = (ev.path / "report.html").read_text()
    assert "chosen on the training videos (Youden&#x27;s J of video-level maxima" in page
    assert "FAR at 0.5 also shown" in page
    assert ev.summary["threshold"] == m["threshold"] and ev.summary["far_at_threshold"] == m["far_at_threshold"]
    capsys.readouterr()
    assert main(cli_args(tmp_path, dataset, "evaluate")) == 0  # cached: the summary line from the DONE marker
    assert f"FAR@{m['threshold']:.3g} (training-chosen): {m['far_at_threshold']:.4f}" in capsys.readouterr().out

    # the rule is in the evaluate stage's key; "fixed" uses evaluate.far_threshold and keeps the model
    fixed = by_stage(make_runner(dataset, tmp_path, ["evaluate.threshold_rule=fixed"]).run(["evaluate"]))
    assert fixed["train"].computed == 0 and fixed["evaluate"].path != ev.path
    f = json.loads((fixed["evaluate"].path / "metrics.json").read_text())
    assert f["threshold"] == 0.5 and f["threshold_rule"] == "fixed" and f["far_at_threshold"] == f["far"]
    assert f["threshold_train"] is None
