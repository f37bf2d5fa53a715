"""RTFM (models/rtfm.py): the official network (github.com/tianyu0207/RTFM, model.py) parameter for
parameter, strict loading of official state dicts, loss terms by hand on batches of the published
size (32 + 32 videos x 10 crops x 32 segments), the official loaders' batches, and evaluating /
scoring with an official checkpoint through the pipeline (``train.checkpoint``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from models import DETECTORS, FeatureBank
from models.base import CropsBatch, loader_draw
from models.rtfm import (
    RTFM,
    NonLocalBlock1D,
    RTFMConfig,
    feature_magnitude_loss,
    rtfm_losses,
    smoothness_loss,
    sparsity_loss,
    topk_classification_loss,
    topk_feature_norm,
    topk_indices,
    topk_mean_magnitude,
)

D, S = 24, 32

#: every key of the official ``Model(2048, 32).state_dict()`` and its shape, read from the official
#: model.py (Aggregate: conv_1..conv_3 = Conv1d + ReLU + BatchNorm1d, conv_4 = Conv1d (no bias) +
#: ReLU, conv_5 = Conv1d (no bias) + ReLU + BatchNorm1d, non_local = _NonLocalBlockND with g, W =
#: (Conv1d, BatchNorm1d), theta, phi; Model: fc1, fc2, fc3). Written out so that a renamed module
#: fails here.
OFFICIAL_KEYS: dict[str, tuple[int, ...]] = {}
for _i in (1, 2, 3):
    OFFICIAL_KEYS.update({
        f"Aggregate.conv_{_i}.0.weight": (512, 2048, 3), f"Aggregate.conv_{_i}.0.bias": (512,),
        f"Aggregate.conv_{_i}.2.weight": (512,), f"Aggregate.conv_{_i}.2.bias": (512,),
        f"Aggregate.conv_{_i}.2.running_mean": (512,), f"Aggregate.conv_{_i}.2.running_var": (512,),
        f"Aggregate.conv_{_i}.2.num_batches_tracked": (),
    })
OFFICIAL_KEYS.update({
    "Aggregate.conv_4.0.weight": (512, 2048, 1),
    "Aggregate.conv_5.0.weight": (2048, 2048, 3),
    "Aggregate.conv_5.2.weight": (2048,), "Aggregate.conv_5.2.bias": (2048,),
    "Aggregate.conv_5.2.running_mean": (2048,), "Aggregate.conv_5.2.running_var": (2048,),
    "Aggregate.conv_5.2.num_batches_tracked": (),
    "Aggregate.non_local.g.weight": (256, 512, 1), "Aggregate.non_local.g.bias": (256,),
    "Aggregate.non_local.W.0.weight": (512, 256, 1), "Aggregate.non_local.W.0.bias": (512,),
    "Aggregate.non_local.W.1.weight": (512,), "Aggregate.non_local.W.1.bias": (512,),
    "Aggregate.non_local.W.1.running_mean": (512,), "Aggregate.non_local.W.1.running_var": (512,),
    "Aggregate.non_local.W.1.num_batches_tracked": (),
    "Aggregate.non_local.theta.weight": (256, 512, 1), "Aggregate.non_local.theta.bias": (256,),
    "Aggregate.non_local.phi.weight": (256, 512, 1), "Aggregate.non_local.phi.bias": (256,),
    "fc1.weight": (512, 2048), "fc1.bias": (512,),
    "fc2.weight": (128, 512), "fc2.bias": (128,),
    "fc3.weight": (1, 128), "fc3.bias": (1,),
})


def official_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict laid out as the official ``Model(2048, 32)``'s: each float tensor filled with its
    own value (so a tensor loaded into the wrong place shows), counters as int64."""
    out = {}
    for i, (k, shape) in enumerate(OFFICIAL_KEYS.items()):
        if k.endswith("num_batches_tracked"):
            out[k] = torch.tensor(1000 + i)
        else:
            out[k] = torch.full(shape, 0.001 * (i + 1) + seed)
    return out


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
    assert RTFM.input_level == "clips" and RTFM.causal is False and RTFM.version >= 2
    cfg = RTFMConfig()
    assert cfg.method == "rtfm"
    assert (cfg.iterations, cfg.lr, cfg.weight_decay) == (15000, 1e-3, 5e-3)
    assert (cfg.batch_abnormal, cfg.batch_normal) == (32, 32)
    assert (cfg.k, cfg.margin, cfg.alpha) == (3, 100.0, 1e-4)
    assert (cfg.lambda_smooth, cfg.lambda_sparse) == (8e-4, 8e-3)
    assert cfg.dropout == 0.7 and cfg.magnitude_dropout is None  # None: the same 0.7
    assert cfg.loss_form == "code" and cfg.checkpoint == ""
    # the paper-network settings are gone: the official network has fixed widths
    for gone in ("hidden", "dilations", "kernel_size"):
        assert not hasattr(cfg, gone)


