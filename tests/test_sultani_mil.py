"""Sultani MIL (models/sultani_mil.py) against the authors' released Keras script
(TrainingAnomalyDetector_public.py): the objective by hand on a tiny case and, with plain numpy
double loops written after ``custom_objective``, on the published 30 + 30 batch of 32 segments;
the network, its initialisation, parameter count and optimiser; the aligned-pair form selectable."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models import DETECTORS, FeatureBank, MILBatch
from models.sultani_mil import SultaniMIL, SultaniMILConfig, mil_ranking_loss

# ----------------------------------------------------------------------------------------------- config


def test_registered_with_the_scripts_defaults():
    assert DETECTORS.get_class("sultani_mil") is SultaniMIL
    cfg = SultaniMILConfig()
    assert (cfg.iterations, cfg.lr, cfg.weight_decay) == (20000, 0.01, 1e-3)
    assert (cfg.batch_abnormal, cfg.batch_normal, cfg.hidden, cfg.dropout) == (30, 30, (512, 32), 0.6)
    assert (cfg.lambda_smooth, cfg.lambda_sparse, cfg.margin, cfg.ranking) == (8e-5, 8e-5, 1.0, "all_pairs")


def test_ranking_form_from_cli_settings():
    from pipeline.core.config import ConfigError
    from stages.config import build_config

    cfg = build_config(sets=["train.ranking=aligned_pairs"], method="sultani_mil")
    assert cfg.train.ranking == "aligned_pairs"
    with pytest.raises(ConfigError):
        build_config(sets=["train.ranking=mean"], method="sultani_mil")


# ----------------------------------------------------------------------------------------------- network


def test_network_layout_parameter_count_and_init():
    """Dense 4096-512 ReLU, Dropout 0.6, Dense 512-32 linear, Dropout 0.6, Dense 32-1 sigmoid;
    glorot_normal (Keras 1: plain normal, std sqrt(2 / (fan_in + fan_out))) and zero biases."""
    torch.manual_seed(0)
    model = SultaniMIL(4096)
    kinds = [type(m).__name__ for m in model.net]
    assert kinds == ["Linear", "ReLU", "Dropout", "Linear", "Dropout", "Linear"]
    assert [m.p for m in model.net if isinstance(m, torch.nn.Dropout)] == [0.6, 0.6]
    assert sum(p.numel() for p in model.parameters()) == 4096 * 512 + 512 + 512 * 32 + 32 + 32 + 1 == 2_114_113
    w = model.net[0].weight
    assert w.std().item() == pytest.approx(math.sqrt(2 / (4096 + 512)), rel=0.01)
    assert w.abs().max().item() > 4 * math.sqrt(2 / (4096 + 512))  # not truncated at 2 std
    assert all(m.bias.abs().sum() == 0 for m in model.net if isinstance(m, torch.nn.Linear))


def test_optimiser_is_keras_adagrad():
    """Adagrad(lr=0.01, epsilon=1e-08), zero accumulator, no decay: one step moves p by lr g / (|g| + eps)."""
    model = SultaniMIL(8)
    opt = model.make_optimizer()
    group = opt.param_groups[0]
    assert isinstance(opt, torch.optim.Adagrad)
    assert (group["lr"], group["eps"], group["weight_decay"], group["lr_decay"]) == (0.01, 1e-8, 0, 0)
    assert group["initial_accumulator_value"] == 0
    p = model.net[-1].bias
    before = p.detach().clone()
    p.grad = torch.tensor([0.25])
    for q in model.parameters():
        if q is not p:
            q.grad = torch.zeros_like(q)
    opt.step()
    assert (before - p.detach()).item() == pytest.approx(0.01 * 0.25 / (0.25 + 1e-8), rel=1e-6)


# ----------------------------------------------------------------------------------------------- objective


def test_objective_on_a_tiny_batch_by_hand():
    # two anomalous bags (max 0.9 and 0.5), two normal bags (max 0.3 and 0.7), 3 segments each
    a = torch.tensor([[0.1, 0.9, 0.3], [0.2, 0.5, 0.4]])
    n = torch.tensor([[0.2, 0.3, 0.1], [0.7, 0.3, 0.0]])
    t = mil_ranking_loss(a, n, margin=1.0, lambda_smooth=0.5, lambda_sparse=0.25)
    # normal 0.3: (1 - 0.9 + 0.3) + (1 - 0.5 + 0.3) = 0.4 + 0.8; normal 0.7: 0.8 + 1.2; mean of 1.2 and 2.0
    assert t["ranking"].item() == pytest.approx(1.6, rel=1e-6)
    # anomalous bags only, summed: (0.8^2 + 0.6^2) + (0.3^2 + 0.1^2) = 1.0 + 0.1; sparsity 1.3 + 1.1
    assert t["smooth"].item() == pytest.approx(0.5 * 1.1, rel=1e-6)
    assert t["sparse"].item() == pytest.approx(0.25 * 2.4, rel=1e-6)
    # the hinge clamps at 0: margin 0.5 gives normal 0.3: max(0, -0.1) + 0.3; normal 0.7: 0.3 + 0.7
    assert mil_ranking_loss(a, n, 0.5, 0.0, 0.0)["ranking"].item() == pytest.approx((0.3 + 1.0) / 2, rel=1e-6)
    # aligned pairs: (0.9 vs 0.3) and (0.5 vs 0.7): (0.4 + 1.2) / 2
    aligned = mil_ranking_loss(a, n, 1.0, 0.5, 0.25, pairs="aligned_pairs")
    assert aligned["ranking"].item() == pytest.approx(0.8, rel=1e-6)
    assert aligned["smooth"].item() == t["smooth"].item() and aligned["sparse"].item() == t["sparse"].item()
    with pytest.raises(ValueError):
        mil_ranking_loss(a, n[:1], 1.0, 0.0, 0.0, pairs="aligned_pairs")
    with pytest.raises(ValueError):
        mil_ranking_loss(a, n, 1.0, 0.0, 0.0, pairs="neither")


def custom_objective_numpy(scores: np.ndarray) -> float:
    """The released objective on ``[60 * 32]`` segment scores, with the script's batch layout (bags 0-29
    anomalous, 30-59 normal) and its loops: per bag the max, the sum, and the 31 squared neighbour
    differences; per normal bag the hinge summed over all anomalous bags; then the mean over normal
    bags plus 8e-5 x (the sum of the anomalous bags' score sums + the sum of their smoothness sums)."""
    n_seg, n_vid = 32, 60
    maxes, sums, smooth = [], [], []
    for v in range(n_vid):
        bag = scores[v * n_seg : (v + 1) * n_seg]
        maxes.append(max(bag))
        sums.append(sum(bag))
        smooth.append(sum((bag[s] - bag[s + 1]) ** 2 for s in range(n_seg - 1)))
    per_normal = []
    for i in range(30, 60):
        per_normal.append(sum(max(1.0 - maxes[j] + maxes[i], 0.0) for j in range(30)))
    return float(np.mean(per_normal) + 8e-5 * sum(sums[:30]) + 8e-5 * sum(smooth[:30]))


def test_objective_on_the_published_30_plus_30_batch():
    rng = np.random.default_rng(0)
    scores = rng.uniform(0.0, 1.0, (60, 32))
    scores[:30] *= 0.9  # some hinges active, some clamped at 0
    t = mil_ranking_loss(torch.from_numpy(scores[:30]), torch.from_numpy(scores[30:]), 1.0, 8e-5, 8e-5)
    total = t["ranking"] + t["smooth"] + t["sparse"]
    assert total.item() == pytest.approx(custom_objective_numpy(scores.reshape(-1)), rel=1e-12)
    # aligned pairs average 30 hinges where the script sums 30 per normal bag: 30x smaller when all are active
    active = mil_ranking_loss(torch.full((30, 32), 0.2), torch.from_numpy(scores[30:]), 1.0, 0.0, 0.0)
    aligned = mil_ranking_loss(torch.full((30, 32), 0.2), torch.from_numpy(scores[30:]), 1.0, 0.0, 0.0, "aligned_pairs")
    assert active["ranking"].item() == pytest.approx(30 * aligned["ranking"].item(), rel=1e-12)


def numpy_forward(model: SultaniMIL, x: np.ndarray) -> np.ndarray:
    """The script's network without dropout, in float64 from the model's weights: ``[N, D]`` -> ``[N]``."""
    w = [m.weight.detach().double().numpy() for m in model.net if isinstance(m, torch.nn.Linear)]
    b = [m.bias.detach().double().numpy() for m in model.net if isinstance(m, torch.nn.Linear)]
    h = np.maximum(x @ w[0].T + b[0], 0.0)
    h = h @ w[1].T + b[1]
    return 1.0 / (1.0 + np.exp(-(h @ w[2].T + b[2])[:, 0]))


def test_model_losses_on_a_30_plus_30_batch_match_the_script():
    """``losses`` on 30 + 30 bags of 32 unit-norm 4096-D segments equals custom_objective (numpy) plus the
    Keras kernel regularisers 0.001 * sum(W^2) of the three Dense layers."""
    torch.manual_seed(0)
    model = SultaniMIL(4096, SultaniMILConfig(dropout=0.0))
    with torch.no_grad():  # trained-looking biases so that the scores spread
        for m in model.net:
            if isinstance(m, torch.nn.Linear):
                m.bias.uniform_(-0.5, 0.5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 32, 4096, generator=g)
    x = x / x.norm(dim=-1, keepdim=True)  # the released segments have unit L2 norm
    terms = model.losses(MILBatch(x[:30], x[30:]))
    scores = numpy_forward(model, x.reshape(-1, 4096).double().numpy())
    kernels = [m.weight.detach().double().numpy() for m in model.net if isinstance(m, torch.nn.Linear)]
    l2 = 1e-3 * sum(float((k**2).sum()) for k in kernels)
    assert terms["l2"].item() == pytest.approx(l2, rel=1e-5)
    assert terms["total"].item() == pytest.approx(custom_objective_numpy(scores) + l2, rel=1e-5)
    parts = ("ranking", "smooth", "sparse", "l2")
    assert terms["total"].item() == pytest.approx(sum(terms[k].item() for k in parts), rel=1e-6)


def test_all_pairs_uses_every_bag_and_aligned_pairs_the_first_min():
    """3 anomalous + 2 normal bags: all_pairs compares every pair; aligned_pairs drops the third anomalous bag."""
    torch.manual_seed(0)
    feats = torch.randn(5, 1, 32, 6)
    bank = FeatureBank(feats, torch.tensor([1, 1, 1, 0, 0]), [str(i) for i in range(5)])
    for ranking in ("all_pairs", "aligned_pairs"):
        model = SultaniMIL(6, SultaniMILConfig(batch_abnormal=3, batch_normal=2, dropout=0.0, ranking=ranking))
        batch = model.sample_batch(bank, torch.Generator().manual_seed(0))
        terms = model.losses(batch)
        with torch.no_grad():
            a, n = model(batch.abnormal), model(batch.normal)
        if ranking == "aligned_pairs":
            a = a[:2]
        expected = mil_ranking_loss(a, n, 1.0, 8e-5, 8e-5, ranking)
        for k in expected:
            assert terms[k].item() == pytest.approx(expected[k].item(), rel=1e-6), (ranking, k)
    assert a.shape[0] == 2  # the aligned form did drop one bag
