"""NG-MIL (models/ngmil.py): loss terms by hand, k-means and prototype buffers, ten-crop batches, resume."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models import DETECTORS, FeatureBank
from models.base import CropsBatch
from models.kmeans import kmeans
from models.ngmil import (
    NGMIL,
    NGMILConfig,
    TemporalEncoder,
    cosine_similarities,
    ng_mil_ranking_loss,
    ngmil_losses,
    normality_clustering_loss,
    normality_triplet_loss,
    similarity_anomaly_score,
    smoothness_loss,
    sparsity_loss,
    update_prototypes,
)

D, S = 24, 32


def small_cfg(**over) -> NGMILConfig:
    base = dict(batch_abnormal=2, batch_normal=2, proto_dim=16, prototypes=8, hidden=(32, 16))
    base.update(over)
    return NGMILConfig(**base)


def bank_with_crops(n_videos: int, crops: int, seed: int = 0) -> FeatureBank:
    """Half anomalous bags (segments 10-13 shifted along one direction in every crop), the rest noise."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n_videos, crops, S, D, generator=g) * 0.1
    labels = torch.tensor([1, 0] * (n_videos // 2))
    feats[labels == 1, :, 10:14, 0] += 2.0
    return FeatureBank(feats, labels, [f"v{i}" for i in range(n_videos)])


# ----------------------------------------------------------------------------------------------- config


def test_registered_with_cited_defaults():
    assert DETECTORS.get_class("ng_mil") is NGMIL
    assert NGMIL.input_level == "segments" and NGMIL.causal is False
    cfg = NGMILConfig()
    assert cfg.method == "ng_mil"
    assert (cfg.lr, cfg.weight_decay, cfg.batch_abnormal, cfg.batch_normal) == (1e-3, 5e-4, 32, 32)
    assert cfg.iterations == 15000 and cfg.crops == "all"
    assert cfg.hidden == (512, 128) and cfg.dropout == 0.7
    assert (cfg.prototypes, cfg.momentum, cfg.temperature, cfg.margin, cfg.k) == (64, 0.1, 0.5, 8.0, 3)
    assert (cfg.tau, cfg.gamma, cfg.rho, cfg.reg_reduction) == (0.1, 0.1, 0.5, "mean")
    assert (cfg.encoder_layers, cfg.encoder_width, cfg.kernel_size, cfg.encoder_residual) == (2, 0, 3, True)
    assert cfg.proto_dim == 512 and cfg.rerank == "both"


def test_config_from_cli_settings_and_validation():
    from pipeline.core.config import ConfigError
    from stages.config import build_config

    cfg = build_config(sets=["train.prototypes=32", "train.crops=one", "train.rerank=mil"], method="ng_mil")
    assert isinstance(cfg.train, NGMILConfig)
    assert (cfg.train.prototypes, cfg.train.crops, cfg.train.rerank) == (32, "one", "mil")
    with pytest.raises(ConfigError):
        build_config(sets=["train.reg_reduction=max"], method="ng_mil")
    bad = ({"k": 0}, {"prototypes": 0}, {"momentum": 0.0}, {"temperature": 0.0}, {"margin": -1.0},
           {"dropout": 1.0}, {"kernel_size": 2}, {"proto_dim": 0}, {"encoder_layers": 0}, {"hidden": ()})
    for b in bad:
        with pytest.raises(ValueError):
            NGMILConfig(**b).validate()
    with pytest.raises(ValueError, match="residual"):
        NGMIL(D, NGMILConfig(encoder_width=D + 1))
    NGMIL(D, NGMILConfig(encoder_width=D + 1, encoder_residual=False))  # fine without the residual


# ----------------------------------------------------------------------------------------------- k-means


def test_kmeans_recovers_separated_clusters_deterministically():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[10.0, 0.0], [0.0, 10.0], [-10.0, -10.0]])
    x = torch.cat([c + 0.1 * torch.randn(50, 2, generator=g) for c in centres])
    want = np.stack([x[i * 50 : (i + 1) * 50].numpy().mean(0) for i in range(3)])  # blob means (numpy)
    got = kmeans(x, 3, gen=torch.Generator().manual_seed(1))[1]
    order = [int(np.argmin(((got.numpy() - w) ** 2).sum(1))) for w in want]
    assert sorted(order) == [0, 1, 2]
    np.testing.assert_allclose(got.numpy()[order], want, atol=1e-5)
    assert torch.equal(got, kmeans(x, 3, gen=torch.Generator().manual_seed(1))[1])  # same seed, same centres
    # fewer distinct points than centres: every point becomes a centre, the rest repeat them
    few = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    c = kmeans(few, 4, gen=torch.Generator().manual_seed(0))[1]
    assert c.shape == (4, 2) and {tuple(r) for r in c.tolist()} == {(0.0, 1.0), (1.0, 0.0)}