def test_config_from_cli_settings():
    from pipeline.core.config import ConfigError, key_fields
    from stages.config import build_config

    cfg = build_config(sets=["train.k=4", "train.loss_form=paper", "train.magnitude_dropout=0.5"], method="rtfm")
    assert isinstance(cfg.train, RTFMConfig)
    assert (cfg.train.k, cfg.train.loss_form, cfg.train.magnitude_dropout) == (4, "paper", 0.5)
    assert "checkpoint" not in key_fields(cfg.train)  # the file's sha256 keys the cache, not its path
    with pytest.raises(ConfigError):
        build_config(sets=["train.loss_form=neither"], method="rtfm")
    with pytest.raises(ConfigError):
        build_config(sets=["train.dilations=[1,2]"], method="rtfm")
    for bad in ({"k": 0}, {"dropout": 1.0}, {"magnitude_dropout": -0.1}, {"margin": 0.0}):
        with pytest.raises(ValueError):
            RTFMConfig(**bad).validate()


# ----------------------------------------------------------------------------------------------- network


def official_count(d: int) -> int:
    """Parameters of the network at feature width d, by hand from the official layer list."""
    branches = 3 * (d * 512 * 3 + 512 + 2 * 512)  # conv_1..3: weight, bias, BatchNorm weight + bias
    conv_4 = d * 512
    non_local = 3 * (512 * 256 + 256) + (256 * 512 + 512) + 2 * 512  # g, theta, phi; W conv + BatchNorm
    conv_5 = 2048 * d * 3 + 2 * d
    fc = (d * 512 + 512) + (512 * 128 + 128) + (128 + 1)
    return branches + conv_4 + non_local + conv_5 + fc


def test_parameter_count_is_the_official_models():
    with torch.device("meta"):
        counts = {d: sum(p.numel() for p in RTFM(d).parameters()) for d in (2048, 1024, 4096, D)}
    assert counts[2048] == 24_718_849 == official_count(2048)
    for d in (1024, 4096, D):
        assert counts[d] == official_count(d)


def test_official_state_dict_loads_strictly_with_the_official_names():
    model = RTFM(2048)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == OFFICIAL_KEYS
    sd = official_state_dict()
    model.load_official(sd)
    got = model.state_dict()
    assert all(torch.equal(got[k], sd[k]) for k in OFFICIAL_KEYS)
    model.load_state_dict(sd, strict=True)  # plain PyTorch strict loading agrees
    assert RTFM.feature_dim_of(sd) == 2048


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda sd: sd.pop("Aggregate.non_local.phi.bias"), "missing keys Aggregate.non_local.phi.bias"),
        (lambda sd: sd.update({"module.fc1.weight": sd["fc1.weight"]}), "unexpected keys module.fc1.weight"),
        (lambda sd: sd.update({"fc2.bias": torch.zeros(64)}), "fc2.bias: shape (64,), the model's is (128,)"),
    ],
)
def test_a_state_dict_of_another_layout_is_refused(change, message):
    model = RTFM(2048)
    sd = official_state_dict()
    change(sd)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        model.load_official(sd)
    assert "\n" not in str(e.value)


