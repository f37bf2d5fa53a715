"""NG-MIL: Normality Guided Multiple Instance Learning.

S. Park, H. Kim, M. Kim, D. Kim, K. Sohn, "Normality Guided Multiple Instance Learning for Weakly
Supervised Video Anomaly Detection", WACV 2023. The paper links no code and we found no official
repository; every choice the paper leaves open is a setting of
:class:`NGMILConfig` and is listed here. The paper's implementation details (batch 32 + 32, Adam
1e-3 / 5e-4, FC 512-128-1 with dropout 0.7, 32 segments, top-3 precision) repeat RTFM's, so where
NG-MIL is silent we follow RTFM's set-up (``models/rtfm.py``).

Model (paper Sec. 3.2, Sec. 4.2, Fig. 2), on 32-segment bags (``input_level = "segments"``):

- Encoder ``f = E(x)``: temporal convolutions, each followed by a ReLU (Sec. 4.2). Our choices (the
  paper gives no sizes): two 1-D convolutions over the segments, kernel 3, D -> D channels, zero padding
  (length kept), plus the input (``f = x + ReLU(conv(ReLU(conv(x))))``), as RTFM's MTN, whose place
  the encoder takes, adds its input (``X = F_bar + F``). Without the residual, one of four seeds of
  ``tests/test_synthetic_benchmark.py`` locked onto non-anomalous segments (frame AUC 0.38; the others
  0.90-0.95); with it all four reached 0.91-0.95.
- MIL classifier ``alpha(f)``: FC D-512-128-1, ReLU and dropout 0.7 after the two hidden layers,
  sigmoid output (Sec. 4.2).
- Projection ``f' = W f + b`` to the prototypes' dimension P (Sec. 3.2: "we first project f_t into
  f_t' to align the feature dimension to p_m", ``p_m`` in ``R^{D/4}``, printed ``R^{D=4}``). P = 512,
  which is D/4 for the paper's 2048-D I3D features, fixed so that low-dimensional features (7-D test
  features, 32-D synthetic ones) still get a usable prototype space. A linear layer with PyTorch's
  default initialisation, non-zero bias included: cosine similarity to the prototypes reflects a
  feature's deviation from normality only when the normal features sit away from the origin (real I3D
  features are non-negative with a large common mean); with zero-mean inputs and a zero bias the
  similarity score at initialisation is noise, and it is what picks the first top-k segments (with a
  zero bias, the overfitting test of ``tests/test_detectors.py`` locked onto noise segments for each
  of four seeds; with the default bias it found the planted ones for each).
- Normality prototypes ``p_m``, an ``[M, P]`` buffer (no gradient; M = 64 for UCF-Crime / XD-Violence,
  32 for ShanghaiTech, Sec. 4.2), initialised in :meth:`NGMIL.setup` by k-means (Lloyd [22],
  Euclidean, k-means++ seeding from the run's generator: :func:`models.kmeans.kmeans`, scikit-learn's) over
  the projected features ``f'`` *of the network at initialisation* of every segment of every crop of
  every normal training video ("across all normal videos", Sec. 4.2).
- Similarity classifier (Eq. 2, 4, 5): cosine similarities ``s_m`` of ``f'`` with the prototypes;
  ``g = ReLU(sum_m softmax_m(s_m / t) s_m)``; ``a = 1 - g``. Eq. 4 as printed has no temperature
  although the text sets t = 0.5 "in Eq. (4)": we divide the similarities by t *inside the softmax
  only* (the attention weights), so that ``g`` stays a convex combination of cosines. The ReLU is the
  paper's ("to make sure it is non-negative"); as cosines are <= 1, ``g`` is in [0, 1] and so is
  ``a = 1 - g`` even when every cosine is negative (then ``a = 1``).
- Score (Eq. 6): ``r = (alpha + a) / 2`` in [0, 1]; :meth:`NGMIL.forward` returns ``r``.
  (``rerank = "mil"`` / ``"similarity"`` use ``alpha`` / ``a`` alone: Table 4's ablations.)

Prototype update (Eq. 3), in :meth:`NGMIL.losses` in training mode, under ``no_grad``, from the
batch's *normal* bags only: each normal segment's ``f'`` is assigned to its most cosine-similar
prototype (Eq. 2) and each prototype with at least one assignee moves to
``(1 - lambda) p + lambda mean(assigned f')``, lambda = 0.1. Eq. 3 as printed writes
``(1 - lambda) p + mean(f')`` (no lambda on the new term), under which the prototypes' norm grows to
1/lambda times the features' and the Euclidean losses (Eq. 8-9) lose their meaning; we read it as the
exponential moving average the text names. A step's losses use the prototypes as they were before
that step's update. Prototypes are never updated at test time (Sec. 4.2), nor by :meth:`forward`.

Losses (Sec. 3.3; :func:`ngmil_losses`), all on ``r`` and the projected features ``f'``:

- ``ranking`` (Eq. 7): ``[1 - mean_topk r(abnormal) + mean_topk r(normal)]_+`` with top-k by the
  re-ranked score r, k = 3 (the paper does not state k for Eq. 7; 3 as RTFM and NG-MIL's own top-k
  precision, Fig. 4), over pairs (abnormal video i, normal video i).
- ``clustering`` (Eq. 8): mean over the normal bags' segments of ``min_m ||p_m - f'||^2`` (Eq. 8
  writes ``f^a`` but the text says the instances of the negative bag).
- ``triplet`` (Eq. 9-10): in each abnormal bag the top-k (pseudo abnormal) and bottom-k (pseudo
  normal) segments by r; for each pseudo-normal ``f_n`` the anchor is its nearest prototype ``p_j``
  (Euclidean, Eq. 10) and the loss is ``[||f_n - p_j||^2 - min_{f_a in top-k} ||f_a - p_j||^2 +
  margin]_+``, margin 8, averaged over the k (Eq. 9's 1/k) and over bags. The text calls the
  pseudo-normal set both ``{f_{k+1} .. f_T}`` and "bottom-k"; Eq. 9 sums k terms ``f_{T-i+1}``, the
  bottom k: used here.
- ``smooth`` / ``sparse``: temporal smoothness ``(r_t - r_{t+1})^2`` and sparsity ``r_t`` of the
  abnormal bags' scores "following Sultani et al." (who apply them to the anomalous bag only). The
  paper's names ``L_s`` / ``L_ts`` are swapped with respect to their formulas; both share the weight
  rho anyway. It writes sums over t; with rho = 0.5 the sparsity sum's gradient (0.5 per segment)
  exceeds the ranking term's (1/k per top-k segment) and drives every score to 0 (observed on the
  synthetic benchmark: the ranking loss stays at 0.99), so by default we take the *mean* over t (the
  sum with rho / T); ``reg_reduction = "sum"`` gives the printed form. Both are averaged over the batch's abnormal bags.
- ``total`` (Eq. 11): ``ranking + tau clustering + gamma triplet + rho (smooth + sparse)``. The paper's
  "we set the hyper-parameters, alpha and gamma as 0.1, 0.1, and 0.5" names two symbols for three
  values; we read it as (tau, gamma, rho) = (0.1, 0.1, 0.5), the order of Eq. 11. (tau and gamma also
  name the temperature and the margin in Sec. 3.2-3.3; the settings are ``temperature`` and
  ``margin``.) The returned ``clustering`` / ``triplet`` / ``smooth`` / ``sparse`` include their
  weights.

Ten crops: by default (``crops = "all"``, as RTFM's code, which trains on all crops) a batch holds
every crop of its 32 + 32 videos: each crop row is encoded and scored on its own; a video's score r
is the mean over its crops (as at test time, :meth:`Detector.score`); top-k / bottom-k are chosen
once per video on those crop-averaged scores; the feature losses (clustering, triplet) and the
prototype update use every crop row's features. ``crops = "one"`` draws one random crop per video
(the base :meth:`Detector.sample_batch`). With one crop both are the same.

Iterations: the paper gives none; 15,000 as RTFM's code.

Not causal: the temporal convolutions look one segment ahead per layer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.config import choice, opt

from models.kmeans import kmeans
from models.registry import register_detector
from .base import Detector, FeatureBank, MILBatch, TrainConfig, all_crops_batch, mlp_head, stack_crops, xavier_init_

log = logging.getLogger(__name__)


@dataclass
class NGMILConfig(TrainConfig):
    """NG-MIL settings; every default cited by the section of the paper (Park et al., WACV 2023)."""

    iterations: int = opt(
        15000,
        "Adam steps: the paper gives none; 15,000 as RTFM's code (option.py, --max-epoch), whose set-up "
        "NG-MIL's Sec. 4.2 repeats",
    )
    lr: float = opt(1e-3, "Adam learning rate (paper Sec. 4.2)")
    weight_decay: float = opt(5e-4, "Adam weight decay (paper Sec. 4.2)")
    batch_abnormal: int = opt(32, "anomalous videos per batch (paper Sec. 4.2)")
    batch_normal: int = opt(32, "normal videos per batch (paper Sec. 4.2)")
    crops: str = choice(
        "all",
        ("all", "one"),
        "'all': every crop of each batch video, scores averaged over crops (as RTFM's code, whose set-up "
        "the paper follows); 'one': one random crop per video (module docstring)",
    )
    encoder_layers: int = opt(
        2, "temporal convolutions of the encoder, each followed by a ReLU (paper Sec. 4.2 gives no number: our choice)"
    )
    encoder_width: int = opt(
        0,
        "output channels of each encoder convolution; 0 = the input dimension D, which the encoder keeps "
        "as RTFM's MTN does (f in R^D, paper Sec. 3.1; our choice); must be D with encoder_residual",
    )
    kernel_size: int = opt(3, "temporal kernel of the encoder's convolutions (our choice; the paper is silent)")
    encoder_residual: bool = opt(
        True,
        "add the input features to the encoder's output (f = x + convs(x)), as RTFM's MTN does (X = F_bar + F), "
        "whose place the encoder takes in the RTFM set-up NG-MIL follows (our choice; the paper is silent)",
    )
    proto_dim: int = opt(
        512,
        "dimension of the projected features f' and the prototypes (paper Sec. 3.2: p_m in R^{D/4}, printed "
        "'R^{D=4}': 512 for its 2048-D I3D features; fixed, see module docstring)",
    )
    hidden: tuple[int, ...] = opt((512, 128), "MIL classifier hidden sizes, FC D-512-128-1 (paper Sec. 4.2)")
    dropout: float = opt(0.7, "dropout after the MIL classifier's hidden layers (paper Sec. 4.2)")
    prototypes: int = opt(
        64,
        "number of normality prototypes M: 64 for UCF-Crime and XD-Violence, 32 for ShanghaiTech "
        "(paper Sec. 4.2, Fig. 5)",
    )
    momentum: float = opt(0.1, "prototype update momentum lambda (paper Eq. 3, Sec. 4.2)")
    temperature: float = opt(0.5, "softmax temperature of the similarity classifier (paper Eq. 4, Sec. 4.2)")
    rerank: str = choice(
        "both",
        ("both", "mil", "similarity"),
        "score r used for top-k selection, the losses and the output: 'both' = Eq. 6 (NGRM); 'mil' = alpha "
        "only (the 'Baseline' of Table 4); 'similarity' = a only ('NGRM^sim' of Table 4)",
    )
    k: int = opt(3, "top-k (and bottom-k) segments by the re-ranked score r (Eq. 7, 9; k = 3 as RTFM and Fig. 4)")
    margin: float = opt(8.0, "triplet margin (paper Eq. 9, Sec. 4.2)")
    tau: float = opt(0.1, "weight of the normality clustering loss (paper Eq. 11, Sec. 4.2; module docstring)")
    gamma: float = opt(0.1, "weight of the normality guided triplet loss (paper Eq. 11, Sec. 4.2; module docstring)")
    rho: float = opt(0.5, "weight of the smoothness + sparsity terms (paper Eq. 11, Sec. 4.2; module docstring)")
    reg_reduction: str = choice(
        "mean",
        ("mean", "sum"),
        "smoothness / sparsity over a bag's segments: 'mean' (default, see module docstring) or 'sum' "
        "(as printed in Sec. 3.3)",
    )
    kmeans_iters: int = opt(100, "most Lloyd iterations of the prototype k-means (our choice)")
    kmeans_tol: float = opt(1e-6, "stop k-means when the centres move less than this (squared, relative; our choice)")
    setup_chunk: int = opt(64, "videos encoded at a time for the k-means initialisation", key=False)

    def validate(self) -> None:
        super().validate()
        if self.k < 1:
            raise ValueError("k must be >= 1")
        if self.prototypes < 1:
            raise ValueError("prototypes must be >= 1")
        if not 0.0 < self.momentum <= 1.0:
            raise ValueError("momentum must be in (0, 1]")
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0")
        if self.margin < 0 or min(self.tau, self.gamma, self.rho) < 0:
            raise ValueError("margin, tau, gamma and rho must be >= 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("dropout must be in [0, 1)")
        if self.encoder_layers < 1 or self.encoder_width < 0 or self.proto_dim < 1:
            raise ValueError("encoder_layers and proto_dim must be >= 1, encoder_width >= 0")
        if not self.hidden or min(self.hidden) < 1:
            raise ValueError("hidden needs at least one positive layer size")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError("kernel_size must be odd (same-length output)")
        if self.kmeans_iters < 0 or self.setup_chunk < 1:
            raise ValueError("kmeans_iters must be >= 0 and setup_chunk >= 1")


# ---------------------------------------------------------------------------------------------
# k-means and the prototype update
# ---------------------------------------------------------------------------------------------


def squared_distances(x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """``||x_i - c_m||^2``: ``x`` ``[..., W]``, ``centres`` ``[M, W]`` -> ``[..., M]`` (>= 0)."""
    d = x.pow(2).sum(-1, keepdim=True) - 2 * x @ centres.T + centres.pow(2).sum(-1)
    return d.clamp_min(0.0)


def cosine_similarities(feats: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Eq. 2: ``s_m = f . p_m / (||f|| ||p_m||)``. ``feats`` ``[..., W]``, ``prototypes`` ``[M, W]`` -> ``[..., M]``.

    A zero vector has similarity 0 with everything.
    """
    return F.normalize(feats, dim=-1, eps=1e-8) @ F.normalize(prototypes, dim=-1, eps=1e-8).T


