"""AR-Net (models/arnet.py): loss terms by hand, padding never leaking, clip sampling, causality,
training on variable-length clips, and the train stage end to end on clips without a segment stage."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from models import DETECTORS, ClipBank, MILBatch
from models.arnet import ARNet, ARNetConfig, center_loss, dmil_loss, dynamic_k

D = 6

# ----------------------------------------------------------------------------------------------- config


def test_registered_with_cited_defaults():
    assert DETECTORS.get_class("ar_net") is ARNet
    assert ARNet.input_level == "clips" and ARNet.causal is True
    cfg = ARNetConfig()
    assert cfg.method == "ar_net"
    assert (cfg.lr, cfg.weight_decay, cfg.iterations) == (1e-4, 5e-4, 4760)
    assert (cfg.batch_abnormal, cfg.batch_normal) == (30, 30)
    assert (cfg.alpha, cfg.lambda_center, cfg.dropout) == (4.0, 20.0, 0.7)
    assert (cfg.max_clips, cfg.normal_sampling, cfg.dmil_reduction) == (300, "window", "instances")


def test_config_from_cli_settings():
    from pipeline.config import ConfigError, build_config

    cfg = build_config(sets=["train.alpha=8", "train.dmil_reduction=videos", "train.max_clips=0"], method="ar_net")
    assert isinstance(cfg.train, ARNetConfig)
    assert (cfg.train.alpha, cfg.train.dmil_reduction, cfg.train.max_clips) == (8.0, "videos", 0)
    with pytest.raises(ConfigError):
        build_config(sets=["train.normal_sampling=random"], method="ar_net")
    for bad in ({"alpha": 0.0}, {"dropout": 1.0}, {"lambda_center": -1.0}, {"max_clips": -1}):
        with pytest.raises(ValueError):
            ARNetConfig(**bad).validate()


def test_network_shape_and_init():
    model = ARNet(D, ARNetConfig())
    assert model.fc.weight.shape == (D, D) and model.ar.weight.shape == (1, D)  # FC F x F (Eq. 1), AR F -> 1 (Eq. 2)
    assert model.fc.bias.abs().sum() == 0 and model.ar.bias.abs().sum() == 0
    bound = math.sqrt(6 / (D + D))  # Xavier-uniform bound
    assert model.fc.weight.abs().max() <= bound


# ----------------------------------------------------------------------------------------------- losses


def test_dynamic_k_by_hand():
    lengths = torch.tensor([1, 3, 4, 5, 8, 9, 300])
    assert dynamic_k(lengths, 4.0).tolist() == [1, 1, 1, 2, 2, 3, 75]  # ceil(t / 4), Eq. 3
    assert dynamic_k(lengths, 3.0).tolist() == [1, 1, 2, 2, 3, 3, 100]
    assert dynamic_k(lengths, 0.5).tolist() == lengths.tolist()  # never more than the video has


PAD = 0.99  # padding values that would win every top-k if they leaked

# row 0 anomalous, 5 clips (k = 2); row 1 normal, 3 clips (k = 1); row 2 normal, 7 clips (k = 2)
SCORES = torch.tensor(
    [
        [0.2, 0.9, 0.4, 0.7, 0.1, PAD, PAD],
        [0.3, 0.6, 0.2, PAD, PAD, PAD, PAD],
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.05],
    ]
)
LENGTHS = torch.tensor([5, 3, 7])
LABELS = torch.tensor([1, 0, 0])


def test_dmil_loss_by_hand():
    # top-k_i of each video against its label, written out
    ce0 = [-math.log(0.9), -math.log(0.7)]  # anomalous: -log s
    ce1 = [-math.log(1 - 0.6)]  # normal: -log(1 - s)
    ce2 = [-math.log(1 - 0.6), -math.log(1 - 0.5)]
    code = sum(ce0 + ce1 + ce2) / 5  # the code: mean over all 5 selected clips
    paper = (sum(ce0) / 2 + sum(ce1) / 1 + sum(ce2) / 2) / 3  # Eq. 5 per video, then mean over videos
    assert dmil_loss(SCORES, LENGTHS, LABELS, 4.0, "instances").item() == pytest.approx(code, rel=1e-6)
    assert dmil_loss(SCORES, LENGTHS, LABELS, 4.0, "videos").item() == pytest.approx(paper, rel=1e-6)
    with pytest.raises(ValueError):
        dmil_loss(SCORES, LENGTHS, LABELS, 4.0, "neither")


def test_center_loss_by_hand():
    # normal videos only: numpy's population variance of each one's valid scores, averaged
    expected = (np.var([0.3, 0.6, 0.2]) + np.var([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.05])) / 2
    assert center_loss(SCORES, LENGTHS, LABELS).item() == pytest.approx(expected, rel=1e-5)
    # by hand for one video: c = 0.4, ((0.1)^2 + (0.1)^2 + 0) / 3
    one = center_loss(torch.tensor([[0.3, 0.5, 0.4, PAD]]), torch.tensor([3]), torch.tensor([0]))
    assert one.item() == pytest.approx(0.02 / 3, rel=1e-5)
    # anomalous videos contribute nothing; a batch without normal videos gives 0
    assert center_loss(SCORES[:1], LENGTHS[:1], LABELS[:1]).item() == 0.0


def test_padding_never_reaches_the_losses_or_gradients():
    torch.manual_seed(0)
    model = ARNet(D, ARNetConfig(dropout=0.0))
    xa, xn = torch.randn(2, 9, D), torch.randn(3, 5, D)
    la, ln = torch.tensor([9, 4]), torch.tensor([5, 2, 3])

    def run(fill: float) -> tuple[dict, list]:
        a, n = xa.clone(), xn.clone()
        a[1, 4:], n[1, 2:], n[2, 3:] = fill, fill, fill
        model.zero_grad()
        terms = model.losses(MILBatch(a, n, la, ln))
        terms["total"].backward()
        return terms, [p.grad.clone() for p in model.parameters()]

    t0, g0 = run(0.0)
    t1, g1 = run(1e3)
    for k in t0:
        assert t0[k].item() == pytest.approx(t1[k].item(), rel=1e-6), k
    for a, b in zip(g0, g1):
        assert torch.allclose(a, b, atol=1e-7)


def test_losses_match_an_independent_per_video_computation():
    """``losses`` on a padded batch equals the terms computed video by video in numpy from the unpadded scores."""
    torch.manual_seed(1)
    cfg = ARNetConfig(dropout=0.0, alpha=3.0)
    model = ARNet(D, cfg)
    videos = [(torch.randn(t, D), y) for t, y in ((7, 1), (2, 1), (10, 1), (4, 0), (8, 0))]
    pad = lambda xs: torch.nn.utils.rnn.pad_sequence(xs, batch_first=True)  # noqa: E731
    batch = MILBatch(
        pad([x for x, y in videos if y]), pad([x for x, y in videos if not y]),
        torch.tensor([len(x) for x, y in videos if y]), torch.tensor([len(x) for x, y in videos if not y]),
    )
    terms = model.losses(batch)
    ces, centers = [], []
    with torch.no_grad():
        for x, y in videos:
            s = np.sort(model(x[None])[0].double().numpy())[::-1]
            k = math.ceil(len(s) / 3.0)
            top = s[:k]
            ces += list(-np.log(top) if y else -np.log(1 - top))
            if not y:
                centers.append(np.mean((s - s.mean()) ** 2))
    assert terms["dmil"].item() == pytest.approx(np.mean(ces), rel=1e-5)
    assert terms["center"].item() == pytest.approx(20.0 * np.mean(centers), rel=1e-5)
    assert terms["total"].item() == pytest.approx(terms["dmil"].item() + terms["center"].item(), rel=1e-6)


# ----------------------------------------------------------------------------------------------- sampling


def index_bank(lengths: list[int], labels: list[int], crops: int = 2) -> ClipBank:
    """Clip j of video i has feature ``[i, j, crop, 0, ...]``, so a batch shows which clips it holds."""
    parts = []
    for i, t in enumerate(lengths):
        f = torch.zeros(t, crops, D)
        f[:, :, 0] = i
        f[:, :, 1] = torch.arange(t, dtype=torch.float32)[:, None]
        f[:, :, 2] = torch.arange(crops, dtype=torch.float32)[None, :]
        parts.append(f)
    offsets = torch.tensor([0] + lengths).cumsum(0)
    return ClipBank(torch.cat(parts), offsets, torch.tensor(labels), [f"v{i}" for i in range(len(lengths))])


def test_sample_batch_caps_long_videos_as_the_code_does():
    bank = index_bank([50, 7, 40, 6], [1, 1, 0, 0])
    cfg = ARNetConfig(batch_abnormal=2, batch_normal=2, max_clips=10)
    model = ARNet(D, cfg)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        b = model.sample_batch(bank, gen)
        for x, lengths in ((b.abnormal, b.abnormal_lengths), (b.normal, b.normal_lengths)):
            assert x.shape[1] == int(lengths.max()) <= 10
            for row, t in zip(x, lengths.tolist()):
                assert (row[t:] == 0).all()  # zero padding after the true length
                video = int(row[0, 0])
                assert t == min(10, [50, 7, 40, 6][video])
                assert (row[:t, 2] == row[0, 2]).all()  # one crop per video
                clips = row[:t, 1]
                if video == 0:  # long anomalous video: one jittered clip in each stride of 5 clips
                    assert ((clips >= torch.arange(10) * 5) & (clips < torch.arange(1, 11) * 5)).all()
                if video == 2:  # long normal video: a window of 10 consecutive clips
                    assert torch.equal(clips - clips[0], torch.arange(10.0))
    uniform = ARNet(D, ARNetConfig(batch_abnormal=2, batch_normal=2, max_clips=10, normal_sampling="uniform"))
    b = uniform.sample_batch(bank, torch.Generator().manual_seed(1))
    row = b.normal[b.normal[:, 0, 0] == 2][0]
    assert ((row[:, 1] >= torch.arange(10) * 4) & (row[:, 1] < torch.arange(1, 11) * 4)).all()


def test_no_cap_keeps_every_clip():
    bank = index_bank([50, 7, 40, 6], [1, 1, 0, 0], crops=1)
    model = ARNet(D, ARNetConfig(batch_abnormal=2, batch_normal=2, max_clips=0))
    b = model.sample_batch(bank, torch.Generator().manual_seed(0))
    assert sorted(b.abnormal_lengths.tolist()) == [7, 50] and sorted(b.normal_lengths.tolist()) == [6, 40]


# ----------------------------------------------------------------------------------------------- scoring


def test_causal_scores_each_clip_on_its_own():
    torch.manual_seed(0)
    model = ARNet(D, ARNetConfig()).eval()
    x = torch.randn(3, 12, D)
    whole = model(x)
    one_by_one = torch.stack([model(x[:, j : j + 1])[:, 0] for j in range(12)], dim=1)
    assert torch.allclose(whole, one_by_one, atol=1e-6)
    x2 = x.clone()
    x2[:, 6:] = torch.randn(3, 6, D)  # later clips change: earlier scores do not
    assert torch.equal(model(x2)[:, :6], whole[:, :6])
    assert torch.allclose(model.score(x), whole.mean(0))  # crops averaged
    assert ((whole >= 0) & (whole <= 1)).all()


def test_learns_planted_clips_from_variable_length_videos():
    """A ClipBank of 4-40-clip videos; anomalous ones have 3 planted clips: they end up ranked on top.

    alpha = 16 keeps every k_i <= 3, so the top-k labels are noise-free and the outcome is not seed luck.
    """
    d = 16  # enough hidden units that some ReLU passes the planted direction whatever the init
    g = torch.Generator().manual_seed(0)
    lengths = [int(t) for t in torch.randint(4, 41, (12,), generator=g)]
    labels = [1, 0] * 6
    parts = []
    for t, y in zip(lengths, labels):
        f = torch.randn(t, 1, d, generator=g) * 0.3
        if y:
            s = int(torch.randint(0, t - 2, (1,), generator=g))
            f[s : s + 3, :, 0] += 2.0
        parts.append(f)
    bank = ClipBank(torch.cat(parts), torch.tensor([0] + lengths).cumsum(0), torch.tensor(labels), [str(i) for i in range(12)])
    torch.manual_seed(0)
    model = ARNet(d, ARNetConfig(lr=1e-2, dropout=0.0, batch_abnormal=4, batch_normal=4, alpha=16.0))
    opt = model.make_optimizer()
    gen = torch.Generator().manual_seed(0)
    for _ in range(150):
        terms = model.losses(model.sample_batch(bank, gen))
        opt.zero_grad()
        terms["total"].backward()
        opt.step()
    for i, y in enumerate(labels):
        s = model.score(bank.bags(i))
        planted = bank.clips(i)[:, 0, 0] > 1.0
        if y:
            assert s[planted].min() > s[~planted].max(), i
        else:
            assert s.max() < 0.5, i


# ----------------------------------------------------------------------------------------------- train stage


def test_train_stage_end_to_end_on_clips_without_segment_stage(tmp_path):
    from conftest import register_test_extractor
    from pipeline.config import build_config
    from pipeline.runner import Context, Runner
    from stages import all_stages
    from test_runner import make_dataset

    manifest = make_dataset(tmp_path / "data")
    register_test_extractor()
    sets = [
        f"data.manifest={manifest}",
        "extract.backbone=test_motion",
        "extract.crops=center",
        "train.iterations=40",
        "train.batch_abnormal=4",
        "train.batch_normal=4",
        "train.lr=0.01",
        "train.checkpoint_every=20",
    ]

    def runner(extra: list[str] = ()) -> Runner:
        return Runner(Context(build_config(sets=[*sets, *extra], method="ar_net"), tmp_path / "run", progress=False), all_stages())

    r = runner()
    assert r.upstream_of("train") == ("extract",)
    reports = {rep.stage: rep for rep in r.run(["evaluate"])}
    assert "segment" not in reports  # clip-level: no segment stage at all
    assert reports["train"].state == "computed" and reports["evaluate"].state == "computed"
    saved = torch.load(reports["train"].path / "model.pt", weights_only=True)
    assert saved["method"] == "ar_net" and saved["input_level"] == "clips" and saved["feature_dim"] == 7
    metrics = json.loads((reports["evaluate"].path / "metrics.json").read_text())
    assert 0.0 <= metrics["auc"] <= 1.0

    # segment settings are not the train stage's inputs: its key, and so its cached model, stay
    changed = runner(["segment.scheme=rtfm", "segment.num_segments=16"])
    status = {row["stage"]: row for row in changed.status()}
    assert status["train"]["state"] == "done" and status["train"]["key"] == reports["train"].key
    assert status["evaluate"]["state"] == "done"
    again = {rep.stage: rep for rep in changed.run(["evaluate"])}
    assert again["train"].computed == 0 and again["train"].path == reports["train"].path
    # a training setting does change it
    assert {row["stage"]: row for row in runner(["train.alpha=8"]).status()}["train"]["state"] == "stale"
