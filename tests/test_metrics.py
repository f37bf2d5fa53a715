"""Frame-level metrics against hand-computed values, and the AUC code against the Sultani et al. paper.

The Sultani check uses the real ROC curves the authors released with their code
(``../shared/data/sultani_c3d/Paper_Results/*.mat``: variables ``X`` = false positive rate,
``Y`` = true positive rate, ``AUC``); the C3D MIL model's curve must give the paper's 75.41 %.
"""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.core.metrics import VideoScores, auc_from_roc, frame_metrics, snippet_level, topk_precision


def _load_roc(path):
    from scipy.io import loadmat

    m = loadmat(str(path))
    return m["X"].ravel(), m["Y"].ravel(), float(m["AUC"].ravel()[0])


def test_sultani_c3d_mil_roc_gives_the_papers_75_41_percent(shared):
    fpr, tpr, _ = _load_roc(shared / "sultani_c3d" / "Paper_Results" / "6_C3D_Final_L1L2.mat")
    assert fpr[0] == 0 and fpr[-1] == 1 and np.all(np.diff(fpr) >= 0)
    assert 100 * auc_from_roc(fpr, tpr) == pytest.approx(75.41, abs=0.01)


def test_every_released_curve_matches_its_stored_auc(shared):
    files = sorted((shared / "sultani_c3d" / "Paper_Results").glob("*.mat"))
    assert len(files) == 4
    for f in files:
        fpr, tpr, stored = _load_roc(f)
        assert auc_from_roc(fpr, tpr) == pytest.approx(stored, abs=1e-9), f.name
    # the binary classifier baseline is at chance, as in the paper's Table 1
    fpr, tpr, _ = _load_roc(files[0])
    assert auc_from_roc(fpr, tpr) == pytest.approx(0.5, abs=0.001)


def test_auc_from_roc_is_the_same_path_as_roc_auc_score():
    from sklearn.metrics import roc_auc_score, roc_curve

    rng = np.random.default_rng(0)
    gt = rng.integers(0, 2, 500)
    s = rng.random(500) + 0.3 * gt
    fpr, tpr, _ = roc_curve(gt, s)
    assert auc_from_roc(fpr, tpr) == pytest.approx(roc_auc_score(gt, s), abs=1e-12)
    with pytest.raises(ValueError):
        auc_from_roc([0.0, 1.0], [0.0])


def _tiny():
    """Three videos, 10 frames. Positives: 0.9, 0.8 (A) and 0.55 (C). Negatives: 0.3, 0.1 (A),
    0.6, 0.2, 0.4, 0.0 (B, normal) and 0.6 (C)."""
    return [
        VideoScores("A", np.array([0.9, 0.8, 0.3, 0.1]), np.array([1, 1, 0, 0]), 1, "Fight"),
        VideoScores("B", np.array([0.6, 0.2, 0.4, 0.0]), np.array([0, 0, 0, 0]), 0, "Normal"),
        VideoScores("C", np.array([0.6, 0.55]), np.array([0, 1]), 1, "Arson"),
    ]


def test_frame_metrics_hand_checked():
    m = frame_metrics(_tiny(), far_threshold=0.5)
    assert (m["frames"], m["anomalous_frames"], m["videos"]) == (10, 3, 3)
    # ROC AUC = share of (positive, negative) pairs ranked right: 0.9 and 0.8 beat all 7
    # negatives, 0.55 beats 5 (not the two 0.6) -> 19 / 21
    assert m["auc"] == pytest.approx(19 / 21)
    # step AP: ranked 0.9 P, 0.8 P, 0.6 N, 0.6 N, 0.55 P -> precision at each positive 1, 1, 3/5
    assert m["ap"] == pytest.approx((1 + 1 + 3 / 5) / 3)
    # trapezoid over the PR points (r, p): (0, 1) (1/3, 1) (2/3, 1) (2/3, 1/2) (1, 3/5)
    assert m["ap_trapezoid"] == pytest.approx(2 / 3 + (1 / 3) * (0.5 + 0.6) / 2)
    assert m["ap"] != pytest.approx(m["ap_trapezoid"])  # the two APs differ: both are reported
    # FAR: frames of the normal video B above 0.5: only 0.6 -> 1/4 (C's 0.6 is not a normal video)
    assert m["far"] == pytest.approx(0.25) and m["far_threshold"] == 0.5
    # abnormal videos only (A, C): positives 0.9, 0.8, 0.55 vs negatives 0.3, 0.1, 0.6 -> 8/9
    assert m["auc_abnormal_only"] == pytest.approx(8 / 9)
    # per class: that class's videos plus every normal video
    # Fight (A + B): 0.9, 0.8 above every negative -> 1; Arson (C + B): 0.55 beats 0.2, 0.4, 0.0 of
    # 0.6, 0.6, 0.2, 0.4, 0.0 -> 3/5
    assert m["per_class_auc"] == {"Arson": pytest.approx(0.6), "Fight": pytest.approx(1.0)}
    # score gap: mean positive 0.75 minus mean negative 2.2 / 7
    assert m["score_gap"] == pytest.approx(0.75 - 2.2 / 7)
    assert "topk_precision" not in m


