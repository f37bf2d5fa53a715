"""CLAWS Net: clustering assisted weakly supervised learning with normalcy suppression.

M. Z. Zaheer, A. Mahmood, M. Astrid, S.-I. Lee, "CLAWS: Clustering Assisted Weakly Supervised
Learning with Normalcy Suppression for Anomalous Event Detection", ECCV 2020 (arXiv:2011.12077).
No official code is public; every default below cites the paper's section (the training settings are
all in Sec. 4.3), and every choice where the paper is silent is marked *our choice* and is a config
setting.

**Random batch selector (RBS, Sec. 3.1).** Each video's clips are cut into batches ("windows" here, to
avoid confusion with a training step) of ``b = batch_clips = 64`` temporally consecutive clips; every
window inherits its video's label. Window ``w`` of a video of ``T`` clips starts at
``min(w * b, T - b)``, ``w = 0 .. ceil(T / b) - 1``: the remainder is *not* dropped or zero-padded but
covered by a last full window aligned with the video's end (it overlaps the previous window), so every
window has exactly ``b`` clips and the normalcy-suppression softmax always runs over ``b`` positions
(*our choice*). A video shorter than ``b`` is one window of all its ``T`` clips, the softmax masked to
those ``T`` (*our choice*). The windows are a pure function of the bank's clip counts
(:func:`window_layout`), recomputed whenever needed. Each training step takes ``batches_per_step``
windows (default 1: "in each training iteration, we arbitrarily select a batch across the whole
training dataset", Sec. 1 and 3.1), each with one random crop, in the order of a per-epoch random
permutation of all windows (an *epoch* = ``ceil(K / batches_per_step)`` steps, ``K`` windows in all,
so every window is visited once per epoch; the permutation is drawn from the sampling generator at the
start of each epoch and kept in the persistent buffer ``order``; *our choice*: sampling without
replacement within an epoch, as a shuffling data loader does). The draw ignores labels, as the paper's
does; ``batch_abnormal`` / ``batch_normal`` are unused.

**Backbone (BBN, Sec. 3.2) and normalcy suppression (NSM, Sec. 3.3), on one window ``x [b, D]``.**
FC module ``i`` = FC (512, then 32 units) + ReLU + dropout; NSM ``i`` = an FC of the same width, on the
same input as its FC module, followed by a softmax over the window's *temporal* axis (each of the ``z``
columns of the ``b x z`` matrix ``P`` sums to 1); the module's output is the elementwise product::

    h_1 = dropout(ReLU(FC_1(x)) * softmax_t(NSM_1(x)))        # [b, 512]
    h_2 = dropout(ReLU(FC_2(h_1)) * softmax_t(NSM_2(h_1)))    # [b, 32]
    y_hat = sigmoid(FC_out(h_2))                              # [b] in [0, 1]

(ReLU, dropout and the positive ``P`` commute, so the order of the product is immaterial.) Dropout
rate 0.6 is *our choice* (the paper gives none; 0.6 is that of Sultani et al. [46], whose 512-32
backbone this is). Inputs are mean-normalised (Sec. 4.3: "mean normalization is applied on the
extracted features"; read here as subtracting the training set's mean clip feature, computed in
:meth:`CLAWS.setup` and kept in the buffer ``feature_mean``). At test time (``forward`` /
``Detector.score``) a video of ``T`` clips is scored in exactly the training windows; a clip covered
by two windows (the overlap of the last one) takes its score from window ``t // b``, the first that
covers it. Not causal: the softmax looks at up to ``b - 1`` later clips.

**Losses (Sec. 3.4-3.5, Eq. 1-3),** per window, then averaged over the step's windows::

    L = lambda1 * L_pred + (1 - lambda1) * L_c + lambda2 * (L_s + L_ts)           (Eq. 3)

- ``L_pred = (1/b) sum_l (y_l - y_hat_l)^2``, the *mean square error* to the video label (Sec. 3.5;
  ``regression=bce`` gives binary cross-entropy instead);
- ``L_ts = sum_l (y_hat_{l+1} - y_hat_l)^2`` and ``L_s = sum_l y_hat_l`` on *every* window, normal
  ones included ("we compute this loss on each batch", Sec. 3.5; ``regularise=abnormal`` restricts both
  to anomalous windows as Sultani et al. do);
- ``L_c = min(alpha, d_i)`` for a normal video, ``1 / d_i`` for an anomalous one (Eq. 2), with
  ``d_i = ||c_1 - c_2||_2 / m_i`` (Eq. 1), ``c_1, c_2`` the centres of a 2-means clustering of the
  video's intermediate representations ``h_1`` (FC-1 output times NSM-1, Fig. 2), ``m_i`` its number of
  clips; lambda1 = 0.9, lambda2 = 8e-5, alpha = 1.0 (Sec. 4.3).

**Clustering (Sec. 3.4).** "At the beginning of each training epoch" every training video's ``h_1`` is
computed (eval mode: no dropout; per window as in training; the crops' representations averaged) and
split by k-means into two clusters (:func:`models.kmeans.kmeans`, scikit-learn's Lloyd with k-means++
seeding, each video's seed drawn from the sampling generator, iterations until no assignment changes or
``kmeans_iters``).
Centres, cluster sizes and each clip's assignment are persistent buffers (``centres``, ``counts``,
``assign``), so a resumed run continues exactly. "This ``d_i`` is then used with the corresponding
batches at each training iteration": a constant ``d_i`` would give no gradient, so (*our choice*,
``cluster_grad=batch``) each centre is written as its stored value plus the current window's members'
deviation from their own stop-gradient value, ``c_k + sum_{j in window, a_j = k} (h_j - sg(h_j)) / n_k``:
its *value* is exactly the epoch's ``c_k`` (so ``L_c`` is the paper's epoch-start ``d_i``), and its
gradient is that of the full-video centre with respect to the window's clips (weight ``1 / n_k`` each).
``cluster_grad=none`` keeps the literal constant (logged, no gradient). A video whose clustering has
an empty cluster or zero distance (e.g. a single clip) gets no ``L_c``.

**Optimiser (Sec. 4.3).** RMSProp (PyTorch defaults alpha 0.99, eps 1e-8, *our choice*: the paper's
implementation is in PyTorch and names no other values), lr 1e-4 for 100k iterations, multiplied by
0.1 after 80k (``lr_decay_at = 0.8`` of ``iterations``). The rate is set in :meth:`CLAWS.before_step`
from the step number, so a resumed run has the same schedule (and the optimiser's state_dict, which
the checkpoint carries, records it). PyTorch's default initialisation (paper silent).

**Short schedules.** With the paper's lr 1e-4 and one window per step the weights barely move in a few
hundred steps (an RMSProp step moves a weight by about lr, and the suppression softmax scales the
activations by about ``1 / b``): measured on the synthetic benchmark of ``tests/test_synthetic_benchmark.py``,
400 steps give frame AUC 0.69 with the defaults and 0.99 with :attr:`CLAWS.short_schedule`
(lr 3e-3, 4 windows a step), which CPU tests of a few hundred steps should apply.

**Cost.** A step is one small MLP pass over ``batches_per_step`` windows; the data path gathers
``b`` consecutive rows per window (no per-video Python loop). Each epoch's re-clustering is one forward
pass over every clip and crop of the training set plus a batched 2-means (videos grouped by length and
padded, at most ``cluster_chunk`` clips a group): on UCF-Crime-sized banks (703k clips, 1024-D, one
crop) about a minute on one CPU thread, once per 11.8k steps.
"""