@torch.no_grad()
def update_prototypes(prototypes: torch.Tensor, feats: torch.Tensor, momentum: float) -> torch.Tensor:
    """Eq. 3 as an exponential moving average (module docstring).

    Args:
        prototypes: ``[M, P]``; feats: ``[N, P]`` projected features ``f'`` of normal-bag segments.
        momentum: lambda in (0, 1].
    Returns:
        ``[M, P]``: prototype m, if some feature's most cosine-similar prototype is m (Eq. 2; ties go
        to the lowest m), becomes ``(1 - lambda) p_m + lambda mean_{t in J_m} f_t``; otherwise unchanged.
    """
    m = prototypes.shape[0]
    assign = cosine_similarities(feats, prototypes).argmax(dim=1)
    onehot = F.one_hot(assign, m).to(feats.dtype)  # [N, M]
    counts = onehot.sum(0)
    means = (onehot.T @ feats) / counts.clamp_min(1)[:, None]
    moved = (1 - momentum) * prototypes + momentum * means
    return torch.where(counts[:, None] > 0, moved, prototypes)


# ---------------------------------------------------------------------------------------------
# Scores and loss terms, as functions of plain tensors so that each can be checked by hand
# ---------------------------------------------------------------------------------------------


def similarity_anomaly_score(feats: torch.Tensor, prototypes: torch.Tensor, temperature: float) -> torch.Tensor:
    """Eq. 4-5: ``a = 1 - ReLU(sum_m softmax_m(s_m / t) s_m)``.

    Args:
        feats: ``[..., P]`` projected features ``f'``; prototypes: ``[M, P]``; temperature: t > 0.
    Returns:
        ``[...]`` in [0, 1] (cosines are <= 1 and the ReLU removes negatives).
    """
    s = cosine_similarities(feats, prototypes)
    g = (torch.softmax(s / temperature, dim=-1) * s).sum(-1)
    return 1.0 - torch.relu(g)