# ----------------------------------------------------------------------------------------------- scores


def test_similarity_anomaly_score_by_hand():
    f = torch.tensor([[3.0, 4.0], [0.0, 2.0], [-1.0, 0.0]])
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # cosines: [0.6, 0.8], [0, 1], [-1, 0]; attention softmax(s / 0.5)
    want = []
    for s in ([0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]):
        w = np.exp(np.array(s) / 0.5)
        w /= w.sum()
        want.append(1.0 - max(0.0, float((w * np.array(s)).sum())))
    got = similarity_anomaly_score(f, p, 0.5)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)
    assert got[2].item() == pytest.approx(1.0)  # all-negative cosines: ReLU(g) = 0, a = 1
    # every cosine -1: a stays in [0, 1]
    opposite = similarity_anomaly_score(torch.tensor([[-1.0, 0.0]]), torch.tensor([[1.0, 0.0], [2.0, 0.0]]), 0.5)
    assert opposite.item() == 1.0
    assert cosine_similarities(torch.zeros(1, 2), p).abs().sum() == 0  # zero vector: similarity 0


def test_forward_is_the_mean_of_the_two_classifiers_and_in_range():
    torch.manual_seed(0)
    model = NGMIL(D, small_cfg()).eval()
    x = torch.randn(3, S, D) * 5
    f = model.features(x)
    alpha = model.mil_score(f)
    a = similarity_anomaly_score(model.project(f), model.prototypes, 0.5)
    r = model(x)
    assert torch.allclose(r, (alpha + a) / 2)
    assert r.shape == (3, S) and ((r >= 0) & (r <= 1)).all()
    m = NGMIL(D, small_cfg(rerank="similarity")).eval()
    m.load_state_dict(model.state_dict())
    assert torch.allclose(m(x), a)
    m = NGMIL(D, small_cfg(rerank="mil")).eval()
    m.load_state_dict(model.state_dict())
    assert torch.allclose(m(x), alpha)


def test_encoder_keeps_length_is_residual_and_not_causal():
    torch.manual_seed(0)
    enc = TemporalEncoder(D, D, layers=2, kernel_size=3, residual=True)
    for t in (1, 2, 5, 32):
        assert enc(torch.randn(2, t, D)).shape == (2, t, D)
    x = torch.randn(1, 8, D)
    h = x.transpose(1, 2)
    for conv in enc.convs:
        h = torch.relu(conv(h))
    assert torch.allclose(enc(x), h.transpose(1, 2) + x)
    y = x.clone()
    y[0, 5] += 3.0  # a later segment changes an earlier one's feature: receptive field 5
    assert not torch.allclose(enc(x)[0, 4], enc(y)[0, 4]) and not torch.allclose(enc(x)[0, 3], enc(y)[0, 3])
    assert torch.allclose(enc(x)[0, :3], enc(y)[0, :3])


# ----------------------------------------------------------------------------------------------- losses


def test_ranking_loss_by_hand():
    a = torch.tensor([[0.9, 0.1, 0.8, 0.7], [1.0, 1.0, 1.0, 0.0]])
    n = torch.tensor([[0.2, 0.6, 0.1, 0.3], [0.0, 0.0, 0.0, 0.0]])
    # pair 0: 1 - (0.9 + 0.8) / 2 + (0.6 + 0.3) / 2 = 0.6; pair 1: 1 - 1 + 0 = 0
    assert ng_mil_ranking_loss(a, n, 2).item() == pytest.approx(0.3)
    # k larger than S is clamped; an extra unpaired anomalous bag is ignored
    assert ng_mil_ranking_loss(a[:1], n[:1], 10).item() == pytest.approx(1 - 2.5 / 4 + 1.2 / 4)
    assert ng_mil_ranking_loss(a, n[:1], 2).item() == pytest.approx(0.6)


def test_clustering_loss_by_hand():
    f = torch.tensor([[[1.0, 1.0], [4.0, 0.0]], [[0.0, -2.0], [3.0, 3.0]]])  # [2 bags, 2 segments, 2]
    p = torch.tensor([[0.0, 0.0], [3.0, 0.0]])
    # nearest squared distances: 2 (p0), 1 (p1), 4 (p0), 9 (p1)
    assert normality_clustering_loss(f, p).item() == pytest.approx((2 + 1 + 4 + 9) / 4)