from __future__ import annotations

import logging
import math
import weakref
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.config import choice, opt

from models.kmeans import kmeans
from models.registry import register_detector
from .base import ClipBank, Detector, FeatureBank, MILBatch, TrainConfig, length_mask

log = logging.getLogger(__name__)

#: buffers whose size depends on the training bank; resized when a state_dict is loaded
_BANK_BUFFERS = ("centres", "counts", "assign", "order")


@dataclass
class CLAWSConfig(TrainConfig):
    """CLAWS settings; every default cited by the section of the paper (Zaheer et al., ECCV 2020)."""

    iterations: int = opt(100000, "RMSProp steps: 100k (paper Sec. 4.3)")
    lr: float = opt(1e-4, "initial RMSProp learning rate (paper Sec. 4.3)")
    lr_decay_at: float = opt(
        0.8, "fraction of the iterations after which lr is multiplied by lr_decay: 80k of 100k (Sec. 4.3)"
    )
    lr_decay: float = opt(0.1, "learning-rate factor after lr_decay_at: 'a 10 times decrease' (Sec. 4.3)")
    weight_decay: float = opt(0.0, "RMSProp weight decay: none (the paper names none)")
    batch_abnormal: int = opt(1, "unused by CLAWS: windows are drawn regardless of label (Sec. 3.1)")
    batch_normal: int = opt(1, "unused by CLAWS: windows are drawn regardless of label (Sec. 3.1)")
    batch_clips: int = opt(64, "batch size b: temporally consecutive clips per window (Sec. 3.1, 4.3)")
    batches_per_step: int = opt(
        1, "windows per optimisation step: one, 'in each training iteration, we arbitrarily select a batch' (Sec. 3.1)"
    )
    hidden: tuple[int, ...] = opt((512, 32), "widths of FC modules 1 and 2 and of their NSMs (Sec. 4.3)")
    dropout: float = opt(0.6, "dropout in each FC module; the paper gives no rate: Sultani et al.'s 0.6 (our choice)")
    lambda1: float = opt(0.9, "lambda1 of Eq. 3: weight of L_pred, (1 - lambda1) that of L_c (Sec. 4.3)")
    lambda2: float = opt(8e-5, "lambda2 of Eq. 3: weight of L_s + L_ts (Sec. 4.3)")
    alpha: float = opt(1.0, "upper bound alpha of the normal videos' clustering loss, Eq. 2 (Sec. 4.3)")
    regression: str = choice(
        "mse", ("mse", "bce"), "L_pred: mean square error to the video label (Sec. 3.5), or binary cross-entropy"
    )
    regularise: str = choice(
        "all",
        ("all", "abnormal"),
        "windows that get L_s and L_ts: all ('on each batch', Sec. 3.5) or anomalous only (Sultani et al.)",
    )
    cluster_grad: str = choice(
        "batch",
        ("batch", "none"),
        "gradient of L_c: 'batch' = through the current window's clips' share of the epoch's centres (our "
        "choice, see the module docstring); 'none' = the epoch-start d_i as a constant (no gradient)",
    )
    kmeans_iters: int = opt(20, "maximum Lloyd iterations of the per-epoch 2-means (our choice; the paper is silent)")
    feature_norm: str = choice(
        "mean",
        ("mean", "none"),
        "'mean': subtract the training set's mean clip feature ('mean normalization', Sec. 4.3); 'none'",
    )
    cluster_chunk: int = opt(
        32768,
        "clips (times crops) per forward chunk of the per-epoch representations, and padded clips per "
        "2-means group (memory only: results equal up to floating-point rounding)",
        key=False,
    )

    def validate(self) -> None:
        super().validate()
        if self.batch_clips < 1 or self.batches_per_step < 1:
            raise ValueError("batch_clips and batches_per_step must be >= 1")
        if not self.hidden or min(self.hidden) < 1:
            raise ValueError("hidden needs at least one positive width")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("dropout must be in [0, 1)")
        if not 0.0 <= self.lambda1 <= 1.0 or self.lambda2 < 0:
            raise ValueError("lambda1 must be in [0, 1] and lambda2 >= 0")
        if self.alpha <= 0:
            raise ValueError("alpha must be > 0")
        if not 0.0 <= self.lr_decay_at <= 1.0 or not 0.0 < self.lr_decay <= 1.0:
            raise ValueError("lr_decay_at must be in [0, 1] and lr_decay in (0, 1]")
        if self.kmeans_iters < 1 or self.cluster_chunk < 1:
            raise ValueError("kmeans_iters and cluster_chunk must be >= 1")


