"""AR-Net: Anomaly Regression Net with the dynamic MIL and center losses.

B. Wan, Y. Fang, X. Xia, J. Mei, "Weakly Supervised Video Anomaly Detection via Center-guided
Discriminative Learning", ICME 2020 (arXiv:2104.07268). Defaults are those of the authors' code,
github.com/wanboyang/Anomaly_AR_Net_ICME_2020 ("the code" below; files ``model.py``, ``losses.py``,
``train.py``, ``main.py``, ``options.py``, ``utils.py``, ``video_dataset_anomaly_balance_uni_sample.py``),
which produced the published 91.24 % AUC on ShanghaiTech; where the paper differs, the paper's form is
a setting.

Clip level (``input_level = "clips"``): it trains on every clip of each video (the train stage's
:class:`~models.base.ClipBank`, no 32-segment pooling) and scores every clip at test time.

Network (the code's ``model.py``, ``Model_single``; paper Sec. 2.2, Eq. 1-2): ``fc`` Linear D-D +
ReLU, Dropout 0.7 (training only), ``classifier`` Linear D-1 + sigmoid; ``weights_init``:
Xavier-uniform weights, zero biases. The parameter names are the code's, so a state dict saved by
its ``Model_single`` loads with strict key matching. D = 2048 for its I3D RGB+flow features
(``options.py``, ``--feature_size 2048``, ``--feature_modal combine``).

Objective (``train.py``): ``L = 1 * L_DMIL + 20 * L_c``: ``--Lambda 1_20`` is split on ``_`` into the
DMIL weight and the center weight (paper Eq. 8, lambda = 20).

- ``L_DMIL`` (``losses.py``, ``KMXMILL_individual``; paper Eq. 3-5): each video i contributes its
  top ``k_i = ceil(t_i / 4)`` clip scores (``--k 4``), ``t_i`` its true (kept) length, each labelled
  with the video's label; one ``BCELoss`` mean over all the batch's selected clips
  (``dmil_reduction=instances``; the paper's Eq. 5 averages per video first: ``videos``).
- ``L_c`` (``losses.py``, ``normal_smooth``; ``center=padded_row``): for each NORMAL video,
  ``torch.var`` (unbiased, ``1/(L-1)``) of its WHOLE score row, padded clips included, then the mean
  over the batch's normal videos. The row length ``L`` is the longest kept length of the batch
  (``train.py`` pads every video to 300 clips and then cuts all 60 rows to the longest true length),
  and the padded clips are zero features scored by the network like any clip (with the training
  dropout): ``sigmoid(classifier(dropout(relu(fc.bias))))``, 0.5 at initialisation. On
  ShanghaiTech most of a normal row is padding (e.g. 129 clips in a 300-clip row: 57 %), so the term
  pulls the real scores towards the padding's score. ``center=masked`` is the paper's Eq. 6-7 form:
  the population variance ``1/t_i`` of the real clips only, padding never scored.

Batches (the code's ``video_dataset_anomaly_balance_uni_sample.py``, ``dataset.__getitem__``, and
``utils.py``): each step draws 30 anomalous and 30 normal training videos without replacement
(``random.sample``, ``--sample_size 30``). A video longer than ``--max-seqlen 300`` clips is cut to
300: an anomalous one by ``process_feat_sample`` / ``random_perturb`` (clip ``floor(i T / 300)`` for
i = 299, and for i < 299 a uniform pick among the integers ``floor(i T / 300) .. floor((i+1) T / 300)``,
both ends included), a normal one by ``process_feat`` / ``random_extract`` (a window of 300
consecutive clips starting uniformly in ``[0, T - 300)``); shorter videos are zero-padded. With
multi-crop features each video gets one random crop per step (the code's features have one view;
test scores average the crops, :meth:`~models.base.Detector.score`).

Optimiser (``main.py``): ``Adam(lr=1e-4, weight_decay=0.0005)`` (``options.py --lr 0.0001``; the paper
gives lr 1e-4 and no decay). Iterations: ``--max_epoch 20`` epochs of ``len(train list)`` steps
(``dataset.__len__``, DataLoader batch 1), 20 x 238 = 4,760 on ShanghaiTech.

Departure: the code evaluates on the test set every 200 steps (``--snapshot``) and the published
figure is the best of those; this pipeline never selects on the test set (``selection=last`` or
``val``).

Scale: these defaults are for 2048-D features and thousands of steps. Adam moves each weight by
about ``lr`` per step whatever the width, so a D x D layer on low-dimensional features (tens of
dims) hardly changes its scores in a few hundred steps at lr 1e-4; short runs on such features need
``train.lr=1e-3`` or more. Note also that nothing in the objective makes anomalous videos sparse:
the top ``1/alpha`` of each anomalous video is labelled anomalous, so alpha should not be much below
``1 / (share of anomalous clips)`` (the paper's Fig. 4 tunes it per dataset).

Causal (``causal = True``): ``forward`` scores each clip from its own feature alone (two per-clip
linear layers), so ``pipeline score --online`` gives exactly the offline clip scores.
"""

