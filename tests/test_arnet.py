"""AR-Net (models/arnet.py): loss terms by hand (the code's padded-row center loss and the paper's
masked one), 30 + 30 batches checked against an independent numpy computation, clip sampling and
padding as the official data loader does it, strict loading of the official state-dict layout,
causality, training on variable-length clips, and the train stage end to end on clips without a
segment stage."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from models import DETECTORS, ClipBank, MILBatch
from models.arnet import (
    ARNet,
    ARNetConfig,
    center_loss,
    dmil_loss,
    dynamic_k,
    jittered_indices,
    padded_center_loss,
    window_indices,
)

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
    assert cfg.center == "padded_row"


def test_config_from_cli_settings():
    from pipeline.core.config import ConfigError
    from stages.config import build_config

    sets = ["train.alpha=8", "train.dmil_reduction=videos", "train.max_clips=0", "train.center=masked"]
    cfg = build_config(sets=sets, method="ar_net")
    assert isinstance(cfg.train, ARNetConfig)
    assert (cfg.train.alpha, cfg.train.dmil_reduction, cfg.train.max_clips) == (8.0, "videos", 0)
    assert cfg.train.center == "masked"
    for bad in ("train.normal_sampling=random", "train.center=unbiased"):
        with pytest.raises(ConfigError):
            build_config(sets=[bad], method="ar_net")
    for bad in ({"alpha": 0.0}, {"dropout": 1.0}, {"lambda_center": -1.0}, {"max_clips": -1}):
        with pytest.raises(ValueError):
            ARNetConfig(**bad).validate()


def test_network_shape_and_init():
    model = ARNet(D, ARNetConfig())
    assert model.fc.weight.shape == (D, D) and model.classifier.weight.shape == (1, D)  # FC F x F (Eq. 1), AR F -> 1 (Eq. 2)
    assert model.fc.bias.abs().sum() == 0 and model.classifier.bias.abs().sum() == 0
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


def test_padded_center_loss_by_hand():
    # one normal row of 2 clips padded to 4, the padding scored 0.5: mean 0.4, squares 0.04 + 0 + 0.01 + 0.01,
    # torch.var's 1 / (L - 1) = 1/3
    row = torch.tensor([[0.2, 0.4, 0.5, 0.5]])
    assert padded_center_loss(row, torch.tensor([0])).item() == pytest.approx(0.06 / 3, rel=1e-6)
    # anomalous rows contribute nothing; the mean runs over the normal rows
    rows = torch.tensor([[0.9, 0.1, 0.5, 0.5], [0.2, 0.4, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5]])
    assert padded_center_loss(rows, torch.tensor([1, 0, 0])).item() == pytest.approx(0.02 / 2, rel=1e-6)
    assert padded_center_loss(rows[:1], torch.tensor([1])).item() == 0.0  # no normal video
    # the masked form of the same row sees only the 2 real clips: population variance 0.01
    assert center_loss(row, torch.tensor([2]), torch.tensor([0])).item() == pytest.approx(0.01, rel=1e-5)


def test_padded_center_loss_of_a_shanghaitech_like_row():
    """A normal video of 129 clips in a 300-clip row (about 57 % padding), as on ShanghaiTech."""
    rng = np.random.default_rng(0)
    real = rng.uniform(0.0, 0.3, 129)
    pad = 0.62  # the padding's score, sigmoid(classifier(relu(fc.bias))) once the biases have trained
    row = np.concatenate([real, np.full(300 - 129, pad)])
    expected = np.sum((row - row.mean()) ** 2) / (300 - 1)
    got = padded_center_loss(torch.tensor(row[None]), torch.tensor([0])).item()
    assert got == pytest.approx(expected, rel=1e-12)
    assert (300 - 129) / 300 == pytest.approx(0.57, abs=0.005)
    # far from the masked (paper) value: the padding dominates the row
    masked = center_loss(torch.tensor(row[None]), torch.tensor([129]), torch.tensor([0])).item()
    assert masked == pytest.approx(np.var(real), rel=1e-12) and got > 5 * masked


@pytest.mark.parametrize("center", ["padded_row", "masked"])
def test_content_past_a_videos_length_never_matters(center):
    """Whatever sits past a video's length (the code's padding is zeros) changes no loss and no gradient."""
    torch.manual_seed(0)
    model = ARNet(D, ARNetConfig(dropout=0.0, center=center))
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


def numpy_scores(model: ARNet, x: np.ndarray) -> np.ndarray:
    """``Model_single`` without dropout, in float64 numpy from the model's weights: ``[T, D]`` -> ``[T]``."""
    w1, b1 = model.fc.weight.detach().double().numpy(), model.fc.bias.detach().double().numpy()
    w2, b2 = model.classifier.weight.detach().double().numpy(), model.classifier.bias.detach().double().numpy()
    h = np.maximum(x @ w1.T + b1, 0.0)
    return 1.0 / (1.0 + np.exp(-(h @ w2.T + b2)[:, 0]))