def test_triplet_loss_by_hand():
    # one video, one crop, 4 segments of 2-D features; scores rank segments 2, 0 (top-2) and 1, 3 (bottom-2)
    f = torch.tensor([[[[2.0, 2.0], [0.0, 1.0], [5.0, 0.0], [2.0, -1.0]]]])
    scores = torch.tensor([[0.8, 0.1, 0.9, 0.3]])
    p = torch.tensor([[0.0, 0.0], [3.0, 0.0]])
    # pseudo normal (0, 1): nearest prototype p0 (d 1), anchor p0; top-2 distances to p0: 25, 8 -> 8
    #   term 1 - 8 + m; pseudo normal (2, -1): nearest p1 (d 2); top-2 to p1: 4, 5 -> 4; term 2 - 4 + m
    for margin, want in ((8.0, ((1 - 8 + 8) + (2 - 4 + 8)) / 2), (3.0, (0 + 1) / 2), (0.0, 0.0)):
        assert normality_triplet_loss(f, scores, p, 2, margin).item() == pytest.approx(want)
    # gradients reach the pseudo-normal and the hardest pseudo-abnormal features, not the others
    fg = f.clone().requires_grad_(True)
    normality_triplet_loss(fg, scores, p, 2, 8.0).backward()
    touched = fg.grad[0, 0].abs().sum(-1) > 0
    assert touched.tolist() == [True, True, True, True]
    fg.grad = None
    # top-1 = seg 2 (d 25 to p0), bottom-1 = seg 1: [1 - 25 + 30]_+ = 6
    loss = normality_triplet_loss(fg, scores, p, 1, 30.0)
    assert loss.item() == pytest.approx(6.0)
    loss.backward()
    assert (fg.grad[0, 0].abs().sum(-1) > 0).tolist() == [False, True, True, False]


def test_smoothness_and_sparsity_by_hand():
    r = torch.tensor([[0.1, 0.5, 0.2, 0.2], [0.0, 0.0, 1.0, 1.0]])
    # squared differences: 0.16 + 0.09 + 0 = 0.25 and 0 + 1 + 0 = 1
    assert smoothness_loss(r, "sum").item() == pytest.approx((0.25 + 1) / 2)
    assert smoothness_loss(r, "mean").item() == pytest.approx((0.25 / 3 + 1 / 3) / 2)
    assert sparsity_loss(r, "sum").item() == pytest.approx((1.0 + 2.0) / 2)
    assert sparsity_loss(r, "mean").item() == pytest.approx((0.25 + 0.5) / 2)
    assert smoothness_loss(torch.tensor([[0.4]])).item() == 0.0  # one segment: nothing to smooth


def test_total_loss_weights_every_term():
    cfg = NGMILConfig(k=1, tau=0.5, gamma=2.0, rho=0.25, margin=8.0)
    scores = torch.tensor([[0.2, 0.9], [0.3, 0.1]])  # video 0 anomalous, video 1 normal
    feats = torch.tensor([[[[1.0, 0.0], [4.0, 0.0]]], [[[0.0, 1.0], [2.0, 0.0]]]])  # [V=2, C=1, S=2, 2]
    labels = torch.tensor([1, 0])
    p = torch.tensor([[0.0, 0.0]])
    t = ngmil_losses(scores, feats, labels, p, cfg)
    assert t["ranking"].item() == pytest.approx(1 - 0.9 + 0.3)
    assert t["clustering"].item() == pytest.approx(0.5 * (1 + 4) / 2)  # the normal video's features only
    # pseudo normal: seg 0 (1, 0), d 1 to p0; pseudo abnormal: seg 1 (4, 0), d 16: [1 - 16 + 8]_+ = 0
    assert t["triplet"].item() == pytest.approx(0.0)
    assert t["smooth"].item() == pytest.approx(0.25 * 0.7**2)  # anomalous video only, mean over 1 pair
    assert t["sparse"].item() == pytest.approx(0.25 * 0.55)
    parts = sum(t[k].item() for k in ("ranking", "clustering", "triplet", "smooth", "sparse"))
    assert t["total"].item() == pytest.approx(parts)


# ----------------------------------------------------------------------------------------------- prototypes


def test_update_prototypes_by_hand():
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    f = torch.tensor([[2.0, 0.1], [3.0, -0.1], [0.1, 5.0]])  # most similar: p0, p0, p1; p2 gets nothing
    got = update_prototypes(p, f, 0.1)
    want = torch.tensor([[0.9 + 0.1 * 2.5, 0.0], [0.1 * 0.1, 0.9 + 0.1 * 5.0], [-1.0, 0.0]])
    assert torch.allclose(got, want)


