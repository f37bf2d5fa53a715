"""Tests generated from the detector registry: shapes, finite loss, gradients, overfitting, loss values."""

from __future__ import annotations

import pytest
import torch

from models import DETECTORS, FeatureBank
from models.sultani_mil import mil_ranking_loss

D, S = 24, 32


def planted_bank(n_videos: int = 4, seed: int = 0) -> FeatureBank:
    """Half anomalous bags whose segments 10-13 carry a planted direction; the rest noise."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n_videos, 1, S, D, generator=g) * 0.1
    labels = torch.tensor([1, 0] * (n_videos // 2))
    feats[labels == 1, :, 10:14, 0] += 2.0
    return FeatureBank(feats, labels, [f"v{i}" for i in range(n_videos)])


def small_config(name: str, **over):
    cfg = DETECTORS.get_class(name).Config()
    cfg.batch_abnormal = cfg.batch_normal = 2
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


@pytest.mark.parametrize("name", DETECTORS.list())
def test_shapes_loss_and_gradients(name):
    torch.manual_seed(0)
    model = DETECTORS.get(name, feature_dim=D, cfg=small_config(name))
    bank = planted_bank()
    batch = model.sample_batch(bank, torch.Generator().manual_seed(0))
    scores = model(batch.abnormal)
    assert scores.shape == batch.abnormal.shape[:2]
    assert ((scores >= 0) & (scores <= 1)).all()
    terms = model.losses(batch)
    assert torch.isfinite(terms["total"])
    terms["total"].backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, f"{pname} got a zero gradient"
    assert model.score(bank.features[0]).shape == (S,)


@pytest.mark.parametrize("name", DETECTORS.list())
def test_overfits_four_videos(name):
    torch.manual_seed(0)
    cfg = small_config(name, dropout=0.0) if hasattr(DETECTORS.get_class(name).Config(), "dropout") else small_config(name)
    model = DETECTORS.get(name, feature_dim=D, cfg=cfg)
    bank = planted_bank()
    opt = model.make_optimizer()
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        terms = model.losses(model.sample_batch(bank, gen))
        opt.zero_grad()
        terms["total"].backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        s = model(bank.features[:, 0])
    top_abn = s[bank.labels == 1].max(dim=1).values
    top_norm = s[bank.labels == 0].max(dim=1).values
    assert top_abn.min() > top_norm.max() + 0.5  # ranked apart with a margin
    # and for the right reason: each anomalous bag's top segment is a planted one
    top = s[bank.labels == 1].argmax(dim=1)
    assert ((top >= 10) & (top < 14)).all(), top


def test_sultani_loss_terms_by_hand():
    a = torch.tensor([[0.1, 0.9, 0.3]])
    n = torch.tensor([[0.2, 0.4, 0.1]])
    t = mil_ranking_loss(a, n, margin=1.0, lambda_smooth=0.5, lambda_sparse=0.25)
    assert t["ranking"].item() == pytest.approx(1 - 0.9 + 0.4)
    assert t["smooth"].item() == pytest.approx(0.5 * (0.8**2 + 0.6**2))
    assert t["sparse"].item() == pytest.approx(0.25 * 1.3)
    # a bag already ranked beyond the margin contributes nothing
    t = mil_ranking_loss(torch.tensor([[1.0]]), torch.tensor([[0.0]]), 1.0, 0.0, 0.0)
    assert t["ranking"].item() == 0.0


def test_sultani_l2_term_matches_keras_regulariser():
    from models.sultani_mil import SultaniMIL, SultaniMILConfig

    cfg = SultaniMILConfig(weight_decay=1e-3, batch_abnormal=2, batch_normal=2)
    model = SultaniMIL(D, cfg)
    bank = planted_bank()
    terms = model.losses(model.sample_batch(bank, torch.Generator().manual_seed(0)))
    expected = 1e-3 * sum(m.weight.pow(2).sum() for m in model.net if isinstance(m, torch.nn.Linear))
    assert terms["l2"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert terms["total"].item() == pytest.approx(sum(terms[k].item() for k in ("ranking", "smooth", "sparse", "l2")), rel=1e-6)