def test_frame_metrics_undefined_values_are_none():
    m = frame_metrics([VideoScores("N", np.array([0.2, 0.7]), np.array([0, 0]), 0, "Normal")])
    assert m["auc"] is None and m["ap"] is None and m["ap_trapezoid"] is None and m["score_gap"] is None
    assert m["auc_abnormal_only"] is None and m["per_class_auc"] == {} and m["far"] == 0.5


def test_topk_precision_hand_checked():
    videos = [
        # top 3: 0.9 (anomalous), 0.8 (anomalous), 0.7 (normal) -> 2 of 3
        VideoScores("v1", np.array([0.1, 0.9, 0.8, 0.2, 0.7]), np.array([0, 1, 1, 0, 0]), 1, "X"),
        # 0.9 (normal), then 2 of the three tied 0.5s, one of which is anomalous -> 0 + 2 * 1/3
        VideoScores("v2", np.array([0.9, 0.5, 0.5, 0.5]), np.array([0, 1, 0, 0]), 1, "X"),
        # fewer snippets than k: both taken, both anomalous -> 2 of 2
        VideoScores("v3", np.array([0.3, 0.6]), np.array([1, 1]), 1, "X"),
        VideoScores("normal", np.array([0.9, 0.8, 0.7]), np.array([0, 0, 0]), 0, "Normal"),  # ignored
        VideoScores("unannotated", np.array([0.9, 0.8]), np.array([0, 0]), 1, "X"),  # nothing to find
    ]
    r = topk_precision(videos, k=3)
    assert r["k"] == 3 and r["videos"] == 3 and r["skipped"] == ["unannotated"]
    assert r["per_video"] == {"v1": pytest.approx(2 / 3), "v2": pytest.approx(2 / 9), "v3": pytest.approx(1.0)}
    # pooled TPI / (TPI + FPI): (2 + 2/3 + 2) / (3 + 3 + 2)
    assert r["precision"] == pytest.approx((2 + 2 / 3 + 2) / 8)
    assert topk_precision(videos, k=1)["precision"] == pytest.approx((1 + 0 + 1) / 3)
    assert topk_precision(videos[3:], k=3)["precision"] is None
    with pytest.raises(ValueError):
        topk_precision(videos, k=0)


def test_snippet_level_and_topk_in_frame_metrics():
    frames = np.array([0.1] * 16 + [0.9] * 16 + [0.5] * 8, np.float32)
    gt = np.array([0] * 30 + [1] * 10)
    scores, labels = snippet_level(frames, gt, [(0, 16), (16, 32), (32, 40)])
    assert scores == pytest.approx([0.1, 0.9, 0.5]) and labels.tolist() == [0, 1, 1]
    snip = [VideoScores("A", scores, labels, 1, "Fight")]
    m = frame_metrics([VideoScores("A", frames, gt, 1, "Fight")], snippets=snip, topk=1)
    assert m["topk_precision"]["precision"] == 1.0 and m["topk_precision"]["k"] == 1


