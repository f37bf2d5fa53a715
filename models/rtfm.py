"""RTFM: Robust Temporal Feature Magnitude learning, as the authors' released code builds and trains it.

Y. Tian, G. Pang, Y. Chen, R. Singh, J. W. Verjans, G. Carneiro, "Weakly-supervised Video Anomaly
Detection with Robust Temporal Feature Magnitude Learning", ICCV 2021; official code
github.com/tianyu0207/RTFM (files cited below as "official model.py" etc.). Where the code and the
paper differ, the code (which produced the published tables) is the default and the paper's form a
setting.

Network (official model.py, ``Aggregate`` and ``Model``), with the official module names, so that
a state dict saved by the official ``Model`` (the released ``.pkl`` checkpoints) loads with strict
key matching (:meth:`RTFM.load_official`):

- ``Aggregate`` (the paper's MTN, Sec. 3.2), on ``[B, T, D]``: ``conv_1`` / ``conv_2`` / ``conv_3``
  = Conv1d(D -> 512, kernel 3, dilation 1 / 2 / 4, padding = dilation) + ReLU + BatchNorm1d(512);
  ``conv_4`` = Conv1d(D -> 512, kernel 1, no bias) + ReLU feeding ``non_local``, a 1-D non-local
  block (official ``_NonLocalBlockND``: ``g``, ``theta``, ``phi`` = Conv1d(512 -> 256, 1), affinity
  ``theta^T phi / T`` with no softmax, output ``W`` = Conv1d(256 -> 512, 1) + BatchNorm1d(512) whose
  weight and bias start at 0, so the block starts as the identity, plus its input); the four
  512-channel outputs are concatenated (2048) and fused by ``conv_5`` = Conv1d(2048 -> D, kernel 3,
  padding 1, no bias) + ReLU + BatchNorm1d(D); then the input is added (residual).
- Dropout 0.7 (``drop_out``, training only) on the ``Aggregate`` output: the features whose
  magnitudes are ranked and the classifier's input are both the dropped-out features.
- Classifier ``fc1`` / ``fc2`` / ``fc3``: Linear D-512-128-1, ReLU and dropout 0.7 after the first
  two, sigmoid.
- Init (official model.py, ``weight_init`` applied to every module): Xavier-uniform weight and zero
  bias for every Conv1d and Linear, the non-local output convolution included; BatchNorms keep
  PyTorch's init except the non-local block's, which is zeroed.

Feature width: the official code hard-codes 2048 (``Aggregate(len_feature=2048)``, the 2048 input
channels of ``conv_4`` and of ``conv_5``, whose 2048 outputs feed the residual and ``fc1``), i.e.
I3D-ResNet50 features; it runs at no other width. Here D generalises the places where D = 2048 is
the *input* width (``conv_1`` .. ``conv_4`` inputs, ``conv_5`` output and its BatchNorm, ``fc1``
input), while the branch widths (512 x 4 = 2048 concatenated, 256 inside the non-local block) stay
the official constants. At D = 2048 this is exactly the official network: 24,718,849 parameters.
Other D (1024-D I3D, 4096-D C3D, the small widths of tests and the demo) are our extension.

Training objective, one batch (official train.py, ``RTFM_loss``, ``sparsity``, ``smooth`` and
``train``; official model.py, ``Model.forward``; see :func:`rtfm_losses`):

- top-k (k = 3 = 32 // 10) snippets per video by the crop-averaged magnitudes of the dropped-out
  features, after multiplying them by a dropout mask (rate 0.7, training only; 0 or 1/0.3);
- ``classification``: BCE of each video's mean score over its top-k snippets (paper Eq. 7 sums
  the per-snippet BCE: ``loss_form=paper``);
- ``magnitude``: ``alpha * mean_rows (|m - ||mean_k x+||| + ||mean_k x-||)^2`` per (video, crop) row,
  the i-th anomalous row paired with the i-th normal one; m = 100, alpha = 1e-4 (paper Eq. 6 is
  the hinge on the mean magnitudes, Eq. 2 and 3: ``loss_form=paper``);
- ``smooth``: 8e-4 * the sum of squared differences of consecutive scores over the batch's
  anomalous videos' concatenated 32-segment scores (the code's sum includes the pairs across video
  boundaries); ``sparse``: 8e-3 * the L2 norm of those scores (paper Sec. 3.4 writes L1).

Scores and magnitudes are computed per crop and averaged over the crops of a video (official
``Model.forward``: ``view(bs, ncrops, -1).mean(1)``); the magnitude loss is per (video, crop) row. At
test time every clip of the video is scored (``input_level = "clips"``) and :meth:`Detector.score`
averages the crops' scores (official test_10crop.py).

Not causal: the non-local block mixes every clip of the video and the convolutions look one to four
clips ahead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.config import choice, opt

from models.registry import register_detector
from .base import CropsBatch, Detector, FeatureBank, MILBatch, TrainConfig, all_crops_batch, stack_crops, xavier_init_

#: the official network's constants (official model.py, ``Aggregate`` and ``Model``)
BRANCH_WIDTH = 512
NONLOCAL_WIDTH = 256
DILATIONS = (1, 2, 4)
HIDDEN = (512, 128)
#: the feature width the official code is written for (I3D-ResNet50)
OFFICIAL_FEATURE_DIM = 2048


@dataclass
class RTFMConfig(TrainConfig):
    """RTFM settings; each default cites the official code (github.com/tianyu0207/RTFM) or the paper."""

    iterations: int = opt(15000, "Adam steps (official option.py --max-epoch 15000, one batch per step; the paper says 50 epochs)")
    lr: float = opt(1e-3, "Adam learning rate (official option.py --lr '[0.001]*15000', constant; paper Sec. 4.2)")
    weight_decay: float = opt(
        5e-3,
        "Adam weight decay (official main.py: optim.Adam(weight_decay=0.005)); the paper's Sec. 4.2 says 5e-4",
    )
    batch_abnormal: int = opt(32, "anomalous videos per batch, all their crops (official option.py --batch-size 32)")
    batch_normal: int = opt(32, "normal videos per batch, all their crops (official option.py --batch-size 32)")
    k: int = opt(3, "top-k snippets by feature magnitude (official model.py: k = num_segments // 10 = 3; paper Sec. 4.2)")
    margin: float = opt(100.0, "feature-magnitude margin m (official train.py: RTFM_loss(0.0001, 100); paper Sec. 4.2)")
    alpha: float = opt(1e-4, "weight of the feature-magnitude loss (official train.py: RTFM_loss(0.0001, 100))")
    lambda_smooth: float = opt(8e-4, "temporal smoothness weight, anomalous videos only (official train.py: smooth(abn_scores, 8e-4))")
    lambda_sparse: float = opt(8e-3, "sparsity weight, anomalous videos only (official train.py: sparsity(abn_scores, .., 8e-3))")
    dropout: float = opt(
        0.7,
        "dropout on the Aggregate output (features) and after fc1 and fc2, training only (official model.py: "
        "Model.drop_out = Dropout(0.7), used at all three places; paper Sec. 4.2)",
    )
    magnitude_dropout: float | None = opt(
        None,
        "dropout mask on the feature magnitudes before the top-k selection, training only; None = the same "
        "rate as 'dropout' (official model.py, Model.forward: the same drop_out on a tensor of ones)",
    )
    loss_form: str = choice(
        "code",
        ("code", "paper"),
        "'code': the official train.py forms, with which alpha and the regulariser weights were tuned "
        "(squared magnitude loss on the norm of the mean top-k feature, BCE of the top-k mean score, "
        "L2-norm sparsity, smoothness over the concatenated batch); 'paper': Eq. 6 hinge on Eq. 2 mean "
        "magnitudes, Eq. 7 summed BCE, L1 sparsity, per-video smoothness (see rtfm_losses)",
    )
    checkpoint: str = opt(
        "",
        "state dict saved by the official RTFM Model (main.py: torch.save(model.state_dict()) as "
        "ckpt/<model_name>final.pkl; e.g. the 'checkpoint for ShanghaiTech' / 'checkpoint for Ucf-crime' "
        "files linked from the RTFM README): the train stage loads it with strict key matching instead of "
        "training; its sha256 enters the cache key",
        key=False,
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
    """The official code's ``g``: the L2 norm of the *mean* top-k feature vector, per (video, crop).

    Official train.py, ``RTFM_loss``: ``norm(mean(feat, dim=1))`` over the k selected features, not
    the mean of the norms that Eq. 2 writes; by the triangle inequality it is never larger.

    Args:
        feats: ``[V, C, S, D]`` Aggregate outputs; idx: ``[V, k]``.
    Returns:
        ``[V, C]``.
    """
    v, c, _, d = feats.shape
    picked = feats.gather(2, idx[:, None, :, None].expand(v, c, idx.shape[1], d))  # [V, C, k, D]
    return picked.mean(dim=2).norm(p=2, dim=-1)


def feature_magnitude_loss(
    g_abnormal: torch.Tensor, g_normal: torch.Tensor, margin: float, form: str = "code"
) -> torch.Tensor:
    """Separability loss ``l_s`` on paired top-k magnitudes (unweighted; alpha applied by the caller).

    Args:
        g_abnormal: ``[N]`` ``g(X+)`` of anomalous (video, crop) rows; g_normal: ``[N]`` of normal
            rows, row i paired with anomalous row i.
        form: ``"code"``: ``mean_i (|m - g(X+_i)| + g(X-_i))^2`` (official train.py, ``RTFM_loss``);
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
        form: ``"code"``: mean over videos of ``BCE(mean_k score, y)`` (official train.py,
            ``RTFM_loss``: BCELoss on the top-k mean scores); ``"paper"``: mean over videos of
            ``sum_k BCE(score, y)`` (Eq. 7).
    """
    y = labels.to(topk_scores.dtype)
    if form == "code":
        return F.binary_cross_entropy(topk_scores.mean(dim=1), y)
    if form == "paper":
        per = F.binary_cross_entropy(topk_scores, y[:, None].expand_as(topk_scores), reduction="none")
        return per.sum(dim=1).mean()
    raise ValueError(f"unknown loss form {form!r}")


def smoothness_loss(abnormal_scores: torch.Tensor, lam: float, form: str = "code") -> torch.Tensor:
    """Temporal smoothness ``lam * (s_{t+1} - s_t)^2`` of the anomalous videos' scores (Sec. 3.4).

    Args:
        abnormal_scores: ``[Va, S]`` crop-averaged scores of the anomalous videos, in batch order.
        form: ``"code"``: summed over the batch's scores concatenated video after video (official
            train.py, ``smooth``, which therefore also counts the ``Va - 1`` differences across video
            boundaries); ``"paper"``: summed over t within each video, averaged over videos.
    """
    if form == "code":
        flat = abnormal_scores.flatten()
        return lam * (flat[1:] - flat[:-1]).pow(2).sum()
    per_video = (abnormal_scores[:, 1:] - abnormal_scores[:, :-1]).pow(2).sum(dim=1)
    return lam * per_video.mean()


def sparsity_loss(abnormal_scores: torch.Tensor, lam: float, form: str = "code") -> torch.Tensor:
    """Sparsity of the anomalous videos' scores (Sec. 3.4).

    Args:
        abnormal_scores: ``[Va, S]`` crop-averaged scores of the anomalous videos.
        form: ``"code"``: ``lam * ||s||_2`` over all the batch's anomalous scores (official train.py,
            ``sparsity``: the L2 norm, not the L1 the paper writes); ``"paper"``:
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
        ``min(Va, Vn)`` pairs (official train.py pairs row i of the two equal halves).
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
# Network (official model.py), module and parameter names as there
# ---------------------------------------------------------------------------------------------


