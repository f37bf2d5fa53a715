"""CLAWS (models/claws.py): loss terms by hand, windows, normalcy suppression, 2-means, sampling,
learning-rate schedule, state round trip, and resume equality through the train stage."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models import DETECTORS, ClipBank, FeatureBank, fit
from models.kmeans import kmeans
from models.claws import (
    CLAWS,
    CLAWSBatch,
    CLAWSConfig,
    claws_objective,
    cluster_distance,
    clustering_loss,
    regression_loss,
    smoothness_loss,
    sparsity_loss,
    straight_through_centres,
    window_layout,
)

D = 6


def clip_bank(lengths=(130, 40, 70, 3), crops: int = 2, seed: int = 0) -> ClipBank:
    """Videos of the given clip counts, alternately anomalous (a planted direction in clips 5-12) and normal."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([(i + 1) % 2 for i in range(len(lengths))])
    parts = []
    for i, t in enumerate(lengths):
        x = torch.randn(t, crops, D, generator=g) * 0.1
        if labels[i] == 1:
            x[5:13, :, 0] += 2.0
        parts.append(x)
    offsets = torch.tensor([0, *lengths]).cumsum(0)
    return ClipBank(torch.cat(parts), offsets, labels, [f"v{i}" for i in range(len(lengths))])


def small_model(**over) -> CLAWS:
    cfg = CLAWSConfig(hidden=(16, 8), batch_clips=64, dropout=0.0)
    for k, v in over.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    return CLAWS(D, cfg)


# ----------------------------------------------------------------------------------------------- config


def test_registered_with_cited_defaults():
    assert DETECTORS.get_class("claws") is CLAWS
    assert CLAWS.input_level == "clips" and CLAWS.causal is False
    cfg = CLAWSConfig()
    assert cfg.method == "claws"
    assert (cfg.iterations, cfg.lr, cfg.lr_decay_at, cfg.lr_decay) == (100000, 1e-4, 0.8, 0.1)
    assert (cfg.batch_clips, cfg.batches_per_step) == (64, 1)
    assert cfg.hidden == (512, 32)
    assert (cfg.lambda1, cfg.lambda2, cfg.alpha) == (0.9, 8e-5, 1.0)
    assert (cfg.regression, cfg.regularise, cfg.cluster_grad, cfg.feature_norm) == ("mse", "all", "batch", "mean")
    with pytest.raises(ValueError):
        CLAWSConfig(lambda1=1.5).validate()
    with pytest.raises(ValueError):
        CLAWSConfig(batch_clips=0).validate()


# ----------------------------------------------------------------------------------------- loss terms


