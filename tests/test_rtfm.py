"""RTFM (models/rtfm.py): loss terms by hand, MTN shapes, ten-crop batches, training on synthetic bags."""

from __future__ import annotations

import math

import pytest
import torch

from models import DETECTORS, FeatureBank
from models.base import CropsBatch
from models.rtfm import (
    RTFM,
    MultiScaleTemporalNetwork,
    RTFMConfig,
    TemporalSelfAttention,
    feature_magnitude_loss,
    rtfm_losses,
    smoothness_loss,
    sparsity_loss,
    topk_classification_loss,
    topk_indices,
    topk_mean_magnitude,
)

D, S = 24, 32


def bank_with_crops(
    n_videos: int, crops: int, seed: int = 0, planted: tuple[int, int] | None = (10, 14)
) -> FeatureBank:
    """Half anomalous bags (a planted direction in some segments of every crop), the rest noise."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n_videos, crops, S, D, generator=g) * 0.1
    labels = torch.tensor([1, 0] * (n_videos // 2))
    for i in torch.nonzero(labels == 1).flatten().tolist():
        a, b = planted if planted else sorted(torch.randint(0, S, (2,), generator=g).tolist())
        feats[i, :, a : max(b, a + 3), 0] += 2.0
    return FeatureBank(feats, labels, [f"v{i}" for i in range(n_videos)])


# ----------------------------------------------------------------------------------------------- config


def test_registered_with_cited_defaults():
    assert "rtfm" in DETECTORS.list()
    assert DETECTORS.get_class("rtfm") is RTFM
    assert RTFM.input_level == "clips" and RTFM.causal is False
    cfg = RTFMConfig()
    assert cfg.method == "rtfm"
    assert (cfg.iterations, cfg.lr, cfg.weight_decay) == (15000, 1e-3, 5e-3)
    assert (cfg.batch_abnormal, cfg.batch_normal) == (32, 32)
    assert (cfg.k, cfg.margin, cfg.alpha) == (3, 100.0, 1e-4)
    assert (cfg.lambda_smooth, cfg.lambda_sparse) == (8e-4, 8e-3)
    assert cfg.dropout == 0.7 and cfg.magnitude_dropout is None  # None: the same 0.7
    assert cfg.hidden == (512, 128) and cfg.dilations == (1, 2, 4) and cfg.kernel_size == 3
    assert cfg.loss_form == "code"


def test_config_from_cli_settings():
    from pipeline.config import ConfigError, build_config

    cfg = build_config(sets=["train.k=4", "train.loss_form=paper", "train.magnitude_dropout=0.5"], method="rtfm")
    assert isinstance(cfg.train, RTFMConfig)
    assert (cfg.train.k, cfg.train.loss_form, cfg.train.magnitude_dropout) == (4, "paper", 0.5)
    with pytest.raises(ConfigError):
        build_config(sets=["train.loss_form=neither"], method="rtfm")
    for bad in ({"k": 0}, {"dropout": 1.0}, {"magnitude_dropout": -0.1}, {"kernel_size": 2}, {"dilations": ()}):
        with pytest.raises(ValueError):
            RTFMConfig(**bad).validate()


# ----------------------------------------------------------------------------------------------- losses


def test_topk_selection_averages_crops_and_applies_the_keep_mask():
    mags = torch.tensor([[[1.0, 4.0, 2.0, 8.0], [3.0, 2.0, 0.0, 4.0]]])  # [V=1, C=2, S=4]; crop mean [2, 3, 1, 6]
    idx = topk_indices(mags, 2)
    assert sorted(idx[0].tolist()) == [1, 3]
    # g per crop (Eq. 2 on the shared snippets): crop 0 (4 + 8) / 2, crop 1 (2 + 4) / 2
    assert topk_mean_magnitude(mags, idx).tolist() == [[6.0, 3.0]]
    # snippet 3 dropped, the rest kept at 1/(1-p) = 2: ranking [4, 6, 2, 0]
    keep = torch.tensor([[2.0, 2.0, 2.0, 0.0]])
    assert sorted(topk_indices(mags, 2, keep)[0].tolist()) == [0, 1]
    assert topk_indices(mags, 10).shape == (1, 4)  # k clamped to S


def test_feature_magnitude_loss_by_hand():
    ga, gn = torch.tensor([98.0, 103.0]), torch.tensor([1.0, 2.0])
    # code form: mean((|m - g+| + g-)^2) = ((2 + 1)^2 + (3 + 2)^2) / 2
    assert feature_magnitude_loss(ga, gn, 100.0, "code").item() == pytest.approx((9 + 25) / 2)
    # Eq. 6: mean(max(0, m - (g+ - g-))) = (max(0, 100 - 97) + max(0, 100 - 101)) / 2
    assert feature_magnitude_loss(ga, gn, 100.0, "paper").item() == pytest.approx(1.5)
    with pytest.raises(ValueError):
        feature_magnitude_loss(ga, gn, 100.0, "other")


def test_classification_loss_by_hand():
    topk = torch.tensor([[0.5, 0.7, 0.9], [0.1, 0.2, 0.3]])
    labels = torch.tensor([1, 0])
    # code: BCE of the top-k mean score, averaged over videos: (-log 0.7 - log(1 - 0.2)) / 2
    want = (-math.log(0.7) - math.log(0.8)) / 2
    assert topk_classification_loss(topk, labels, "code").item() == pytest.approx(want, rel=1e-6)
    # Eq. 7: BCE summed over the k snippets, averaged over videos
    want = (-(math.log(0.5) + math.log(0.7) + math.log(0.9)) - (math.log(0.9) + math.log(0.8) + math.log(0.7))) / 2
    assert topk_classification_loss(topk, labels, "paper").item() == pytest.approx(want, rel=1e-6)


def test_smoothness_and_sparsity_by_hand():
    s = torch.tensor([[0.1, 0.5, 0.2], [0.0, 0.0, 1.0]])
    # per video: 0.4^2 + 0.3^2 = 0.25 and 0 + 1 = 1; no difference across the two videos' boundary
    assert smoothness_loss(s, 0.5, "code").item() == pytest.approx(0.5 * 1.25)
    assert smoothness_loss(s, 0.5, "paper").item() == pytest.approx(0.5 * 0.625)
    s = torch.tensor([[0.3, 0.4], [0.0, 0.0]])
    assert sparsity_loss(s, 0.5, "code").item() == pytest.approx(0.5 * 0.5)  # L2 norm of all scores
    assert sparsity_loss(s, 0.5, "paper").item() == pytest.approx(0.5 * 0.35)  # mean per-video L1


def test_rtfm_losses_combine_the_terms():
    cfg = RTFMConfig(k=1, margin=10.0, alpha=0.1, lambda_smooth=1.0, lambda_sparse=1.0)
    # 2 videos (anomalous, normal) x 2 crops x 3 snippets
    mags = torch.tensor([[[1.0, 9.0, 2.0], [3.0, 7.0, 1.0]], [[2.0, 1.0, 1.0], [4.0, 1.0, 0.0]]])
    scores = torch.tensor([[0.2, 0.8, 0.4], [0.6, 0.3, 0.1]])
    labels = torch.tensor([1, 0])
    idx = topk_indices(mags, cfg.k)
    assert idx.tolist() == [[1], [0]]  # crop means [2, 8, 1.5] and [3, 1, 0.5]
    t = rtfm_losses(mags, scores, labels, idx, cfg)
    # magnitude pairs crop by crop: (|10 - 9| + 2)^2 = 9 and (|10 - 7| + 4)^2 = 49
    assert t["magnitude"].item() == pytest.approx(0.1 * (9 + 49) / 2)
    assert t["classification"].item() == pytest.approx((-math.log(0.8) - math.log(0.4)) / 2, rel=1e-6)
    # regularisers on the anomalous video only
    assert t["smooth"].item() == pytest.approx(0.6**2 + 0.4**2)
    assert t["sparse"].item() == pytest.approx(math.sqrt(0.2**2 + 0.8**2 + 0.4**2))
    parts = sum(t[k].item() for k in ("classification", "magnitude", "smooth", "sparse"))
    assert t["total"].item() == pytest.approx(parts)
    assert t["mag_abnormal"].item() == pytest.approx(8.0) and t["mag_normal"].item() == pytest.approx(3.0)


# ----------------------------------------------------------------------------------------------- network


@pytest.mark.parametrize("t", [1, 2, 3, 4, 5, 32, 100])
def test_mtn_keeps_shape_for_any_length(t):
    torch.manual_seed(0)
    mtn = MultiScaleTemporalNetwork(D)  # D/4 = 6 channels per branch
    x = torch.randn(3, t, D)
    assert mtn(x).shape == (3, t, D)
    model = RTFM(D, RTFMConfig())
    assert model(x).shape == (3, t)
    assert model.score(x).shape == (t,)


def test_mtn_rejects_a_dimension_it_cannot_split():
    with pytest.raises(ValueError, match="divisible"):
        MultiScaleTemporalNetwork(30)


def test_attention_orders_agree():
    """T <= width builds the T x T map, T > width multiplies in the other order: same result."""
    torch.manual_seed(0)
    tsa = TemporalSelfAttention(8, 4).double()
    f = torch.randn(2, 8, 7, dtype=torch.float64)  # T = 7 > width 4
    fc = torch.relu(tsa.reduce(f))
    q, k, v = tsa.query(fc), tsa.key(fc), tsa.value(fc)
    m = q.transpose(1, 2) @ k / 7  # [B, T, T]
    want = tsa.out((m @ v.transpose(1, 2)).transpose(1, 2)) + fc
    assert torch.allclose(tsa(f), want)
    f = torch.randn(2, 8, 3, dtype=torch.float64)  # T = 3 <= width
    fc = torch.relu(tsa.reduce(f))
    q, k, v = tsa.query(fc), tsa.key(fc), tsa.value(fc)
    want = tsa.out(((q.transpose(1, 2) @ k / 3) @ v.transpose(1, 2)).transpose(1, 2)) + fc
    assert torch.allclose(tsa(f), want)


def test_not_causal_attention_sees_later_clips():
    torch.manual_seed(0)
    model = RTFM(D, RTFMConfig()).eval()
    x = torch.randn(1, 10, D)
    y = x.clone()
    y[0, 9] += 5.0
    assert not torch.allclose(model(x)[0, :5], model(y)[0, :5])


# ----------------------------------------------------------------------------------------------- crops


def test_sample_batch_takes_all_ten_crops():
    bank = bank_with_crops(8, 10)
    cfg = RTFMConfig(batch_abnormal=3, batch_normal=2)
    model = RTFM(D, cfg)
    batch = model.sample_batch(bank, torch.Generator().manual_seed(0))
    assert isinstance(batch, CropsBatch) and batch.crops == 10
    assert batch.abnormal.shape == (30, S, D) and batch.normal.shape == (20, S, D)
    # video-major rows: each block of 10 rows is one video's 10 crops, in order
    for rows, want_label in ((batch.abnormal, 1), (batch.normal, 0)):
        for v in rows.view(-1, 10, S, D):
            match = [i for i in range(8) if torch.equal(bank.features[i], v)]
            assert len(match) == 1 and bank.labels[match[0]].item() == want_label
    terms = model.losses(batch)
    assert torch.isfinite(terms["total"])


def test_identical_crops_give_the_single_crop_losses():
    """Magnitudes, top-k and scores are crop averages: ten copies of one crop change nothing."""
    torch.manual_seed(0)
    bank1 = bank_with_crops(4, 1)
    bank10 = FeatureBank(bank1.features.expand(-1, 10, -1, -1).contiguous(), bank1.labels, bank1.ids)
    model = RTFM(D, RTFMConfig(batch_abnormal=2, batch_normal=2)).eval()  # eval: no dropout anywhere
    t1 = model.losses(model.sample_batch(bank1, torch.Generator().manual_seed(3)))
    t10 = model.losses(model.sample_batch(bank10, torch.Generator().manual_seed(3)))
    for k in ("classification", "magnitude", "smooth", "sparse", "total"):
        assert t10[k].item() == pytest.approx(t1[k].item(), rel=1e-5), k


def test_crop_scores_averaged_at_test_time():
    torch.manual_seed(0)
    model = RTFM(D, RTFMConfig())
    bags = torch.randn(10, 7, D)  # [C, T, D]
    model.eval()
    assert torch.allclose(model.score(bags), model(bags).mean(0))


# ----------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("loss_form", ["code", "paper"])
def test_trains_on_a_tiny_synthetic_dataset(loss_form):
    """Default dropout (0.7, also on magnitudes), 3 crops, anomalies at random places; held-out videos."""
    torch.manual_seed(0)
    train = bank_with_crops(12, 3, seed=1, planted=None)
    test = bank_with_crops(8, 3, seed=2, planted=None)
    cfg = RTFMConfig(batch_abnormal=4, batch_normal=4, hidden=(32, 16), loss_form=loss_form)
    model = RTFM(D, cfg)
    opt = model.make_optimizer()
    gen = torch.Generator().manual_seed(0)
    first = None
    for _ in range(200):
        terms = model.losses(model.sample_batch(train, gen))
        opt.zero_grad()
        terms["total"].backward()
        opt.step()
        if first is None:
            first = {k: v.item() for k, v in terms.items()}
    assert terms["classification"].item() < first["classification"]
    assert terms["mag_abnormal"].item() > terms["mag_normal"].item()  # magnitudes separated (Sec. 3.3)
    top = torch.stack([model.score(test.features[i]).max() for i in range(len(test.ids))])
    assert top[test.labels == 1].min() > top[test.labels == 0].max()  # held-out videos ranked apart


def test_code_form_magnitude_is_the_norm_of_the_mean_topk_feature():
    from models.rtfm import topk_feature_norm

    # one video, one crop, 3 snippets of 2-D features; top-2 = snippets 0 and 2
    feats = torch.tensor([[[[3.0, 0.0], [0.0, 1.0], [0.0, 4.0]]]])
    idx = torch.tensor([[0, 2]])
    # mean of (3,0) and (0,4) is (1.5, 2) whose norm is 2.5; the mean of the norms would be 3.5
    assert topk_feature_norm(feats, idx).item() == pytest.approx(2.5)