def test_init_is_the_official_weight_init():
    torch.manual_seed(0)
    model = RTFM(64)
    convs_and_linears = [m for m in model.modules() if isinstance(m, (torch.nn.Conv1d, torch.nn.Linear))]
    assert len(convs_and_linears) == 5 + 4 + 3  # 5 Aggregate convs, non-local g/theta/phi/W.0, fc1-3
    for m in convs_and_linears:
        fan_in = m.weight[0].numel()
        fan_out = m.weight.shape[0] * (m.weight[0, 0].numel() if m.weight.dim() > 2 else 1)
        bound = math.sqrt(6.0 / (fan_in + fan_out))  # Xavier-uniform
        assert m.weight.abs().max() <= bound
        if m.weight.numel() > 1000:
            assert m.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
        assert m.bias is None or not m.bias.any()
    agg = model.Aggregate
    assert agg.conv_4[0].bias is None and agg.conv_5[0].bias is None  # bias=False in the official code
    for bn in (agg.conv_1[2], agg.conv_2[2], agg.conv_3[2], agg.conv_5[2]):
        assert bn.weight.eq(1).all() and bn.bias.eq(0).all()
    assert agg.non_local.W[1].weight.eq(0).all() and agg.non_local.W[1].bias.eq(0).all()


def test_non_local_block_starts_as_the_identity():
    """W's BatchNorm weight and bias start at 0: the block's output is its input, in either mode, and
    nothing reaches g / theta / phi / W.0 until that weight moves (one optimiser step later it has)."""
    torch.manual_seed(0)
    block = NonLocalBlock1D()
    x = torch.randn(3, 512, 20)
    assert torch.equal(block(x), x)
    assert torch.equal(block.eval()(x), x)
    model = RTFM(D, RTFMConfig(batch_abnormal=2, batch_normal=2))
    bank = bank_with_crops(4, 1)
    opt = model.make_optimizer()
    inner = ("g.weight", "theta.weight", "phi.weight", "W.0.weight")
    for step in range(2):
        opt.zero_grad()
        model.losses(model.sample_batch(bank, torch.Generator().manual_seed(0)))["total"].backward()
        grads = [getattr(model.Aggregate.non_local, n.split(".")[0]) for n in inner]
        norms = [dict(m.named_parameters())[n.split(".", 1)[1]].grad.abs().sum().item() for m, n in zip(grads, inner)]
        assert (all(v == 0 for v in norms) if step == 0 else all(v > 0 for v in norms)), (step, norms)
        opt.step()


def test_non_local_orders_agree():
    """Short inputs build the T x T affinity as the official block does; longer ones use the
    associative order. Both equal the formula y_t = (1/T) sum_s (theta_t . phi_s) g_s, z = W(y) + x."""
    torch.manual_seed(0)
    block = NonLocalBlock1D(8, 4).double().eval()
    torch.nn.init.normal_(block.W[1].weight)  # leave the identity start, so W(y) counts
    for t in (3, 7):  # 3 <= inter width 4 < 7
        x = torch.randn(2, 8, t, dtype=torch.float64)
        g, th, ph = block.g(x), block.theta(x), block.phi(x)
        y = torch.einsum("bct,bcs,bds->bdt", th, ph, g) / t
        assert torch.allclose(block(x), block.W(y) + x)


@pytest.mark.parametrize("t", [1, 2, 5, 32, 300])
def test_any_length_keeps_its_shape(t):
    torch.manual_seed(0)
    model = RTFM(D, RTFMConfig()).eval()
    x = torch.randn(3, t, D)
    assert model.Aggregate(x).shape == (3, t, D)
    assert model(x).shape == (3, t)
    assert model.score(x).shape == (t,)


def test_not_causal_later_clips_change_earlier_scores():
    torch.manual_seed(0)
    model = RTFM(D, RTFMConfig()).eval()
    torch.nn.init.normal_(model.Aggregate.non_local.W[1].weight)  # a trained non-local block
    x = torch.randn(1, 40, D)
    y = x.clone()
    y[0, 39] += 5.0
    assert not torch.allclose(model(x)[0, :5], model(y)[0, :5])