def test_regression_loss_by_hand():
    scores = torch.tensor([[0.2, 0.9, 0.5], [0.2, 0.4, 0.1]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    labels = torch.tensor([1, 0])
    mse = regression_loss(scores, mask, labels, "mse")
    assert mse.tolist() == pytest.approx([(0.8**2 + 0.1**2) / 2, (0.2**2 + 0.4**2 + 0.1**2) / 3])
    bce = regression_loss(scores, mask, labels, "bce")
    want = [-(math.log(0.2) + math.log(0.9)) / 2, -(math.log(0.8) + math.log(0.6) + math.log(0.9)) / 3]
    assert bce.tolist() == pytest.approx(want, rel=1e-5)


def test_smoothness_and_sparsity_by_hand():
    scores = torch.tensor([[0.1, 0.5, 0.2, 0.9], [0.3, 0.3, 0.6, 0.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    assert smoothness_loss(scores, mask).tolist() == pytest.approx([0.4**2 + 0.3**2, 0.0 + 0.3**2 + 0.6**2])
    assert sparsity_loss(scores, mask).tolist() == pytest.approx([0.8, 1.2])


def test_cluster_distance_and_loss_by_hand():
    centres = torch.tensor([[[0.0, 0.0], [3.0, 4.0]], [[1.0, 1.0], [1.0, 3.0]], [[0.0, 0.0], [0.0, 1.0]]])
    d = cluster_distance(centres, torch.tensor([10, 1, 4]))  # Eq. 1: ||c1 - c2|| / m_i
    assert d.tolist() == pytest.approx([0.5, 2.0, 0.25])
    # Eq. 2: min(alpha, d) for normal videos, 1 / d for anomalous ones
    assert clustering_loss(d, torch.tensor([0, 0, 1]), alpha=1.0).tolist() == pytest.approx([0.5, 1.0, 4.0])


def test_objective_weights_eq3_by_hand():
    pred, clus = torch.tensor([0.2, 0.4]), torch.tensor([3.0, 0.5])
    smooth, sparse, labels = torch.tensor([0.1, 0.3]), torch.tensor([2.0, 4.0]), torch.tensor([1, 0])
    t = claws_objective(pred, clus, smooth, sparse, labels, lambda1=0.9, lambda2=0.01)
    assert t["regression"].item() == pytest.approx(0.9 * 0.3)
    assert t["cluster"].item() == pytest.approx(0.1 * 1.75)
    assert t["smooth"].item() == pytest.approx(0.01 * 0.2)
    assert t["sparse"].item() == pytest.approx(0.01 * 3.0)
    assert t["total"].item() == pytest.approx(0.27 + 0.175 + 0.002 + 0.03)
    t = claws_objective(pred, clus, smooth, sparse, labels, 0.9, 0.01, regularise="abnormal")
    assert t["smooth"].item() == pytest.approx(0.01 * 0.1 / 2) and t["sparse"].item() == pytest.approx(0.01 * 2.0 / 2)


def test_straight_through_centres_value_and_gradient():
    stored = torch.tensor([[[1.0, 2.0], [5.0, 5.0]]])
    counts = torch.tensor([[4.0, 2.0]])
    h = torch.tensor([[[0.3, 0.1], [7.0, 7.0], [9.0, 9.0]]], requires_grad=True)
    assign = torch.tensor([[0, 1, -1]])  # the last clip is padding
    c = straight_through_centres(stored, counts, h, assign)
    assert torch.equal(c.detach(), stored)  # the value is the epoch's centres
    w = torch.tensor([[[1.0, -2.0], [3.0, 0.5]]])
    (c * w).sum().backward()
    # d/dh_l = w[cluster of l] / n_k; padding gets nothing
    want = torch.tensor([[[1.0 / 4, -2.0 / 4], [3.0 / 2, 0.5 / 2], [0.0, 0.0]]])
    assert torch.allclose(h.grad, want)


# ------------------------------------------------------------------------------------ windows, model


def test_window_layout_by_hand():
    video, start, length, first = window_layout(torch.tensor([130, 64, 10, 65]), 64)
    assert video.tolist() == [0, 0, 0, 1, 2, 3, 3]
    # 130 clips: [0, 64), [64, 128) and the remainder as a full window aligned with the end, [66, 130)
    assert start.tolist() == [0, 64, 66, 0, 0, 0, 1]
    assert length.tolist() == [64, 64, 64, 64, 10, 64, 64]
    assert first.tolist() == [0, 3, 4, 5, 7]


def test_forward_scores_each_clip_in_its_training_window():
    model = small_model().eval()
    x = torch.randn(1, 130, D)
    with torch.no_grad():
        full = model(x)[0]
        w = [model.windows(x[:, a : a + 64], torch.ones(1, 64, dtype=torch.bool))[0][0] for a in (0, 64, 66)]
    assert torch.allclose(full[:64], w[0]) and torch.allclose(full[64:128], w[1])
    assert torch.allclose(full[128:], w[2][62:])  # the last two clips from the end-aligned window


def test_nsm_softmax_is_over_time_and_padding_is_ignored():
    model = small_model().eval()
    x = torch.randn(2, 20, D)
    lengths = torch.tensor([20, 13])
    with torch.no_grad():
        padded = model(x * (torch.arange(20) < lengths[:, None])[..., None], lengths)
        alone = model(x[1:, :13])
        p = model.nsms[0](x[:1]).softmax(dim=1)
    assert torch.allclose(padded[1, :13], alone[0], atol=1e-6) and (padded[1, 13:] == 0).all()
    assert torch.allclose(p.sum(dim=1), torch.ones(1, 16))  # each column of P sums to 1 over the window
    # a clip's score depends on the other clips of its window (not causal)
    y = x[:1].clone()
    y[0, 15] += 5.0
    with torch.no_grad():
        assert not torch.allclose(model(y)[0, :15], model(x[:1])[0, :15])


def test_gather_windows_takes_the_right_clips_and_crop():
    bank = clip_bank(crops=3)
    model = small_model()
    gen = torch.Generator().manual_seed(1)
    batch = model.sample_batch(bank, gen)
    assert isinstance(batch, CLAWSBatch)
    model.cfg.batches_per_step = 5
    batch = model.sample_batch(bank, gen)
    x = torch.cat([batch.abnormal, batch.normal])
    lengths = torch.cat([batch.abnormal_lengths, batch.normal_lengths])
    rows = torch.cat([batch.abnormal_row, batch.normal_row])
    for k in range(x.shape[0]):
        t = int(lengths[k])
        window = bank.features[int(rows[k]) : int(rows[k]) + t]  # [t, C, D]
        assert any(torch.equal(window[:, c], x[k, :t]) for c in range(3))
        assert (x[k, t:] == 0).all()
    assert (bank.labels[batch.abnormal_video] == 1).all() and (bank.labels[batch.normal_video] == 0).all()


# ------------------------------------------------------------------------------------------- k-means


def test_two_means_of_every_video_on_obvious_clusters():
    pts = torch.zeros(2, 5, 2)
    pts[0, :4] = torch.tensor([[0.0, 0.0], [0.0, 1.0], [10.0, 0.0], [10.0, 1.0]])
    pts[0, 4] = 1e6  # padding of the first video (length 4): must be ignored
    pts[1] = torch.tensor([[1.0, 1.0], [1.2, 1.0], [-4.0, 2.0], [1.1, 1.0], [-4.0, 2.2]])
    lengths = torch.tensor([4, 5])
    for seed in range(5):
        assign, centres, counts = kmeans(pts, 2, lengths=lengths, gen=torch.Generator().manual_seed(seed), iters=20)
        np.testing.assert_allclose(sorted(centres[0].tolist()), [[0.0, 0.5], [10.0, 0.5]], rtol=1e-6)
        np.testing.assert_allclose(sorted(centres[1].tolist()), [[-4.0, 2.1], [1.1, 1.0]], rtol=1e-6)
        assert counts.sum(1).tolist() == [4.0, 5.0]
        assert sorted(counts[1].tolist()) == [2.0, 3.0]
        a = assign[1].tolist()
        assert a[0] == a[1] == a[3] != a[2] == a[4]


def test_recluster_fills_the_buffers_and_matches_a_numpy_lloyd():
    bank = clip_bank()
    model = small_model(batch_clips=16, cluster_chunk=100)  # several groups
    gen = torch.Generator().manual_seed(0)
    model.recluster(bank, gen)
    assert model.centres.shape == (4, 2, 16) and model.assign.shape == (bank.features.shape[0],)
    assert model.counts.sum(1).tolist() == bank.lengths.float().tolist()
    assert model.training  # restored
    whole = small_model(batch_clips=16, cluster_chunk=10**6)
    whole.load_state_dict(model.state_dict())
    whole.recluster(bank, torch.Generator().manual_seed(0))
    assert torch.equal(whole.assign, model.assign) and torch.allclose(whole.centres, model.centres)
    # every centre is the mean of its members' representations, and members are nearer their own centre
    for i in range(4):
        rep = model.representations(bank, torch.tensor([i]))[0, : int(bank.lengths[i])].numpy()
        a = model.assign[int(bank.offsets[i]) : int(bank.offsets[i + 1])].numpy()
        for k in (0, 1):
            if (a == k).any():
                np.testing.assert_allclose(model.centres[i, k].numpy(), rep[a == k].mean(0), rtol=1e-4, atol=1e-6)
        d = ((rep[:, None, :] - model.centres[i].numpy()[None]) ** 2).sum(-1)
        assert (d[np.arange(len(a)), a] <= d.min(1) + 1e-6).all()


def test_cluster_loss_reaches_only_fc1_and_nsm1():
    bank = clip_bank()
    model = small_model(lambda1=0.0, lambda2=0.0, batches_per_step=4)
    gen = torch.Generator().manual_seed(0)
    model.setup(bank, gen)
    model.before_step(bank, 0, gen)
    terms = model.losses(model.sample_batch(bank, gen))
    assert terms["cluster"].item() > 0 and terms["total"].item() == pytest.approx(terms["cluster"].item())
    terms["total"].backward()
    for name, p in model.named_parameters():
        reached = p.grad is not None and p.grad.abs().sum() > 0
        assert reached == name.startswith(("fcs.0.", "nsms.0.")), name
    model = small_model(lambda1=0.0, lambda2=0.0, cluster_grad="none")
    model.setup(bank, gen)
    model.before_step(bank, 0, gen)
    terms = model.losses(model.sample_batch(bank, gen))
    assert terms["cluster"].item() > 0 and not terms["cluster"].requires_grad  # the literal constant d_i


# ---------------------------------------------------------------------- sampling, schedule, state


def test_an_epoch_visits_every_window_once():
    bank = clip_bank()
    model = small_model(batch_clips=16, batches_per_step=3)
    _, start, _, _ = window_layout(bank.lengths, 16)
    k = start.numel()
    spe = model.steps_per_epoch(bank)
    assert spe == math.ceil(k / 3)
    gen = torch.Generator().manual_seed(0)
    seen = []
    for step in range(spe):
        model.before_step(bank, step, gen)
        b = model.sample_batch(bank, gen)
        videos = torch.cat([b.abnormal_video, b.normal_video]).tolist()
        seen += list(zip(videos, torch.cat([b.abnormal_row, b.normal_row]).tolist()))
    video, start, _, _ = window_layout(bank.lengths, 16)
    every = set(zip(video.tolist(), (bank.offsets[video] + start).tolist()))
    assert set(seen) == every and len(seen) == 3 * spe  # the last step wraps around to the order's start


def test_lr_schedule_is_a_function_of_the_step():
    bank = clip_bank()
    model = small_model(iterations=100, lr=1e-3)
    opt = model.make_optimizer()
    gen = torch.Generator().manual_seed(0)
    for step, want in ((0, 1e-3), (79, 1e-3), (80, 1e-4), (99, 1e-4), (5, 1e-3)):
        model.before_step(bank, step, gen)
        assert opt.param_groups[0]["lr"] == pytest.approx(want)


def test_state_dict_round_trip_resizes_bank_buffers():
    bank = clip_bank()
    model = small_model()
    gen = torch.Generator().manual_seed(0)
    model.setup(bank, gen)
    model.before_step(bank, 0, gen)
    state = model.state_dict()
    assert {"feature_mean", "centres", "counts", "assign", "order"} <= set(state)
    assert torch.allclose(model.feature_mean, bank.features.flatten(0, 1).mean(0), atol=1e-6)
    fresh = small_model()
    assert fresh.centres.shape[0] == 0
    fresh.load_state_dict(state)
    for k, v in state.items():
        assert torch.equal(fresh.state_dict()[k], v), k
    x = bank.bags(0)
    assert torch.equal(fresh.score(x), model.score(x))


def test_feature_bank_input_is_read_as_videos_of_s_clips():
    g = torch.Generator().manual_seed(0)
    bank = FeatureBank(torch.randn(4, 2, 32, D, generator=g), torch.tensor([1, 0, 1, 0]), ["a", "b", "c", "d"])
    model = small_model(batches_per_step=4)
    gen = torch.Generator().manual_seed(0)
    model.setup(bank, gen)
    model.before_step(bank, 0, gen)
    assert model.assign.shape == (128,)
    terms = model.losses(model.sample_batch(bank, gen))
    assert torch.isfinite(terms["total"])


def test_short_schedule_learns_the_planted_clips():
    bank = clip_bank(lengths=(40, 36, 50, 30, 70, 44), crops=1)
    model = small_model(hidden=(32, 8), **CLAWS.short_schedule, iterations=200)
    fit(model, bank, 200, torch.Generator().manual_seed(0))
    for i in range(len(bank.ids)):
        s = model.score(bank.bags(i))
        if bank.labels[i] == 1:
            assert 5 <= int(s.argmax()) < 13
            assert s[5:13].min() > s[20:].max()


# -------------------------------------------------------------------- resume through the train stage


def test_training_resumes_to_the_same_weights_and_clusters(tmp_path, monkeypatch):
    from test_runner import by_stage, make_dataset, make_runner

    manifest = make_dataset(tmp_path / "data")
    # 3-4 clips a video, windows of 2 (so each video has an overlapping end-aligned window): 16 windows,
    # an epoch of 16 steps, so the crash at step 50 resumes mid-epoch from the checkpoint at 40 and
    # re-clusters at 48; the lr drops at step 45
    extra = ["train.method=claws", "train.batch_clips=2", "train.lr=0.01", "train.lr_decay_at=0.75"]
    ref = by_stage(make_runner(manifest, tmp_path / "a", extra).run(["train"]))["train"]
    ref_state = torch.load(ref.path / "model.pt", weights_only=True)["state_dict"]
    assert ref_state["centres"].shape == (8, 2, 16) and ref_state["order"].numel() == 16

    calls = {"n": 0}
    orig = torch.optim.RMSprop.step

    def crashing_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 50:
            raise KeyboardInterrupt
        return orig(self, *a, **k)

    monkeypatch.setattr(torch.optim.RMSprop, "step", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        make_runner(manifest, tmp_path / "b", extra).run(["train"])
    monkeypatch.setattr(torch.optim.RMSprop, "step", orig)
    ckpt = torch.load(next((tmp_path / "b" / "cache" / "train").glob("*/checkpoint.pt")), weights_only=True)
    assert ckpt["step"] == 40 and ckpt["model"]["assign"].numel() > 0

    resumed = by_stage(make_runner(manifest, tmp_path / "b", extra).run(["train"]))["train"]
    state = torch.load(resumed.path / "model.pt", weights_only=True)["state_dict"]
    assert set(state) == set(ref_state)
    for k in ref_state:
        assert torch.equal(ref_state[k], state[k]), k
    rows = (resumed.path / "train_log.csv").read_text().splitlines()
    header = rows[0].split(",")
    cluster = [float(r.split(",")[header.index("cluster")]) for r in rows[1:]]
    assert len(cluster) == 60 and max(cluster) > 0
