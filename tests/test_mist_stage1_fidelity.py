"""MIST stage I against the authors' code (github.com/fjchange/MIST_VAD, stage1training/), by hand.

Each expected value below is computed here with plain numpy / Python loops from the official
definitions, not with the implementation: the generator G (``MIL_Generator.py``,
``Simple_Regressor``; init ``utils/utils.py``, ``weights_normal_init``), the stage I loss on a batch
of the published 40 + 40 videos (``train_MIL_Generator.py``, ``topk_rank_loss``), the sub-bag
indices (``SHT_MIL_dataset.py``, ``sample_feat``), the pseudo-label smoothing and normalisation
(``train_MIL_Generator.py``, ``smooth`` / ``Augment_Pseudo_Label_Refilement``) and the layout of the
released pseudo-label file (``data/SHT_I3D_PLs.npy``: a dict ``"<video>.npy"`` -> float64 ``[T]``).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import nn

from models import ClipBank
from models.mist import (
    MIST,
    MistConfig,
    box_smooth,
    mist_mil_loss,
    official_pseudo_labels,
    refine_pseudo_labels,
    sub_bag_indices,
)


def test_defaults_are_the_official_stage1_settings():
    cfg = MistConfig()
    assert (cfg.iterations, cfg.lr, cfg.weight_decay, cfg.grad_clip) == (3001, 0.01, 1e-3, 10.0)
    assert (cfg.batch_abnormal, cfg.batch_normal) == (40, 40)
    assert (cfg.hidden, cfg.dropout, cfg.generator_relu, cfg.init, cfg.feature_norm) == ((512, 32), 0.6, "first", "kaiming", "none")
    assert (cfg.sub_bags, cfg.sub_bag_len, cfg.topk, cfg.sampling) == (32, 7, 7, "shared_offset")
    assert (cfg.rank_units, cfg.pairs, cfg.margin, cfg.lambda_sparse, cfg.lambda_smooth) == ("clips", "all", 1.0, 0.01, 0.0)
    assert (cfg.smooth_window, cfg.smooth_passes) == (5, 2)
    opt = MIST(16, cfg).make_optimizer()
    assert isinstance(opt, torch.optim.Adagrad)
    assert (opt.defaults["lr"], opt.defaults["weight_decay"]) == (0.01, 1e-3)


# ---------------------------------------------------------------------------------- generator


@pytest.mark.parametrize("dim,params", [(1024, 541_249), (4096, 2_114_113)])
def test_generator_layout_and_parameter_count(dim, params):
    g = MIST(dim).generator
    kinds = [type(m) for m in g]
    assert kinds == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear, nn.Dropout, nn.Linear, nn.Sigmoid]  # no ReLU after 512-32
    assert [(g[i].in_features, g[i].out_features) for i in (0, 3, 5)] == [(dim, 512), (512, 32), (32, 1)]
    assert g[2].p == g[4].p == 0.6
    # D*512 + 512 + 512*32 + 32 + 32 + 1
    assert sum(p.numel() for p in g.parameters()) == params == dim * 512 + 512 + 512 * 32 + 32 + 32 + 1
    assert sorted(g.state_dict()) == ["0.bias", "0.weight", "3.bias", "3.weight", "5.bias", "5.weight"]


def test_official_state_dict_loads_strictly_and_scores_as_the_official_layout():
    torch.manual_seed(0)
    state = {f"regressor.{i}.{k}": torch.randn(*s) * 0.05 for i, shapes in
             {0: ((512, 64), (512,)), 3: ((32, 512), (32,)), 5: ((1, 32), (1,))}.items()
             for k, s in zip(("weight", "bias"), shapes)}
    model = MIST(64).eval()
    model.load_official_generator(state)
    x = torch.randn(5, 64)
    w = {k.split(".", 1)[1]: v for k, v in state.items()}
    h = torch.relu(x @ w["0.weight"].T + w["0.bias"])  # official: ReLU after the first layer only
    h = h @ w["3.weight"].T + w["3.bias"]
    expected = torch.sigmoid(h @ w["5.weight"].T + w["5.bias"]).squeeze(-1)
    assert torch.allclose(model(x[None])[0], expected, atol=1e-6)
    with pytest.raises(RuntimeError):  # strict: a missing key fails
        model.load_official_generator({k: v for k, v in state.items() if k != "regressor.5.bias"})


def test_generator_init_is_kaiming_normal_with_zero_biases():
    torch.manual_seed(0)
    g = MIST(1024).generator
    for i, fan_in in ((0, 1024), (3, 512), (5, 32)):
        assert (g[i].bias == 0).all()
    w = g[0].weight.detach().double().flatten().numpy()  # 524,288 draws
    assert abs(w.std() / np.sqrt(2 / 1024) - 1) < 0.01  # Kaiming: std sqrt(2 / fan_in)
    kurtosis = ((w - w.mean()) ** 4).mean() / w.var() ** 2
    assert abs(kurtosis - 3) < 0.05  # normal (a uniform init has kurtosis 1.8)
    w3 = g[3].weight.detach().double().flatten().numpy()
    assert abs(w3.std() / np.sqrt(2 / 512) - 1) < 0.03
    xg = MIST(1024, MistConfig(init="xavier")).generator
    bound = np.sqrt(6 / (1024 + 512))
    assert float(xg[0].weight.detach().abs().max()) <= bound and float(xg[0].weight.detach().abs().max()) > 0.99 * bound


# ------------------------------------------------------------------------------- stage I loss


def _official_loss_by_loops(abn: np.ndarray, nor: np.ndarray, k: int, lam: float) -> tuple[float, float, float]:
    """``topk_rank_loss`` written out: each video's score is the mean of its k largest clip scores;
    ``err = sum over normal i, abnormal j of max(0, 1 - a_j + n_i) / B^2``; sparsity ``lam`` times the
    mean of every anomalous clip score."""
    b = len(abn)
    top_a = [sum(sorted(row, reverse=True)[:k]) / k for row in abn]
    top_n = [sum(sorted(row, reverse=True)[:k]) / k for row in nor]
    err = 0.0
    for i in range(b):
        for j in range(b):
            err += max(0.0, 1.0 - top_a[j] + top_n[i])
    err /= b * b
    sparse = lam * sum(sum(row) for row in abn) / (b * len(abn[0]))
    return err, sparse, err + sparse


def test_stage1_loss_by_hand_on_a_40_plus_40_batch():
    rng = np.random.default_rng(0)
    # 40 + 40 videos x 224 clip scores, each video's level spread out so that the pairs differ
    abn = rng.uniform(0, 1, (40, 224)) * np.linspace(0.3, 1.0, 40)[:, None]
    nor = rng.uniform(0, 1, (40, 224)) * rng.permutation(np.linspace(0.05, 0.6, 40))[:, None]
    err, sparse, total = _official_loss_by_loops(abn, nor, 7, 0.01)
    cfg = MistConfig()
    t = mist_mil_loss(torch.from_numpy(abn), torch.from_numpy(nor), cfg.margin, cfg.lambda_sparse, cfg.topk, cfg.pairs, cfg.lambda_smooth)
    assert t["ranking"].item() == pytest.approx(err, rel=1e-12)
    assert t["sparsity"].item() == pytest.approx(sparse, rel=1e-12)
    assert t["smoothness"].item() == 0.0 and t["total"].item() == pytest.approx(total, rel=1e-12)
    # scores in [0, 1] and margin 1: no hinge is ever clipped, so with Ba = Bn the row-aligned form has
    # the same value (and gradient); they part where a hinge is clipped, e.g. at margin 0.5
    aligned = mist_mil_loss(torch.from_numpy(abn), torch.from_numpy(nor), 1.0, 0.01, 7, "aligned")["ranking"].item()
    assert aligned == pytest.approx(err, rel=1e-12)
    half = [mist_mil_loss(torch.from_numpy(abn), torch.from_numpy(nor), 0.5, 0.0, 7, p)["ranking"].item() for p in ("all", "aligned")]
    top_a, top_n = np.sort(abn, 1)[:, -7:].mean(1), np.sort(nor, 1)[:, -7:].mean(1)
    assert half[0] == pytest.approx(np.mean([max(0.0, 0.5 - a + n) for a in top_a for n in top_n]), rel=1e-12)
    assert half[1] == pytest.approx(np.mean([max(0.0, 0.5 - a + n) for a, n in zip(top_a, top_n)]), rel=1e-12)
    assert abs(half[0] - half[1]) > 1e-3
    # the poster's form: max over sub-bag means (32 x 7), top 1
    sub_a, sub_n = abn.reshape(40, 32, 7).mean(-1), nor.reshape(40, 32, 7).mean(-1)
    poster = _official_loss_by_loops(sub_a, sub_n, 1, 0.01)[0]
    assert mist_mil_loss(torch.from_numpy(sub_a), torch.from_numpy(sub_n), 1.0, 0.01, 1)["ranking"].item() == pytest.approx(poster)


def test_detector_loss_on_its_own_40_plus_40_batch_matches_the_loops():
    torch.manual_seed(0)
    lengths = [int(n) for n in np.random.default_rng(1).integers(150, 400, 90)]
    videos = [torch.randn(n, 1, 8) for n in lengths]
    bank = ClipBank.from_videos(videos, [1] * 45 + [0] * 45, [f"v{i}" for i in range(90)])
    model = MIST(8).eval()  # dropout off, so the scores below are the loss's
    batch = model.sample_batch(bank, torch.Generator().manual_seed(0))
    assert batch.abnormal.shape == (40, 224, 8) and batch.normal.shape == (40, 224, 8)
    with torch.no_grad():
        abn = model.generate(batch.abnormal).double().numpy()
        nor = model.generate(batch.normal).double().numpy()
        terms = model.losses(batch)
    err, sparse, total = _official_loss_by_loops(abn, nor, 7, 0.01)
    assert terms["ranking"].item() == pytest.approx(err, rel=1e-5)
    assert terms["sparsity"].item() == pytest.approx(sparse, rel=1e-5)
    assert terms["total"].item() == pytest.approx(total, rel=1e-5)


def test_gradient_norm_is_clipped_at_10():
    model = MIST(8)
    x = torch.randn(2, 224, 8)
    (model.generate(x).sum() * 1e4).backward()
    before = torch.norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    model.clip_gradients()
    after = torch.norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert before > 10 and after == pytest.approx(10.0, rel=1e-4)


# ----------------------------------------------------------------------------------- sub-bags


def _official_starts(n: int, L: int = 32, T: int = 7) -> np.ndarray:
    """The L run starts before the offset: numpy's integer linspace(0, n - T, L + 1), last dropped."""
    return np.linspace(0, n - T, num=L + 1, dtype=int)[:L]


