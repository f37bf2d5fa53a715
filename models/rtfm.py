"""RTFM: Robust Temporal Feature Magnitude learning.

Y. Tian, G. Pang, Y. Chen, R. Singh, J. W. Verjans, G. Carneiro, "Weakly-supervised Video Anomaly
Detection with Robust Temporal Feature Magnitude Learning", ICCV 2021 (``papers/rtfm.txt``).

Model ``r(F) = f_phi(s_theta(F))`` (paper Eq. 1):

- ``s_theta``, the multi-scale temporal network (MTN, Sec. 3.2, Fig. S1): a pyramid of three dilated
  temporal convolutions (PDC, dilations 1, 2, 4, kernel 3, Eq. 4 and Sec. 4.1), each mapping D -> D/4
  channels, and a temporal self-attention branch (TSA, Eq. 5) on D/4 channels; the four D/4 outputs are
  concatenated back to D and added to the input features: ``X = [F_PDC1, F_PDC2, F_PDC3, F_TSA] + F``.
- ``f_phi``, the snippet classifier (Sec. 4.1): FC D-512-128-1, ReLU and dropout 0.7 after the first
  two, sigmoid output.
- Feature magnitude of snippet t: ``||x_t||_2`` of the MTN output (Sec. 3.1).

Training objective (per batch; see :func:`rtfm_losses`):

- ``classification``: BCE of each video's mean score over its top-k-magnitude snippets against the
  video label (the authors' code; the paper's Eq. 7 sums the per-snippet BCE over the k snippets,
  available as ``loss_form=paper``).
- ``magnitude``: ``alpha * mean_pairs (|m - g(X+)| + g(X-))^2`` (the authors' code form; the paper's
  Eq. 6 is the hinge ``max(0, m - d(X+, X-))`` with ``d = g(X+) - g(X-)`` of Eq. 3, available as
  ``loss_form=paper``), where ``g`` is, in the code form, the norm of the mean top-k feature (as
  the released ``RTFM_loss`` computes it) and, in the paper form, the mean magnitude of the top-k
  snippets (Eq. 2), k = 3,
  m = 100 (Sec. 4.1), alpha = 1e-4 (PROTOCOLS.md).
- ``smooth`` / ``sparse``: temporal smoothness (weight 8e-4) and sparsity (8e-3) of the anomalous
  videos' scores only (Sec. 3.4 after Eq. 7, following Sultani et al.; weights and "abnormal only" from
  PROTOCOLS.md).

Ten crops (PROTOCOLS.md, 'Training: RTFM'): a training batch holds *all* crops of 32 normal + 32
anomalous videos. Our reading of how the authors combine them, followed here: every crop is passed
through the MTN and the classifier on its own; a video's magnitudes and scores are the means over its
crops; the top-k snippets are chosen once per video on the crop-averaged magnitudes (after the
magnitude dropout); the magnitude loss is evaluated per (video, crop) row at those k snippets and
averaged over the rows (anomalous row (i, c) paired with normal row (i, c)); the classification and
regularisation terms use the crop-averaged scores. At test time every clip is scored
(``input_level = "clips"``) and :meth:`Detector.score` averages the crops' scores.

Not causal: the attention branch mixes every clip of the video and the convolutions look one to four
clips ahead.
"""

from __future__ import annotations

from dataclasses import dataclass

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import choice, opt

from . import register_detector
from .base import CropsBatch, Detector, FeatureBank, MILBatch, TrainConfig, all_crops_batch, mlp_head, stack_crops, xavier_init_