def test_report_puts_worst_false_alarms_and_misses_first_and_is_self_contained(tmp_path):
    import re

    from pipeline.core.manifest import VideoRecord
    from stages.report import verdict, write_report

    n = 32
    videos = {
        # normal, quiet -> correct
        "quiet": (VideoRecord("quiet", "q.mp4", "test", 0, "Normal"), np.full(n, 0.1)),
        # normal, above 0.5 on half its frames -> false alarm 50 %
        "alarm": (VideoRecord("alarm", "a.mp4", "test", 0, "Normal"), np.r_[np.full(16, 0.9), np.full(16, 0.1)]),
        # anomalous 8-24, found on 8-16 only -> miss 50 %; its normal frames are quiet
        "half": (VideoRecord("half", "h.mp4", "test", 1, "Fight", ((8, 24),)), np.r_[np.full(8, 0.1), np.full(8, 0.8), np.full(16, 0.2)]),
        # anomalous 0-16, all missed -> miss 100 %
        "missed": (VideoRecord("missed", "m.mp4", "test", 1, "Fight", ((0, 16),)), np.full(n, 0.2)),
        # anomalous, found, with the last 4 frames not evaluated (NaN) -> correct
        "found": (VideoRecord("found", "f.mp4", "test", 1, "Fight", ((16, 28),)), np.r_[np.full(16, 0.1), np.full(12, 0.9), np.full(4, np.nan)]),
    }
    v = {k: verdict(r, s, 0.5) for k, (r, s) in videos.items()}
    assert v["alarm"].label == "false alarm" and v["alarm"].false_alarm == 0.5 and v["alarm"].miss is None
    assert v["half"].label == "miss" and v["half"].miss == 0.5 and v["half"].false_alarm == 0
    assert v["missed"].label == "miss" and v["missed"].miss == 1.0
    assert v["quiet"].label == "correct" and v["found"].label == "correct"

    scores_dir = tmp_path / "items"
    scores_dir.mkdir()
    for vid, (_, s) in videos.items():
        np.save(scores_dir / f"{vid}.scores.npy", s.astype(np.float32))
    log = tmp_path / "train_log.csv"
    log.write_text("step,ranking,smooth,total,val_auc\n1,1.0,0.1,1.1,\n2,0.5,0.2,0.7,0.8\n3,0.4,0.1,0.5,\n")
    metrics = frame_metrics([VideoScores(k, s[np.isfinite(s)], np.asarray(r.frame_labels(n))[np.isfinite(s)], r.label, r.cls)
                             for k, (r, s) in videos.items()])
    metrics["topk_precision"] = {"k": 3, "precision": 0.5, "videos": 3}
    page = write_report(tmp_path, metrics, [r for r, _ in videos.values()], scores_dir, log).read_text()
    order = re.findall(r"<div id='v-([a-z]+)'>", page)
    assert order[:3] == ["missed", "alarm", "half"] and set(order[3:]) == {"quiet", "found"}
    assert re.findall(r'alt="([a-z ]+): missed"', page) == ["miss"] and 'alt="false alarm: alarm"' in page
    assert "topk_precision" in page and "ap_trapezoid" in page and "AUC Fight" in page
    # self-contained: every image inline, nothing fetched from elsewhere
    assert page.count("<img") == 2 + len(videos) and page.count('src="data:image/png;base64,') == page.count("<img")
    assert not re.search(r"(src|href)=[\"'](?!data:|#)", page) and "http" not in page
    for f in ("curves.png", "training.png", "videos/missed.png"):
        assert (tmp_path / f).read_bytes()[:4] == b"\x89PNG"


def test_report_verdicts_at_the_chosen_threshold_beside_the_fixed_one(tmp_path):
    from pipeline.core.manifest import VideoRecord
    from stages.report import write_report

    # uncalibrated scores: the anomaly scored 0.4, the normal video 0.1 -> at 0.5 a miss, at 0.3 correct
    videos = [VideoRecord("a", "a.mp4", "test", 1, "Fight", ((0, 8),)), VideoRecord("n", "n.mp4", "test", 0, "Normal")]
    scores = {"a": np.r_[np.full(8, 0.4), np.full(8, 0.1)], "n": np.full(16, 0.1)}
    (tmp_path / "items").mkdir()
    for k, s in scores.items():
        np.save(tmp_path / "items" / f"{k}.scores.npy", s.astype(np.float32))
    metrics = frame_metrics([VideoScores(v.id, scores[v.id], np.asarray(v.frame_labels(16)), v.label, v.cls) for v in videos])
    metrics.update(threshold=0.3, threshold_rule="train_youden", far_at_threshold=0.0,
                   threshold_note="threshold 0.3 chosen on the training videos (Youden's J of video-level maxima)")
    page = write_report(tmp_path, metrics, videos, tmp_path / "items", tmp_path / "none.csv").read_text()
    assert "threshold 0.3 chosen on the training videos (Youden&#x27;s J of video-level maxima); FAR at 0.5 also shown" in page
    assert "<p>2 correct (at 0.5: 1 miss, 1 correct)</p>" in page and 'alt="correct: a"' in page
    assert "<th>far</th>" in page and "<th>far_at_threshold</th>" in page and "(0.3, rule train_youden)" in page
    # an older metrics.json (no threshold): verdicts at far_threshold, no far_at_threshold row
    for k in ("threshold", "threshold_rule", "far_at_threshold", "threshold_note"):
        del metrics[k]
    page = write_report(tmp_path, metrics, videos, tmp_path / "items", tmp_path / "none.csv").read_text()
    assert 'alt="miss: a"' in page and "far_at_threshold" not in page and "fixed threshold 0.5" in page
