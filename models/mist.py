"""MIST: Multiple Instance Self-Training (stage I generator G; stage II settings and losses).

J.-C. Feng, F.-T. Hong, W.-S. Zheng, "MIST: Multiple Instance Self-Training Framework for Video
Anomaly Detection", CVPR 2021 (``papers/mist-poster.txt``: Algorithm 1, Stage I / Stage II panels);
protocol facts from the authors' code in ``../shared/PROTOCOLS.md`` (MIST lines).

The whole method is a chain of runner stages (``stages/mist.py``); ``--method mist`` runs it:

1. ``extract``: clip features of the pretrained encoder E (the ordinary extract stage).
2. ``mist_generator``: stage I, the multiple instance pseudo-label generator G (this detector with
   ``use_head`` off) trained by the generic train loop on the clip features: each step draws
   anomalous and normal videos, cuts each into L sub-bags of T clips (:func:`sub_bag_indices`,
   sparse continuous sampling; ``uniform`` as in the poster's Table 4), scores every clip with G
   (FC D-512-32-1, the Sultani generator) and minimises L_MIL (:func:`mist_mil_loss`).
3. ``mist_pseudo``: G scores every clip of the anomalous training videos; moving-average smoothing
   and per-video min-max normalisation give clip pseudo-labels (:func:`refine_pseudo_labels`);
   normal videos keep 0.
4. ``train``: stage II, E_SGA (``extractors/sga.py``) fine-tuned on raw clips with L = L1 + L2,
   class-weighted cross-entropy on the main and guided heads (:func:`class_weighted_ce`).
5. ``mist_extract``: features re-extracted with the fine-tuned encoder (its own cache key), with
   each clip's attention map; ``mist_explain`` writes attention overlays for ``train.explain``.
6. ``evaluate``: this detector with ``use_head`` on, i.e. E_SGA's main head on the re-extracted
   features (which equals E_SGA's score of the clip).

Any other detector can train on the fine-tuned features with ``extract.encoder=<encoder.pt>`` (the
poster's Table 3, "encoder-agnostic").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import choice, opt

from . import register_detector
from .base import ClipBank, Detector, MILBatch, TrainConfig, _draw, mlp_head, xavier_init_

#: fields of :class:`MistConfig` that only stage II (and later) reads; stage I's cache key leaves them out
STAGE2_PREFIX = "ft_"


@dataclass
class MistConfig(TrainConfig):
    """MIST settings. Stage I (generator) fields first, then stage II (``ft_*``) ones."""

    iterations: int = opt(
        3000,
        "stage I generator steps (not given by the poster nor PROTOCOLS.md; a few thousand, as Sultani's "
        "generator, which MIST's G follows)",
    )
    lr: float = opt(0.01, "stage I Adagrad learning rate (PROTOCOLS.md, MIST stage I)")
    weight_decay: float = opt(0.0, "stage I Adagrad weight decay (none given)")
    batch_abnormal: int = opt(20, "anomalous videos per stage I batch (PROTOCOLS.md: batch 40 = 20 + 20)")
    batch_normal: int = opt(20, "normal videos per stage I batch (PROTOCOLS.md: batch 40 = 20 + 20)")
    hidden: tuple[int, ...] = opt((512, 32), "G's hidden FC sizes (Sultani's generator, Sec. 4.2; MIST's G follows it)")
    dropout: float = opt(0.6, "dropout in G (Sultani Sec. 4.2)")
    feature_norm: str = choice(
        "l2",
        ("l2", "none"),
        "G's input: each clip feature L2-normalised (as the Sultani features G was designed for; raw I3D "
        "features, of norm 20-60, saturate G's sigmoid within a few Adagrad steps at lr 0.01, and a "
        "saturated G gives no pseudo-labels), or raw. Not stated by MIST; a choice",
    )
    sub_bags: int = opt(32, "L, sub-bags per video (PROTOCOLS.md: 32 x 7 sub-bags)")
    sub_bag_len: int = opt(7, "T, clips per sub-bag (PROTOCOLS.md: 32 x 7 sub-bags)")
    topk: int = opt(
        7,
        "sub-bag scores averaged in place of max_l S_l in L_MIL (PROTOCOLS.md 'top-7', the authors' code); "
        "1 = the poster's max",
    )
    sampling: str = choice(
        "sparse_continuous",
        ("sparse_continuous", "uniform"),
        "sub-bag sampling: T continuous clips at a random place of each of L equal spans (poster, 'sparse "
        "continuous sampling'), or T clips evenly spread over each span (Table 4's 'uniform')",
    )
    margin: float = opt(1.0, "epsilon of L_MIL (poster Eq. 7; value from Sultani Eq. 3, MIST gives none)")
    lambda_sparse: float = opt(8e-5, "lambda of L_MIL's sparsity term (poster Eq. 7; value from Sultani Sec. 4.2)")
    smooth_window: int = opt(5, "moving-average (box) window of the pseudo-labels (PROTOCOLS.md)")
    smooth_passes: int = opt(2, "times the box filter is applied (PROTOCOLS.md: twice)")
    ft_epochs: int = opt(301, "stage II epochs (PROTOCOLS.md)")
    ft_lr: float = opt(1e-4, "stage II Adam learning rate (PROTOCOLS.md: lr 1e-4; the optimiser is not stated)")
    ft_clips_per_video: int = opt(3, "clips sampled per training video per epoch (PROTOCOLS.md)")
    ft_batch_videos: int = opt(10, "videos per stage II step (x ft_clips_per_video clips; not stated, a choice)")
    ft_expand_k: int = opt(8, "expand_k of the self-guided attention (PROTOCOLS.md)")
    ft_freeze_epochs: int = opt(30, "epochs with the backbone frozen (PROTOCOLS.md: 30 UCF-Crime, 60 ShanghaiTech)")
    ft_dropout: float = opt(0.5, "dropout before E_SGA's main head (not stated; a choice)")
    ft_class_weights: str = choice(
        "frequency",
        ("frequency", "none"),
        "w0, w1 of the class-weighted cross-entropy (poster L_w): inverse class frequencies of the training "
        "clip labels (each class weighs half), or 1",
    )
    ft_checkpoint_every: int = opt(20, "stage II steps between resumable checkpoints", key=False)
    explain: str = opt(
        "", "comma-separated video ids whose attention maps are written as PNG overlays (mist_explain stage)"
    )

    def validate(self) -> None:
        super().validate()
        if self.sub_bags < 1 or self.sub_bag_len < 1:
            raise ValueError("sub_bags and sub_bag_len must be >= 1")
        if not 1 <= self.topk <= self.sub_bags:
            raise ValueError("topk must be in [1, sub_bags]")
        if self.smooth_window < 1 or self.smooth_passes < 0:
            raise ValueError("smooth_window must be >= 1 and smooth_passes >= 0")
        if self.ft_epochs < 1 or self.ft_clips_per_video < 1 or self.ft_batch_videos < 1:
            raise ValueError("ft_epochs, ft_clips_per_video and ft_batch_videos must be >= 1")
        if self.ft_lr <= 0 or self.ft_expand_k < 1 or self.ft_freeze_epochs < 0:
            raise ValueError("ft_lr must be > 0, ft_expand_k >= 1, ft_freeze_epochs >= 0")

    def explain_ids(self) -> list[str]:
        return [v.strip() for v in self.explain.split(",") if v.strip()]


def sub_bag_indices(n_clips: int, sub_bags: int, length: int, mode: str, gen: torch.Generator | None) -> torch.Tensor:
    """Clip indices of one video's ``L`` sub-bags of ``T`` clips.

    The video's ``n_clips`` clips are split into ``L`` equal spans (``[l n / L, (l + 1) n / L)``).
    ``sparse_continuous``: sub-bag l is T consecutive clips starting at a random place of span l such
    that they stay inside it (a span shorter than T starts at its beginning and runs past it, clipped
    to the video's last clip). ``uniform``: T clips evenly spaced over span l. With ``gen`` None the
    random start is the span's middle placement (deterministic, for scoring).

    Returns:
        ``[L, T]`` int64 in ``[0, n_clips)``.
    """
    if n_clips < 1:
        raise ValueError("a video needs at least one clip")
    edges = torch.linspace(0, n_clips, sub_bags + 1, dtype=torch.float64)
    lo, hi = edges[:-1], edges[1:]
    steps = torch.arange(length, dtype=torch.float64)
    if mode == "uniform":
        idx = lo[:, None] + (hi - lo)[:, None] * (steps[None, :] + 0.5) / length
        return idx.floor().long().clamp_(0, n_clips - 1)
    if mode != "sparse_continuous":
        raise ValueError(f"unknown sub-bag sampling {mode!r}")
    start = lo.floor()
    room = (hi.floor() - start - length).clamp(min=0)  # free places inside the span
    u = torch.rand(sub_bags, generator=gen, dtype=torch.float64) if gen is not None else torch.full((sub_bags,), 0.5, dtype=torch.float64)
    start = start + (u * (room + 1)).floor().clamp(max=room)
    return (start[:, None] + steps[None, :]).long().clamp_(0, n_clips - 1)


def mist_mil_loss(abnormal: torch.Tensor, normal: torch.Tensor, margin: float, lam: float, topk: int = 1) -> dict[str, torch.Tensor]:
    """L_MIL (poster Eq. 7): ``[eps - max_l S^a_l + max_l S^n_l]_+ + (lambda / L) sum_l S^a_l``.

    ``max`` becomes the mean of the ``topk`` largest sub-bag scores (the authors' top-k; ``topk=1``
    is the equation). Args: ``abnormal``, ``normal``: ``[B, L]`` sub-bag scores in [0, 1]; row i of
    each forms a pair. Returns ``ranking``, ``sparsity`` and ``total``, each a scalar averaged over
    the B pairs.
    """
    top_a = abnormal.topk(topk, dim=1).values.mean(1)
    top_n = normal.topk(topk, dim=1).values.mean(1)
    ranking = F.relu(margin - top_a + top_n).mean()
    sparsity = lam * abnormal.mean(1).mean()
    return {"ranking": ranking, "sparsity": sparsity, "total": ranking + sparsity}


def box_smooth(x: np.ndarray, window: int, passes: int) -> np.ndarray:
    """Moving average of ``x`` ``[n]`` over ``window`` clips, ``passes`` times; the ends average the
    clips inside the window only (no zero padding), so a constant stays constant. float64 ``[n]``."""
    y = np.asarray(x, np.float64)
    half_lo, half_hi = (window - 1) // 2, window // 2
    for _ in range(passes):
        c = np.concatenate([[0.0], np.cumsum(y)])
        i = np.arange(len(y))
        a, b = np.maximum(i - half_lo, 0), np.minimum(i + half_hi + 1, len(y))
        y = (c[b] - c[a]) / (b - a)
    return y


def refine_pseudo_labels(scores: np.ndarray, window: int, passes: int) -> np.ndarray:
    """Pseudo-labels of an anomalous video's clips (poster, 'pseudo labels refinement'; PROTOCOLS.md):
    box-filter smoothing, then ``(s - min) / (max - min)``. ``scores`` ``[n]`` in [0, 1] -> ``[n]``
    float32 in [0, 1]. Where min-max is undefined (max = min: a one-clip video, or G scoring every
    clip alike) every clip gets 1 if that score is above 0.5, else 0."""
    s = box_smooth(scores, window, passes)
    lo, hi = float(s.min()), float(s.max())
    if hi - lo < 1e-12:
        return np.full(len(s), 1.0 if hi > 0.5 else 0.0, np.float32)
    return ((s - lo) / (hi - lo)).astype(np.float32)


def class_weights(labels: np.ndarray, mode: str) -> tuple[float, float]:
    """``(w0, w1)`` of :func:`class_weighted_ce` from all training clip labels ``[n]`` in [0, 1]:
    with ``frequency``, ``w0 = 1 / (2 f)`` and ``w1 = 1 / (2 (1 - f))``, ``f`` the mean label (the
    share of anomalous clips, soft labels counted fractionally), so both classes weigh the same in
    total; ``none``: ``(1, 1)``."""
    if mode == "none":
        return 1.0, 1.0
    f = float(np.clip(np.mean(labels), 1e-3, 1 - 1e-3))
    return 0.5 / f, 0.5 / (1.0 - f)


def class_weighted_ce(p: torch.Tensor, y: torch.Tensor, w0: float, w1: float) -> torch.Tensor:
    """The poster's ``L_w = -w0 y log p - w1 (1 - y) log(1 - p)``, averaged over clips.

    ``p``: ``[N]`` anomaly probabilities in (0, 1); ``y``: ``[N]`` labels in [0, 1] (pseudo-labels are
    soft). Computed from ``log p`` clamped at -100 (as ``binary_cross_entropy``) for stability.
    """
    logp = torch.log(p).clamp(min=-100)
    log1p = torch.log1p(-p).clamp(min=-100)
    return -(w0 * y * logp + w1 * (1 - y) * log1p).mean()


@register_detector("mist")
class MIST(Detector):
    """Stage I generator G, and after stage II the copy of E_SGA's main head (module docstring).

    ``forward`` scores clips ``[B, S, D]`` -> ``[B, S]`` in [0, 1]: with the buffer ``use_head``
    False by G (``sigmoid(G(x))``), with it True by the head (``softmax(x W^T + b)[..., 1]``, ``x``
    then being features re-extracted with E_SGA). The head's ``W`` ``[2, D]`` and ``b`` ``[2]`` are
    buffers (copied from E_SGA after stage II, never trained here), so stage I optimises G alone.
    """

    Config = MistConfig
    input_level = "clips"
    version = 1
    #: the train stage of MIST is stage II; it reads the raw clips' ranges and the pseudo-labels
    train_inputs: ClassVar[tuple[str, ...] | None] = ("extract", "mist_pseudo")
    feature_stage: ClassVar[str] = "mist_extract"
    eval_inputs: ClassVar[tuple[str, ...] | None] = ("mist_extract", "mist_explain", "train")
    short_schedule: ClassVar[dict[str, object]] = {
        # a few dozen short videos: fewer, shorter sub-bags than UCF-Crime's 32 x 7 and a larger batch share;
        # low-dimensional synthetic features of small norm need no L2 normalisation (which would make
        # pure-noise clips as long as the planted ones)
        "sub_bags": 4, "sub_bag_len": 2, "topk": 1, "batch_abnormal": 8, "batch_normal": 8, "feature_norm": "none",
    }

    def __init__(self, feature_dim: int, cfg: MistConfig | None = None) -> None:
        cfg = cfg or MistConfig()
        super().__init__(feature_dim, cfg)
        self.generator = mlp_head(feature_dim, tuple(cfg.hidden), cfg.dropout)
        xavier_init_(self.generator)
        self.register_buffer("head_weight", torch.zeros(2, feature_dim))
        self.register_buffer("head_bias", torch.zeros(2))
        self.register_buffer("use_head", torch.zeros((), dtype=torch.bool))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(self.use_head):
            return torch.softmax(F.linear(x, self.head_weight, self.head_bias), dim=-1)[..., 1]
        return self.generate(x)

    def generate(self, x: torch.Tensor) -> torch.Tensor:
        """G's clip scores: ``[..., D]`` -> ``[...]`` in (0, 1) (input normalised per ``feature_norm``)."""
        if self.cfg.feature_norm == "l2":
            x = F.normalize(x, dim=-1)
        return torch.sigmoid(self.generator(x)).squeeze(-1)

    def set_head(self, head: nn.Linear) -> None:
        """Score with E_SGA's main head ``head`` (``Linear(D, 2)``) from now on."""
        self.head_weight.copy_(head.weight.detach())
        self.head_bias.copy_(head.bias.detach())
        self.use_head.fill_(True)

    def make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adagrad(self.generator.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    def sample_batch(self, bank: Any, gen: torch.Generator) -> MILBatch:
        """``batch_abnormal`` + ``batch_normal`` videos, one random crop each, cut into sub-bags:
        ``abnormal`` ``[Ba, L * T, D]`` and ``normal`` ``[Bn, L * T, D]`` float32, sub-bag l being
        clips ``l * T : (l + 1) * T`` of a row."""
        if not isinstance(bank, ClipBank):
            raise TypeError("MIST's generator trains on clips (a ClipBank)")

        def bags(index: torch.Tensor) -> torch.Tensor:
            out = []
            for i in index.tolist():
                clips = bank.clips(i)
                c = int(torch.randint(clips.shape[1], (1,), generator=gen))
                idx = sub_bag_indices(clips.shape[0], self.cfg.sub_bags, self.cfg.sub_bag_len, self.cfg.sampling, gen)
                out.append(torch.as_tensor(clips[idx.flatten(), c], dtype=torch.float32))  # [L * T, D]
            return torch.stack(out)

        a = _draw(bank.abnormal_index, self.cfg.batch_abnormal, gen)
        n = _draw(bank.normal_index, self.cfg.batch_normal, gen)
        return MILBatch(abnormal=bags(a), normal=bags(n))

    def losses(self, batch: MILBatch) -> dict[str, torch.Tensor]:
        """Sub-bag score S_l = mean of G's scores of its T clips; then :func:`mist_mil_loss`, pairing
        anomalous and normal videos row by row (the shorter side repeats)."""
        shape = (-1, self.cfg.sub_bags, self.cfg.sub_bag_len)
        sa = self.generate(batch.abnormal).view(shape).mean(-1)  # [Ba, L]
        sn = self.generate(batch.normal).view(shape).mean(-1)
        b = max(len(sa), len(sn))
        sa, sn = sa.repeat((b + len(sa) - 1) // len(sa), 1)[:b], sn.repeat((b + len(sn) - 1) // len(sn), 1)[:b]
        return mist_mil_loss(sa, sn, self.cfg.margin, self.cfg.lambda_sparse, self.cfg.topk)

    @classmethod
    def run_train(cls, ctx: Any, out: Any, inputs: dict[str, Any]) -> dict[str, Any]:
        """The train stage of ``--method mist``: stage II (``stages.mist.finetune``)."""
        from stages.mist import finetune

        return finetune(ctx, out, inputs)