class NonLocalBlock1D(nn.Module):
    """1-D non-local block, embedded-dot-product form without softmax (official model.py,
    ``_NonLocalBlockND`` with ``dimension=1, sub_sample=False, bn_layer=True``).

    ``[B, C, T] -> [B, C, T]``: ``z = W(y) + x`` with ``y_t = (1/T) sum_s (theta_t . phi_s) g_s``;
    ``W`` = Conv1d(inter -> C, 1) + BatchNorm1d(C), the BatchNorm's weight and bias set to 0 so that
    the block starts as the identity. Without a softmax the product is associative, so for
    ``T > inter`` the cheaper order ``theta (phi^T g) / T`` is used and long test videos never build
    a T x T map (same result up to float rounding).
    """

    def __init__(self, in_channels: int = BRANCH_WIDTH, inter_channels: int = NONLOCAL_WIDTH) -> None:
        super().__init__()
        self.in_channels, self.inter_channels = in_channels, inter_channels
        # registration order as in the official module: g, W, theta, phi
        self.g = nn.Conv1d(in_channels, inter_channels, kernel_size=1)
        self.W = nn.Sequential(nn.Conv1d(inter_channels, in_channels, kernel_size=1), nn.BatchNorm1d(in_channels))
        nn.init.zeros_(self.W[1].weight)
        nn.init.zeros_(self.W[1].bias)
        self.theta = nn.Conv1d(in_channels, inter_channels, kernel_size=1)
        self.phi = nn.Conv1d(in_channels, inter_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[2]
        g, theta, phi = self.g(x), self.theta(x), self.phi(x)  # [B, inter, T] each
        if t <= self.inter_channels:
            affinity = torch.bmm(theta.transpose(1, 2), phi) / t  # [B, T, T]
            y = torch.bmm(affinity, g.transpose(1, 2)).transpose(1, 2)  # [B, inter, T]
        else:
            y = torch.bmm(torch.bmm(g, phi.transpose(1, 2)), theta) / t  # (g phi^T) theta, [B, inter, T]
        return self.W(y) + x


def _conv_relu_bn(c_in: int, c_out: int, kernel: int, dilation: int = 1, bias: bool = True) -> nn.Sequential:
    """Conv1d (same length) -> ReLU -> BatchNorm1d, as the official ``Aggregate`` orders them."""
    pad = dilation * (kernel - 1) // 2
    return nn.Sequential(
        nn.Conv1d(c_in, c_out, kernel, dilation=dilation, padding=pad, bias=bias), nn.ReLU(), nn.BatchNorm1d(c_out)
    )


class Aggregate(nn.Module):
    """The multi-scale temporal network (official model.py, ``Aggregate``; paper Sec. 3.2): ``[B, T, D] -> [B, T, D]``.

    Module docstring for the layers; ``len_feature`` is D (the official code fixes it at 2048).
    """

    def __init__(self, len_feature: int = OFFICIAL_FEATURE_DIM) -> None:
        super().__init__()
        self.len_feature = len_feature
        d, w = len_feature, BRANCH_WIDTH
        self.conv_1, self.conv_2, self.conv_3 = (_conv_relu_bn(d, w, 3, dilation) for dilation in DILATIONS)
        self.conv_4 = nn.Sequential(nn.Conv1d(d, w, kernel_size=1, bias=False), nn.ReLU())
        self.conv_5 = _conv_relu_bn(w * (len(DILATIONS) + 1), d, 3, bias=False)
        self.non_local = NonLocalBlock1D(w, NONLOCAL_WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = x.transpose(1, 2)  # [B, D, T]
        branches = [self.conv_1(f), self.conv_2(f), self.conv_3(f), self.non_local(self.conv_4(f))]
        return (self.conv_5(torch.cat(branches, dim=1)) + f).transpose(1, 2)


@register_detector("rtfm")
class RTFM(Detector):
    """The official RTFM ``Model`` (module docstring) as a detector; its ``state_dict`` has the
    official keys (``Aggregate.conv_1.0.weight`` .. ``fc3.bias``), see :meth:`load_official`."""

    Config = RTFMConfig
    input_level = "clips"
    train_level = "segments"
    causal = False
    #: segment.scheme=auto pools 32 segments as the official utils.py process_feat does
    segment_scheme = "rtfm"
    #: 2: the official network (version 1 was built from the paper's description)
    version = 2
    #: for a few hundred steps on a few dozen videos (tests/test_synthetic_benchmark.py, 400 steps,
    #: 24 + 24 videos, measured frame AUC): the code's dropout of 70 % of the feature magnitudes
    #: before top-k (``magnitude_dropout``) is a regulariser for 15,000 steps, in a few hundred it
    #: mostly selects normal segments as the "top-k" of anomalous videos (0.72 with it, 0.94 without,
    #: measured with the earlier paper-described network); with the official network, lr 1e-3 and
    #: 32 + 32 batches (drawn with replacement from the 24 + 24 videos) reach 0.88 in 84 s, lr 3e-4
    #: and 16 + 16 batches 0.97 in 33 s (one CPU thread)
    short_schedule: ClassVar[dict[str, object]] = {"magnitude_dropout": 0.0, "lr": 3e-4, "batch_abnormal": 16, "batch_normal": 16}

    def __init__(self, feature_dim: int, cfg: RTFMConfig | None = None) -> None:
        cfg = cfg or RTFMConfig()
        super().__init__(feature_dim, cfg)
        self.Aggregate = Aggregate(feature_dim)
        self.fc1 = nn.Linear(feature_dim, HIDDEN[0])
        self.fc2 = nn.Linear(HIDDEN[0], HIDDEN[1])
        self.fc3 = nn.Linear(HIDDEN[1], 1)
        self.drop_out = nn.Dropout(cfg.dropout)
        xavier_init_(self.modules())  # official weight_init: every Conv and Linear, BatchNorms untouched
        #: batches drawn so far; set from the training loop's step by :meth:`before_step`
        self.batches_drawn = 0

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Aggregate output, dropped out in training: ``[B, S, D]`` -> ``[B, S, D]``."""
        return self.drop_out(self.Aggregate(x))

    def classify(self, feats: torch.Tensor) -> torch.Tensor:
        """Snippet scores: ``[B, S, D]`` -> ``[B, S]`` in [0, 1] (fc1-ReLU-dropout-fc2-ReLU-dropout-fc3-sigmoid)."""
        h = self.drop_out(torch.relu(self.fc1(feats)))
        h = self.drop_out(torch.relu(self.fc2(h)))
        return torch.sigmoid(self.fc3(h)).squeeze(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, S, D]`` float32 (one row per crop) -> ``[B, S]`` scores in [0, 1]."""
        return self.classify(self.features(x))

    def before_step(self, bank: FeatureBank, step: int, gen: torch.Generator) -> None:
        self.batches_drawn = step

    def sample_batch(self, bank: FeatureBank, gen: torch.Generator) -> CropsBatch:
        """``batch_abnormal`` anomalous + ``batch_normal`` normal videos with all their crops, as the
        official main.py's two loaders give them (shuffled, without replacement within a pass, last
        partial batch dropped, restarted when exhausted; :func:`models.base.loader_draw`)."""
        step = self.batches_drawn
        self.batches_drawn += 1
        return all_crops_batch(bank, self.cfg.batch_abnormal, self.cfg.batch_normal, gen, step=step, seed=self.cfg.seed)

    def losses(self, batch: MILBatch) -> dict[str, torch.Tensor]:
        x, va, vn, c, labels = stack_crops(batch)  # x [(Va+Vn)*C, S, D], anomalous videos first
        s = x.shape[1]
        feats = self.features(x)
        scores = self.classify(feats).view(va + vn, c, s).mean(dim=1)  # crop-averaged [V, S]
        magnitudes = feats.norm(p=2, dim=-1).view(va + vn, c, s)  # [V, C, S]
        p = self.cfg.dropout if self.cfg.magnitude_dropout is None else self.cfg.magnitude_dropout
        keep = F.dropout(torch.ones_like(scores), p, training=self.training)  # 0 or 1/(1-p) per snippet
        idx = topk_indices(magnitudes.detach(), self.cfg.k, keep)
        g = None
        if self.cfg.loss_form == "code":  # official RTFM_loss: the norm of the mean top-k feature
            g = topk_feature_norm(feats.view(va + vn, c, s, -1), idx)
        return rtfm_losses(magnitudes, scores, labels, idx, self.cfg, g)

    def make_optimizer(self) -> torch.optim.Optimizer:
        # torch Adam's weight_decay adds wd * w to the gradient (coupled L2), as the official main.py's Adam does.
        return torch.optim.Adam(self.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    # -- official checkpoints ----------------------------------------------------------------------
    @staticmethod
    def feature_dim_of(state: Mapping[str, Any]) -> int:
        """The feature width D of a state dict laid out as this model's (``fc1.weight`` is ``[512, D]``)."""
        w = state.get("fc1.weight")
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            raise ValueError("no 2-D 'fc1.weight' tensor, so not an RTFM state dict")
        return int(w.shape[1])

    def load_official(self, state: Mapping[str, Any]) -> None:
        """Load a state dict saved by the official ``Model`` (or by this class) with strict keys and shapes.

        Raises:
            ValueError: one line naming the missing and unexpected keys (at most 3 of each) or the
                first shape that differs.
        """
        want = self.state_dict()
        missing = [k for k in want if k not in state]
        unexpected = [k for k in state if k not in want]
        if missing or unexpected:
            def few(keys: list[str]) -> str:
                return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")

            raise ValueError(
                "not laid out as the official RTFM Model: "
                + "; ".join(p for p in (missing and f"missing keys {few(missing)}", unexpected and f"unexpected keys {few(unexpected)}") if p)
            )
        for k, v in want.items():
            got = state[k]
            if not isinstance(got, torch.Tensor) or got.shape != v.shape:
                shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
                raise ValueError(f"{k}: shape {shape}, the model's is {tuple(v.shape)}")
        self.load_state_dict(state, strict=True)
