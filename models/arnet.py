"""AR-Net: Anomaly Regression Net with the dynamic MIL and center losses.

B. Wan, Y. Fang, X. Xia, J. Mei, "Weakly Supervised Video Anomaly Detection via Center-guided
Discriminative Learning", ICME 2020 (arXiv:2104.07268; ``papers/ar-net.txt``). Official code:
github.com/wanboyang/Anomaly_AR_Net_ICME_2020 (``Model_single``, ``KMXMILL_individual``,
``normal_smooth``; referred to below as "the code").

Clip level (``input_level = "clips"``): it trains on every clip of each video (the train stage's
:class:`~models.base.ClipBank`, no 32-segment pooling) and scores every clip at test time.

Network (Sec. 2.2): ``X_FC = Dropout(ReLU(W_FC X + b_FC))`` with ``W_FC`` D x D (Eq. 1; FC 2048-2048
for I3D RGB+flow, PROTOCOLS.md), dropout 0.7 (Sec. 3.1), then the AR layer, one linear unit and a
sigmoid (Eq. 2; the paper writes ``1 / (1 + exp(W X + b))``, the same family as the code's
``sigmoid(W X + b)`` up to the sign of the learnt parameters). Xavier-uniform weights and zero biases
(Sec. 3.1: "Xavier"; uniform and zero biases from the code's ``weights_init``).

Objective (Eq. 8): ``L = L_DMIL + lambda * L_c``, lambda = 20 (Sec. 2.5; the code's ``Lambda=1_20``).

- ``L_DMIL`` (Eq. 3-5): each video i, anomalous or normal, contributes the binary cross-entropy of
  its top ``k_i = ceil(t_i / alpha)`` clip scores against its video label, ``t_i`` its own number of
  (sampled) clips, alpha = 4 (Sec. 3.1, ShanghaiTech). Eq. 5 averages over each video's ``k_i``;
  the code averages over all the batch's selected clips at once, so a long video weighs more
  (``dmil_reduction``; default the code's, which produced the published 91.24 %).
- ``L_c`` (Eq. 6-7): on normal videos only, the mean squared distance of each video's clip scores to
  their mean ``c_i``, averaged over the batch's normal videos (the paper's ``1/t_i``; the code takes
  ``torch.var``, i.e. ``1/(t_i - 1)``, over the padded score row: padding included, which we never
  do; the difference from ``1/(t_i - 1)`` is under 1 % beyond 100 clips).

Padding never reaches the losses: every top-k, mean and sum is masked by the true lengths
(:func:`~models.base.length_mask`), and clips past a video's end are not even scored.

Batches (Sec. 3.1; PROTOCOLS.md): 30 anomalous + 30 normal videos, one random crop each (the base
:meth:`~models.base.Detector.sample_batch`; the authors' features have a single view per clip, so
with 10-crop features each step sees one crop per video, a form of augmentation; at test time
:meth:`~models.base.Detector.score` averages the crops). Sequences are capped at ``max_clips`` = 300
clips (the code's ``--max-seqlen``): a longer anomalous video is cut to 300 evenly spaced clips with
a random jitter inside each stride (``random_perturb``), a longer normal video to a random window of
300 consecutive clips (``random_extract``); ``t_i`` is then the kept length.

Optimiser (Sec. 3.1): Adam, lr 1e-4; weight decay 5e-4 (the code's ``optim.Adam(...,
weight_decay=0.0005)``; the paper is silent). Iterations: the code trains 20 epochs
(``max_epoch``) of ``len(train list)`` steps, each step one 30 + 30 batch: 20 x 238 = 4,760 steps on
ShanghaiTech. The code also evaluates on the test set every 200 steps and keeps the best; this
pipeline never selects on the test set (``selection=last`` or ``val``).

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

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import choice, opt

from . import register_detector
from .base import (
    ClipBank,
    Detector,
    FeatureBank,
    MILBatch,
    TrainConfig,
    _draw,
    length_mask,
    pad_clip_batch,
    xavier_init_,
)


@dataclass
class ARNetConfig(TrainConfig):
    """AR-Net settings; every default cited (paper = ``papers/ar-net.txt``; "code" = the official repository)."""

    iterations: int = opt(
        4760,
        "Adam steps: the code's 20 epochs (max_epoch) x one step per training video, 238 on ShanghaiTech "
        "(the paper gives no schedule)",
    )
    lr: float = opt(1e-4, "Adam learning rate (paper Sec. 3.1; code)")
    weight_decay: float = opt(5e-4, "Adam weight decay (code: optim.Adam weight_decay=0.0005; the paper is silent)")
    batch_abnormal: int = opt(30, "anomalous videos per batch (paper Sec. 3.1; code sample_size=30)")
    batch_normal: int = opt(30, "normal videos per batch (paper Sec. 3.1; code sample_size=30)")
    alpha: float = opt(4.0, "k_i = ceil(t_i / alpha) top clips per video (paper Eq. 3; alpha = 4 for ShanghaiTech, Sec. 3.1)")
    lambda_center: float = opt(20.0, "weight lambda of the center loss (paper Eq. 8, Sec. 2.5; code Lambda=1_20)")
    dropout: float = opt(0.7, "dropout after the FC layer (paper Eq. 1, Sec. 3.1; code)")
    max_clips: int = opt(
        300,
        "longest clip sequence per training video; longer ones are subsampled (code --max-seqlen 300); 0 = no limit",
    )
    normal_sampling: str = choice(
        "window",
        ("window", "uniform"),
        "how a normal video longer than max_clips is cut: a random window of consecutive clips (code: "
        "random_extract) or evenly spaced jittered clips (as anomalous videos always are, code: random_perturb)",
    )
    dmil_reduction: str = choice(
        "instances",
        ("instances", "videos"),
        "averaging of the DMIL cross-entropy: 'instances', over all selected clips of the batch (code: "
        "BCELoss mean over the concatenated top-k); 'videos', over each video's k_i, then over videos (paper Eq. 5)",
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
    """Dynamic multiple-instance learning loss ``L_DMIL`` (Eq. 3-5).

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
    """Center loss ``L_c`` (Eq. 6-7) over the normal videos of a batch.

    Args:
        scores: ``[B, L]`` clip scores in [0, 1], valid on the first ``lengths[b]`` entries of row b.
        lengths: ``[B]`` int64, each >= 1.
        labels: ``[B]`` video labels; anomalous rows (label 1) contribute nothing (Eq. 6, ``otherwise 0``).
    Returns:
        scalar: mean over normal videos of ``(1/t_i) sum_j (s_ij - c_i)^2`` with ``c_i = (1/t_i) sum_j s_ij``
        (Eq. 7); 0 when the batch holds no normal video.
    """
    valid = length_mask(lengths, scores.shape[1]).to(scores.dtype)
    t = lengths.to(scores.dtype)
    center = (scores * valid).sum(dim=1) / t  # c_i, Eq. 7
    spread = ((scores - center[:, None]).pow(2) * valid).sum(dim=1) / t  # [B]
    normal = (labels == 0).to(scores.dtype)
    return (spread * normal).sum() / normal.sum().clamp(min=1.0)