@dataclass
class CLAWSBatch(MILBatch):
    """A :class:`MILBatch` of windows: ``abnormal`` ``[Ka, L, D]`` / ``normal`` ``[Kn, L, D]`` float32,
    zero-padded past ``*_lengths`` (``L <= b``); either side may be empty (``K* = 0``).

    ``*_video`` ``[K*]`` int64: each window's video index in the bank; ``*_row`` ``[K*]`` int64: the bank row
    of its first clip (``offsets[video] + start``), to look up the clips' cluster assignments.
    """

    abnormal_video: torch.Tensor | None = None
    normal_video: torch.Tensor | None = None
    abnormal_row: torch.Tensor | None = None
    normal_row: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> "CLAWSBatch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return CLAWSBatch(
            *(move(getattr(self, f)) for f in ("abnormal", "normal", "abnormal_lengths", "normal_lengths")),
            *(move(getattr(self, f)) for f in ("abnormal_video", "normal_video", "abnormal_row", "normal_row")),
        )


# ---------------------------------------------------------------------------------------------
# Windows (the paper's "batches") and bank access
# ---------------------------------------------------------------------------------------------


def window_layout(lengths: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every video's windows of ``b`` consecutive clips (module docstring, 'Random batch selector').

    Args:
        lengths: ``[N]`` int64 clips per video.
    Returns:
        ``video`` ``[K]`` (each window's video), ``start`` ``[K]`` (its first clip within the video),
        ``length`` ``[K]`` (``min(T, b)``), all int64, windows video after video; and ``first``
        ``[N + 1]`` int64: video n's windows are ``first[n]:first[n+1]``.
    """
    lengths = lengths.to(torch.int64)
    n_win = (lengths + b - 1) // b
    first = torch.cat([n_win.new_zeros(1), n_win.cumsum(0)])
    video = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), n_win)
    w = torch.arange(video.numel(), device=lengths.device) - first[video]
    t = lengths[video]
    start = torch.minimum(w * b, (t - b).clamp(min=0))
    return video, start, t.clamp(max=b), first


def clip_windows(
    lengths: torch.Tensor, first: torch.Tensor, start: torch.Tensor, t_max: int, b: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """For every clip ``t < t_max`` of every video: the window that scores it and its position there.

    Clip ``t`` is taken from window ``t // b`` of its video (the first window covering it).
    Args:
        lengths: ``[N]``; first: ``[N + 1]`` and start: ``[K]`` from :func:`window_layout`; ``t_max >= 1``.
    Returns:
        ``win`` ``[N, t_max]`` and ``pos`` ``[N, t_max]`` int64; past a video's end they are clamped to
        valid indices (of windows of ``min(b, t_max)`` positions), to be masked by the caller.
    """
    t = torch.arange(t_max, device=lengths.device)
    win = first[:-1, None] + t[None, :] // b
    win = torch.minimum(win, first[1:, None] - 1).clamp(min=0)
    pos = (t[None, :] - start[win]).clamp(min=0, max=min(b, t_max) - 1)
    return win, pos


def bank_layout(bank: FeatureBank | ClipBank) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``offsets`` ``[N + 1]`` and ``lengths`` ``[N]`` (int64, CPU) of the bank's clip rows, and its crop count.

    A :class:`FeatureBank` ``[N, C, S, D]`` is read as N videos of S clips (row ``n * S + s``).
    """
    if isinstance(bank, ClipBank):
        offsets = bank.offsets.to("cpu", torch.int64)
        return offsets, offsets[1:] - offsets[:-1], int(bank.features.shape[1])
    n, c, s = (int(v) for v in bank.features.shape[:3])
    return torch.arange(n + 1, dtype=torch.int64) * s, torch.full((n,), s, dtype=torch.int64), c


def gather_windows(
    bank: FeatureBank | ClipBank, video: torch.Tensor, start: torch.Tensor, length: torch.Tensor, size: int,
    crop: torch.Tensor | None, layout: tuple[torch.Tensor, torch.Tensor, int] | None = None,
) -> torch.Tensor:
    """Clip features of windows, zero past each window's length.

    Args:
        video, start, length: ``[K]`` int64 (CPU) windows; size: ``L``, the padded length.
        crop: ``[K]`` int64 crop of each window, or None for all crops.
        layout: the bank's :func:`bank_layout`, if already at hand.
    Returns:
        ``[K, L, D]`` (one crop) or ``[K, L, C, D]`` (all crops) float32, on the bank's device.
    """
    offsets, lengths, _ = layout or bank_layout(bank)
    pos = torch.arange(size)
    t = torch.minimum(start[:, None] + pos, lengths[video][:, None] - 1)  # [K, L] within-video clip
    valid = (pos[None, :] < length[:, None]).to(bank.features.device)
    dev = bank.features.device
    if isinstance(bank, ClipBank):
        rows = (offsets[video][:, None] + t).to(dev)
        x = bank.features[rows] if crop is None else bank.features[rows, crop[:, None].to(dev)]
    else:
        v = video[:, None].to(dev)
        if crop is None:
            x = bank.features[v, :, t.to(dev)]  # [K, L, C, D]
        else:
            x = bank.features[v, crop[:, None].to(dev), t.to(dev)]
    x = torch.as_tensor(x, dtype=torch.float32)
    shape = valid.shape + (1,) * (x.dim() - 2)
    return x * valid.view(shape)


# ---------------------------------------------------------------------------------------------
# Loss terms, as functions of plain tensors so that each can be checked by hand
# ---------------------------------------------------------------------------------------------


def regression_loss(scores: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, form: str = "mse") -> torch.Tensor:
    """``L_pred`` per window (Sec. 3.5): ``(1/b) sum_l (y - y_hat_l)^2`` over the window's valid clips.

    Args:
        scores: ``[K, L]`` in [0, 1]; mask: ``[K, L]`` bool (valid clips); labels: ``[K]`` 0/1 (video label).
        form: ``"mse"`` (the paper) or ``"bce"`` (mean binary cross-entropy).
    Returns:
        ``[K]``.
    """
    y = labels.to(scores.dtype)[:, None].expand_as(scores)
    if form == "mse":
        per = (y - scores).pow(2)
    elif form == "bce":
        per = F.binary_cross_entropy(scores, y, reduction="none")
    else:
        raise ValueError(f"unknown regression form {form!r}")
    m = mask.to(scores.dtype)
    return (per * m).sum(1) / m.sum(1).clamp(min=1)


def smoothness_loss(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``L_ts = sum_l (y_hat_{l+1} - y_hat_l)^2`` per window over consecutive valid clips (Sec. 3.5).

    ``scores``: ``[K, L]``; ``mask``: ``[K, L]`` bool -> ``[K]``.
    """
    pair = (mask[:, 1:] & mask[:, :-1]).to(scores.dtype)
    return ((scores[:, 1:] - scores[:, :-1]).pow(2) * pair).sum(1)


def sparsity_loss(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``L_s = sum_l y_hat_l`` per window over its valid clips (Sec. 3.5). ``[K, L]`` -> ``[K]``."""
    return (scores * mask.to(scores.dtype)).sum(1)


def cluster_distance(centres: torch.Tensor, clips: torch.Tensor) -> torch.Tensor:
    """``d_i = ||c_1 - c_2||_2 / m_i`` (Eq. 1). ``centres``: ``[K, 2, H]``; ``clips``: ``[K]`` m_i -> ``[K]``."""
    return (centres[:, 0] - centres[:, 1]).norm(p=2, dim=-1) / clips.to(centres.dtype)


def clustering_loss(d: torch.Tensor, labels: torch.Tensor, alpha: float) -> torch.Tensor:
    """``L_c`` (Eq. 2): ``min(alpha, d)`` for normal (label 0), ``1 / d`` for anomalous (label 1).

    ``d``: ``[K]`` distances (> 0); ``labels``: ``[K]`` 0/1 -> ``[K]``.
    """
    return torch.where(labels.bool(), 1.0 / d, d.clamp(max=alpha))


def straight_through_centres(
    stored: torch.Tensor, counts: torch.Tensor, h: torch.Tensor, assign: torch.Tensor
) -> torch.Tensor:
    """The epoch's centres with a gradient path through the current window's members.

    ``c_k + sum_{l: assign_l = k} (h_l - sg(h_l)) / n_k``: equal in value to ``stored``; its gradient
    with respect to ``h_l`` is ``1 / n_k`` for the cluster ``k`` of clip l (module docstring).
    Args:
        stored: ``[K, 2, H]`` centres of each window's video; counts: ``[K, 2]`` its cluster sizes n_k.
        h: ``[K, L, H]`` the window's current representations; assign: ``[K, L]`` int64 cluster of each
            clip, -1 where padded.
    Returns:
        ``[K, 2, H]``.
    """
    onehot = (assign[..., None] == torch.arange(2, device=assign.device)).to(h.dtype)  # [K, L, 2]
    delta = torch.einsum("klc,klh->kch", onehot, h - h.detach())
    return stored + delta / counts.clamp(min=1).to(h.dtype)[..., None]


def claws_objective(
    pred: torch.Tensor, cluster: torch.Tensor, smooth: torch.Tensor, sparse: torch.Tensor, labels: torch.Tensor,
    lambda1: float, lambda2: float, regularise: str = "all",
) -> dict[str, torch.Tensor]:
    """Eq. 3 averaged over windows: ``mean_k [lambda1 L_pred + (1-lambda1) L_c + lambda2 (L_s + L_ts)]``.

    Args:
        pred, cluster, smooth, sparse: ``[K]`` per-window terms; labels: ``[K]`` 0/1.
        regularise: ``"all"`` windows get ``L_s + L_ts``, or ``"abnormal"`` ones only.
    Returns:
        The weighted means ``regression``, ``cluster``, ``smooth``, ``sparse`` and their sum ``total``.
    """
    w = torch.ones_like(pred) if regularise == "all" else labels.to(pred.dtype)
    terms = {
        "regression": lambda1 * pred.mean(),
        "cluster": (1.0 - lambda1) * cluster.mean(),
        "smooth": lambda2 * (smooth * w).mean(),
        "sparse": lambda2 * (sparse * w).mean(),
    }
    terms["total"] = terms["regression"] + terms["cluster"] + terms["smooth"] + terms["sparse"]
    return terms


# ---------------------------------------------------------------------------------------------
# Network
# ---------------------------------------------------------------------------------------------


@register_detector("claws")
class CLAWS(Detector):
    """Backbone with normalcy suppression, random windows and the clustering distance loss (module docstring)."""

    Config = CLAWSConfig
    input_level = "clips"
    causal = False
    #: settings for CPU schedules of a few hundred steps (the generic tests): the paper's lr 1e-4 on one
    #: window per step needs its 100k iterations (a step moves an RMSProp weight by about lr, and the
    #: normalcy-suppression softmax scales activations by ~1/b), so short runs use a larger rate and
    #: four windows per step (measured: 300 steps overfit 4 videos, 400 steps give frame AUC 0.99 on the
    #: synthetic benchmark; lr 1e-2 is unstable)
    short_schedule: ClassVar[dict[str, object]] = {"lr": 3e-3, "batches_per_step": 4}

    def __init__(self, feature_dim: int, cfg: CLAWSConfig | None = None) -> None:
        cfg = cfg or CLAWSConfig()
        super().__init__(feature_dim, cfg)
        sizes = [feature_dim, *cfg.hidden]
        self.fcs = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))
        self.nsms = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))
        self.out = nn.Linear(sizes[-1], 1)
        self.drop = nn.Dropout(cfg.dropout)
        self.register_buffer("feature_mean", torch.zeros(feature_dim))
        # per-epoch clustering state, sized to the training bank by before_step (all persistent)
        self.register_buffer("centres", torch.zeros(0, 2, cfg.hidden[0]))  # [N, 2, H1]
        self.register_buffer("counts", torch.zeros(0, 2))  # [N, 2] cluster sizes
        self.register_buffer("assign", torch.zeros(0, dtype=torch.uint8))  # [sum T] cluster of each clip
        self.register_buffer("order", torch.zeros(0, dtype=torch.int64))  # [K] this epoch's window order
        self._step: int | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._windows_cache: tuple | None = None

    # -- state ------------------------------------------------------------------------------

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        # the bank-sized buffers start empty: take the saved shapes before the copy
        for name in _BANK_BUFFERS:
            saved = state_dict.get(prefix + name)
            if saved is not None and saved.shape != self._buffers[name].shape:
                self._buffers[name] = torch.empty(saved.shape, dtype=saved.dtype, device=self._buffers[name].device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- scoring ----------------------------------------------------------------------------

    def windows(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores of windows: ``x`` ``[K, L, D]`` float32, ``mask`` ``[K, L]`` bool (valid clips; each row
        has at least one) -> ``scores`` ``[K, L]`` in [0, 1] (0 at padding) and ``h_1`` ``[K, L, H1]``,
        the representation clustered by Sec. 3.4 (FC-1 output times NSM-1)."""
        m = mask[..., None]
        h = x - self.feature_mean
        rep = h
        for i, (fc, nsm) in enumerate(zip(self.fcs, self.nsms)):
            p = nsm(h).masked_fill(~m, float("-inf")).softmax(dim=1)  # over the window's time axis
            h = self.drop(torch.relu(fc(h)) * p)
            if i == 0:
                rep = h
        scores = torch.sigmoid(self.out(h)).squeeze(-1) * mask
        return scores, rep

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: ``[B, T, D]`` float32 (optionally zero-padded past ``lengths`` ``[B]``) -> ``[B, T]`` in [0, 1].

        Each sequence is scored in its training windows of ``b`` clips (module docstring); 0 past its length.
        """
        bsz, t_max = x.shape[:2]
        if lengths is None:
            lengths = torch.full((bsz,), t_max, dtype=torch.int64, device=x.device)
        b = self.cfg.batch_clips
        video, start, length, first = window_layout(lengths, b)
        if video.numel() == 0:
            return x.new_zeros(bsz, t_max)
        size = min(b, t_max)
        pos = torch.arange(size, device=x.device)
        rows = torch.minimum(start[:, None] + pos, lengths[video][:, None] - 1)
        scores, _ = self.windows(x[video[:, None], rows], pos < length[:, None])
        win, p = clip_windows(lengths, first, start, t_max, b)
        valid = torch.arange(t_max, device=x.device)[None, :] < lengths[:, None]
        return scores[win, p] * valid

    # -- training ---------------------------------------------------------------------------

    def make_optimizer(self) -> torch.optim.Optimizer:
        # PyTorch RMSprop defaults (alpha 0.99, eps 1e-8): the paper's implementation is PyTorch (Sec. 4.3)
        self._optimizer = torch.optim.RMSprop(self.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        return self._optimizer

    def lr_at(self, step: int) -> float:
        """Learning rate of step ``step`` (from 0): ``lr``, times ``lr_decay`` from ``lr_decay_at * iterations`` on."""
        decay_from = round(self.cfg.lr_decay_at * self.cfg.iterations)
        return self.cfg.lr * (self.cfg.lr_decay if step >= decay_from else 1.0)

    def bank_windows(self, bank: FeatureBank | ClipBank) -> tuple[tuple[torch.Tensor, torch.Tensor, int], tuple]:
        """The bank's :func:`bank_layout` and :func:`window_layout` (a pure function of the bank's clip
        counts, cached for the last bank seen, by a weak reference, so that a step does not recompute it)."""
        key = (tuple(bank.features.shape), self.cfg.batch_clips)
        cache = self._windows_cache
        if cache is None or cache[0]() is not bank or cache[1] != key:
            layout = bank_layout(bank)
            cache = self._windows_cache = (weakref.ref(bank), key, layout, window_layout(layout[1], key[1]))
        return cache[2], cache[3]

    def steps_per_epoch(self, bank: FeatureBank | ClipBank) -> int:
        """Steps that visit every window once: ``ceil(K / batches_per_step)``."""
        k = int(self.bank_windows(bank)[1][0].numel())
        return max(1, math.ceil(k / self.cfg.batches_per_step))

    @torch.no_grad()
    def setup(self, bank: FeatureBank | ClipBank, gen: torch.Generator) -> None:
        """Mean normalisation (Sec. 4.3): ``feature_mean`` = the mean training clip feature over all crops."""
        if self.cfg.feature_norm != "mean":
            return
        feats = bank.features
        rows = feats.reshape(-1, feats.shape[-1]) if isinstance(bank, FeatureBank) else feats.flatten(0, 1)
        total = torch.zeros(feats.shape[-1], dtype=torch.float64)
        step = max(1, self.cfg.cluster_chunk)
        for i in range(0, rows.shape[0], step):
            total += torch.as_tensor(rows[i : i + step]).double().sum(0).cpu()
        self.feature_mean.copy_((total / max(1, rows.shape[0])).float())

    def before_step(self, bank: FeatureBank | ClipBank, step: int, gen: torch.Generator) -> None:
        """Set this step's learning rate; at each epoch's first step, a new window order and the 2-means."""
        self._step = step
        if self._optimizer is not None:
            for group in self._optimizer.param_groups:
                group["lr"] = self.lr_at(step)
        if step % self.steps_per_epoch(bank) == 0:
            k = int(self.bank_windows(bank)[1][0].numel())
            self.order = torch.randperm(k, generator=gen).to(self.feature_mean.device)
            self.recluster(bank, gen)

    @torch.no_grad()
    def representations(self, bank: FeatureBank | ClipBank, vids: torch.Tensor) -> torch.Tensor:
        """``h_1`` of every clip of the videos ``vids`` ``[V]`` (int64, CPU): eval mode, each clip from the
        window that scores it, crops averaged. Returns ``[V, T_max, H1]`` float32 on the model's device,
        zero past each video's length."""
        _, lengths_all, crops = bank_layout(bank)
        lengths = lengths_all[vids]
        t_max, b = int(lengths.max()), self.cfg.batch_clips
        video, start, length, first = window_layout(lengths, b)
        size = min(b, t_max)
        dev = self.feature_mean.device
        per = max(1, self.cfg.cluster_chunk // (size * crops))  # windows per forward chunk
        reps = []
        for w0 in range(0, video.numel(), per):
            sl = slice(w0, w0 + per)
            x = gather_windows(bank, vids[video[sl]], start[sl], length[sl], size, None).to(dev)  # [k, L, C, D]
            k = x.shape[0]
            x = x.permute(0, 2, 1, 3).reshape(k * crops, size, -1)
            mask = (torch.arange(size, device=dev) < length[sl].to(dev)[:, None]).repeat_interleave(crops, 0)
            _, h = self.windows(x, mask)
            reps.append(h.view(k, crops, size, -1).mean(1))
        rep = torch.cat(reps)  # [K, L, H1]
        win, pos = clip_windows(lengths, first, start, t_max, b)
        valid = (torch.arange(t_max)[None, :] < lengths[:, None]).to(dev)
        return rep[win.to(dev), pos.to(dev)] * valid[..., None]

    @torch.no_grad()
    def recluster(self, bank: FeatureBank | ClipBank, gen: torch.Generator) -> None:
        """Sec. 3.4: 2-means of every training video's ``h_1`` into the buffers ``centres``, ``counts``, ``assign``.

        Videos are processed in groups of similar length (sorted by length, at most ``cluster_chunk``
        padded clips a group), each group as one padded batch; the result does not depend on the grouping.
        """
        was_training = self.training
        self.eval()
        offsets, lengths, _ = bank_layout(bank)
        n = lengths.numel()
        dev = self.feature_mean.device
        seeds = torch.randint(2**31 - 1, (n,), generator=gen)  # every video's k-means seed, by index
        assign = torch.zeros(int(offsets[-1]), dtype=torch.uint8, device=dev)
        centres = torch.zeros(n, 2, self.cfg.hidden[0], device=dev)
        counts = torch.zeros(n, 2, device=dev)
        by_length = torch.argsort(lengths, stable=True).tolist()
        sizes = lengths.tolist()
        i = 0
        while i < n:
            j = i + 1  # sorted ascending, so the group's padded size is (j - i) * sizes[by_length[j - 1]]
            while j < n and (j + 1 - i) * sizes[by_length[j]] <= self.cfg.cluster_chunk:
                j += 1
            vids = torch.tensor(by_length[i:j], dtype=torch.int64)
            points = self.representations(bank, vids)
            a, c, cnt = kmeans(points, 2, lengths=lengths[vids], seeds=seeds[vids], iters=self.cfg.kmeans_iters)
            valid = torch.arange(points.shape[1])[None, :] < lengths[vids][:, None]
            rows = (offsets[vids][:, None] + torch.arange(points.shape[1])[None, :])[valid]
            assign[rows.to(dev)] = a[valid.to(dev)].to(torch.uint8)
            centres[vids.to(dev)], counts[vids.to(dev)] = c, cnt
            i = j
        self.assign, self.centres, self.counts = assign, centres, counts
        self.train(was_training)
        log.debug("claws: 2-means of %d videos", n)

    def sample_batch(self, bank: FeatureBank | ClipBank, gen: torch.Generator) -> CLAWSBatch:
        """``batches_per_step`` windows, the next ones of this epoch's ``order`` (uniformly random ones when
        no epoch was started by :meth:`before_step`), one random crop each, split by their video's label."""
        layout, (video, start, length, _) = self.bank_windows(bank)
        offsets, crops = layout[0], layout[2]
        k, n = video.numel(), self.cfg.batches_per_step
        if self._step is not None and self.order.numel() == k:
            pos = (self._step % self.steps_per_epoch(bank)) * n
            pick = self.order.cpu()[(pos + torch.arange(n)) % k]
        else:
            pick = torch.randint(k, (n,), generator=gen)
        crop = torch.randint(crops, (n,), generator=gen)
        video, start, length = video[pick], start[pick], length[pick]
        size = int(length.max())
        x = gather_windows(bank, video, start, length, size, crop, layout)
        abn = bank.labels.cpu()[video] == 1
        dev = x.device
        side = lambda m: (x[m.to(dev)], length[m], video[m], offsets[video[m]] + start[m])  # noqa: E731
        (xa, la, va, ra), (xn, ln, vn, rn) = side(abn), side(~abn)
        return CLAWSBatch(xa, xn, la, ln, va, vn, ra, rn)

    def _cluster_terms(self, h: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, video, row) -> torch.Tensor:
        """``L_c`` of each window ``[K]`` (0 where the video has no usable clustering)."""
        k, size = mask.shape
        if video is None or self.centres.shape[0] == 0 or int(video.max()) >= self.centres.shape[0]:
            return h.new_zeros(k)
        idx = (row[:, None] + torch.arange(size, device=row.device)).clamp(max=self.assign.numel() - 1)
        assign = self.assign[idx].long().masked_fill(~mask, -1)
        counts = self.counts[video]
        centres = self.centres[video]
        if self.cfg.cluster_grad == "batch":
            centres = straight_through_centres(centres, counts, h, assign)
        d = cluster_distance(centres, counts.sum(1))
        ok = (counts > 0).all(1) & (d.detach() > 0)
        return clustering_loss(torch.where(ok, d, torch.ones_like(d)), labels, self.cfg.alpha) * ok

    def losses(self, batch: MILBatch) -> dict[str, torch.Tensor]:
        """Eq. 3 over the batch's windows (see :func:`claws_objective`)."""
        x = torch.cat([batch.abnormal, batch.normal])
        ka, kn = batch.abnormal.shape[0], batch.normal.shape[0]
        if batch.abnormal_lengths is not None and batch.normal_lengths is not None:
            lengths = torch.cat([batch.abnormal_lengths, batch.normal_lengths]).to(x.device)
        else:
            lengths = torch.full((ka + kn,), x.shape[1], dtype=torch.int64, device=x.device)
        labels = torch.cat([torch.ones(ka), torch.zeros(kn)]).to(x.device)
        mask = length_mask(lengths, x.shape[1])
        scores, h = self.windows(x, mask)
        video = row = None
        if getattr(batch, "abnormal_video", None) is not None and getattr(batch, "normal_video", None) is not None:
            video = torch.cat([batch.abnormal_video, batch.normal_video]).to(self.centres.device)
            row = torch.cat([batch.abnormal_row, batch.normal_row]).to(self.centres.device)
        return claws_objective(
            regression_loss(scores, mask, labels, self.cfg.regression),
            self._cluster_terms(h, mask, labels, video, row),
            smoothness_loss(scores, mask),
            sparsity_loss(scores, mask),
            labels,
            self.cfg.lambda1,
            self.cfg.lambda2,
            self.cfg.regularise,
        )
