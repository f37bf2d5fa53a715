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
    # ---- stage II (fjchange/MIST_VAD stage2training/{SHT_I3D,SHT_C3D,UCF_C3D}_train.sh and .py,
    # configs/{SHT_I3D,SHT_C3D,UCF_C3D}_options.py, datasets/dataset.py). Sentinels ('' / 0 / -1)
    # take the value of ft_recipe; stages.mist.stage2_settings resolves them.
    ft_recipe: str = choice(
        "auto",
        ("auto", "sht_i3d", "sht_c3d", "ucf_c3d"),
        "which official stage II script the '' / 0 / -1 settings below follow: sht_i3d (SHT_I3D_train.sh + "
        "configs/SHT_I3D_options.py), sht_c3d (SHT_C3D_train.sh + SHT_C3D_options.py), ucf_c3d (UCF_C3D_train.sh "
        "+ UCF_C3D_options.py); auto = sht_c3d for a C3D backbone, else sht_i3d (the authors give no I3D "
        "UCF-Crime stage II script)",
    )
    ft_epochs: int = opt(301, "stage II epochs (official *_train.sh: --epochs 301, all three scripts)")
    ft_lr: float = opt(1e-4, "Adam learning rate after warm-up, constant (official *_train.sh --lr 1e-4; "
                       "utils/utils.py get_lr_scheduler; the options' --min_lr 1e-6 is never read)")
    ft_warmup_epochs: int = opt(5, "linear warm-up epochs: epoch e < 5 trains at lr (e + 0.5) / 5 (official "
                                "*_train.sh --warmup_epochs 5; utils/utils.py get_lr_scheduler, LambdaLR per epoch)")
    ft_weight_decay: float = opt(5e-4, "Adam (L2, not decoupled) weight decay (official configs/*_options.py "
                                 "--weight_decay 5e-4, --optim adam)")
    ft_decay_biases: str = choice(
        "", ("", "yes", "no"),
        "weight decay on bias (non-'weight') parameters too: '' = recipe (sht_*: yes, one parameter group, "
        "SHT_*_train.py get_optimizer; ucf_c3d: no, UCF_C3D_train.py get_optimizer gives biases decay 0)",
    )
    ft_grad_clip: float = opt(-1.0, "gradient-norm clipping before each optimiser step; -1 = recipe (sht_i3d 20, "
                              "sht_c3d 10, ucf_c3d 20: configs/*_options.py --grad_clip); 0 = off")
    ft_batch_videos: int = opt(0, "videos of EACH class per batch (class-balanced: as many anomalous as normal, "
                               "two shuffled loaders zipped, last partial batch dropped; an epoch ends with the "
                               "shorter class); 0 = recipe (sht_* 10, ucf_c3d 32: *_train.sh --batch_size)")
    ft_accumulate: int = opt(0, "batches per optimiser step (gradients summed; the step follows batch i of an epoch "
                             "when i % n == 0, gradients left at an epoch's end carry into the next, as the official "
                             "train_SG_epoch counter); 0 = recipe (sht_i3d 3, sht_c3d 1, ucf_c3d 5: configs/*_options.py "
                             "--accumulate_step)")
    ft_clips_per_video: int = opt(3, "clips per video per batch, one from each of 3 equal spans (official *_train.sh "
                                  "--clip_num 3; utils/utils.py random_perturb)")
    ft_expand_k: int = opt(8, "expand_k of the self-guided attention: 2k = 16 attention channels (official "
                           "configs/*_options.py --expand_k 8)")
    ft_freeze_epochs: int = opt(-1, "epochs with the backbone frozen (run without gradients); -1 = recipe (sht_* 30: "
                                "--freeze_epochs 30; ucf_c3d 60: UCF_C3D_train.sh --freeze_epochs 60)")
    ft_freeze_bn_epochs: int = opt(-1, "epochs with the backbone's batch-norm affine parameters frozen (official "
                                   "SHT_I3D_train.sh --freeze_bn --freeze_bn_epochs 30); -1 = ft_freeze_epochs")
    ft_bn_stats: str = choice(
        "batch", ("batch", "running"),
        "backbone batch norms while training: batch = normalise with and update batch statistics (official "
        "SHT_I3D_train.sh --use_bn_sta; I3D_SGA_STD.freeze_batch_norm keeps them in train mode), running = eval "
        "mode, statistics frozen. C3D has no batch norm",
    )
    ft_bn_momentum: float = opt(0.1, "momentum of the running batch statistics while fine-tuning (official "
                                "models/I3D_STD.py Unit3Dpy: torch BatchNorm3d default 0.1; the pretrained "
                                "Sonnet port uses 0.001)")
    ft_dropout: float = opt(0.8, "dropout before E_SGA's main head (official configs/*_options.py --dropout_rate 0.8)")
    ft_class_weights: str = opt(
        "",
        "weights (anomalous term, normal term) of the class-weighted cross-entropy of both heads: '' = recipe "
        "(sht_i3d '0.8,0.65', C3D recipes '1,1': configs/*_options.py --class_reweights; stage2training/losses.py "
        "Weighted_BCE_Loss puts the first on y log p); 'a,n' = those values; 'frequency' = inverse class "
        "frequencies of the pseudo-labels (each class weighing half)",
    )
    ft_lambda_guided: float = opt(1.0, "weight of the guided head's loss; the main head's is 1 (official "
                                  "--lambda_atten / --lambda_att 1.0, --lambda_base 1.0)")
    ft_label_interp: str = choice(
        "", ("", "swapped", "overlap", "max"),
        "label of a jittered clip spanning pseudo-labelled clips c and c+1 (b frames into c): '' = recipe; swapped "
        "= (b/16) y_c + (1 - b/16) y_(c+1) (sht_i3d: datasets/dataset.py Train_TemAug_Dataset_SHT_I3D, weights as "
        "written there); overlap = each clip's share of the frames, (1 - b/16) y_c + (b/16) y_(c+1); max = "
        "max(y_c, y_(c+1)) (C3D recipes: Train_TemAug_Dataset_SHT_C3D / _C3D). Normal videos: 0",
    )
    ft_augment: str = choice(
        "official", ("official", "none"),
        "training clips: official = temporal jitter (16 frames starting 0-15 frames into a sampled clip), frame "
        "resized to ft_train_size, multi-scale corner/centre crop (scales 1.0 and 0.8 of the short side, 13 fixed "
        "places) resized to the backbone's crop, horizontal flip p=0.5, grayscale p=ft_grayscale (datasets/dataset.py "
        "Train_TemAug_*, opencv_videovision/transforms.py MultiScaleCrop); none = the sampled clips as they are, "
        "resized to ft_train_size and centre-cropped",
    )
    ft_train_size: str = opt("", "HxW the training frames are resized to before cropping; '' = recipe (I3D 256x340, "
                             "C3D 128x171: Train_TemAug_Dataset_* transforms.Resize)")
    ft_grayscale: float = opt(-1.0, "probability a training clip is made grayscale; -1 = recipe (sht_i3d 0, C3D "
                              "recipes 0.1: transforms.RandomGrayScale in Train_TemAug_Dataset_SHT_C3D / _C3D)")
    ft_test_input: str = choice(
        "official", ("official", "extract"),
        "input of the fine-tuned encoder at test time and re-extraction (mist_extract, pipeline score): official = "
        "the frame resized to ft_test_size, whole (sht_i3d: Test_Dataset_SHT_I3D, 240x320, no crop) or centre-"
        "cropped to the backbone's crop (C3D recipes: Test_Dataset_SHT_C3D / _C3D, 128x171 then 112); extract = "
        "the extract stage's resize and extract.crops, scores averaged over the crops",
    )
    ft_test_size: str = opt("", "HxW of the official test-time resize; '' = recipe (sht_i3d 240x320, C3D 128x171)")
    ft_checkpoint_every: int = opt(20, "stage II batches between resumable checkpoints (besides every epoch end)", key=False)
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
        if self.ft_epochs < 1 or self.ft_clips_per_video < 1 or self.ft_batch_videos < 0 or self.ft_accumulate < 0:
            raise ValueError("ft_epochs and ft_clips_per_video must be >= 1, ft_batch_videos and ft_accumulate >= 0")
        if self.ft_lr <= 0 or self.ft_expand_k < 1 or self.ft_freeze_epochs < -1 or self.ft_freeze_bn_epochs < -1:
            raise ValueError("ft_lr must be > 0, ft_expand_k >= 1, ft_freeze_epochs and ft_freeze_bn_epochs >= -1")
        if self.ft_warmup_epochs < 0 or self.ft_weight_decay < 0 or self.ft_grad_clip < -1 or self.ft_lambda_guided < 0:
            raise ValueError("ft_warmup_epochs, ft_weight_decay, ft_lambda_guided must be >= 0, ft_grad_clip >= -1")
        if not 0 <= self.ft_bn_momentum <= 1 or not (self.ft_grayscale == -1 or 0 <= self.ft_grayscale <= 1):
            raise ValueError("ft_bn_momentum must be in [0, 1], ft_grayscale in [0, 1] or -1")
        for name in ("ft_train_size", "ft_test_size"):
            if getattr(self, name):
                parse_size(getattr(self, name), name)
        if self.ft_class_weights not in ("", "frequency"):
            parse_class_weights(self.ft_class_weights)

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


