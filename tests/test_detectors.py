"""Tests generated from the detector registry: shapes, finite loss, gradients, overfitting, loss values."""

from __future__ import annotations

import pytest
import torch

from models import DETECTORS, ClipBank, FeatureBank, fit
from models.sultani_mil import mil_ranking_loss

D, S = 24, 32
#: clip counts of the four videos of a clip-level bank: variable, as real videos are
CLIP_LENGTHS = (32, 40, 24, 36)


def planted_bank(n_videos: int = 4, seed: int = 0, level: str = "segments") -> FeatureBank | ClipBank:
    """Half anomalous videos whose units 10-13 carry a planted direction; the rest noise.

    ``level="segments"``: a FeatureBank of ``[n, 1, 32, D]`` bags; ``"clips"``: a ClipBank whose
    videos have ``CLIP_LENGTHS`` clips (one crop).
    """
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([1, 0] * (n_videos // 2))
    ids = [f"v{i}" for i in range(n_videos)]
    if level == "segments":
        feats = torch.randn(n_videos, 1, S, D, generator=g) * 0.1
        feats[labels == 1, :, 10:14, 0] += 2.0
        return FeatureBank(feats, labels, ids)
    lengths = [CLIP_LENGTHS[i % len(CLIP_LENGTHS)] for i in range(n_videos)]
    videos = []
    for i, t in enumerate(lengths):
        x = torch.randn(t, 1, D, generator=g) * 0.1
        if labels[i] == 1:
            x[10:14, :, 0] += 2.0
        videos.append(x)
    return ClipBank.from_videos(videos, labels.tolist(), ids)


def bank_for(name: str) -> FeatureBank | ClipBank:
    return planted_bank(level=DETECTORS.get_class(name).training_level())


#: parameters whose gradient is exactly zero at initialisation by design, per detector: RTFM's
#: non-local block starts as the identity (its output BatchNorm's weight is 0, official RTFM
#: model.py), so nothing flows into the block until that weight moves (tests/test_rtfm.py checks it)
ZERO_GRADIENT_AT_INIT = {"rtfm": tuple(f"Aggregate.non_local.{m}." for m in ("g", "theta", "phi", "W.0"))}


def small_config(name: str, **over):
    cfg = DETECTORS.get_class(name).Config()
    cfg.batch_abnormal = cfg.batch_normal = 2
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


@pytest.mark.parametrize("name", DETECTORS.list())
def test_every_config_field_is_documented(name):
    import dataclasses

    for f in dataclasses.fields(DETECTORS.get_class(name).Config):
        assert f.metadata.get("doc"), f"{name}: train.{f.name} is undocumented"


@pytest.mark.parametrize("name", DETECTORS.list())
def test_shapes_loss_and_gradients(name):
    torch.manual_seed(0)
    model = DETECTORS.get(name, feature_dim=D, cfg=small_config(name))
    bank = bank_for(name)
    gen = torch.Generator().manual_seed(0)
    model.setup(bank, gen)
    model.before_step(bank, 0, gen)
    batch = model.sample_batch(bank, gen)
    scores = model(batch.abnormal)
    assert scores.shape == batch.abnormal.shape[:2]
    assert ((scores >= 0) & (scores <= 1)).all()
    terms = model.losses(batch)
    assert torch.isfinite(terms["total"])
    terms["total"].backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        if not pname.startswith(ZERO_GRADIENT_AT_INIT.get(name, ())):
            assert p.grad.abs().sum() > 0, f"{pname} got a zero gradient"
    for i in range(len(bank.ids)):  # test-time scoring: one score per segment, or per clip
        bags = bank.bags(i)
        assert model.score(bags).shape == (bags.shape[1] if model.input_level == "clips" else S,)


@pytest.mark.parametrize("name", DETECTORS.list())
def test_overfits_four_videos(name):
    torch.manual_seed(0)
    cls = DETECTORS.get_class(name)
    over = dict(cls.short_schedule)  # settings for a few hundred steps; each detector documents why
    if hasattr(cls.Config(), "dropout"):
        over["dropout"] = 0.0
    cfg = small_config(name, **over)
    model = DETECTORS.get(name, feature_dim=D, cfg=cfg)
    bank = bank_for(name)
    fit(model, bank, 300, torch.Generator().manual_seed(0))
    with torch.no_grad():
        s = [model(bank.bags(i)[:1])[0] for i in range(len(bank.ids))]  # [T_i] per video
    abn = [x for x, y in zip(s, bank.labels) if y == 1]
    top_abn = min(float(x.max()) for x in abn)
    top_norm = max(float(x.max()) for x, y in zip(s, bank.labels) if y == 0)
    assert top_abn > top_norm + 0.5  # ranked apart with a margin
    # and for the right reason: each anomalous video's top unit is a planted one
    top = torch.tensor([int(x.argmax()) for x in abn])
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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", DETECTORS.list())
def test_trains_and_scores_on_cuda(name):
    """Bank and model on the GPU, batches moved as the train stage moves them: finite losses for a
    few steps, and the GPU model scores a video as its CPU copy does."""
    import copy

    torch.manual_seed(0)
    device = torch.device("cuda")
    model = DETECTORS.get(name, feature_dim=D, cfg=small_config(name)).to(device)
    bank = bank_for(name)
    bank.features = bank.features.to(device)
    gen = torch.Generator().manual_seed(0)
    opt = model.make_optimizer()
    model.setup(bank, gen)
    model.train()
    for step in range(3):
        model.before_step(bank, step, gen)
        terms = model.losses(model.sample_batch(bank, gen).to(device))
        assert torch.isfinite(terms["total"]), step
        opt.zero_grad(set_to_none=True)
        terms["total"].backward()
        opt.step()
    model.eval()
    on_cpu = copy.deepcopy(model).cpu()
    bags = bank.bags(0)
    torch.testing.assert_close(model.score(bags).cpu(), on_cpu.score(bags.cpu()), rtol=1e-4, atol=1e-4)