@dataclass
class RTFMConfig(TrainConfig):
    """RTFM settings; every default cited (paper = ``papers/rtfm.txt``; PROTOCOLS.md 'Training: RTFM')."""

    iterations: int = opt(15000, "Adam steps (PROTOCOLS.md: authors' code; the paper says 50 epochs)")
    lr: float = opt(1e-3, "Adam learning rate for ShanghaiTech/UCF-Crime (paper Sec. 4.1; PROTOCOLS.md); 1e-4 for XD")
    weight_decay: float = opt(
        5e-3,
        "Adam weight decay: 5e-3 as in the authors' code, which produced the published numbers "
        "(PROTOCOLS.md); the paper's Sec. 4.1 says 5e-4",
    )
    batch_abnormal: int = opt(32, "anomalous videos per batch, all their crops (paper Sec. 4.1; PROTOCOLS.md)")
    batch_normal: int = opt(32, "normal videos per batch, all their crops (paper Sec. 4.1; PROTOCOLS.md)")
    k: int = opt(3, "top-k snippets by feature magnitude (paper Eq. 2, Sec. 4.1; PROTOCOLS.md)")
    margin: float = opt(100.0, "feature-magnitude margin m (paper Eq. 6, Sec. 4.1; PROTOCOLS.md)")
    alpha: float = opt(1e-4, "weight of the feature-magnitude loss (PROTOCOLS.md: authors' code)")
    lambda_smooth: float = opt(8e-4, "temporal smoothness weight, anomalous videos only (PROTOCOLS.md; form: Sec. 3.4)")
    lambda_sparse: float = opt(8e-3, "sparsity weight, anomalous videos only (PROTOCOLS.md; form: Sec. 3.4)")
    dropout: float = opt(0.7, "dropout after the classifier's hidden FC layers (paper Sec. 4.1)")
    magnitude_dropout: float | None = opt(
        None,
        "dropout on the feature magnitudes before the top-k selection, training only; None = the same "
        "rate as 'dropout' (0.7, PROTOCOLS.md: the authors use the one rate for both)",
    )
    hidden: tuple[int, ...] = opt((512, 128), "snippet classifier hidden sizes, FC D-512-128-1 (paper Sec. 4.1)")
    dilations: tuple[int, ...] = opt((1, 2, 4), "dilations of the PDC branches (paper Sec. 3.2, 4.1)")
    kernel_size: int = opt(3, "temporal kernel of each dilated convolution, '3x1 Conv1D' (paper Sec. 4.1)")
    loss_form: str = choice(
        "code",
        ("code", "paper"),
        "'code': the authors' loss forms, with which alpha and the regulariser weights were tuned "
        "(squared magnitude loss on the norm of the mean top-k feature, BCE of the top-k mean score, "
        "L2-norm sparsity); 'paper': Eq. 6 hinge on Eq. 2 mean magnitudes, Eq. 7 summed BCE, L1 "
        "sparsity (see rtfm_losses)",
    )

    def validate(self) -> None:
        super().validate()
        if self.k < 1:
            raise ValueError("k must be >= 1")
        if self.margin <= 0:
            raise ValueError("margin must be > 0")
        if self.alpha < 0 or self.lambda_smooth < 0 or self.lambda_sparse < 0:
            raise ValueError("alpha, lambda_smooth and lambda_sparse must be >= 0")
        for name in ("dropout", "magnitude_dropout"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1)")
        if not self.hidden or min(self.hidden) < 1:
            raise ValueError("hidden needs at least one positive layer size")
        if not self.dilations or min(self.dilations) < 1:
            raise ValueError("dilations needs at least one positive dilation")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError("kernel_size must be odd (same-length output)")


# ---------------------------------------------------------------------------------------------
# Loss terms, as functions of plain tensors so that each can be checked by hand.
# ---------------------------------------------------------------------------------------------


def topk_indices(magnitudes: torch.Tensor, k: int, keep: torch.Tensor | None = None) -> torch.Tensor:
    """The k snippets of largest (crop-averaged) magnitude of each video, ``Omega_k`` of Eq. 2.

    Args:
        magnitudes: ``[V, C, S]`` per-crop snippet magnitudes ``||x_t||_2``.
        k: snippets to select (clamped to S).
        keep: optional ``[V, S]`` multiplier applied to the crop-averaged magnitudes before ranking
            (the magnitude dropout mask: 0 for dropped snippets, ``1/(1-p)`` for kept ones).
    Returns:
        ``[V, k']`` int64 snippet indices, ``k' = min(k, S)``.
    """
    ranked = magnitudes.mean(dim=1)
    if keep is not None:
        ranked = ranked * keep
    return ranked.topk(min(k, ranked.shape[1]), dim=1).indices