def test_dropout_on_the_features_in_training_only():
    """The Aggregate output is dropped out (0.7) before both the magnitudes and the classifier."""
    torch.manual_seed(0)
    model = RTFM(D, RTFMConfig()).train()
    x = torch.randn(8, S, D)
    torch.manual_seed(1)
    agg = model.Aggregate(x)
    torch.manual_seed(1)
    feats = model.features(x)  # the same batch statistics: only the dropout differs
    zero = feats == 0
    assert zero.float().mean().item() == pytest.approx(0.7, abs=0.03)
    assert torch.allclose(feats[~zero], agg[~zero] / 0.3, rtol=1e-5, atol=1e-6)
    seen = []
    model.fc1.register_forward_hook(lambda m, inp, out: seen.append(inp[0].detach()))
    bank = bank_with_crops(4, 2)
    model.losses(model.sample_batch(bank, torch.Generator()))
    assert (seen[-1] == 0).float().mean().item() == pytest.approx(0.7, abs=0.03)  # the classifier's input
    model.eval()
    assert torch.equal(model.features(x), model.Aggregate(x))
    model(x)
    assert (seen[-1] == 0).float().mean().item() < 0.01


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
    # code (official smooth over the concatenated scores): 0.4^2 + 0.3^2, then across the boundary
    # 0.2 -> 0.0: 0.2^2, then 0 + 1
    assert smoothness_loss(s, 0.5, "code").item() == pytest.approx(0.5 * (0.25 + 0.04 + 1.0))
    # paper: per video 0.25 and 1, averaged
    assert smoothness_loss(s, 0.5, "paper").item() == pytest.approx(0.5 * 0.625)
    s = torch.tensor([[0.3, 0.4], [0.0, 0.0]])
    assert sparsity_loss(s, 0.5, "code").item() == pytest.approx(0.5 * 0.5)  # L2 norm of all scores
    assert sparsity_loss(s, 0.5, "paper").item() == pytest.approx(0.5 * 0.35)  # mean per-video L1


def test_code_form_magnitude_is_the_norm_of_the_mean_topk_feature():
    # one video, one crop, 3 snippets of 2-D features; top-2 = snippets 0 and 2
    feats = torch.tensor([[[[3.0, 0.0], [0.0, 1.0], [0.0, 4.0]]]])
    idx = torch.tensor([[0, 2]])
    # mean of (3,0) and (0,4) is (1.5, 2) whose norm is 2.5; the mean of the norms would be 3.5
    assert topk_feature_norm(feats, idx).item() == pytest.approx(2.5)


def official_terms_numpy(feats: np.ndarray, crop_scores: np.ndarray, n_abnormal: int) -> dict[str, float]:
    """The official train() loss, in plain numpy (float64), from per-crop features and scores.

    Args:
        feats: ``[V, C, S, Dm]`` features whose magnitudes are ranked; crop_scores: ``[V, C, S]``;
            the first ``n_abnormal`` videos are anomalous, the rest normal (same count).
    Official model.py / train.py: magnitudes and scores are crop means; top-3 snippets per video on
    the crop-mean magnitudes; BCE of the top-3 mean score; per (crop, video) row
    ``(|100 - ||mean_k f+|| | + ||mean_k f-||)^2`` averaged, times 1e-4, row i of the anomalous half
    paired with row i of the normal half; smoothness 8e-4 and sparsity (L2) 8e-3 over the anomalous
    videos' scores concatenated.
    """
    v, c, s, _ = feats.shape
    mags = np.linalg.norm(feats, axis=-1).mean(axis=1)  # [V, S]
    scores = crop_scores.mean(axis=1)  # [V, S]
    idx = np.argsort(-mags, axis=1)[:, :3]
    top = np.take_along_axis(scores, idx, 1).mean(1)
    y = np.r_[np.ones(n_abnormal), np.zeros(v - n_abnormal)]
    bce = -(y * np.log(top) + (1 - y) * np.log(1 - top)).mean()
    g = np.stack([[np.linalg.norm(feats[i, j, idx[i]].mean(0)) for j in range(c)] for i in range(v)])  # [V, C]
    rows = (np.abs(100 - g[:n_abnormal]) + g[n_abnormal:]) ** 2
    abn = scores[:n_abnormal].reshape(-1)
    terms = {
        "classification": bce,
        "magnitude": 1e-4 * rows.mean(),
        "smooth": 8e-4 * np.sum((abn[1:] - abn[:-1]) ** 2),
        "sparse": 8e-3 * np.sqrt(np.sum(abn**2)),
    }
    terms["total"] = sum(terms.values())
    return terms


