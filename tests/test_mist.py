"""MIST's pieces by hand: sub-bag sampling, L_MIL, pseudo-label refinement, the class-weighted CE,
the self-guided attention encoder's shapes and gradients, a two-step fine-tune, clip decoding.

The registry tests (tests/test_detectors.py) also run the stage I generator: shapes, gradients and
overfitting four videos. The chain end to end is tests/test_mist_e2e.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.mist import (
    MIST,
    MistConfig,
    box_smooth,
    class_weighted_ce,
    class_weights,
    mist_mil_loss,
    refine_pseudo_labels,
    sub_bag_indices,
)


# ----------------------------------------------------------------------------------- sub-bags


@pytest.mark.parametrize("n", [224, 300, 57])
@pytest.mark.parametrize("mode", ["shared_offset", "independent_offset"])
def test_offset_sub_bags_are_runs_of_consecutive_clips_at_evenly_spaced_starts(n, mode):
    L, T = 32, 7
    base = np.floor(np.arange(L + 1) * ((n - T) / L)).astype(int)[:L]  # official: integer linspace(0, n - T, L + 1)
    span = (n - T) // (L + 1) if mode == "shared_offset" else int(base[1] - base[0])
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        idx = sub_bag_indices(n, L, T, mode, gen)
        assert idx.shape == (L, T) and idx.dtype == torch.int64
        assert (idx >= 0).all() and (idx < n).all()
        assert (idx[:, 1:] - idx[:, :-1] == 1).all()  # T consecutive clips
        move = idx[:, 0].numpy() - base
        assert (move >= 0).all() and (move < max(span, 1)).all()
        if mode == "shared_offset":
            assert len(set(move.tolist())) == 1  # one offset for every run


def test_offsets_are_random_and_shared_or_not():
    gen = torch.Generator().manual_seed(1)
    base = torch.from_numpy(np.floor(np.arange(32) * (313 / 32)).astype(np.int64))
    shared = torch.stack([sub_bag_indices(320, 32, 7, "shared_offset", gen)[:, 0] - base for _ in range(200)])
    assert (shared == shared[:, :1]).all() and set(shared[:, 0].tolist()) == set(range(313 // 33))
    own = torch.stack([sub_bag_indices(320, 32, 7, "independent_offset", gen)[:, 0] - base for _ in range(200)])
    assert set(own.flatten().tolist()) == set(range(9)) and (own != own[:, :1]).any(dim=1).all()
    assert (sub_bag_indices(320, 32, 7, "shared_offset", None)[:, 0] == base).all()  # no generator: offset 0


def test_spread_sub_bags_and_short_videos_stay_in_range():
    idx = sub_bag_indices(320, 32, 5, "spread", None)
    assert idx.shape == (32, 5)
    assert (idx == torch.arange(0, 320, 10)[:, None] + torch.tensor([1, 3, 5, 7, 9])).all()
    for mode in ("spread", "shared_offset", "independent_offset"):  # 5 clips into 32 x 7 sub-bags: repeats, in range
        short = sub_bag_indices(5, 32, 7, mode, torch.Generator().manual_seed(0))
        assert short.shape == (32, 7) and short.min() >= 0 and short.max() == 4
    with pytest.raises(ValueError, match="sampling"):
        sub_bag_indices(10, 2, 2, "dense", None)


def test_generator_batch_holds_the_sampled_sub_bags():
    from models import ClipBank

    feats = [torch.arange(n, dtype=torch.float32)[:, None, None].expand(n, 1, 3) for n in (40, 24)]
    bank = ClipBank.from_videos(feats, [1, 0], ["a", "n"])
    cfg = MistConfig(sub_bags=4, sub_bag_len=3, batch_abnormal=1, batch_normal=1)
    batch = MIST(3, cfg).sample_batch(bank, torch.Generator().manual_seed(0))
    assert batch.abnormal.shape == (1, 12, 3) and batch.normal.shape == (1, 12, 3)
    a = batch.abnormal[0, :, 0].view(4, 3)  # the feature is the clip index
    move = a[:, 0] - torch.tensor([0.0, 9, 18, 27])  # starts floor(k * 37 / 4), one shared offset in [0, 7)
    assert (a[:, 1:] - a[:, :-1] == 1).all() and (move == move[0]).all() and 0 <= move[0] < 7


# ----------------------------------------------------------------------------------- losses


def test_mil_loss_by_hand():
    a = torch.tensor([[0.2, 0.9, 0.4]])
    n = torch.tensor([[0.3, 0.1, 0.5]])
    t = mist_mil_loss(a, n, margin=1.0, lam=0.3, topk=1)
    assert t["ranking"].item() == pytest.approx(1 - 0.9 + 0.5)
    assert t["sparsity"].item() == pytest.approx(0.3 * (0.2 + 0.9 + 0.4) / 3)
    assert t["total"].item() == pytest.approx(0.6 + 0.15)
    t2 = mist_mil_loss(a, n, margin=1.0, lam=0.0, topk=2)  # the authors' top-k: mean of the 2 largest
    assert t2["ranking"].item() == pytest.approx(1 - 0.65 + 0.4)
    assert mist_mil_loss(torch.tensor([[1.0]]), torch.tensor([[0.0]]), 1.0, 0.0)["ranking"].item() == 0.0


def test_class_weighted_ce_by_hand_and_frequency_weights():
    p, y = torch.tensor([0.8, 0.3]), torch.tensor([1.0, 0.0])
    expected = -(2.0 * math.log(0.8) + 0.5 * math.log(0.7)) / 2
    assert class_weighted_ce(p, y, 2.0, 0.5).item() == pytest.approx(expected)
    soft = class_weighted_ce(torch.tensor([0.6]), torch.tensor([0.25]), 1.0, 1.0).item()
    assert soft == pytest.approx(-(0.25 * math.log(0.6) + 0.75 * math.log(0.4)))
    assert class_weights("frequency", np.array([1, 0, 0, 0.0])) == pytest.approx((2.0, 2 / 3))
    assert class_weights("none") == (1.0, 1.0) and class_weights("0.8,0.65") == (0.8, 0.65)
    assert math.isfinite(class_weighted_ce(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0]), 1, 1).item())


def test_box_smoothing_and_min_max_normalisation():
    impulse = np.zeros(9)
    impulse[4] = 1.0
    assert box_smooth(impulse, 3, 1) == pytest.approx([0, 0, 0, 1 / 3, 1 / 3, 1 / 3, 0, 0, 0])
    twice = box_smooth(impulse, 5, 2)
    interior = np.convolve(np.convolve(impulse, np.ones(5) / 5, "same"), np.ones(5) / 5, "same")
    assert twice[2:7] == pytest.approx(interior[2:7])  # away from the ends, two box filters
    assert box_smooth(np.full(7, 0.3), 5, 2) == pytest.approx(np.full(7, 0.3))  # ends not pulled to 0
    scores = np.array([0.1, 0.1, 0.2, 0.9, 0.95, 0.9, 0.2, 0.1, 0.1, 0.1])
    labels = refine_pseudo_labels(scores, 5, 2)
    assert labels.dtype == np.float64 and labels.min() == 0.0 and labels.max() == 1.0
    assert int(labels.argmax()) == 4 and labels[4] > labels[2] > labels[0]
    # min-max undefined (a constant row, a single clip): G's smoothed scores are kept
    assert refine_pseudo_labels(np.full(4, 0.8), 5, 2) == pytest.approx(np.full(4, 0.8))
    assert refine_pseudo_labels(np.array([0.2]), 5, 2) == pytest.approx([0.2])


# ------------------------------------------------------------------------------ E_SGA, stage II


def _esga(backbone: str = "i3d"):
    from extractors.c3d import C3D
    from extractors.i3d_inception import InceptionI3d
    from extractors.sga import ESGA

    torch.manual_seed(0)
    net = InceptionI3d() if backbone == "i3d" else C3D()
    return ESGA(net.eval(), expand_k=8, dropout=0.0, clip_len=16)


@pytest.mark.parametrize("backbone,size,dim,grid", [("i3d", 64, 1024, 2), ("c3d", 32, 512, 2)])
def test_esga_shapes_and_gradients(backbone, size, dim, grid):
    model = _esga(backbone).train()
    x = torch.randn(3, 3, 16, size, size)
    out = model(x)
    assert out.logits.shape == (3, 2) and out.guided_logits.shape == (3, 2)
    assert out.attention.shape == (3, grid, grid) and out.feature.shape == (3, dim)
    assert ((out.attention > 0) & (out.attention < 1)).all()
    out.logits.sum().backward()
    # frozen backbone (requires_grad still on): gradients reach it; frozen: none do
    assert model.sga.f1[0].weight.grad is not None and model.sga.f2.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())
    model.zero_grad(set_to_none=True)
    model.set_backbone_trainable(False)
    out = model(x)
    (out.logits.sum() + out.guided_logits.sum()).backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert model.sga.guide.weight.grad.abs().sum() > 0 and model.head.weight.grad.abs().sum() > 0
    assert model.backbone.training  # batch statistics while training (official --use_bn_sta)
    model.bn_batch_stats = False
    assert not model.train().backbone.training  # ft_bn_stats=running: frozen statistics


def test_attended_feature_is_the_final_map_reweighted_by_attention():
    from extractors.sga import backbone_maps

    model = _esga().eval()
    x = torch.randn(2, 3, 16, 64, 64)
    with torch.no_grad():
        out = model(x)
        _, final = backbone_maps(model.backbone, x)
    a = out.attention[:, None, None]  # [N, 1, 1, h, w]
    assert out.feature == pytest.approx((final * (1 + a)).mean(dim=(2, 3, 4)), abs=1e-5)


def test_two_fine_tuning_steps_lower_the_loss():
    from stages.mist import finetune_losses, finetune_step

    model = _esga().train()
    model.set_backbone_trainable(False)  # the first epochs' schedule: attention and heads only
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 16, 32, 32, generator=g)
    y = torch.tensor([1.0, 0.0, 0.7, 0.0])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    nullctx = torch.autocast("cpu", enabled=False)
    before = finetune_losses(model, x, y, 1.5, 0.75, nullctx)["total"].item()
    for _ in range(2):
        terms = finetune_step(model, opt, None, x, y, 1.5, 0.75, nullctx)
        assert set(terms) == {"main", "guided", "total"} and terms["total"] == pytest.approx(terms["main"] + terms["guided"])
    after = finetune_losses(model, x, y, 1.5, 0.75, nullctx)["total"].item()
    assert after < before


def test_decode_clips_matches_the_decoded_frames_and_pads_the_end(tmp_path):
    from conftest import moving_square_video, write_video
    from pipeline.core.video import VideoDecodeError, open_video
    from stages.mist import decode_clips

    path = tmp_path / "v.mp4"
    write_video(path, moving_square_video(40))
    with open_video(path) as src:
        frames = src.read_all()
    clips = decode_clips(path, [16, 0, 32], 16, 30.0)
    assert clips.shape == (3, 16, *frames.shape[1:]) and clips.dtype == np.uint8
    assert (clips[0] == frames[16:32]).all() and (clips[1] == frames[:16]).all()
    assert (clips[2, :8] == frames[32:40]).all() and (clips[2, 8:] == frames[39]).all()  # padded
    with pytest.raises(VideoDecodeError, match="past the video's end"):
        decode_clips(path, [48], 16, 30.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fine_tuning_step_on_cuda_with_mixed_precision():
    from pipeline.core.precision import autocast as make_autocast
    from pipeline.core.precision import grad_scaler
    from stages.mist import finetune_step

    device = torch.device("cuda")
    model = _esga().to(device).train()
    autocast, scaler = make_autocast(device, "auto"), grad_scaler(device, "auto")  # as stage II chooses
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(6, 3, 16, 64, 64, device=device)
    y = torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0, 0.0], device=device)
    terms = finetune_step(model, opt, scaler, x, y, 1.0, 1.0, autocast)
    assert math.isfinite(terms["total"])


def test_overlay_figure_has_an_attention_colour_bar_and_the_clips_score_and_frames_in_its_title():
    """One overlay of a tiny synthetic frame: the attention blended over its box, a colour bar over the
    attention's fixed range [0, 1] (E_SGA's sigmoid, not rescaled per map), the score and frames titled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from stages.mist import overlay_figure

    frame = np.full((24, 32, 3), 100, np.uint8)
    attention = np.full((2, 2), 0.25, np.float16)  # constant, so the bilinear resize keeps 0.25 everywhere
    box = (8, 4, 24, 20)  # left, top, right, bottom
    fig = overlay_figure(frame, attention, box, score=0.8127, frames=(48, 64), video="v01", clip=3)
    try:
        assert len(fig.axes) == 2
        img_ax, bar_ax = fig.axes
        assert bar_ax.get_label() == "<colorbar>"
        assert tuple(float(v) for v in bar_ax.get_ylim()) == (0.0, 1.0)
        assert "attention" in bar_ax.get_ylabel() and "0.25" in bar_ax.get_ylabel()  # this map's min-max
        title = img_ax.get_title()
        assert "v01" in title and "clip 3" in title
        assert "frames 48-63" in title  # [48, 64): the last frame is 63
        assert "score 0.813" in title  # 0.8127 to 3 decimals
        shown = np.asarray(img_ax.images[0].get_array())
        jet = np.asarray(matplotlib.colormaps["jet"](0.25)[:3]) * 255
        assert (shown[0, 0] == 100).all()  # outside the box: the frame
        np.testing.assert_allclose(shown[10, 15], np.floor(0.5 * 100 + 0.5 * jet), atol=1)  # inside: blended
    finally:
        plt.close(fig)