def test_setup_runs_kmeans_on_all_crops_of_normal_videos_only():
    torch.manual_seed(0)
    bank = bank_with_crops(6, 3)
    model = NGMIL(D, small_cfg())
    assert not bool(model.proto_ready)
    model.setup(bank, torch.Generator().manual_seed(5))
    assert bool(model.proto_ready)
    with torch.no_grad():  # independently: the projected features of the 3 normal videos x 3 crops x 32 segments
        x = bank.features[bank.labels == 0].reshape(-1, S, D)
        proj = model.project(model.features(x)).reshape(-1, model.cfg.proto_dim)
    assert proj.shape[0] == 3 * 3 * S
    assert torch.allclose(model.prototypes, kmeans(proj, 8, gen=torch.Generator().manual_seed(5), iters=model.cfg.kmeans_iters, tol=model.cfg.kmeans_tol)[1])
    # each prototype is the mean of the points nearest to it (a Lloyd fixed point)
    assign = torch.cdist(proj, model.prototypes).argmin(1)
    for m in assign.unique():
        assert torch.allclose(model.prototypes[m], proj[assign == m].mean(0), atol=1e-5)
    # anomalous videos play no part; a normal video's third crop does
    before = model.prototypes.clone()
    changed = FeatureBank(bank.features.clone(), bank.labels, bank.ids)
    changed.features[bank.labels == 1] += 5.0
    model.setup(changed, torch.Generator().manual_seed(5))
    assert torch.equal(model.prototypes, before)
    changed.features[1, 2] += 5.0  # video 1 is normal
    model.setup(changed, torch.Generator().manual_seed(5))
    assert not torch.equal(model.prototypes, before)
    # setup_chunk does not change the result
    other = NGMIL(D, small_cfg(setup_chunk=1))
    other.load_state_dict(model.state_dict())
    other.setup(bank, torch.Generator().manual_seed(5))
    model.setup(bank, torch.Generator().manual_seed(5))
    assert torch.allclose(other.prototypes, model.prototypes, atol=1e-6)


def test_losses_update_prototypes_from_normal_bags_in_training_only():
    torch.manual_seed(0)
    bank = bank_with_crops(4, 1)
    model = NGMIL(D, small_cfg(crops="one"))
    model.setup(bank, torch.Generator().manual_seed(0))
    batch = model.sample_batch(bank, torch.Generator().manual_seed(1))
    p0 = model.prototypes.clone()
    with torch.no_grad():
        model(batch.abnormal)  # forward never updates
    assert torch.equal(model.prototypes, p0)
    model.eval()
    model.losses(batch)  # eval: no update
    assert torch.equal(model.prototypes, p0)
    model.train()
    terms = model.losses(batch)
    terms["total"].backward()  # the in-place update does not break autograd
    assert not model.prototypes.requires_grad
    with torch.no_grad():
        normal_proj = model.project(model.features(batch.normal)).reshape(-1, model.cfg.proto_dim)
    assert torch.allclose(model.prototypes, update_prototypes(p0, normal_proj, 0.1))
    assert not torch.equal(model.prototypes, p0)
    # the anomalous bags do not move the prototypes
    model.prototypes.copy_(p0)
    other = CropsBatch(abnormal=batch.abnormal + 3.0, normal=batch.normal)
    model.losses(other)
    assert torch.allclose(model.prototypes, update_prototypes(p0, normal_proj, 0.1))


def test_prototypes_initialised_from_the_first_batch_without_setup(caplog):
    torch.manual_seed(0)
    bank = bank_with_crops(4, 1)
    model = NGMIL(D, small_cfg())
    terms = model.losses(model.sample_batch(bank, torch.Generator().manual_seed(0)))
    assert torch.isfinite(terms["total"]) and bool(model.proto_ready)
    assert "not initialised" in caplog.text


def test_buffers_survive_a_state_dict_round_trip():
    torch.manual_seed(0)
    bank = bank_with_crops(4, 2)
    model = NGMIL(D, small_cfg())
    model.setup(bank, torch.Generator().manual_seed(0))
    state = model.state_dict()
    assert "prototypes" in state and "proto_ready" in state
    torch.manual_seed(1)
    fresh = NGMIL(D, small_cfg())
    fresh.load_state_dict(state)
    assert torch.equal(fresh.prototypes, model.prototypes) and bool(fresh.proto_ready)
    assert torch.equal(fresh.score(bank.features[0]), model.score(bank.features[0]))