def test_loss_terms_by_numpy_on_a_published_batch():
    """32 + 32 videos x 10 crops x 32 segments, random features and scores: rtfm_losses (code form)
    gives the official train() loss computed independently in numpy."""
    rng = np.random.default_rng(0)
    v, c, dm = 64, 10, 6
    feats = rng.normal(0, 1, (v, c, S, dm)) * np.r_[np.full(32, 30.0), np.full(32, 3.0)][:, None, None, None]
    crop_scores = rng.uniform(0.02, 0.98, (v, c, S))
    want = official_terms_numpy(feats, crop_scores, 32)
    f = torch.from_numpy(feats).float()
    mags = f.norm(dim=-1)
    idx = topk_indices(mags, 3)
    labels = torch.tensor([1] * 32 + [0] * 32)
    got = rtfm_losses(mags, torch.from_numpy(crop_scores).float().mean(1), labels, idx, RTFMConfig(), topk_feature_norm(f, idx))
    for k, value in want.items():
        assert got[k].item() == pytest.approx(value, rel=1e-5), k


def test_model_losses_on_a_published_batch_follow_the_official_forward():
    """RTFM.losses on 32 + 32 videos x 10 crops (eval mode: no dropout) equals the official
    composition, in numpy, of the model's own per-crop features and scores: crop averaging, top-k on
    crop-mean magnitudes, the (crop, video) row pairing and the smoothness order are the wiring checked."""
    torch.manual_seed(0)
    model = RTFM(8, RTFMConfig()).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 10, S, 8, generator=g)
    x[:32, :, 5:9] += 3.0
    batch = CropsBatch(abnormal=x[:32].flatten(0, 1), normal=x[32:].flatten(0, 1), crops=10)
    with torch.no_grad():
        got = model.losses(batch)
        feats = model.features(x.flatten(0, 1))
        crop_scores = model.classify(feats).view(64, 10, S)
    want = official_terms_numpy(feats.view(64, 10, S, 8).double().numpy(), crop_scores.double().numpy(), 32)
    for k, value in want.items():
        assert got[k].item() == pytest.approx(value, rel=1e-5), k


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


# ----------------------------------------------------------------------------------------------- batches


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
    assert torch.isfinite(model.losses(batch)["total"])


def test_batches_are_the_official_loaders():
    """Shuffled, no video twice within a pass, the last partial batch dropped, restarted when
    exhausted (official main.py's two DataLoaders, drop_last=True); resuming at a step draws the
    same batch (the pass's permutation depends on the seed and the pass number only)."""
    index = torch.arange(100, 107)  # 7 videos, batches of 3: 2 per pass, 1 left out
    passes = [[loader_draw(index, 3, step, seed=5).tolist() for step in (2 * p, 2 * p + 1)] for p in range(4)]
    for first, second in passes:
        assert len(set(first + second)) == 6 and set(first + second) <= set(range(100, 107))
    assert len({tuple(p[0]) for p in passes}) > 1  # each pass reshuffled
    assert loader_draw(index, 3, 5, seed=5).tolist() == passes[2][1]
    assert loader_draw(index, 3, 5, seed=6).tolist() != passes[2][1]
    assert sorted(loader_draw(index, 10, 0, seed=5).tolist()) == index.tolist()  # fewer videos than a batch: all
    bank = bank_with_crops(8, 2)
    model = RTFM(D, RTFMConfig(batch_abnormal=2, batch_normal=2))
    gen = torch.Generator()
    drawn = [model.sample_batch(bank, gen).abnormal for _ in range(3)]
    again = RTFM(D, RTFMConfig(batch_abnormal=2, batch_normal=2))
    again.before_step(bank, 2, gen)  # a run resumed at step 2
    assert torch.equal(again.sample_batch(bank, gen).abnormal, drawn[2])


def test_identical_crops_give_the_single_crop_losses():
    """Magnitudes, top-k and scores are crop averages: ten copies of one crop change nothing."""
    torch.manual_seed(0)
    bank1 = bank_with_crops(4, 1)
    bank10 = FeatureBank(bank1.features.expand(-1, 10, -1, -1).contiguous(), bank1.labels, bank1.ids)
    model = RTFM(D, RTFMConfig(batch_abnormal=2, batch_normal=2)).eval()  # eval: no dropout anywhere
    t1 = model.losses(model.sample_batch(bank1, torch.Generator()))
    model.before_step(bank1, 0, torch.Generator())
    t10 = model.losses(model.sample_batch(bank10, torch.Generator()))
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
    """Default dropout (0.7 on the features and the hidden layers), the short schedule's magnitude
    dropout and lr, 2 crops, anomalies at random places; held-out videos ranked apart."""
    torch.manual_seed(0)
    train = bank_with_crops(12, 2, seed=1, planted=None)
    test = bank_with_crops(8, 2, seed=2, planted=None)
    cfg = RTFMConfig(**{**RTFM.short_schedule, "batch_abnormal": 4, "batch_normal": 4, "loss_form": loss_form})
    model = RTFM(D, cfg)
    opt = model.make_optimizer()
    gen = torch.Generator().manual_seed(0)
    first = None
    for _ in range(60):
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


