"""MIST: Multiple Instance Self-Training (stage I generator G; stage II settings and losses).

J.-C. Feng, F.-T. Hong, W.-S. Zheng, "MIST: Multiple Instance Self-Training Framework for Video
Anomaly Detection", CVPR 2021 (poster: Algorithm 1, Stage I / Stage II panels). Defaults follow the
authors' code (github.com/fjchange/MIST_VAD) where it and the paper differ: stage I is
``stage1training/train_MIL_Generator.py`` (``train``, ``topk_rank_loss``, ``Augment_Pseudo_Label_*``),
``stage1training/MIL_Generator.py`` (``Simple_Regressor``) and ``stage1training/SHT_MIL_dataset.py``
(``SH_Train_Origin_Dataset.sample_feat``).

The whole method is a chain of runner stages (``stages/mist.py``); ``--method mist`` runs it:

1. ``extract``: clip features of the pretrained encoder E (the ordinary extract stage).
2. ``mist_generator``: stage I, the multiple instance pseudo-label generator G (this detector with
   ``use_head`` off) trained by the generic train loop on the raw clip features: each step draws 40
   anomalous and 40 normal videos, samples from each L = 32 runs of T = 7 consecutive clips with one
   shared random offset (:func:`sub_bag_indices`, the poster's "sparse continuous sampling"), scores
   every clip with G (:func:`build_generator`: FC D-512-32-1, ReLU after the first layer only) and
   minimises L_MIL (:func:`mist_mil_loss`: the mean of the top 7 of the 224 sampled clip scores, a
   hinge over every anomalous x normal pair, sparsity 0.01) with Adagrad and gradient clipping.
3. ``mist_pseudo``: G scores every clip of every training video; a 5-clip box filter applied twice
   (edges replicated, :func:`box_smooth`) and per-video min-max normalisation give the anomalous
   videos' clip pseudo-labels (:func:`refine_pseudo_labels`), each spanning [0, 1]; stage II trains
   normal videos' clips as 0. ``pseudo_labels.npy`` holds them in the layout of the authors'
   released ``data/SHT_I3D_PLs.npy`` (:func:`official_pseudo_labels`).
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

from pipeline.core.config import choice, opt

from models.registry import register_detector
from .base import ClipBank, Detector, MILBatch, TrainConfig, draw_videos, xavier_init_

#: fields of :class:`MistConfig` that only stage II (and later) reads; stage I's cache key leaves them out
STAGE2_PREFIX = "ft_"


@dataclass
class MistConfig(TrainConfig):
    """MIST settings. Stage I (generator) fields first, then stage II (``ft_*``) ones."""

    iterations: int = opt(
        3001,
        "stage I generator steps (official stage1training/train_MIL_Generator.py: --epochs 3001; on "
        "ShanghaiTech's 63 anomalous training videos each epoch is one batch of 40 + 40, the last partial "
        "batch being dropped; UCF-Crime's 800 would make 20 steps an epoch)",
    )
    lr: float = opt(0.01, "stage I Adagrad learning rate (official train_MIL_Generator.py: --lr 0.01)")
    weight_decay: float = opt(1e-3, "stage I Adagrad weight decay (official train_MIL_Generator.py, train: weight_decay=0.001)")
    grad_clip: float = opt(
        10.0,
        "stage I gradient-norm clipping, 0 = off (official train_MIL_Generator.py, train: clip_grad_norm_ at 10; "
        "its --clip 4.0 is never read)",
    )
    batch_abnormal: int = opt(40, "anomalous videos per stage I batch (official train_MIL_Generator.py: --batch_size 40 of each class)")
    batch_normal: int = opt(40, "normal videos per stage I batch (official train_MIL_Generator.py: --batch_size 40 of each class)")
    hidden: tuple[int, ...] = opt((512, 32), "G's hidden FC sizes (official stage1training/MIL_Generator.py, Simple_Regressor)")
    generator_relu: str = choice(
        "first",
        ("first", "all"),
        "ReLU after G's first hidden layer only, the second being linear (official MIL_Generator.py, "
        "Simple_Regressor), or after every hidden layer (Sultani et al.'s generator, Sec. 4.2)",
    )
    init: str = choice(
        "kaiming",
        ("kaiming", "xavier"),
        "G's weight init: Kaiming-normal (fan-in, gain sqrt 2) with zero biases (official utils/utils.py, "
        "weights_normal_init), or Xavier-uniform with zero biases",
    )
    dropout: float = opt(0.6, "dropout after each of G's hidden layers (official MIL_Generator.py / train_MIL_Generator.py: --dropout_rate 0.6)")
    feature_norm: str = choice(
        "none",
        ("none", "l2"),
        "G's input: the raw clip features (official train_MIL_Generator.py: --norm 0), or each L2-normalised "
        "(its --norm 2)",
    )
    sub_bags: int = opt(32, "L, sub-bags (runs of clips) sampled per video (official train_MIL_Generator.py: --part_num 32)")
    sub_bag_len: int = opt(7, "T, consecutive clips per sub-bag (official train_MIL_Generator.py: --part_len 7)")
    topk: int = opt(
        7,
        "G's scores averaged into a video's score in L_MIL: the mean of the top k units (official "
        "train_MIL_Generator.py: --topk 7, topk_rank_loss); 1 = the poster's max (Eq. 7)",
    )
    rank_units: str = choice(
        "clips",
        ("clips", "sub_bags"),
        "units the top k is taken over: all L x T sampled clip scores (official topk_rank_loss), or the L "
        "sub-bag scores S_l, each the mean of its T clips (poster Eq. 7)",
    )
    pairs: str = choice(
        "all",
        ("all", "aligned"),
        "hinge pairs of L_MIL: every anomalous x normal video pair of the batch, averaged (official "
        "topk_rank_loss), or row i of each side paired (the shorter side repeating)",
    )
    sampling: str = choice(
        "shared_offset",
        ("shared_offset", "independent_offset", "spread"),
        "sub-bag sampling (sub_bag_indices): L runs of T consecutive clips at evenly spaced starts moved by one "
        "random offset shared by the video's runs (official SHT_MIL_dataset.py, sample_feat, --sample uniform, "
        "the default), each run moved by its own offset (its --sample random), or T clips spread evenly over each "
        "of L equal spans (the non-continuous baseline of the poster's Table 4, as read here)",
    )
    margin: float = opt(1.0, "epsilon of L_MIL (poster Eq. 7; official topk_rank_loss: relu(1 - abnormal + normal))")
    lambda_sparse: float = opt(
        0.01,
        "weight of L_MIL's sparsity term, the mean of the anomalous videos' sampled clip scores (official "
        "train_MIL_Generator.py: --lambda_1 0.01; poster Eq. 7 gives the form)",
    )
    lambda_smooth: float = opt(
        0.0,
        "weight of the mean squared difference of consecutive sampled anomalous clip scores (official "
        "train_MIL_Generator.py: --lambda_2 0, i.e. off)",
    )
    smooth_window: int = opt(5, "box-filter width of the pseudo-label smoothing (official train_MIL_Generator.py: --smooth_len 5)")
    smooth_passes: int = opt(2, "times the box filter is applied (official Augment_Pseudo_Label_Refilement: smooth twice)")
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
    ft_bn_scale: bool = opt(
        True,
        "give the backbone's scale-free (Sonnet-style) Inception-I3D batch norms a trainable scale gamma = 1, as "
        "the affine BatchNorm3d of the I3D that MIST fine-tunes (official models/I3D_STD.py Unit3Dpy, converted "
        "weights with gamma = 1); false trains the offsets only. C3D has no batch norm",
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
    ft_resize: str = choice(
        "official", ("official", "extract"),
        "resize rule of the fine-tuned encoder's frames (training clips, re-extraction, scoring): official = "
        "OpenCV's bilinear without antialiasing (extract.resize_dtype=opencv), as the authors' datasets resize "
        "(datasets/dataset.py through opencv_videovision/functional.py resize, cv2.INTER_LINEAR); extract = the "
        "extract stage's extract.resize_dtype",
    )
    ft_input_norm: str = choice(
        "official", ("official", "extractor"),
        "pixel scaling of the fine-tuned encoder's input (training clips, re-extraction, scoring): official = the "
        "recipe's, (x - 128) / 128 for I3D (datasets/dataset.py Train_TemAug_Dataset_SHT_I3D and "
        "Test_Dataset_SHT_I3D: Normalize(mean 128, std 128)) and BGR minus (90.25, 97.66, 101.41) for C3D (the C3D "
        "datasets, the same as this project's C3D extractor); extractor = the extract stage's scaling (Inception-I3D: "
        "x / 127.5 - 1)",
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
        units = self.sub_bags * (self.sub_bag_len if self.rank_units == "clips" else 1)
        if not 1 <= self.topk <= units:
            raise ValueError(f"topk must be in [1, {units}] (the {self.rank_units} ranked per video)")
        if self.grad_clip < 0 or self.lambda_sparse < 0 or self.lambda_smooth < 0:
            raise ValueError("grad_clip, lambda_sparse and lambda_smooth must be >= 0")
        if self.smooth_window < 1 or self.smooth_window % 2 == 0 or self.smooth_passes < 0:
            raise ValueError("smooth_window must be odd and >= 1 (a centred box), smooth_passes >= 0")
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
    """Clip indices of one video's ``L`` sub-bags of ``T`` consecutive clips (the poster's "sparse
    continuous sampling"; official stage1training/SHT_MIL_dataset.py, ``sample_feat``).

    ``shared_offset`` (official ``--sample uniform``, the default): with ``R = n_clips - T`` the last
    start that keeps a run inside the video, the ``L + 1`` starts ``floor(k R / L)``, ``k = 0..L``, are
    laid out, the last is dropped, and every run is moved by ONE offset ``m`` drawn uniformly from
    ``[0, R // (L + 1))`` (``m = 0`` when that range is empty). Runs overlap, so clips repeat, in a video
    shorter than ``L x T`` clips. ``independent_offset`` (official ``--sample random``): each run moved
    by its own offset from ``[0, floor(R / L))``. ``spread``: ``T`` clips spread evenly over each of ``L``
    equal spans (not continuous). A video shorter than ``T`` clips (where the official code fails)
    repeats its last clip. With ``gen`` None every offset is 0 (deterministic).

    Returns:
        ``[L, T]`` int64 in ``[0, n_clips)``; row l is sub-bag l, in temporal order.
    """
    if n_clips < 1:
        raise ValueError("a video needs at least one clip")
    steps = torch.arange(length)
    if mode == "spread":
        edges = torch.linspace(0, n_clips, sub_bags + 1, dtype=torch.float64)
        lo, hi = edges[:-1], edges[1:]
        idx = lo[:, None] + (hi - lo)[:, None] * (steps[None, :] + 0.5) / length
        return idx.floor().long().clamp_(0, n_clips - 1)
    if mode not in ("shared_offset", "independent_offset"):
        raise ValueError(f"unknown sub-bag sampling {mode!r}")
    room = max(n_clips - length, 0)
    # k * (R / L) in float64, floored: the arithmetic of numpy's integer linspace the official code uses
    starts = (torch.arange(sub_bags + 1, dtype=torch.float64) * (room / sub_bags)).floor().long()[:sub_bags]
    if mode == "shared_offset":
        span = room // (sub_bags + 1)
        move = torch.randint(span, (1,), generator=gen) if gen is not None and span >= 1 else torch.zeros(1, dtype=torch.long)
    else:
        span = int(starts[1] - starts[0]) if sub_bags > 1 else room
        move = torch.randint(span, (sub_bags,), generator=gen) if gen is not None and span >= 1 else torch.zeros(sub_bags, dtype=torch.long)
    return ((starts + move)[:, None] + steps[None, :]).clamp_(0, n_clips - 1)


def mist_mil_loss(
    abnormal: torch.Tensor,
    normal: torch.Tensor,
    margin: float,
    lam: float,
    topk: int = 1,
    pairs: str = "all",
    lam_smooth: float = 0.0,
) -> dict[str, torch.Tensor]:
    """L_MIL (poster Eq. 7) in the form of the official ``topk_rank_loss`` (stage1training/train_MIL_Generator.py).

    Args:
        abnormal, normal: ``[Ba, K]`` / ``[Bn, K]`` scores in [0, 1] of each video's ranked units in
            temporal order (officially all ``K = L x T`` sampled clips; the poster's ``K = L`` sub-bags).
        topk: a video's score ``v`` is the mean of its ``topk`` largest units (1: the poster's max).
        pairs: ``all``: ``ranking`` is the mean of ``[margin - v_a + v_n]_+`` over every anomalous x
            normal pair of the batch (official: the sum over the pairs divided by ``B^2``);
            ``aligned``: over the pairs (row i, row i), the shorter side repeating.
        lam: ``sparsity = lam * mean(abnormal)`` (official: ``--lambda_1`` times the mean of every
            sampled anomalous clip score; the poster's ``(lambda / L) sum_l S^a_l`` per video).
        lam_smooth: ``smoothness = lam_smooth * mean((a[:, i+1] - a[:, i])^2)`` over the anomalous rows
            (official ``--lambda_2``, 0 by default).

    Returns:
        ``ranking``, ``sparsity``, ``smoothness`` and their sum ``total``: scalars.
    """
    top_a = abnormal.topk(topk, dim=1).values.mean(1)  # [Ba]
    top_n = normal.topk(topk, dim=1).values.mean(1)  # [Bn]
    if pairs == "all":
        ranking = F.relu(margin - top_a[None, :] + top_n[:, None]).mean()
    elif pairs == "aligned":
        b = max(len(top_a), len(top_n))
        ranking = F.relu(margin - top_a.repeat(-(-b // len(top_a)))[:b] + top_n.repeat(-(-b // len(top_n)))[:b]).mean()
    else:
        raise ValueError(f"unknown pairs {pairs!r}")
    sparsity = lam * abnormal.mean()
    diffs = abnormal[:, 1:] - abnormal[:, :-1]
    smoothness = lam_smooth * diffs.pow(2).mean() if diffs.numel() else abnormal.new_zeros(())
    return {"ranking": ranking, "sparsity": sparsity, "smoothness": smoothness, "total": ranking + sparsity + smoothness}


def box_smooth(x: np.ndarray, window: int, passes: int) -> np.ndarray:
    """Centred moving average of ``x`` ``[n]`` over ``window`` (odd) clips, ``passes`` times, each pass
    padding both ends with ``window // 2`` copies of the edge value (official train_MIL_Generator.py,
    ``smooth``: edge replication, then a 'valid' box convolution), so the length is kept and a
    constant stays constant. Returns float64 ``[n]``."""
    y = np.asarray(x, np.float64).reshape(-1)
    if window % 2 != 1:
        raise ValueError("the box window must be odd (a centred filter)")
    if not len(y):
        return y
    box = np.full(window, 1.0 / window)
    for _ in range(passes):
        y = np.convolve(np.pad(y, window // 2, mode="edge"), box, mode="valid")
    return y


def refine_pseudo_labels(scores: np.ndarray, window: int, passes: int, abnormal: bool = True) -> np.ndarray:
    """Pseudo-labels from G's clip scores ``[n]`` (poster, "pseudo labels refinement"; official
    ``Augment_Pseudo_Label_Refilement``): :func:`box_smooth`, then for an anomalous video
    ``(s - min s) / max(s - min s)``, so it spans exactly [0, 1]. A normal video (``abnormal`` False)
    keeps its smoothed scores, as in the official file (stage II trains its clips as 0 regardless).
    Where min-max is undefined G's smoothed scores are kept: a one-clip video (as officially) or a
    constant row (which the official code divides by zero). Returns float64 ``[n]`` in [0, 1]."""
    s = box_smooth(scores, window, passes)
    if not abnormal or len(s) < 2:
        return s
    shifted = s - s.min()
    top = shifted.max()
    return shifted / top if top > 0 else s


def official_pseudo_labels(
    scores: dict[str, np.ndarray], labels: dict[str, int], window: int, passes: int
) -> dict[str, np.ndarray]:
    """The layout of the authors' released pseudo-labels (``data/SHT_I3D_PLs.npy`` of fjchange/MIST_VAD,
    written by ``Augment_Pseudo_Label_Refilement``): a dict keyed ``"<video id>.npy"`` holding, for every
    training video, one float64 per clip (16 frames) from :func:`refine_pseudo_labels`; anomalous videos
    span [0, 1], normal ones hold their smoothed scores. ``scores``: G's ``[T]`` clip scores per id;
    ``labels``: 1 anomalous / 0 normal per id. Save with ``np.save`` (load with ``allow_pickle=True``)."""
    return {f"{vid}.npy": refine_pseudo_labels(s, window, passes, labels[vid] == 1) for vid, s in scores.items()}


def build_generator(
    in_dim: int, hidden: tuple[int, ...], dropout: float, relu: str = "first", init: str = "kaiming"
) -> nn.Sequential:
    """G: ``[..., in_dim]`` -> ``[..., 1]`` in (0, 1), an MLP ending in a sigmoid.

    Every hidden ``Linear`` is followed by ``ReLU`` (``relu="first"``: after the first one only, as the
    official ``Simple_Regressor`` of stage1training/MIL_Generator.py; ``"all"``: after each) and
    ``Dropout``; then ``Linear(hidden[-1], 1)`` and ``Sigmoid``. With the defaults the layout is the
    official ``regressor``: Linear(D,512), ReLU, Dropout, Linear(512,32), Dropout, Linear(32,1), Sigmoid
    (parameters at indices 0, 3, 5). ``init="kaiming"``: Kaiming-normal weights (fan-in, gain sqrt 2)
    and zero biases (official utils/utils.py, ``weights_normal_init``); ``"xavier"``: Xavier-uniform.
    """
    if relu not in ("first", "all") or init not in ("kaiming", "xavier"):
        raise ValueError(f"unknown generator_relu {relu!r} or init {init!r}")
    sizes = [in_dim, *hidden]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(a, b))
        if relu == "all" or i == 0:
            layers.append(nn.ReLU())
        layers.append(nn.Dropout(dropout))
    layers += [nn.Linear(sizes[-1], 1), nn.Sigmoid()]
    net = nn.Sequential(*layers)
    if init == "xavier":
        xavier_init_(net)
    else:
        for m in net:
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight)
                nn.init.zeros_(m.bias)
    return net


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
    version = 2  # 2: the official stage I (generator layout and init, loss, optimiser, sampling, pseudo-labels)
    short_schedule: ClassVar[dict[str, object]] = {
        # a few dozen videos of 24-160 clips: 8 x 3 sub-bags and the top 2 of their 24 clips instead of
        # 32 x 7 and the top 7 of 224, and 8 + 8 videos a batch. lr 0.1: on the tests' 24-32-D features
        # the Kaiming init is 5x wider than at 1024-D (std sqrt(2 / D)) and, at lr 0.01, 300 Adagrad steps
        # leave G memorising noise clips instead of learning the planted direction (measured on
        # tests/test_detectors.py and tests/test_synthetic_benchmark.py, seeds 0-3)
        "sub_bags": 8, "sub_bag_len": 3, "topk": 2, "batch_abnormal": 8, "batch_normal": 8, "lr": 0.1,
    }

    def __init__(self, feature_dim: int, cfg: MistConfig | None = None) -> None:
        cfg = cfg or MistConfig()
        super().__init__(feature_dim, cfg)
        self.generator = build_generator(feature_dim, tuple(cfg.hidden), cfg.dropout, cfg.generator_relu, cfg.init)
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
        return self.generator(x).squeeze(-1)

    def load_official_generator(self, state: dict[str, torch.Tensor]) -> None:
        """Load G's weights from a state dict of the authors' ``Simple_Regressor`` (official
        stage1training/MIL_Generator.py: keys ``regressor.{0,3,5}.{weight,bias}``), strictly; needs
        the default ``hidden`` and ``generator_relu``, which lay G out as the official ``regressor``."""
        prefix = "regressor."
        self.generator.load_state_dict({k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()})

    def set_head(self, head: nn.Linear) -> None:
        """Score with E_SGA's main head ``head`` (``Linear(D, 2)``) from now on."""
        self.head_weight.copy_(head.weight.detach())
        self.head_bias.copy_(head.bias.detach())
        self.use_head.fill_(True)

    def make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adagrad(self.generator.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    def sample_batch(self, bank: Any, gen: torch.Generator) -> MILBatch:
        """``batch_abnormal`` + ``batch_normal`` videos, each class drawn without replacement (official
        train_MIL_Generator.py: each epoch takes the first 40 of a fresh permutation of each class), one
        random crop each (the official features have one view per clip), cut into sub-bags by
        :func:`sub_bag_indices`: ``abnormal`` ``[Ba, L * T, D]`` and ``normal`` ``[Bn, L * T, D]``
        float32, sub-bag l being clips ``l * T : (l + 1) * T`` of a row."""
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

        a = draw_videos(bank.abnormal_index, self.cfg.batch_abnormal, gen)
        n = draw_videos(bank.normal_index, self.cfg.batch_normal, gen)
        return MILBatch(abnormal=bags(a), normal=bags(n))

    def losses(self, batch: MILBatch) -> dict[str, torch.Tensor]:
        """:func:`mist_mil_loss` on G's scores of the sampled clips ``[B, L * T]`` (``rank_units=clips``,
        official), or on the sub-bag scores ``S_l``, each the mean of its ``T`` clips (``sub_bags``, poster)."""
        cfg = self.cfg
        sa, sn = self.generate(batch.abnormal), self.generate(batch.normal)  # [Ba, L * T], [Bn, L * T]
        if cfg.rank_units == "sub_bags":
            sa = sa.view(-1, cfg.sub_bags, cfg.sub_bag_len).mean(-1)  # [Ba, L]
            sn = sn.view(-1, cfg.sub_bags, cfg.sub_bag_len).mean(-1)
        return mist_mil_loss(sa, sn, cfg.margin, cfg.lambda_sparse, cfg.topk, cfg.pairs, cfg.lambda_smooth)