def topk_indices(scores: torch.Tensor, k: int, largest: bool = True) -> torch.Tensor:
    """The ``k`` (clamped to S) highest (or lowest) scored segments of each bag: ``[V, S]`` -> ``[V, k']`` int64."""
    return scores.topk(min(k, scores.shape[1]), dim=1, largest=largest).indices


def ng_mil_ranking_loss(abnormal: torch.Tensor, normal: torch.Tensor, k: int) -> torch.Tensor:
    """Eq. 7: mean over pairs of ``[1 - mean_topk r(abnormal_i) + mean_topk r(normal_i)]_+``.

    Args:
        abnormal: ``[Va, S]`` scores r in [0, 1]; normal: ``[Vn, S]``; row i of each paired, over
            ``min(Va, Vn)`` pairs.
        k: top-k per bag (clamped to S).
    """
    n = min(abnormal.shape[0], normal.shape[0])
    kk = min(k, abnormal.shape[1])
    top_a = abnormal[:n].topk(kk, dim=1).values.mean(1)
    top_n = normal[:n].topk(kk, dim=1).values.mean(1)
    return torch.relu(1.0 - top_a + top_n).mean()


def normality_clustering_loss(normal_feats: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Eq. 8: mean over the normal bags' segments of ``min_m ||p_m - f||^2``.

    Args:
        normal_feats: ``[..., P]`` projected features of normal bags (every leading index a segment).
        prototypes: ``[M, P]`` (no gradient).
    """
    return squared_distances(normal_feats, prototypes).min(dim=-1).values.mean()


def normality_triplet_loss(
    abnormal_feats: torch.Tensor, scores: torch.Tensor, prototypes: torch.Tensor, k: int, margin: float
) -> torch.Tensor:
    """Eq. 9-10 on the abnormal bags.

    Args:
        abnormal_feats: ``[V, C, S, P]`` projected features of V abnormal videos, C crops each.
        scores: ``[V, S]`` their (crop-averaged) scores r, which pick the top-k (pseudo abnormal) and
            bottom-k (pseudo normal) segments of each video, the same for all its crops.
        prototypes: ``[M, P]`` (no gradient); k: set size (clamped to S); margin: gamma of Eq. 9.
    Returns:
        Mean over videos, crops and the k pseudo-normal segments ``f_n`` of
        ``[||f_n - p_j||^2 - min_{f_a in top-k} ||f_a - p_j||^2 + margin]_+``, with
        ``j = argmin_m ||f_n - p_m||^2`` (Eq. 10).
    """
    v, c, _, w = abnormal_feats.shape
    top = topk_indices(scores, k)  # [V, k]
    bottom = topk_indices(scores, k, largest=False)
    pick = lambda idx: abnormal_feats.gather(2, idx[:, None, :, None].expand(v, c, idx.shape[1], w))  # noqa: E731
    f_abn, f_nor = pick(top), pick(bottom)  # [V, C, k, W]
    j = squared_distances(f_nor.detach(), prototypes).argmin(dim=-1)  # [V, C, k]
    anchor = prototypes[j]  # [V, C, k, W]
    d_pos = (f_nor - anchor).pow(2).sum(-1)  # [V, C, k]
    d_neg = (f_abn[:, :, :, None, :] - anchor[:, :, None, :, :]).pow(2).sum(-1).min(dim=2).values  # [V, C, k]
    return torch.relu(d_pos - d_neg + margin).mean()


def smoothness_loss(abnormal: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """``(r_t - r_{t+1})^2`` over each abnormal bag's S-1 neighbours: mean (``"mean"``) or sum (``"sum"``)
    over t, then the mean over bags. ``abnormal``: ``[Va, S]``."""
    d = (abnormal[:, 1:] - abnormal[:, :-1]).pow(2)
    return (d.mean(1) if reduction == "mean" else d.sum(1)).mean() if d.shape[1] else abnormal.sum() * 0


def sparsity_loss(abnormal: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """``r_t`` over each abnormal bag's S segments: mean or sum over t, then the mean over bags. ``[Va, S]``."""
    return (abnormal.mean(1) if reduction == "mean" else abnormal.sum(1)).mean()


def ngmil_losses(
    scores: torch.Tensor,
    feats: torch.Tensor,
    labels: torch.Tensor,
    prototypes: torch.Tensor,
    cfg: NGMILConfig,
) -> dict[str, torch.Tensor]:
    """Every NG-MIL loss term of one batch (Eq. 11); ``total`` is their sum.

    Args:
        scores: ``[V, S]`` crop-averaged re-ranked scores r in [0, 1].
        feats: ``[V, C, S, P]`` projected features ``f'`` of every crop.
        labels: ``[V]`` 1 anomalous / 0 normal; the i-th anomalous video is paired with the i-th normal.
        prototypes: ``[M, P]`` (no gradient).
    Returns:
        ``ranking``, ``clustering`` (tau included), ``triplet`` (gamma included), ``smooth`` and
        ``sparse`` (rho included), ``total``.
    """
    abn, nor = labels == 1, labels == 0
    ranking = ng_mil_ranking_loss(scores[abn], scores[nor], cfg.k)
    clustering = cfg.tau * normality_clustering_loss(feats[nor], prototypes)
    triplet = cfg.gamma * normality_triplet_loss(feats[abn], scores[abn].detach(), prototypes, cfg.k, cfg.margin)
    smooth = cfg.rho * smoothness_loss(scores[abn], cfg.reg_reduction)
    sparse = cfg.rho * sparsity_loss(scores[abn], cfg.reg_reduction)
    total = ranking + clustering + triplet + smooth + sparse
    return {
        "ranking": ranking, "clustering": clustering, "triplet": triplet, "smooth": smooth, "sparse": sparse,
        "total": total,
    }


# ---------------------------------------------------------------------------------------------
# Network
# ---------------------------------------------------------------------------------------------


class TemporalEncoder(nn.Module):
    """Temporal convolutions, each followed by a ReLU (Sec. 4.2): ``[B, S, D]`` -> ``[B, S, W]``.

    Zero padding of ``kernel_size // 2`` on each side keeps every length S >= 1. With ``residual`` the
    input is added to the last ReLU's output (then W = D).
    """

    def __init__(self, in_dim: int, width: int, layers: int = 2, kernel_size: int = 3, residual: bool = False) -> None:
        super().__init__()
        if residual and width != in_dim:
            raise ValueError(f"a residual encoder keeps the input dimension {in_dim}; got width {width}")
        sizes = [in_dim] + [width] * layers
        self.convs = nn.ModuleList(
            nn.Conv1d(a, b, kernel_size, padding=kernel_size // 2) for a, b in zip(sizes, sizes[1:])
        )
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.transpose(1, 2)
        for conv in self.convs:
            h = torch.relu(conv(h))
        h = h.transpose(1, 2)
        return h + x if self.residual else h


@register_detector("ng_mil")
class NGMIL(Detector):
    """Encoder + MIL classifier + projection and normality prototypes, trained with Eq. 11 (module docstring).

    Buffers (in ``state_dict``, so checkpoints and resume carry them): ``prototypes`` ``[M, P]``
    float32 and ``proto_ready`` (0-d bool, True once initialised). Weights of the encoder and the MIL
    classifier: Xavier-uniform, zero biases (as RTFM's; the paper is silent); the projection keeps
    PyTorch's default initialisation (module docstring).
    """

    Config = NGMILConfig
    input_level = "segments"
    causal = False

    def __init__(self, feature_dim: int, cfg: NGMILConfig | None = None) -> None:
        cfg = cfg or NGMILConfig()
        super().__init__(feature_dim, cfg)
        width = cfg.encoder_width or feature_dim
        self.encoder = TemporalEncoder(feature_dim, width, cfg.encoder_layers, cfg.kernel_size, cfg.encoder_residual)
        self.classifier = mlp_head(width, cfg.hidden, cfg.dropout)
        xavier_init_(self.modules())  # before the projection exists: it keeps PyTorch's default init
        # PyTorch's default init, non-zero bias included: cosine similarity to the prototypes only reflects a
        # feature's deviation from normality when the projected features sit away from the origin
        # (module docstring)
        self.projection = nn.Linear(width, cfg.proto_dim)
        # placeholder until setup() (or the first training batch) runs k-means
        self.register_buffer("prototypes", torch.randn(cfg.prototypes, cfg.proto_dim))
        self.register_buffer("proto_ready", torch.tensor(False))

    # ------------------------------------------------------------------ scoring

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder output ``f``: ``[B, S, D]`` -> ``[B, S, W]``."""
        return self.encoder(x)

    def project(self, feats: torch.Tensor) -> torch.Tensor:
        """Projected features ``f'`` (Sec. 3.2), the prototypes' space: ``[B, S, W]`` -> ``[B, S, P]``."""
        return self.projection(feats)

    def mil_score(self, feats: torch.Tensor) -> torch.Tensor:
        """MIL classifier ``alpha``: ``[B, S, W]`` -> ``[B, S]`` in [0, 1]."""
        return torch.sigmoid(self.classifier(feats)).squeeze(-1)

    def ensemble(self, feats: torch.Tensor, proj: torch.Tensor, prototypes: torch.Tensor | None = None) -> torch.Tensor:
        """Eq. 6 ``r = (alpha(f) + a(f'; P)) / 2``: ``[B, S, W]``, ``[B, S, P]`` -> ``[B, S]`` in [0, 1]."""
        p = self.prototypes if prototypes is None else prototypes
        if self.cfg.rerank == "mil":
            return self.mil_score(feats)
        a = similarity_anomaly_score(proj, p, self.cfg.temperature)
        return a if self.cfg.rerank == "similarity" else 0.5 * (self.mil_score(feats) + a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, S, D]`` float32 (one row per crop) -> ``[B, S]`` scores r in [0, 1].

        Never updates the prototypes."""
        f = self.features(x)
        return self.ensemble(f, self.project(f))

    # ------------------------------------------------------------------ prototypes

    @torch.no_grad()
    def init_prototypes(self, proj: torch.Tensor, gen: torch.Generator | None = None) -> None:
        """Set the prototypes to the k-means centres of ``proj`` ``[N, P]`` (projected features)."""
        _, centres, _ = kmeans(proj.float(), self.cfg.prototypes, gen=gen, iters=self.cfg.kmeans_iters, tol=self.cfg.kmeans_tol)
        self.prototypes.copy_(centres.to(self.prototypes))
        self.proto_ready.fill_(True)

    @torch.no_grad()
    def setup(self, bank: FeatureBank, gen: torch.Generator) -> None:
        """k-means over the projected encoder outputs (at initialisation) of every segment of every crop of
        every normal training video (Sec. 4.2), encoded ``setup_chunk`` videos at a time."""
        device = self.prototypes.device
        normal = bank.normal_index.tolist()
        parts = []
        for i in range(0, len(normal), self.cfg.setup_chunk):
            x = torch.as_tensor(bank.features[normal[i : i + self.cfg.setup_chunk]]).to(device, torch.float32)
            parts.append(self.project(self.features(x.flatten(0, 1))).flatten(0, 1))  # [chunk*C*S, P]
        proj = torch.cat(parts)
        log.info("ng_mil: k-means of %d normal segment features into %d prototypes", proj.shape[0], self.cfg.prototypes)
        self.init_prototypes(proj, gen)

    # ------------------------------------------------------------------ training

    def sample_batch(self, bank: FeatureBank, gen: torch.Generator) -> MILBatch:
        """``batch_abnormal`` + ``batch_normal`` videos: all their crops (``crops = "all"``) or one random crop."""
        if self.cfg.crops == "one":
            return super().sample_batch(bank, gen)
        return all_crops_batch(bank, self.cfg.batch_abnormal, self.cfg.batch_normal, gen)

    def losses(self, batch: MILBatch) -> dict[str, torch.Tensor]:
        """Eq. 11 on one batch; in training mode, then Eq. 3 on the normal bags' features (no gradient)."""
        x, va, vn, c, labels = stack_crops(batch)  # x [(Va+Vn)*C, S, D]
        s = x.shape[1]
        feats = self.features(x)  # [(Va+Vn)*C, S, W]
        proj = self.project(feats)  # [(Va+Vn)*C, S, P]
        normal_proj = proj[va * c :].detach().flatten(0, 1)
        if not bool(self.proto_ready):
            log.warning("ng_mil: prototypes were not initialised by setup(); k-means on this batch's normal features")
            self.init_prototypes(normal_proj)
        # a copy: the buffer is updated in place below while autograd still needs this step's values
        protos = self.prototypes.clone()
        scores = self.ensemble(feats, proj, protos).view(va + vn, c, s).mean(dim=1)  # crop-averaged r [V, S]
        terms = ngmil_losses(scores, proj.view(va + vn, c, s, -1), labels, protos, self.cfg)
        if self.training:
            self.prototypes.copy_(update_prototypes(self.prototypes, normal_proj, self.cfg.momentum))
        return terms

    def make_optimizer(self) -> torch.optim.Optimizer:
        # torch Adam's weight_decay is coupled L2 (added to the gradient), as in RTFM's PyTorch code.
        return torch.optim.Adam(self.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