def trained_biases(model: ARNet, seed: int) -> None:
    """Non-zero biases, so that the padding's score is not the initial 0.5."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.fc.bias.copy_(torch.rand(model.fc.bias.shape, generator=g))
        model.classifier.bias.fill_(0.3)


def test_30_plus_30_batch_matches_the_official_loss_computed_in_numpy():
    """The published batch: 30 anomalous + 30 normal videos, cut / padded to the batch's longest
    length (300 here), the centre loss over whole padded normal rows. Expected values from numpy,
    video by video, as the code's losses.py loops compute them."""
    d = 8
    torch.manual_seed(3)
    model = ARNet(d, ARNetConfig(dropout=0.0))
    trained_biases(model, 3)
    rng = np.random.default_rng(3)
    lengths = rng.integers(20, 301, 60)
    lengths[0], lengths[31] = 300, 129  # one full-length video; a ShanghaiTech-like normal one
    videos = [rng.normal(size=(t, d)) for t in lengths]
    x = torch.zeros(60, 300, d)
    for i, v in enumerate(videos):
        x[i, : len(v)] = torch.from_numpy(v).float()
    lt = torch.from_numpy(lengths)
    terms = model.losses(MILBatch(x[:30], x[30:], lt[:30], lt[30:]))

    pad = numpy_scores(model, np.zeros((1, d)))[0]  # the zero feature's score
    assert abs(pad - 0.5) > 0.05
    ces, variances = [], []
    for i, v in enumerate(videos):
        s = numpy_scores(model, v.astype(np.float32).astype(np.float64))
        k = math.ceil(len(s) / 4)
        top = np.sort(s)[::-1][:k]
        y = 1 if i < 30 else 0
        ces += list(-np.log(top) if y else -np.log(1 - top))
        if not y:
            row = np.concatenate([s, np.full(300 - len(s), pad)])
            variances.append(np.sum((row - row.mean()) ** 2) / (len(row) - 1))
    assert terms["dmil"].item() == pytest.approx(np.mean(ces), rel=1e-5)
    assert terms["center"].item() == pytest.approx(20.0 * np.mean(variances), rel=1e-5)
    assert terms["total"].item() == pytest.approx(np.mean(ces) + 20.0 * np.mean(variances), rel=1e-5)


def test_rows_are_as_long_as_the_longest_video_of_the_batch():
    """The code cuts all 60 rows to the longest true length: a batch of short videos has short rows,
    so the same normal video's centre loss depends on the batch's longest (anomalous) video."""
    d = 4
    torch.manual_seed(0)
    model = ARNet(d, ARNetConfig(dropout=0.0))
    trained_biases(model, 0)
    xn = torch.randn(1, 5, d)
    pad = numpy_scores(model, np.zeros((1, d)))[0]
    s = numpy_scores(model, xn[0].double().numpy())
    for longest in (5, 12):
        xa = torch.randn(1, longest, d)
        terms = model.losses(MILBatch(xa, xn, torch.tensor([longest]), torch.tensor([5])))
        row = np.concatenate([s, np.full(longest - 5, pad)])
        assert terms["center"].item() == pytest.approx(20.0 * np.var(row, ddof=1), rel=1e-5), longest