# ---------------------------------------------------------------------------------------------
# Network
# ---------------------------------------------------------------------------------------------


@register_detector("ar_net")
class ARNet(Detector):
    """FC D-D + ReLU + dropout, AR layer D-1 + sigmoid, trained with DMIL + center loss (module docstring).

    Causal: each clip is scored from its own feature only, so online scores equal offline ones.
    """

    Config = ARNetConfig
    input_level = "clips"
    causal = True
    #: Adam at the paper's lr 1e-4 barely moves small layers in a few hundred steps; alpha 4 labels
    #: the top quarter of an anomalous video anomalous, more than many of the synthetic benchmark's
    #: 10-40 % events; dropout 0.7 slows fitting and a per-clip MLP memorises a few dozen videos'
    #: scenes without more weight decay (measured at 400 steps on the synthetic benchmark: frame
    #: AUC 0.51 with the defaults, 0.93 with these, 0.88 with alpha 4 / lr 3e-3 / dropout 0)
    short_schedule: ClassVar[dict[str, object]] = {"lr": 3e-3, "dropout": 0.0, "alpha": 6.0, "weight_decay": 1e-2}

    def __init__(self, feature_dim: int, cfg: ARNetConfig | None = None) -> None:
        cfg = cfg or ARNetConfig()
        super().__init__(feature_dim, cfg)
        self.fc = nn.Linear(feature_dim, feature_dim)  # W_FC in R^{F x F}, Eq. 1
        self.dropout = nn.Dropout(cfg.dropout)
        self.ar = nn.Linear(feature_dim, 1)  # AR layer, Eq. 2
        xavier_init_((self.fc, self.ar))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, S, D]`` float32 (any leading shape ``[..., D]``) -> ``[B, S]`` scores in [0, 1], clip by clip."""
        return torch.sigmoid(self.ar(self.dropout(torch.relu(self.fc(x))))).squeeze(-1)

    def sample_batch(self, bank: FeatureBank | ClipBank, gen: torch.Generator) -> MILBatch:
        """30 anomalous + 30 normal videos, one random crop each, capped at ``max_clips`` clips (module docstring)."""
        if not isinstance(bank, ClipBank):
            return super().sample_batch(bank, gen)
        a = _draw(bank.abnormal_index, self.cfg.batch_abnormal, gen)
        n = _draw(bank.normal_index, self.cfg.batch_normal, gen)
        crops = bank.features.shape[1]
        ca = torch.randint(crops, (a.numel(),), generator=gen)
        cn = torch.randint(crops, (n.numel(),), generator=gen)
        xa, la = pad_clip_batch(bank, a, ca, self.cfg.max_clips, gen, mode="uniform")
        xn, ln = pad_clip_batch(bank, n, cn, self.cfg.max_clips, gen, mode=self.cfg.normal_sampling)
        return MILBatch(xa, xn, la, ln)

    def losses(self, batch: MILBatch) -> dict[str, torch.Tensor]:
        """``dmil``, ``center`` (lambda applied) and ``total`` = their sum (Eq. 8).

        Only the valid clips go through the network (a long-tailed batch is mostly padding); their
        scores are laid out in one ``[Ba + Bn, L]`` table, zeros on padding, which the masked losses skip.
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
        valid = length_mask(lengths, max(xa.shape[1], xn.shape[1]))
        # boolean indexing walks rows in order, valid clips first in each row: the same order as `valid`
        clips = torch.cat([xa[length_mask(la, xa.shape[1])], xn[length_mask(ln, xn.shape[1])]])  # [sum t_i, D]
        scores = clips.new_zeros(valid.shape).masked_scatter(valid, self.forward(clips))
        dmil = dmil_loss(scores, lengths, labels, self.cfg.alpha, self.cfg.dmil_reduction)
        center = self.cfg.lambda_center * center_loss(scores, lengths, labels)
        return {"dmil": dmil, "center": center, "total": dmil + center}

    def make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