@pytest.mark.parametrize("n", [7, 8, 100, 223, 224, 225, 257, 1000, 4321])
def test_shared_offset_sub_bags_are_the_official_runs(n):
    base = _official_starts(n)
    assert (sub_bag_indices(n, 32, 7, "shared_offset", None)[:, 0].numpy() == base).all()
    gen = torch.Generator().manual_seed(n)
    seen = set()
    for _ in range(60):
        idx = sub_bag_indices(n, 32, 7, "shared_offset", gen).numpy()
        m = idx[0, 0] - base[0]
        assert (idx == (base + m)[:, None] + np.arange(7)).all()  # one offset shared by the 32 runs of 7
        seen.add(int(m))
    # official: move = randint((n - T) // (L + 1)), or 0 when that is < 1
    span = max((n - 7) // 33, 1)
    assert seen <= set(range(span)) and (len(seen) == span if span <= 8 else len(seen) > span // 3)


def test_official_starts_match_for_other_sub_bag_counts():
    for n in range(7, 700, 3):
        for L, T in ((33, 7), (10, 3), (32, 7)):
            got = sub_bag_indices(n, L, T, "shared_offset", None)[:, 0].numpy()
            assert (got == _official_starts(n, L, T)).all(), (n, L, T)


# ------------------------------------------------------------------------------ pseudo-labels


def test_box_smoothing_replicates_the_edges_by_hand():
    x = np.array([1.0, 0, 0, 0, 0, 0, 0, 2])
    # one pass, pad [1, 1 | x | 2, 2], 5-clip means
    assert box_smooth(x, 5, 1) == pytest.approx([0.6, 0.4, 0.2, 0.0, 0.0, 0.4, 0.8, 1.2], abs=1e-12)
    # second pass over [0.6, 0.6 | .6 .4 .2 0 0 .4 .8 1.2 | 1.2, 1.2]
    twice = [0.48, 0.36, 0.24, 0.2, 0.28, 0.48, 0.72, 0.96]
    assert box_smooth(x, 5, 2) == pytest.approx(twice, abs=1e-12)
    expected = (np.array(twice) - 0.2) / 0.76
    assert refine_pseudo_labels(x, 5, 2) == pytest.approx(expected, abs=1e-12)
    assert refine_pseudo_labels(x, 5, 2, abnormal=False) == pytest.approx(twice, abs=1e-12)


def test_every_abnormal_video_spans_0_1_in_the_released_layout():
    rng = np.random.default_rng(3)
    ids = [f"{i:02d}_{j:04d}" for i, j in zip(range(30), rng.integers(0, 200, 30))]
    labels = {vid: int(i % 3 == 0) for i, vid in enumerate(ids)}
    scores = {vid: rng.uniform(0, 1, int(rng.integers(2, 300))).astype(np.float32) for vid in ids}
    released = official_pseudo_labels(scores, labels, 5, 2)
    buf = io.BytesIO()
    np.save(buf, released, allow_pickle=True)
    buf.seek(0)
    loaded = np.load(buf, allow_pickle=True).item()  # as the authors' SHT_I3D_PLs.npy loads
    assert isinstance(loaded, dict) and sorted(loaded) == sorted(f"{vid}.npy" for vid in ids)
    for vid in ids:
        row = loaded[f"{vid}.npy"]
        assert row.dtype == np.float64 and row.shape == scores[vid].shape  # one value per 16-frame clip
        if labels[vid]:
            assert row.min() == 0.0 and row.max() == 1.0
        else:  # normal videos keep their smoothed scores, as in the released file
            assert row == pytest.approx(box_smooth(scores[vid], 5, 2))