def test_losses_match_an_independent_per_video_computation():
    """``center=masked``: ``losses`` on a padded batch equals the terms computed video by video in
    numpy from the unpadded scores (the paper's Eq. 6-7)."""
    torch.manual_seed(1)
    cfg = ARNetConfig(dropout=0.0, alpha=3.0, center="masked")
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


def test_official_state_dict_loads_strictly():
    """``Model_single``'s layout (fc D x D, classifier D -> 1, no other parameters) at the code's 2048-D."""
    model = ARNet(2048, ARNetConfig())
    official = {
        "fc.weight": torch.randn(2048, 2048), "fc.bias": torch.randn(2048),
        "classifier.weight": torch.randn(1, 2048), "classifier.bias": torch.randn(1),
    }
    model.load_state_dict(official, strict=True)
    assert sum(p.numel() for p in model.parameters()) == 2048 * 2048 + 2048 + 2048 + 1 == 4_198_401
    x = torch.randn(3, 2048)
    expected = torch.sigmoid(torch.relu(x @ official["fc.weight"].T + official["fc.bias"]) @ official["classifier.weight"].T + official["classifier.bias"])
    assert torch.allclose(model.eval()(x[None])[0], expected[:, 0], atol=1e-6)


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


def test_jittered_indices_by_hand():
    """The code's random_perturb for T = 7 clips cut to 3: floor(i 7 / 3) = 0, 2, 4; index 0 from
    {0, 1, 2}, index 1 from {2, 3, 4} (both ends included), the last one always 4."""
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([jittered_indices(7, 3, gen) for _ in range(300)])
    assert set(draws[:, 0].tolist()) == {0, 1, 2}
    assert set(draws[:, 1].tolist()) == {2, 3, 4}
    assert set(draws[:, 2].tolist()) == {4}
    # 700 clips to 300: a 2- or 3-clip stride, every index inside [floor(i T / n), floor((i+1) T / n)]
    idx = jittered_indices(700, 300, gen)
    lo = torch.arange(301) * 700 // 300
    assert ((idx >= lo[:-1]) & (idx <= lo[1:])).all() and idx[-1] == 697  # floor(299 * 700 / 300)


def test_window_indices_never_start_at_the_last_position():
    """The code's random_extract draws its start with np.random.randint(T - n): 0 .. T - n - 1."""
    gen = torch.Generator().manual_seed(0)
    starts = {int(window_indices(12, 10, gen)[0]) for _ in range(200)}
    assert starts == {0, 1}
    w = window_indices(450, 300, gen)
    assert torch.equal(w - w[0], torch.arange(300)) and w[-1] < 449


def test_sample_batch_caps_long_videos_as_the_code_does():
    bank = index_bank([50, 7, 40, 6], [1, 1, 0, 0])
    cfg = ARNetConfig(batch_abnormal=2, batch_normal=2, max_clips=10)
    model = ARNet(D, cfg)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        b = model.sample_batch(bank, gen)
        # one row length for all 4 videos: the longest kept one (the code trims to max(seq_len))
        assert b.abnormal.shape[1] == b.normal.shape[1] == 10
        for x, lengths in ((b.abnormal, b.abnormal_lengths), (b.normal, b.normal_lengths)):
            for row, t in zip(x, lengths.tolist()):
                assert (row[t:] == 0).all()  # zero padding after the true length
                video = int(row[0, 0])
                assert t == min(10, [50, 7, 40, 6][video])
                assert (row[:t, 2] == row[0, 2]).all()  # one crop per video
                clips = row[:t, 1]
                if video == 0:  # long anomalous video: random_perturb over strides of 5 clips
                    assert ((clips >= torch.arange(10) * 5) & (clips <= torch.arange(1, 11) * 5)).all()
                    assert clips[-1] == 45
                if video == 2:  # long normal video: a window of 10 consecutive clips starting before 30
                    assert torch.equal(clips - clips[0], torch.arange(10.0)) and clips[0] < 30
    uniform = ARNet(D, ARNetConfig(batch_abnormal=2, batch_normal=2, max_clips=10, normal_sampling="uniform"))
    b = uniform.sample_batch(bank, torch.Generator().manual_seed(1))
    row = b.normal[b.normal[:, 0, 0] == 2][0]
    assert ((row[:, 1] >= torch.arange(10) * 4) & (row[:, 1] <= torch.arange(1, 11) * 4)).all() and row[-1, 1] == 36