def topk_mean_magnitude(magnitudes: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``g_{theta,k}`` of Eq. 2 per (video, crop): the mean magnitude of the snippets ``idx``.

    Args:
        magnitudes: ``[V, C, S]``; idx: ``[V, k]`` (the same snippets for every crop of a video).
    Returns:
        ``[V, C]``.
    """
    v, c, _ = magnitudes.shape
    return magnitudes.gather(2, idx[:, None, :].expand(v, c, idx.shape[1])).mean(dim=2)


def topk_feature_norm(feats: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The authors' code's ``g``: the L2 norm of the *mean* top-k feature vector, per (video, crop).

    The released ``RTFM_loss`` takes ``norm(mean(top-k features))``, not the mean of the norms that
    Eq. 2 writes; by the triangle inequality it is never larger.

    Args:
        feats: ``[V, C, S, D]`` MTN outputs; idx: ``[V, k]``.
    Returns:
        ``[V, C]``.
    """
    v, c, _, d = feats.shape
    picked = feats.gather(2, idx[:, None, :, None].expand(v, c, idx.shape[1], d))  # [V, C, k, D]
    return picked.mean(dim=2).norm(p=2, dim=-1)


def feature_magnitude_loss(
    g_abnormal: torch.Tensor, g_normal: torch.Tensor, margin: float, form: str = "code"
) -> torch.Tensor:
    """Separability loss ``l_s`` on paired top-k mean magnitudes (unweighted; alpha applied by the caller).

    Args:
        g_abnormal: ``[N]`` ``g(X+)`` of anomalous (video, crop) rows; g_normal: ``[N]`` of normal
            rows, row i paired with anomalous row i.
        form: ``"code"``: ``mean_i (|m - g(X+_i)| + g(X-_i))^2`` (the authors' code);
            ``"paper"``: ``mean_i max(0, m - (g(X+_i) - g(X-_i)))`` (Eq. 6 with Eq. 3).
    """
    if form == "code":
        return ((margin - g_abnormal).abs() + g_normal).pow(2).mean()
    if form == "paper":
        return torch.relu(margin - (g_abnormal - g_normal)).mean()
    raise ValueError(f"unknown loss form {form!r}")


def topk_classification_loss(topk_scores: torch.Tensor, labels: torch.Tensor, form: str = "code") -> torch.Tensor:
    """Snippet-classifier loss ``l_f`` on the top-k-magnitude snippets' scores (Sec. 3.4).

    Args:
        topk_scores: ``[V, k]`` crop-averaged scores in [0, 1] of each video's top-k snippets.
        labels: ``[V]`` video labels, 1 anomalous / 0 normal.
        form: ``"code"``: mean over videos of ``BCE(mean_k score, y)`` (the authors' code);
            ``"paper"``: mean over videos of ``sum_k BCE(score, y)`` (Eq. 7).
    """
    y = labels.to(topk_scores.dtype)
    if form == "code":
        return F.binary_cross_entropy(topk_scores.mean(dim=1), y)
    if form == "paper":
        per = F.binary_cross_entropy(topk_scores, y[:, None].expand_as(topk_scores), reduction="none")
        return per.sum(dim=1).mean()
    raise ValueError(f"unknown loss form {form!r}")


def smoothness_loss(abnormal_scores: torch.Tensor, lam: float, form: str = "code") -> torch.Tensor:
    """Temporal smoothness ``lam * (s_t - s_{t-1})^2`` within each anomalous video (Sec. 3.4).

    Args:
        abnormal_scores: ``[Va, S]`` crop-averaged scores of the anomalous videos.
        form: ``"code"``: summed over t and over the batch's videos (the authors' code sums over the
            concatenated batch; we leave out the differences across video boundaries it also
            includes); ``"paper"``: summed over t, averaged over videos.
    """
    per_video = (abnormal_scores[:, 1:] - abnormal_scores[:, :-1]).pow(2).sum(dim=1)
    return lam * (per_video.sum() if form == "code" else per_video.mean())


def sparsity_loss(abnormal_scores: torch.Tensor, lam: float, form: str = "code") -> torch.Tensor:
    """Sparsity of the anomalous videos' scores (Sec. 3.4).

    Args:
        abnormal_scores: ``[Va, S]`` crop-averaged scores of the anomalous videos.
        form: ``"code"``: ``lam * ||s||_2`` over all the batch's anomalous scores (the authors'
            code takes the L2 norm, not the L1 the paper writes); ``"paper"``:
            ``lam * mean_videos sum_t |s_t|``.
    """
    if form == "code":
        return lam * abnormal_scores.flatten().norm(p=2)
    return lam * abnormal_scores.abs().sum(dim=1).mean()


def rtfm_losses(
    magnitudes: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    idx: torch.Tensor,
    cfg: RTFMConfig,
    g: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Every RTFM loss term of one batch, weighted; ``total`` is their sum.

    Args:
        magnitudes: ``[V, C, S]`` per-crop snippet feature magnitudes.
        scores: ``[V, S]`` crop-averaged snippet scores in [0, 1].
        labels: ``[V]`` 1 anomalous / 0 normal.
        idx: ``[V, k]`` top-k snippet indices (:func:`topk_indices`).
        g: optional ``[V, C]`` top-k magnitudes to use in the magnitude loss (the code form passes
            :func:`topk_feature_norm`); default :func:`topk_mean_magnitude` (Eq. 2).
    Returns:
        ``classification``, ``magnitude`` (alpha included), ``smooth``, ``sparse``, ``total``, and two
        detached diagnostics, ``mag_abnormal`` / ``mag_normal``: mean top-k magnitude of each class.
        The magnitude term pairs the i-th anomalous with the i-th normal video (crop by crop), over
        ``min(Va, Vn)`` pairs.
    """
    form = cfg.loss_form
    abn, nor = labels == 1, labels == 0
    if g is None:
        g = topk_mean_magnitude(magnitudes, idx)  # [V, C]
    ga, gn = g[abn], g[nor]
    n = min(ga.shape[0], gn.shape[0])
    magnitude = cfg.alpha * feature_magnitude_loss(ga[:n].flatten(), gn[:n].flatten(), cfg.margin, form)
    classification = topk_classification_loss(scores.gather(1, idx), labels, form)
    smooth = smoothness_loss(scores[abn], cfg.lambda_smooth, form)
    sparse = sparsity_loss(scores[abn], cfg.lambda_sparse, form)
    total = classification + magnitude + smooth + sparse
    return {
        "classification": classification,
        "magnitude": magnitude,
        "smooth": smooth,
        "sparse": sparse,
        "total": total,
        "mag_abnormal": ga.mean().detach(),
        "mag_normal": gn.mean().detach(),
    }


# ---------------------------------------------------------------------------------------------
# Network
# ---------------------------------------------------------------------------------------------


class TemporalSelfAttention(nn.Module):
    """TSA branch (paper Sec. 3.2, Eq. 5), on ``[B, D, T]`` channel-first features.

    ``F_c = ReLU(Conv1x1(F))`` reduces D to ``width`` (= D/4); three 1x1 convolutions give ``F_c1``,
    ``F_c2``, ``F_c3`` (each ``width`` channels, as the paper states); ``M = F_c1 F_c2^T`` is divided by T
    (our choice: the paper writes no normalisation; dividing by the number of positions is the
    'dot product' form of the non-local block [58] it adapts, and keeps the branch's scale
    independent of the video length, which differs between training (32 segments) and testing (every
    clip)); ``F_c4 = Conv1x1(M F_c3)``; output ``F_c4 + F_c`` (Eq. 5). The ReLU after the reduction is
    our choice (the paper is silent). Since no softmax is involved, ``M F_c3 = F_c1 (F_c2^T F_c3)``
    exactly; the cheaper order is used, so long test videos never build a T x T map.
    """

    def __init__(self, in_dim: int, width: int) -> None:
        super().__init__()
        self.reduce = nn.Conv1d(in_dim, width, 1)
        self.query = nn.Conv1d(width, width, 1)
        self.key = nn.Conv1d(width, width, 1)
        self.value = nn.Conv1d(width, width, 1)
        self.out = nn.Conv1d(width, width, 1)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        fc = torch.relu(self.reduce(f))  # [B, w, T]
        q, k, v = self.query(fc), self.key(fc), self.value(fc)
        t, w = fc.shape[2], fc.shape[1]
        if t <= w:
            attn = torch.bmm(q.transpose(1, 2), k) / t  # M [B, T, T]
            y = torch.bmm(v, attn.transpose(1, 2))  # (M F_c3) channel-first: [B, w, T]
        else:
            y = torch.bmm(torch.bmm(v, k.transpose(1, 2)), q) / t  # F_c3^T F_c2 F_c1^T, [B, w, T]
        return self.out(y) + fc


class MultiScaleTemporalNetwork(nn.Module):
    """MTN ``s_theta`` (paper Sec. 3.2, Fig. S1): ``[B, T, D] -> [B, T, D]``.

    One branch per dilation (PDC, Eq. 4): ``Conv1d(D, D/4, kernel 3, dilation d, padding d)`` so that
    every T >= 1 keeps its length (zero padding: our choice; the paper is silent), followed by a ReLU
    (our choice; the paper is silent); plus the TSA branch (:class:`TemporalSelfAttention`, D/4
    channels). The branch outputs are concatenated (``len(dilations) + 1`` branches of D/4: D for the
    default three dilations) and added to the input (``X = F_bar + F``, Sec. 3.2). No normalisation
    layer and no fusion convolution: the paper describes neither.
    """

    def __init__(self, dim: int, dilations: tuple[int, ...] = (1, 2, 4), kernel_size: int = 3) -> None:
        super().__init__()
        branches = len(dilations) + 1
        if dim % branches:
            raise ValueError(
                f"RTFM's MTN splits the {dim}-D features into {branches} branches of D/{branches} channels; "
                f"{dim} is not divisible by {branches}"
            )
        width = dim // branches
        self.pdc = nn.ModuleList(
            nn.Conv1d(dim, width, kernel_size, dilation=d, padding=d * (kernel_size - 1) // 2) for d in dilations
        )
        self.tsa = TemporalSelfAttention(dim, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = x.transpose(1, 2)  # [B, D, T]
        outs = [torch.relu(conv(f)) for conv in self.pdc] + [self.tsa(f)]
        return torch.cat(outs, dim=1).transpose(1, 2) + x


@register_detector("rtfm")
class RTFM(Detector):
    """MTN + snippet classifier trained with RTFM's feature-magnitude and top-k losses (module docstring).

    Weights: Xavier-uniform, zero biases (our choice; the paper is silent).
    """

    Config = RTFMConfig
    input_level = "clips"
    train_level = "segments"
    causal = False
    #: the code's dropout of 70 % of the feature magnitudes before top-k (``magnitude_dropout``) is a
    #: regulariser for 15,000 steps; in a few hundred it mostly selects normal segments as the
    #: "top-k" of anomalous videos (measured on the synthetic benchmark at 400 steps: frame AUC 0.72
    #: with it, 0.94 without)
    short_schedule: ClassVar[dict[str, object]] = {"magnitude_dropout": 0.0}

    def __init__(self, feature_dim: int, cfg: RTFMConfig | None = None) -> None:
        cfg = cfg or RTFMConfig()
        super().__init__(feature_dim, cfg)
        self.mtn = MultiScaleTemporalNetwork(feature_dim, tuple(cfg.dilations), cfg.kernel_size)
        self.classifier = mlp_head(feature_dim, cfg.hidden, cfg.dropout)
        xavier_init_(self.modules())

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """MTN output ``X = s_theta(F)``: ``[B, S, D]`` -> ``[B, S, D]``."""
        return self.mtn(x)

    def classify(self, feats: torch.Tensor) -> torch.Tensor:
        """Snippet scores ``f_phi(X)``: ``[B, S, D]`` -> ``[B, S]`` in [0, 1]."""
        return torch.sigmoid(self.classifier(feats)).squeeze(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, S, D]`` float32 (one row per crop) -> ``[B, S]`` scores in [0, 1]."""
        return self.classify(self.features(x))

    def sample_batch(self, bank: FeatureBank, gen: torch.Generator) -> CropsBatch:
        """``batch_abnormal`` anomalous + ``batch_normal`` normal videos with all their crops (PROTOCOLS.md)."""
        return all_crops_batch(bank, self.cfg.batch_abnormal, self.cfg.batch_normal, gen)

    def losses(self, batch: MILBatch) -> dict[str, torch.Tensor]:
        x, va, vn, c, labels = stack_crops(batch)  # x [(Va+Vn)*C, S, D]
        s = x.shape[1]
        feats = self.features(x)
        scores = self.classify(feats).view(va + vn, c, s).mean(dim=1)  # crop-averaged [V, S]
        magnitudes = feats.norm(p=2, dim=-1).view(va + vn, c, s)  # [V, C, S]
        p = self.cfg.dropout if self.cfg.magnitude_dropout is None else self.cfg.magnitude_dropout
        keep = F.dropout(torch.ones_like(scores), p, training=self.training)  # 0 or 1/(1-p) per snippet
        idx = topk_indices(magnitudes.detach(), self.cfg.k, keep)
        g = None
        if self.cfg.loss_form == "code":  # the released code's norm of the mean top-k feature
            g = topk_feature_norm(feats.view(va + vn, c, s, -1), idx)
        return rtfm_losses(magnitudes, scores, labels, idx, self.cfg, g)

    def make_optimizer(self) -> torch.optim.Optimizer:
        # torch Adam's weight_decay adds wd * w to the gradient (coupled L2), as the authors' PyTorch code does.
        return torch.optim.Adam(self.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