from __future__ import annotations

from dataclasses import dataclass

from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.config import choice, opt

from models.registry import register_detector
from .base import (
    ClipBank,
    Detector,
    FeatureBank,
    MILBatch,
    TrainConfig,
    draw_videos,
    length_mask,
    xavier_init_,
)


@dataclass
class ARNetConfig(TrainConfig):
    """AR-Net settings; every default cited ("code" = the official repository, module docstring)."""

    iterations: int = opt(
        4760,
        "Adam steps: the code's 20 epochs (options.py --max_epoch 20) x one step per training video "
        "(dataset.__len__), 238 on ShanghaiTech (the paper gives no schedule)",
    )
    lr: float = opt(1e-4, "Adam learning rate (code options.py --lr 0.0001; paper Sec. 3.1)")
    weight_decay: float = opt(5e-4, "Adam weight decay (code main.py: optim.Adam(..., weight_decay=0.0005); the paper is silent)")
    batch_abnormal: int = opt(
        30, "anomalous videos per batch (code options.py --sample_size 30, dataset.__getitem__; paper Sec. 3.1)"
    )
    batch_normal: int = opt(
        30, "normal videos per batch (code options.py --sample_size 30, dataset.__getitem__; paper Sec. 3.1)"
    )
    alpha: float = opt(
        4.0,
        "k_i = ceil(t_i / alpha) top clips per video (code losses.py KMXMILL_individual, options.py --k 4; "
        "paper Eq. 3, alpha = 4 for ShanghaiTech, Sec. 3.1)",
    )
    lambda_center: float = opt(
        20.0,
        "weight of the center loss; the DMIL weight is 1 (code train.py: --Lambda 1_20 split on '_' into "
        "1 x DMIL + 20 x center; paper Eq. 8, Sec. 2.5)",
    )
    dropout: float = opt(0.7, "dropout after the FC layer, training only (code model.py Model_single; paper Sec. 3.1)")
    max_clips: int = opt(
        300,
        "longest clip sequence per training video; longer ones are cut to it (code options.py --max-seqlen 300, "
        "utils.py process_feat / process_feat_sample); 0 = no limit",
    )
    normal_sampling: str = choice(
        "window",
        ("window", "uniform"),
        "how a normal video longer than max_clips is cut: 'window', max_clips consecutive clips from a uniform "
        "start in [0, T - max_clips) (code utils.py process_feat / random_extract); 'uniform', one clip per "
        "stride with a random jitter, as anomalous videos always are (code utils.py random_perturb)",
    )
    center: str = choice(
        "padded_row",
        ("padded_row", "masked"),
        "center loss form: 'padded_row', the unbiased variance of each normal video's whole score row, zero-"
        "feature padding scored by the network and included, rows as long as the batch's longest kept video, "
        "mean over normal videos (code losses.py normal_smooth, train.py); 'masked', the population variance "
        "of the real clips only (paper Eq. 6-7)",
    )
    dmil_reduction: str = choice(
        "instances",
        ("instances", "videos"),
        "averaging of the DMIL cross-entropy: 'instances', over all selected clips of the batch (code "
        "losses.py KMXMILL_individual: BCELoss mean over the concatenated top-k); 'videos', over each "
        "video's k_i, then over videos (paper Eq. 5)",
    )

    def validate(self) -> None:
        super().validate()
        if self.alpha <= 0:
            raise ValueError("alpha must be > 0")
        if self.lambda_center < 0:
            raise ValueError("lambda_center must be >= 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("dropout must be in [0, 1)")
        if self.max_clips < 0:
            raise ValueError("max_clips must be >= 0 (0: no limit)")


# ---------------------------------------------------------------------------------------------
# Clip sampling of long videos, as the code's data loader does.
# ---------------------------------------------------------------------------------------------


def jittered_indices(t: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` clip indices of a ``t``-clip video, ``t > n`` (the code's ``utils.py``, ``random_perturb``).

    With ``lo_i = floor(i t / n)``: index i < n-1 is drawn uniformly from the integers
    ``lo_i .. lo_{i+1}`` (both ends included, so neighbours may repeat a clip); the last index is
    ``lo_{n-1}`` (the code's random branch for it needs ``lo_{n-1} < n - 1``, impossible when
    ``t > n``). Returns ``[n]`` int64, non-decreasing, in ``[0, t)``.
    """
    i = torch.arange(n + 1, dtype=torch.int64)
    lo = i * t // n  # exact integer floor of i t / n (the code's float quotient floors the same)
    width = lo[1:] - lo[:-1] + 1  # [n], choices per index
    u = torch.rand(n, generator=gen, dtype=torch.float64)
    pick = lo[:-1] + torch.minimum((u * width).long(), width - 1)
    pick[-1] = lo[n - 1]
    return pick


def window_indices(t: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` consecutive clip indices of a ``t``-clip video, ``t > n``, from a start drawn uniformly in
    ``[0, t - n)`` (the code's ``utils.py``, ``random_extract``: ``np.random.randint(T - n)``, which never
    starts at ``t - n``). Returns ``[n]`` int64."""
    start = int(torch.randint(t - n, (1,), generator=gen))
    return torch.arange(start, start + n)


def sample_clips(
    bank: ClipBank,
    index: torch.Tensor,
    crops: torch.Tensor,
    max_len: int,
    gen: torch.Generator,
    cut: Callable[[int, int, torch.Generator], torch.Tensor],
) -> list[torch.Tensor]:
    """Each video's ``[t_b, D]`` float32 clip features (crop ``crops[b]``), videos longer than
    ``max_len`` (> 0) cut by ``cut(t, max_len, gen) -> [max_len] indices``; ``max_len = 0`` keeps all."""
    seqs = []
    for i, c in zip(index.tolist(), crops.tolist()):
        x = bank.clips(i)[:, c]  # [T, D]
        if max_len and x.shape[0] > max_len:
            x = x[cut(x.shape[0], max_len, gen)]
        seqs.append(torch.as_tensor(x, dtype=torch.float32))
    return seqs


# ---------------------------------------------------------------------------------------------
# Loss terms, as functions of plain tensors so that each can be checked by hand.
# ---------------------------------------------------------------------------------------------


def dynamic_k(lengths: torch.Tensor, alpha: float) -> torch.Tensor:
    """``k_i = ceil(t_i / alpha)`` (Eq. 3). ``lengths``: ``[B]`` int64, each >= 1 -> ``[B]`` int64 in [1, t_i]."""
    # float64: the quotient of two exact integers is correctly rounded, so ceil never overshoots
    k = torch.ceil(lengths.to(torch.float64) / alpha).to(torch.int64)
    return torch.minimum(k.clamp(min=1), lengths)


def dmil_loss(
    scores: torch.Tensor, lengths: torch.Tensor, labels: torch.Tensor, alpha: float, reduction: str = "instances"
) -> torch.Tensor:
    """Dynamic multiple-instance learning loss ``L_DMIL`` (the code's ``losses.py``, ``KMXMILL_individual``; paper Eq. 3-5).

    Args:
        scores: ``[B, L]`` clip scores in [0, 1]; row b is valid on its first ``lengths[b]`` entries
            (anything after is padding and ignored).
        lengths: ``[B]`` int64, ``1 <= lengths[b] <= L``.
        labels: ``[B]`` video labels, 1 anomalous / 0 normal.
        alpha: Eq. 3's divisor; video b's ``k_b = ceil(lengths[b] / alpha)`` highest scores are selected.
        reduction: ``"instances"``: ``sum_b sum_{j<=k_b} BCE(s_bj, y_b) / sum_b k_b`` (the code);
            ``"videos"``: ``mean_b (1/k_b) sum_{j<=k_b} BCE(s_bj, y_b)`` (Eq. 5, averaged over videos).
    Returns:
        scalar float32, >= 0.
    """
    L = scores.shape[1]
    k = dynamic_k(lengths, alpha)  # [B]
    kmax = int(k.max())
    valid = length_mask(lengths, L)
    # rank on a detached copy with padding at -inf, then gather the live scores: padding is never
    # picked (k_b <= lengths[b]) and its values never enter the autograd graph through topk
    idx = scores.detach().masked_fill(~valid, float("-inf")).topk(kmax, dim=1).indices  # [B, kmax]
    top = scores.gather(1, idx)
    selected = torch.arange(kmax, device=scores.device)[None, :] < k[:, None]  # [B, kmax]
    y = labels.to(scores.dtype)[:, None].expand_as(top)
    ce = F.binary_cross_entropy(top, y, reduction="none") * selected
    if reduction == "instances":
        return ce.sum() / k.sum()
    if reduction == "videos":
        return (ce.sum(dim=1) / k).mean()
    raise ValueError(f"unknown DMIL reduction {reduction!r}")


def center_loss(scores: torch.Tensor, lengths: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Masked center loss ``L_c`` (paper Eq. 6-7; ``center=masked``) over the normal videos of a batch.

    Args:
        scores: ``[B, L]`` clip scores in [0, 1], valid on the first ``lengths[b]`` entries of row b.
        lengths: ``[B]`` int64, each >= 1.
        labels: ``[B]`` video labels; anomalous rows (label 1) contribute nothing (Eq. 6, ``otherwise 0``).
    Returns:
        scalar: mean over normal videos of ``(1/t_i) sum_j (s_ij - c_i)^2`` with ``c_i = (1/t_i) sum_j s_ij``
        (Eq. 7), padding ignored; 0 when the batch holds no normal video.
    """
    valid = length_mask(lengths, scores.shape[1]).to(scores.dtype)
    t = lengths.to(scores.dtype)
    center = (scores * valid).sum(dim=1) / t  # c_i, Eq. 7
    spread = ((scores - center[:, None]).pow(2) * valid).sum(dim=1) / t  # [B]
    normal = (labels == 0).to(scores.dtype)
    return (spread * normal).sum() / normal.sum().clamp(min=1.0)


def padded_center_loss(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The code's center loss (``losses.py``, ``normal_smooth``; ``center=padded_row``).

    Args:
        scores: ``[B, L]`` clip scores in [0, 1] of the batch's rows, padding included: every entry
            counts (the caller scores the zero-feature padding with the network, as the code does).
        labels: ``[B]`` video labels; only normal rows (label 0) enter.
    Returns:
        scalar: mean over normal rows of ``torch.var(row)``, the unbiased variance
        ``(1/(L-1)) sum_j (s_ij - mean_i)^2`` over all ``L`` entries. 0 when the batch holds no normal
        video or ``L = 1`` (where the code's mean over an empty list, or var of one value, gives NaN).
    """
    normal = labels == 0
    if scores.shape[1] < 2 or not bool(normal.any()):
        return scores.new_zeros(())
    return scores[normal].var(dim=1, unbiased=True).mean()


# ---------------------------------------------------------------------------------------------
# Network
# ---------------------------------------------------------------------------------------------


@register_detector("ar_net")
class ARNet(Detector):
    """FC D-D + ReLU + dropout, classifier D-1 + sigmoid, trained with DMIL + center loss (module docstring).

    Causal: each clip is scored from its own feature only, so online scores equal offline ones.
    """

    Config = ARNetConfig
    input_level = "clips"
    causal = True
    #: 2: the code's padded-row center loss, common batch row length, its long-video sampling and
    #: parameter names (``classifier``) became the defaults
    version = 2
    #: Adam at the code's lr 1e-4 barely moves small layers in a few hundred steps; alpha 4 labels
    #: the top quarter of an anomalous video anomalous, more than many of the synthetic benchmark's
    #: 10-40 % events; dropout 0.7 slows fitting and a per-clip MLP memorises a few dozen videos'
    #: scenes without more weight decay. Measured at 400 steps on tests/test_synthetic_benchmark.py
    #: (frame AUC; center=padded_row, the default / center=masked): 0.56 / 0.54 with the defaults,
    #: 0.935 / 0.931 with these, 0.90 / 0.89 with alpha 4, lr 3e-3, dropout 0. The padded-row center
    #: loss did not change which settings short runs need, so they are unchanged.
    short_schedule: ClassVar[dict[str, object]] = {"lr": 3e-3, "dropout": 0.0, "alpha": 6.0, "weight_decay": 1e-2}

    def __init__(self, feature_dim: int, cfg: ARNetConfig | None = None) -> None:
        cfg = cfg or ARNetConfig()
        super().__init__(feature_dim, cfg)
        # the code's Model_single names (fc, classifier): its state dicts load strictly
        self.fc = nn.Linear(feature_dim, feature_dim)  # W_FC in R^{F x F}, Eq. 1
        self.dropout = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(feature_dim, 1)  # the AR layer, Eq. 2
        xavier_init_((self.fc, self.classifier))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, S, D]`` float32 (any leading shape ``[..., D]``) -> ``[B, S]`` scores in [0, 1], clip by clip."""
        return torch.sigmoid(self.classifier(self.dropout(torch.relu(self.fc(x))))).squeeze(-1)

    def sample_batch(self, bank: FeatureBank | ClipBank, gen: torch.Generator) -> MILBatch:
        """30 anomalous + 30 normal videos, one random crop each, long videos cut to ``max_clips``
        as the code cuts them, all rows zero-padded to the batch's longest kept length (module docstring)."""
        if not isinstance(bank, ClipBank):
            return super().sample_batch(bank, gen)
        a = draw_videos(bank.abnormal_index, self.cfg.batch_abnormal, gen)
        n = draw_videos(bank.normal_index, self.cfg.batch_normal, gen)
        crops = bank.features.shape[1]
        ca = torch.randint(crops, (a.numel(),), generator=gen)
        cn = torch.randint(crops, (n.numel(),), generator=gen)
        normal_cut = window_indices if self.cfg.normal_sampling == "window" else jittered_indices
        seqs = sample_clips(bank, a, ca, self.cfg.max_clips, gen, jittered_indices)
        seqs += sample_clips(bank, n, cn, self.cfg.max_clips, gen, normal_cut)
        x = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True)  # [Ba + Bn, L, D], one common L
        lengths = torch.tensor([len(q) for q in seqs], dtype=torch.int64)
        k = a.numel()
        return MILBatch(x[:k], x[k:], lengths[:k], lengths[k:])

    def losses(self, batch: MILBatch) -> dict[str, torch.Tensor]:
        """``dmil``, ``center`` (lambda applied) and ``total`` = their sum (Eq. 8).

        ``center=padded_row``: every row is cut or zero-padded to ``L`` = the batch's longest true
        length and all ``B x L`` clips, padding included, go through the network (the code's
        ``train.py``). ``masked``: only the valid clips are scored; their scores are laid out in a
        ``[B, L]`` table, zeros on padding, which the masked losses skip.
        """
        xa, xn = batch.abnormal, batch.normal
        la = batch.abnormal_lengths
        ln = batch.normal_lengths
        if la is None:  # fixed-length bags (segments): every position is valid
            la = torch.full((xa.shape[0],), xa.shape[1], dtype=torch.int64, device=xa.device)
        if ln is None:
            ln = torch.full((xn.shape[0],), xn.shape[1], dtype=torch.int64, device=xn.device)
        lengths = torch.cat([la, ln])
        labels = torch.cat([torch.ones_like(la), torch.zeros_like(ln)])
        if self.cfg.center == "padded_row":
            scores = self.forward(common_rows(xa, xn, lengths, int(lengths.max())))  # [B, L]
            center = padded_center_loss(scores, labels)
        else:
            valid = length_mask(lengths, max(xa.shape[1], xn.shape[1]))
            # boolean indexing walks rows in order, valid clips first in each row: the same order as `valid`
            clips = torch.cat([xa[length_mask(la, xa.shape[1])], xn[length_mask(ln, xn.shape[1])]])  # [sum t_i, D]
            scores = clips.new_zeros(valid.shape).masked_scatter(valid, self.forward(clips))
            center = center_loss(scores, lengths, labels)
        dmil = dmil_loss(scores, lengths, labels, self.cfg.alpha, self.cfg.dmil_reduction)
        center = self.cfg.lambda_center * center
        return {"dmil": dmil, "center": center, "total": dmil + center}

    def make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)


def common_rows(xa: torch.Tensor, xn: torch.Tensor, lengths: torch.Tensor, width: int) -> torch.Tensor:
    """``[Ba + Bn, width, D]``: the anomalous then normal rows, each cut to ``width`` or zero-padded
    to it, and zeroed past its own length (the code's padded, then trimmed, batch tensor)."""
    rows = []
    for x in (xa, xn):
        x = x[:, :width]
        if x.shape[1] < width:
            x = F.pad(x, (0, 0, 0, width - x.shape[1]))
        rows.append(x)
    return torch.cat(rows).masked_fill(~length_mask(lengths, width)[:, :, None], 0.0)