def test_published_batch_is_padded_to_300_clips():
    """30 + 30 videos from a bank with 129- to 700-clip videos: every row 300 long, long videos cut to
    300, short ones zero-padded, the shapes the code's loader gives."""
    rng = np.random.default_rng(0)
    lengths = [int(t) for t in rng.integers(129, 701, 80)]
    lengths[40] = 129
    bank = index_bank(lengths, [1] * 40 + [0] * 40, crops=1)
    b = ARNet(D, ARNetConfig()).sample_batch(bank, torch.Generator().manual_seed(0))
    assert b.abnormal.shape == (30, 300, D) and b.normal.shape == (30, 300, D)
    for x, ls in ((b.abnormal, b.abnormal_lengths), (b.normal, b.normal_lengths)):
        for row, t in zip(x, ls.tolist()):
            assert t == min(300, lengths[int(row[0, 0])])
            assert (row[t:] == 0).all() and (row[:t, 0] == row[0, 0]).all()


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


@pytest.mark.parametrize("center", ["padded_row", "masked"])
def test_learns_planted_clips_from_variable_length_videos(center):
    """A ClipBank of 40 videos of 4-40 clips; anomalous ones have 3 planted clips: they end up ranked on top.

    alpha = 16 keeps every k_i <= 3, so the top-k labels are noise-free. Measured over seeds 0-5,
    both center forms learn it with 5 of the 6 seeds; with the sixth (3) the initial ReLUs block
    the planted direction and the MLP memorises noise clips instead. With 12 videos and 4 + 4
    batches that memorisation happened at more seeds (padded_row failed at seed 0), hence 40 videos.
    """
    d = 16
    n = 40
    g = torch.Generator().manual_seed(0)
    lengths = [int(t) for t in torch.randint(4, 41, (n,), generator=g)]
    labels = [1, 0] * (n // 2)
    parts = []
    for t, y in zip(lengths, labels):
        f = torch.randn(t, 1, d, generator=g) * 0.3
        if y:
            s = int(torch.randint(0, t - 2, (1,), generator=g))
            f[s : s + 3, :, 0] += 2.0
        parts.append(f)
    bank = ClipBank(torch.cat(parts), torch.tensor([0] + lengths).cumsum(0), torch.tensor(labels), [str(i) for i in range(n)])
    torch.manual_seed(0)
    model = ARNet(d, ARNetConfig(lr=1e-2, dropout=0.0, batch_abnormal=10, batch_normal=10, alpha=16.0, center=center))
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
    from stages.config import build_config
    from pipeline.core.runner import Runner
    from pipeline.runs import make_context
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
        return Runner(make_context(build_config(sets=[*sets, *extra], method="ar_net"), tmp_path / "run", progress=False), all_stages())

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
    from pipeline.core.status import stage_status

    status = {row["stage"]: row for row in stage_status(changed)}
    assert status["train"]["state"] == "done" and status["train"]["key"] == reports["train"].key
    assert status["evaluate"]["state"] == "done"
    again = {rep.stage: rep for rep in changed.run(["evaluate"])}
    assert again["train"].computed == 0 and again["train"].path == reports["train"].path
    # a training setting does change it
    assert {row["stage"]: row for row in stage_status(runner(["train.alpha=8"]))}["train"]["state"] == "stale"