# ----------------------------------------------------------------------------------------------- official checkpoints in the pipeline


def test_an_official_checkpoint_is_evaluated_and_scores_new_videos(tmp_path, capsys):
    """``train.checkpoint=FILE``: the train stage loads the state dict strictly instead of training
    (no training features needed), the file's sha256 keys the cache, evaluate and ``pipeline score``
    use it; a file of another layout, a corrupt or a missing one stops the run with one line naming it."""
    from pipeline.cli import main
    from test_runner import make_dataset, register_test_extractor

    register_test_extractor()
    data = make_dataset(tmp_path / "data")
    torch.manual_seed(0)
    official = RTFM(7)  # test_motion's 7-D features; at 2048-D this is the released layout
    for name, buf in official.named_buffers():  # trained-looking BatchNorm statistics
        if "running_var" in name:
            buf.uniform_(0.5, 1.5)
    torch.nn.init.normal_(official.Aggregate.non_local.W[1].weight)
    ckpt = tmp_path / "rtfm_official.pkl"
    torch.save(official.state_dict(), ckpt, _use_new_zipfile_serialization=False)  # PyTorch < 1.6 format
    run = tmp_path / "run"
    base = ["-q", "run", "--stage", "evaluate", "--method", "rtfm", "--run-dir", str(run)] + [
        a for s in (f"data.manifest={data}", "extract.backbone=test_motion", "extract.crops=center") for a in ("--set", s)
    ]

    def run_with(path: Path) -> tuple[int, str]:
        code = main(base + ["--set", f"train.checkpoint={path}"])
        return code, capsys.readouterr().err

    code, err = run_with(ckpt)
    assert code == 0, err
    latest = json.loads((run / "latest.json").read_text())
    assert "segment" not in latest  # nothing was trained, so no training bags were built
    train_dir = run / latest["train"]
    done = json.loads((train_dir / "DONE").read_text())
    from pipeline.core.store import sha256_file

    assert done["checkpoint_sha256"] == sha256_file(ckpt) and done["iterations"] == 0
    saved = torch.load(train_dir / "model.pt", weights_only=True)
    assert saved["method"] == "rtfm" and saved["feature_dim"] == 7
    assert all(torch.equal(saved["state_dict"][k], v) for k, v in official.state_dict().items())
    metrics = json.loads((run / latest["evaluate"] / "metrics.json").read_text())
    assert 0.0 <= metrics["auc"] <= 1.0
    # pipeline score with the same run gives the evaluate stage's scores for a test video
    code = main(["-q", "score", str(data.parent / "test1.mp4"), "--run-dir", str(run), "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    scored = json.loads((tmp_path / "out" / "test1.json").read_text())
    evaluated = np.load(run / latest["evaluate"] / "items" / "test1.scores.npy")
    assert np.asarray(scored["scores"]) == pytest.approx(evaluated.astype(np.float64), abs=1e-5)
    # other weights, other file content: another train key
    official.fc3.bias.data += 1.0
    other = tmp_path / "other.pkl"
    torch.save(official.state_dict(), other)
    assert run_with(other)[0] == 0
    assert json.loads((run / "latest.json").read_text())["train"] != latest["train"]
    # refused: another layout, a corrupt file, a missing file; each a one-line error naming the file
    sd = official.state_dict()
    sd["fc4.weight"] = sd.pop("fc3.weight")
    cases = {"layout.pkl": sd, "corrupt.pkl": b"not a torch file"}
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content) if isinstance(content, bytes) else torch.save(content, path)
        code, err = run_with(path)
        assert code == 1 and str(path) in err and len(err.strip().splitlines()) == 1, err
    assert "missing keys fc3.weight; unexpected keys fc4.weight" in run_with(tmp_path / "layout.pkl")[1]
    code, err = run_with(tmp_path / "nope.pkl")
    assert code == 1 and "nope.pkl: file not found" in err
