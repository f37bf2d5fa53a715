"""MIST stage II against the authors' code (fjchange/MIST_VAD): the self-guided attention branch
(models/Attention.py), the class-weighted loss (stage2training/losses.py), the optimiser schedule
(stage2training/*_train.sh, configs/*_options.py, utils/utils.py), BatchNorm handling
(models/I3D_STD.py), training-clip augmentation and labels (datasets/dataset.py,
opencv_videovision/transforms.py) and the test-time input (Test_Dataset_SHT_I3D).

Expected values are written out by hand or computed with plain numpy here, not by the code under test.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from extractors.sga import OFFICIAL_NAMES, ESGA, SelfGuidedAttention, backbone_maps, to_official_names
from models.mist import MistConfig, class_weighted_ce, class_weights
from stages.mist import (
    augment_clips,
    balanced_batches,
    finetune_step,
    jitter_label,
    lr_factor,
    multiscale_crop_box,
    stage2_settings,
    stratified_clips,
)

NULL = torch.autograd.graph.saved_tensors_hooks(lambda x: x, lambda x: x)  # a no-op context manager


def _conv3d_numpy(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: tuple, pad: tuple) -> np.ndarray:
    """Plain cross-correlation: x [C, T, H, W], w [O, C, kt, kh, kw] -> [O, T', H', W']."""
    x = np.pad(x, [(0, 0)] + [(p, p) for p in pad])
    o, _, kt, kh, kw = w.shape
    t_out = (x.shape[1] - kt) // stride[0] + 1
    h_out = (x.shape[2] - kh) // stride[1] + 1
    w_out = (x.shape[3] - kw) // stride[2] + 1
    out = np.empty((o, t_out, h_out, w_out))
    for t in range(t_out):
        for i in range(h_out):
            for j in range(w_out):
                patch = x[:, t * stride[0] : t * stride[0] + kt, i * stride[1] : i * stride[1] + kh, j * stride[2] : j * stride[2] + kw]
                out[:, t, i, j] = (w * patch[None]).sum(axis=(1, 2, 3, 4)) + b
    return out


# ------------------------------------------------------------------------------ the attention branch


def test_attention_branch_parameters_are_the_official_ones_at_832_channels():
    branch = SelfGuidedAttention(832, expand_k=8, mid_t=4)
    shapes = {n: tuple(p.shape) for n, p in branch.named_parameters()}
    assert shapes == {
        "f1.0.weight": (832, 832, 3, 3, 3), "f1.0.bias": (832,),  # Conv_Atten: 3x3x3, C -> C
        "f1.2.weight": (16, 832, 1, 1, 1), "f1.2.bias": (16,),  # Att_1: C -> 2k
        "f2.weight": (1, 16, 2, 1, 1), "f2.bias": (1,),  # Att_3: kernel (out_t_channels = 2, 1, 1)
        "guide.weight": (16, 16, 1, 1, 1), "guide.bias": (16,),  # Att_2
    }
    expected = 832 * 832 * 27 + 832 + 16 * 832 + 16 + 16 * 2 + 1 + 16 * 16 + 16
    assert sum(p.numel() for p in branch.parameters()) == expected == 18_704_513
    conv = branch.f1[0]
    assert conv.stride == (1, 2, 2) and conv.padding == (0, 1, 1)  # no temporal padding
    assert isinstance(branch.f1[1], nn.ReLU) and isinstance(branch.f1[3], nn.ReLU)


def test_attention_branch_forward_by_hand_at_the_240x320_test_grid():
    """M_(b-4) of a 16x240x320 clip at I3D Mixed_4f is 4x15x20; F1 (no temporal padding) gives
    2x8x10, the 2-tap F2 one time step on Mixed_5c's 8x10 grid."""
    torch.manual_seed(0)
    c, k = 3, 2
    branch = SelfGuidedAttention(c, expand_k=k, mid_t=4).double()
    m = torch.rand(1, c, 4, 15, 20, dtype=torch.float64)
    attention, guided, m_star = branch(m)
    assert m_star.shape == (1, 2 * k, 2, 8, 10) and attention.shape == (1, 1, 1, 8, 10) and guided.shape == (1, 2)
    p = {n: v.detach().numpy() for n, v in branch.named_parameters()}
    f1 = np.maximum(_conv3d_numpy(m[0].numpy(), p["f1.0.weight"], p["f1.0.bias"], (1, 2, 2), (0, 1, 1)), 0)
    f1 = np.maximum(np.einsum("oc,cthw->othw", p["f1.2.weight"][:, :, 0, 0, 0], f1) + p["f1.2.bias"][:, None, None, None], 0)
    np.testing.assert_allclose(m_star[0].detach().numpy(), f1, rtol=1e-10)
    a = 1 / (1 + np.exp(-(np.einsum("ct,cthw->hw", p["f2.weight"][0, :, :, 0, 0], f1) + p["f2.bias"][0])))
    np.testing.assert_allclose(attention[0, 0, 0].detach().numpy(), a, rtol=1e-10)
    g = np.einsum("oc,cthw->othw", p["guide.weight"][:, :, 0, 0, 0], f1) + p["guide.bias"][:, None, None, None]
    pooled = g.mean(axis=(1, 2, 3))  # GAP -> [2k]; channels 0..k-1 normal, k..2k-1 anomalous
    np.testing.assert_allclose(guided[0].detach().numpy(), [pooled[:k].mean(), pooled[k:].mean()], rtol=1e-10)


def test_an_official_layout_state_dict_loads_strictly_into_the_branch_and_head():
    from extractors.c3d import C3D

    torch.manual_seed(0)
    model = ESGA(C3D(), expand_k=8, clip_len=16)
    official = to_official_names(model.state_dict())
    assert sorted(official) == sorted([
        "Conv_Atten.Conv_Atten.0.weight", "Conv_Atten.Conv_Atten.0.bias", "Conv_Atten.Att_1.0.weight",
        "Conv_Atten.Att_1.0.bias", "Conv_Atten.Att_2.weight", "Conv_Atten.Att_2.bias",
        "Conv_Atten.Att_3.0.weight", "Conv_Atten.Att_3.0.bias", "Regressor.1.weight", "Regressor.1.bias"])
    assert official["Regressor.1.weight"].shape == (2, 512) and model.dropout.p == 0.8
    back = {ours + k[len(theirs):]: v for k, v in official.items() for ours, theirs in OFFICIAL_NAMES.items() if k.startswith(theirs)}
    fresh = ESGA(C3D(), expand_k=8, clip_len=16)
    fresh.load_state_dict({**{k: v for k, v in fresh.state_dict().items() if k.startswith("backbone.")}, **back}, strict=True)
    assert torch.equal(fresh.sga.f2.weight, model.sga.f2.weight)


# ------------------------------------------------------------------------------ loss and class weights


def test_fixed_class_weighted_ce_by_hand():
    p = np.array([0.9, 0.2, 0.6, 0.0])
    y = np.array([1.0, 0.0, 0.3, 0.0])
    wa, wn = 0.8, 0.65
    eps = 1e-8
    expected = np.mean(-wa * y * np.log(p + eps) - wn * (1 - y) * np.log(1 - p + eps))
    got = class_weighted_ce(torch.tensor(p), torch.tensor(y), wa, wn).item()
    assert got == pytest.approx(expected, rel=1e-12)
    # the weight on y log p (0.8) is the anomalous one: an anomalous clip at p = 0.5 costs 0.8 log 2
    assert class_weighted_ce(torch.tensor([0.5]), torch.tensor([1.0]), wa, wn).item() == pytest.approx(0.8 * math.log(2))
    assert class_weighted_ce(torch.tensor([0.5]), torch.tensor([0.0]), wa, wn).item() == pytest.approx(0.65 * math.log(2))
    # p = 1 on a normal clip: finite, -0.65 log(1e-8)
    assert class_weighted_ce(torch.tensor([1.0]), torch.tensor([0.0]), wa, wn).item() == pytest.approx(-0.65 * math.log(1e-8))


def test_recipe_defaults_per_backbone():
    cfg = MistConfig()
    i3d, c3d = stage2_settings(cfg, "i3d_inception"), stage2_settings(cfg, "c3d_fc6")
    ucf = stage2_settings(MistConfig(ft_recipe="ucf_c3d"), "c3d_fc6")
    assert class_weights(i3d.class_weights) == (0.8, 0.65) and class_weights(c3d.class_weights) == (1.0, 1.0)
    assert (i3d.batch_videos, i3d.accumulate, i3d.freeze_epochs, i3d.freeze_bn_epochs, i3d.grad_clip) == (10, 3, 30, 30, 20.0)
    assert (c3d.batch_videos, c3d.accumulate, c3d.freeze_epochs, c3d.grad_clip) == (10, 1, 30, 10.0)
    assert (ucf.batch_videos, ucf.accumulate, ucf.freeze_epochs, ucf.grad_clip, ucf.decay_biases) == (32, 5, 60, 20.0, False)
    assert (i3d.epochs, i3d.lr, i3d.warmup_epochs, i3d.weight_decay, i3d.dropout, i3d.expand_k, i3d.clips_per_video) == (
        301, 1e-4, 5, 5e-4, 0.8, 8, 3)
    assert i3d.bn_batch_stats and i3d.bn_momentum == 0.1
    assert (i3d.test_crops, i3d.test_size, i3d.train_size) == ("none", (240, 320), (256, 340))
    assert (c3d.test_crops, c3d.test_size, c3d.train_size, c3d.grayscale) == ("center", (128, 171), (128, 171), 0.1)
    # Normalize(mean 128, std 128) of the I3D datasets; the C3D datasets' BGR mean is the C3D extractor's own
    assert (i3d.input_norm, c3d.input_norm, ucf.input_norm) == ((128.0, 128.0), None, None)
    assert stage2_settings(MistConfig(ft_input_norm="extractor"), "i3d_inception").input_norm is None
    # every recipe's frames go through cv2.resize (opencv_videovision/functional.py, INTER_LINEAR)
    assert (i3d.resize_dtype, c3d.resize_dtype, ucf.resize_dtype) == ("opencv",) * 3
    assert stage2_settings(MistConfig(ft_resize="extract"), "i3d_inception").resize_dtype is None
    # explicit settings win over the recipe
    mine = stage2_settings(MistConfig(ft_batch_videos=4, ft_accumulate=1, ft_class_weights="frequency", ft_test_input="extract"), "i3d_inception")
    assert (mine.batch_videos, mine.accumulate, mine.class_weights, mine.test_crops) == (4, 1, "frequency", None)


# ------------------------------------------------------------------------------ optimisation schedule


class _TwoHeads(nn.Module):
    """A stand-in for E_SGA: two linear heads on flat inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 2)
        self.b = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.a(x), guided_logits=self.b(x))


def test_three_accumulated_batches_equal_one_step_on_their_summed_loss():
    torch.manual_seed(0)
    xs = [torch.randn(6, 4) for _ in range(3)]
    ys = [torch.rand(6) for _ in range(3)]
    acc, ref = _TwoHeads(), _TwoHeads()
    ref.load_state_dict(acc.state_dict())
    opt_acc = torch.optim.SGD(acc.parameters(), lr=0.1)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    clip = 0.05  # small enough to bite: the summed gradient is clipped once, before the step
    for i, (x, y) in enumerate(zip(xs, ys)):
        finetune_step(acc, opt_acc, None, x, y, 0.8, 0.65, NULL, step=i == 2, grad_clip=clip)
        if i < 2:
            assert all(p.grad is not None for p in acc.parameters())  # held, not yet stepped
    total = 0
    for x, y in zip(xs, ys):
        out = ref(x)
        pa = torch.softmax(out.logits, -1)[:, 1]
        pg = torch.softmax(out.guided_logits, -1)[:, 1]
        total = total + class_weighted_ce(pa, y, 0.8, 0.65) + class_weighted_ce(pg, y, 0.8, 0.65)
    total.backward()
    norm = torch.sqrt(sum((p.grad**2).sum() for p in ref.parameters()))
    assert norm > clip
    for p in ref.parameters():
        p.grad *= clip / (norm + 1e-6)
    opt_ref.step()
    for p, q in zip(acc.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        assert p.grad is None  # zeroed after the step


def test_published_shanghaitech_epoch_is_six_balanced_batches_stepped_every_three():
    """63 anomalous + 175 normal training videos, 10 + 10 per batch, last partial batch dropped: 6 batches
    an epoch; the official counter steps after batches 0 and 3 of each epoch, batches 4 and 5 carrying
    into the next epoch's first step, so every step but the very first sums 3 batches."""
    gen = torch.Generator().manual_seed(0)
    abnormal, normal = list(range(63)), list(range(63, 238))
    batches = balanced_batches(abnormal, normal, 10, gen)
    assert len(batches) == 6 and all(len(b) == 20 for b in batches)
    assert all(set(b[:10]) <= set(normal) and set(b[10:]) <= set(abnormal) for b in batches)
    assert len({v for b in batches for v in b[10:]}) == 60  # no anomalous video twice in an epoch
    sizes, pending = [], 0
    for _epoch in range(3):
        for i in range(len(batches)):
            pending += 1
            if i % 3 == 0:
                sizes.append(pending)
                pending = 0
    assert sizes == [1, 3, 3, 3, 3, 3]


def test_warm_up_then_constant_learning_rate():
    lrs = [1e-4 * lr_factor(e, 5) for e in (0, 1, 2, 3, 4, 5, 30, 300)]
    assert lrs == pytest.approx([1e-5, 3e-5, 5e-5, 7e-5, 9e-5, 1e-4, 1e-4, 1e-4])


# ------------------------------------------------------------------------------ BatchNorm handling


def test_batch_norm_affine_frozen_then_trained_and_batch_statistics_used():
    from extractors.i3d_inception import InceptionI3d

    torch.manual_seed(0)
    model = ESGA(InceptionI3d(), expand_k=8, clip_len=16)
    bns = [m for m in model.backbone.modules() if hasattr(m, "running_mean")]
    bn_params = {id(p) for m in bns for p in m.parameters(recurse=False)}
    assert len(bns) == 57 and len(bn_params) == 57  # one offset (bias) per Sonnet batch norm

    def trainable() -> tuple[set, set]:
        ps = list(model.backbone.parameters())
        return ({p.requires_grad for p in ps if id(p) in bn_params}, {p.requires_grad for p in ps if id(p) not in bn_params})

    model.set_backbone_trainable(False, False)  # epochs < 30
    assert trainable() == ({False}, {False})
    model.set_backbone_trainable(True, False)  # backbone free, --freeze_bn still on
    assert trainable() == ({False}, {True})
    model.set_backbone_trainable(True, True)  # epochs >= 30
    assert trainable() == ({True}, {True})

    model.set_backbone_trainable(False, False)
    model.set_bn_momentum(0.1)
    first = bns[0]
    seen = {}
    first.register_forward_hook(lambda mod, inp, out: seen.update(x=inp[0].detach().clone()))
    before = first.running_mean.clone()
    x = torch.randn(2, 3, 16, 32, 32)
    model.train()
    assert model.backbone.training  # --use_bn_sta: batch statistics even with the backbone frozen
    with torch.no_grad():
        model(x)
    batch_mean = seen["x"].mean(dim=(0, 2, 3, 4))
    torch.testing.assert_close(first.running_mean, 0.9 * before + 0.1 * batch_mean, rtol=1e-5, atol=1e-6)
    model.eval()
    after = first.running_mean.clone()
    with torch.no_grad():
        model(x)
    assert torch.equal(first.running_mean, after)  # eval: running statistics, untouched


def test_batch_norm_scale_of_ones_as_the_official_affine_batchnorm():
    from extractors.i3d_inception import InceptionI3d

    torch.manual_seed(0)
    plain = InceptionI3d()
    scaled = ESGA(InceptionI3d(), expand_k=8, clip_len=16, bn_scale=True)
    scaled.backbone.load_state_dict(plain.state_dict(), strict=False)
    bns = [m for m in scaled.backbone.modules() if hasattr(m, "running_mean")]
    assert all(torch.equal(m.weight, torch.ones_like(m.bias)) for m in bns)  # gamma = 1, 57 of them
    assert sum(k.endswith(".bn.weight") for k in scaled.state_dict()) == 57
    assert not any(k.endswith(".bn.weight") for k in plain.state_dict())  # the extractor's layout is unchanged
    plain.eval(), scaled.eval()
    x = torch.randn(1, 3, 16, 32, 32)
    with torch.no_grad():
        for a, b in zip(backbone_maps(scaled.backbone, x), backbone_maps(plain, x)):
            torch.testing.assert_close(a, b)  # gamma = 1 changes nothing until it trains
    scaled.set_backbone_trainable(True, False)
    assert not any(m.weight.requires_grad for m in bns)  # --freeze_bn: gamma frozen with beta
    scaled.set_backbone_trainable(True, True)
    assert all(m.weight.requires_grad and m.bias.requires_grad for m in bns)
    bns[0].weight.data.fill_(2.0)  # gamma scales the normalised map
    bn = bns[0]
    y = torch.randn(2, bn.bias.numel(), 2, 3, 3)
    expect = (y - bn.running_mean[None, :, None, None, None]) / torch.sqrt(bn.running_var + bn.eps)[None, :, None, None, None]
    torch.testing.assert_close(bn(y), 2.0 * expect + bn.bias[None, :, None, None, None])


# ------------------------------------------------------------------------------ clips, labels, augmentation


def test_stratified_clip_sampling_is_the_official_random_perturb():
    gen = torch.Generator().manual_seed(0)
    draws = np.array([stratified_clips(5, 3, gen) for _ in range(400)])
    assert set(draws[:, 0]) == {0, 1} and set(draws[:, 1]) == {1, 2, 3} and set(draws[:, 2]) == {3, 4}
    assert stratified_clips(1, 3, gen) == [0, 0, 0] and stratified_clips(0, 3, gen) == [0, 0, 0]


def test_jittered_clip_labels_by_hand():
    y = np.array([0.2, 0.6, 1.0], np.float32)
    # 4 frames into clip 0 of 16: the clip covers 12 frames of clip 0 and 4 of clip 1
    assert jitter_label(y, 0, 4, 16, "swapped") == pytest.approx(0.25 * 0.2 + 0.75 * 0.6)  # as the official I3D dataset
    assert jitter_label(y, 0, 4, 16, "overlap") == pytest.approx(0.75 * 0.2 + 0.25 * 0.6)
    assert jitter_label(y, 0, 4, 16, "max") == pytest.approx(0.6)
    assert jitter_label(y, 0, 0, 16, "swapped") == pytest.approx(0.6)  # begin 0: all weight on clip c + 1
    assert jitter_label(y, 2, 5, 16, "swapped") == pytest.approx(1.0)  # no next clip: its own label


def test_multiscale_crop_boxes_at_the_official_i3d_geometry():
    gen = torch.Generator().manual_seed(0)
    boxes = {multiscale_crop_box(256, 340, 224, gen) for _ in range(3000)}
    sizes = {(ch, cw) for _, _, ch, cw in boxes}
    assert sizes == {(256, 256), (256, 204), (204, 256), (204, 204)}  # 256 and int(0.8 * 256), one scale apart at most
    # 256x256 crops: width step (340 - 256) // 4 = 21, height step 0
    assert {(t, l) for t, l, ch, cw in boxes if (ch, cw) == (256, 256)} == {(0, 0), (0, 21), (0, 42), (0, 63), (0, 84)}
    # 204x204: steps 34 and 13; the 13 official places (corners, centre, edge middles, quarter points)
    places = {(y * 13, x * 34) for x, y in [(0, 0), (4, 0), (0, 4), (4, 4), (2, 2), (0, 2), (4, 2), (2, 4), (2, 0),
                                             (1, 1), (3, 1), (1, 3), (3, 3)]}
    assert {(t, l) for t, l, ch, cw in boxes if (ch, cw) == (204, 204)} == places


def test_augmented_clip_shapes_centre_crop_flip_and_grayscale(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    frames = torch.rand(3, 3, 4, 32, 40) * 255
    out = augment_clips(frames, 28, gen, 0.0, True)
    assert out.shape == (3, 3, 4, 28, 28) and out.dtype == torch.float32
    plain = augment_clips(frames, 28, gen, 0.0, False)
    assert torch.equal(plain, frames[..., 2:30, 6:34])  # no augmentation: the centre crop
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    gray = augment_clips(frames, 28, g1, 1.0, True)
    color = augment_clips(frames, 28, g2, 1e-12, True)  # the same draws, grayscale never taken
    expected = 0.114 * color[:, 0] + 0.587 * color[:, 1] + 0.299 * color[:, 2]  # cv2 RGB2GRAY on BGR frames
    for c in range(3):
        torch.testing.assert_close(gray[:, c], expected)
    import stages.mist

    monkeypatch.setattr(stages.mist, "multiscale_crop_box", lambda h, w, size, gen: (0, 0, h, w))  # whole frame
    square = frames[:1, ..., :32]
    outs = [augment_clips(square, 32, torch.Generator().manual_seed(s), 0.0, True) for s in range(16)]
    flipped = [bool(torch.equal(o, square.flip(-1))) for o in outs]
    assert all(f or torch.equal(o, square) for f, o in zip(flipped, outs))
    assert 2 <= sum(flipped) <= 14  # p = 0.5


def test_training_batch_decodes_jittered_clips_with_their_labels(tmp_path):
    from conftest import moving_square_video, write_video
    from stages.mist import sample_training_batch

    path = tmp_path / "v.mp4"
    write_video(path, moving_square_video(64, h=48, w=64))
    videos = [
        {"path": path, "label": 1, "starts": [0, 16, 32, 48], "labels": np.array([0.0, 0.5, 1.0, 1.0], np.float32)},
        {"path": path, "label": 0, "starts": [0, 16, 32, 48], "labels": np.zeros(4, np.float32)},
    ]
    s = stage2_settings(MistConfig(ft_train_size="36x48"), "i3d_inception")
    ext = SimpleNamespace(crop_size=32, normalize=lambda x: x / 127.5 - 1)
    x, y = sample_training_batch(videos, [1, 0], s, ext, 16, 30.0, "uint8", torch.device("cpu"), torch.Generator().manual_seed(0))
    assert x.shape == (6, 3, 16, 32, 32) and y.shape == (6,)
    assert (y[:3] == 0).all() and ((y[3:] >= 0) & (y[3:] <= 1)).all() and x.min() >= -1 and x.max() <= 1


# ------------------------------------------------------------------------------ test-time input


def test_test_time_input_is_the_whole_frame_at_240x320(tmp_path):
    from conftest import moving_square_video, write_video
    from extractors.i3d_inception import InceptionI3d
    from extractors.sga import SGAExtractor
    from pipeline.core.store import atomic_torch_save
    from stages.config import build_config
    from extractors.stream import iter_clip_features

    torch.manual_seed(0)
    model = ESGA(InceptionI3d(), expand_k=8, clip_len=16)
    s = stage2_settings(MistConfig(), "i3d_inception")
    atomic_torch_save(tmp_path / "encoder.pt", {
        "backbone": "i3d_inception", "expand_k": 8, "clip_len": 16, "feature_dim": 1024,
        "state_dict": model.state_dict(), "test_input": {"resize": ["fixed", *s.test_size], "crops": s.test_crops},
        "input_norm": list(s.input_norm), "resize_dtype": s.resize_dtype})
    base = SimpleNamespace(registry_name="i3d_inception", device="cpu", resize=("short", 256), crop_size=224, clip_len=16,
                           model=InceptionI3d(), normalize=lambda x: x / 127.5 - 1)
    sga = SGAExtractor(base, tmp_path / "encoder.pt")
    assert sga.resize == ("fixed", 240, 320) and sga.input_crops == "none" and sga.resize_dtype == "opencv"
    # the extract path resizes with the encoder's rule, not the run's extract.resize_dtype
    from extractors.transforms import resize_frames
    from extractors.stream import network_input

    frames = torch.randint(0, 256, (1, 2, 480, 640, 3), dtype=torch.uint8)
    plain = SimpleNamespace(resize=("fixed", 240, 320), crop_size=224, normalize=lambda x: x)
    for ext, rule in ((plain, "uint8"), (SimpleNamespace(**vars(plain), resize_dtype="opencv"), "opencv")):
        got = network_input(ext, frames, "none", "torchvision", "uint8")
        torch.testing.assert_close(got[0].permute(1, 0, 2, 3), resize_frames(frames[0], ("fixed", 240, 320), rule))
    pixels = torch.tensor([0.0, 64.0, 128.0, 255.0]).view(1, 1, 4, 1, 1).expand(1, 3, 4, 1, 1).contiguous()
    expect = torch.tensor([-1.0, -0.5, 0.0, 127.0 / 128.0]).view(1, 1, 4, 1, 1).expand(1, 3, 4, 1, 1)
    torch.testing.assert_close(sga.normalize(pixels), expect)  # (x - 128) / 128, not x / 127.5 - 1
    torch.testing.assert_close(sga.normalize_(pixels.clone()), expect)
    seen = []
    sga.features = lambda x: seen.append(tuple(x.shape)) or torch.zeros(len(x), 1024)  # the shape, not the network
    path = tmp_path / "v.mp4"
    write_video(path, moving_square_video(32, h=96, w=160))
    cfg = build_config(sets=["extract.crops=10", "extract.batch_clips=2"])  # the extract stage's 10 crops do not apply
    info: dict = {}
    feats = [f for _, _, f in iter_clip_features(cfg, sga, path, info=info)]
    assert seen == [(2, 3, 16, 240, 320)] and [f.shape for f in feats] == [(1, 1024)] * 2
    assert info["crops"] == ["full"] and info["crop_setting"] == "none"