# ----------------------------------------------------------------------------------------------- crops


def test_sample_batch_takes_all_crops_and_keeps_them_through_to():
    bank = bank_with_crops(8, 10)
    model = NGMIL(D, small_cfg(batch_abnormal=3, batch_normal=2))
    batch = model.sample_batch(bank, torch.Generator().manual_seed(0))
    assert isinstance(batch, CropsBatch) and batch.crops == 10
    assert batch.abnormal.shape == (30, S, D) and batch.normal.shape == (20, S, D)
    for rows, want_label in ((batch.abnormal, 1), (batch.normal, 0)):
        for v in rows.view(-1, 10, S, D):  # video-major rows
            match = [i for i in range(8) if torch.equal(bank.features[i], v)]
            assert len(match) == 1 and bank.labels[match[0]].item() == want_label
    moved = batch.to("cpu")
    assert isinstance(moved, CropsBatch) and moved.crops == 10
    one = NGMIL(D, small_cfg(crops="one")).sample_batch(bank, torch.Generator().manual_seed(0))
    assert one.abnormal.shape == (2, S, D) and getattr(one, "crops", 1) == 1


def test_identical_crops_give_the_single_crop_losses():
    torch.manual_seed(0)
    bank1 = bank_with_crops(4, 1)
    bank10 = FeatureBank(bank1.features.expand(-1, 10, -1, -1).contiguous(), bank1.labels, bank1.ids)
    model = NGMIL(D, small_cfg())
    model.setup(bank1, torch.Generator().manual_seed(0))
    model.eval()  # no dropout, no prototype update
    t1 = model.losses(model.sample_batch(bank1, torch.Generator().manual_seed(3)))
    t10 = model.losses(model.sample_batch(bank10, torch.Generator().manual_seed(3)))
    for k in ("ranking", "clustering", "triplet", "smooth", "sparse", "total"):
        assert t10[k].item() == pytest.approx(t1[k].item(), rel=1e-5, abs=1e-7), k


# ----------------------------------------------------------------------------------------------- training


def test_trains_on_ten_crop_bags_and_ranks_held_out_videos():
    torch.manual_seed(0)
    train, test = bank_with_crops(8, 3, seed=1), bank_with_crops(6, 3, seed=2)
    model = NGMIL(D, small_cfg(batch_abnormal=4, batch_normal=4))
    gen = torch.Generator().manual_seed(0)
    model.setup(train, gen)
    opt = model.make_optimizer()
    first = None
    for _ in range(150):
        terms = model.losses(model.sample_batch(train, gen))
        opt.zero_grad()
        terms["total"].backward()
        opt.step()
        first = first or terms["ranking"].item()
    assert terms["ranking"].item() < first
    top = torch.stack([model.score(test.features[i]).max() for i in range(len(test.ids))])
    assert top[test.labels == 1].min() > top[test.labels == 0].max()
    s = model.score(test.features[0])  # anomalous: its top segment is a planted one
    assert 10 <= int(s.argmax()) < 14


def test_training_resumes_to_the_same_weights_and_prototypes(tmp_path, monkeypatch):
    from test_runner import by_stage, make_dataset, make_runner

    data = make_dataset(tmp_path / "data")
    extra = ["train.method=ng_mil", "train.proto_dim=8", "train.prototypes=4", "train.lr=0.001"]
    ref = by_stage(make_runner(data, tmp_path / "a", extra).run(["train"]))["train"]
    ref_state = torch.load(ref.path / "model.pt", weights_only=True)["state_dict"]
    assert bool(ref_state["proto_ready"])

    calls = {"n": 0}
    orig = torch.optim.Adam.step

    def crashing_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 50:
            raise KeyboardInterrupt
        return orig(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        make_runner(data, tmp_path / "b", extra).run(["train"])
    monkeypatch.setattr(torch.optim.Adam, "step", orig)
    ckpt = next((tmp_path / "b" / "cache" / "train").glob("*/checkpoint.pt"))
    saved = torch.load(ckpt, weights_only=True)
    assert saved["step"] == 40 and "prototypes" in saved["model"]

    resumed = by_stage(make_runner(data, tmp_path / "b", extra).run(["train"]))["train"]
    state = torch.load(resumed.path / "model.pt", weights_only=True)["state_dict"]
    assert set(state) == set(ref_state)
    for k in ref_state:
        assert torch.equal(ref_state[k], state[k]), k
    assert not torch.equal(saved["model"]["prototypes"], state["prototypes"])  # they kept moving after step 40
    assert math.isfinite(float(resumed.summary["final_loss"]))