def parse_size(text: str, name: str = "size") -> tuple[int, int]:
    """``"HxW"`` (e.g. ``"240x320"``) -> ``(H, W)``, both >= 1; ValueError naming ``name`` otherwise."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"{name} must be HxW, e.g. 240x320, got {text!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"{name} must be HxW with H, W >= 1, got {text!r}")
    return h, w


def parse_class_weights(text: str) -> tuple[float, float]:
    """``"a,n"`` -> ``(a, n)``: the anomalous and normal terms' weights, both >= 0 (official ``--class_reweights``)."""
    try:
        a, n = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"ft_class_weights must be 'frequency' or two numbers 'a,n', got {text!r}") from None
    if a < 0 or n < 0:
        raise ValueError(f"ft_class_weights must be >= 0, got {text!r}")
    return a, n


def class_weights(spec: str, labels: np.ndarray | None = None) -> tuple[float, float]:
    """``(w_anomalous, w_normal)`` of :func:`class_weighted_ce`.

    ``spec``: ``"a,n"`` fixed weights (official ``--class_reweights``: ``0.8,0.65`` in
    configs/SHT_I3D_options.py, ``1,1`` in the C3D configs), ``"none"`` = ``(1, 1)``, or ``"frequency"``:
    from all training clip labels ``labels`` ``[n]`` in [0, 1], ``(1 / (2 f), 1 / (2 (1 - f)))`` with
    ``f`` the mean label (soft labels counted fractionally), so both classes weigh the same in total.
    """
    if spec == "none":
        return 1.0, 1.0
    if spec != "frequency":
        return parse_class_weights(spec)
    if labels is None:
        raise ValueError("frequency class weights need the training clip labels")
    f = float(np.clip(np.mean(labels), 1e-3, 1 - 1e-3))
    return 0.5 / f, 0.5 / (1.0 - f)


#: added inside the logarithms of :func:`class_weighted_ce` (official stage2training/losses.py, ``eps=1e-8``)
CE_EPS = 1e-8


def class_weighted_ce(p: torch.Tensor, y: torch.Tensor, w_anomalous: float, w_normal: float) -> torch.Tensor:
    """``mean(-w_a y log(p + eps) - w_n (1 - y) log(1 - p + eps))``, eps = 1e-8 (official
    stage2training/losses.py, ``Weighted_BCE_Loss`` with label smoothing 0, which clips ``y`` to [0, 1];
    the poster's ``L_w``).

    ``p``: ``[N]`` anomaly probabilities (softmax of a head's 2 logits, class 1) in [0, 1]; ``y``:
    ``[N]`` soft labels, clipped to [0, 1]. Returns a scalar (float32 for float32 input).
    """
    y = y.clamp(0.0, 1.0)
    return -(w_anomalous * y * torch.log(p + CE_EPS) + w_normal * (1 - y) * torch.log(1 - p + CE_EPS)).mean()


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
