"""MIST's stages (``models/mist.py`` describes the chain): generator, pseudo-labels, stage II
fine-tuning (the train stage of ``--method mist``), re-extraction and attention overlays.

Each is an ordinary runner stage with its own cache key, so a killed ``--method mist`` run resumes
at the step it was in: finished stages are reused, the generator and the fine-tuning continue from
their last checkpoint, re-extraction skips completed videos. The stages are ``optional``: they run
(and ``pipeline status`` lists them) only when the chosen detector's train or evaluate stage reads
them.

Stage II (:func:`finetune`) follows the authors' scripts (fjchange/MIST_VAD stage2training/*_train.sh,
configs/*_options.py, datasets/dataset.py), per recipe (:data:`STAGE2_RECIPES`, ``train.ft_recipe``):
it decodes the training clips it samples from the raw videos with the extract stage's decoder
(``pipeline.core.video.open_video``), jitters them in time, resizes them with the extract stage's resize
(``extractors.transforms.preprocess_clips``), augments them (multi-scale crop, flip, grayscale) and
normalises them as the extractor does. Re-extraction (``mist_extract``) and ``pipeline score`` feed
the fine-tuned encoder the official test-time input recorded in ``encoder.pt`` (``train.ft_test_input``).
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.core.store import atomic_torch_save, atomic_write_bytes
from pipeline.core.errors import StageError
from pipeline.core.precision import autocast, grad_scaler
from pipeline.core.training import load_checkpoint, rng_state, save_checkpoint, set_rng_state, training_loop, write_log
from pipeline.core.runner import resolve_device
from pipeline.core.stage import Context, Stage
from pipeline.core.store import StageDir

from .chains import OwnTraining
from .extract import ExtractStage
from .train import load_detector, train_detector, write_model

log = logging.getLogger(__name__)


def _mist_config_inputs(stage: Stage, cfg: Any, stage2: bool) -> dict[str, Any]:
    """The train-section values a MIST stage's key holds: stage I ones only (``stage2`` False), or all."""
    from models.mist import STAGE2_PREFIX

    out = Stage.config_inputs(stage, cfg)
    if not stage2:
        out = {k: v for k, v in out.items() if not k.startswith(f"train.{STAGE2_PREFIX}") and k != "train.explain"}
    return out


class MistGeneratorStage(Stage):
    """Stage I: G trained by the generic train loop on the extract stage's clips (``model.pt``)."""

    name = "mist_generator"
    reads = ("train",)
    manifest_columns = ("id", "split", "label")
    upstream = ("extract",)
    per_video = False
    optional = True

    def config_inputs(self, cfg: Any) -> dict[str, Any]:
        return _mist_config_inputs(self, cfg, stage2=False)

    def extra_inputs(self, ctx: Context) -> dict[str, Any]:
        from models import DETECTORS

        return {"detector_version": DETECTORS.get_class(ctx.cfg.train.method).version}

    def run_whole(self, ctx: Context, out: StageDir, inputs: dict[str, StageDir]) -> dict[str, Any]:
        return train_detector(ctx, out, inputs)


class MistPseudoStage(Stage):
    """Clip pseudo-labels of the training videos: ``items/<id>.{scores,labels}.npy`` (G's clip scores
    in eval mode, averaged over crops, and the labels stage II trains on, ``[T]`` float32: the refined
    ones for anomalous videos, 0 for normal ones), ``plots/<id>.png`` per anomalous video, and
    ``pseudo_labels.npy``: every training video's pseudo-labels in the layout of the authors' released
    ``data/SHT_I3D_PLs.npy`` (``models.mist.official_pseudo_labels``; official
    stage1training/train_MIL_Generator.py, ``Augment_Pseudo_Label_Generate`` / ``_Refilement``)."""

    name = "mist_pseudo"
    reads = ("train",)
    manifest_columns = ("id", "split", "label")
    upstream = ("extract", "mist_generator")
    per_video = False
    optional = True

    def config_inputs(self, cfg: Any) -> dict[str, Any]:
        return _mist_config_inputs(self, cfg, stage2=False)

    def run_whole(self, ctx: Context, out: StageDir, inputs: dict[str, StageDir]) -> dict[str, Any]:
        from models.mist import official_pseudo_labels, refine_pseudo_labels

        cfg = ctx.cfg.train
        model = load_detector(inputs["mist_generator"], "cpu")
        done = set(inputs["extract"].complete_items())
        videos = [v for v in ctx.manifest.split("train") if v.id in done]
        all_scores: dict[str, np.ndarray] = {}
        for v in videos:
            if out.item_complete(v.id):
                all_scores[v.id] = out.load_item(v.id)[1]["scores"]
                continue
            feats = inputs["extract"].load_item(v.id)[1]["features"]  # [T, C, D]
            scores = model.score(torch.from_numpy(feats).float().permute(1, 0, 2)).numpy().astype(np.float32)
            if v.label == 1:
                labels = refine_pseudo_labels(scores, cfg.smooth_window, cfg.smooth_passes).astype(np.float32)
                _plot_pseudo_labels(out.path / "plots" / f"{v.id}.png", v.id, scores, labels)
            else:  # stage II trains normal clips as 0 (official datasets/dataset.py, Train_TemAug_Dataset_*: [1, 0])
                labels = np.zeros_like(scores)
            out.save_item(v.id, {"scores": scores, "labels": labels}, {"label": v.label, "clips": len(scores)})
            all_scores[v.id] = scores
        released = official_pseudo_labels(all_scores, {v.id: v.label for v in videos}, cfg.smooth_window, cfg.smooth_passes)
        buf = io.BytesIO()
        np.save(buf, np.array(released, dtype=object), allow_pickle=True)
        atomic_write_bytes(out.path / "pseudo_labels.npy", buf.getvalue())
        abnormal = [v for v in videos if v.label == 1]
        flat = [v.id for v in abnormal if np.ptp(all_scores[v.id]) == 0]
        if flat:  # min-max undefined: G scores every clip alike, typically a sigmoid saturated by large raw features
            log.warning("mist_pseudo: G gives %d of %d anomalous videos one score for every clip (e.g. %s); if G "
                        "saturated, try train.feature_norm=l2 or a lower train.lr", len(flat), len(abnormal), flat[0])
        log.info("mist_pseudo: pseudo-labels for %d anomalous and %d normal training videos",
                 len(abnormal), len(videos) - len(abnormal))
        return {"videos": len(videos), "abnormal": len(abnormal)}


def _save_png(path: Path, fig: Any) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write_bytes(path, buf.getvalue())


def _plot_pseudo_labels(path: Path, vid: str, scores: np.ndarray, labels: np.ndarray) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 2.4))
    ax.plot(scores, label="G score", color="0.6")
    ax.plot(labels, label="pseudo-label", color="C3")
    ax.set(xlabel="clip", ylim=(-0.02, 1.02), title=vid)
    ax.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    _save_png(path, fig)
    plt.close(fig)


# ------------------------------------------------------------------------------------- stage II


@dataclass(frozen=True)
class Stage2Settings:
    """Stage II settings with every recipe sentinel of :class:`models.mist.MistConfig` resolved
    (:func:`stage2_settings`); field meanings are those of the ``ft_*`` settings of the same name.
    Sizes are ``(H, W)``; ``test_crops`` is ``"none"`` / ``"center"`` (official test input) or None
    (``ft_test_input=extract``: the extract stage's resize and crops)."""

    recipe: str
    epochs: int
    lr: float
    warmup_epochs: int
    weight_decay: float
    decay_biases: bool
    grad_clip: float
    batch_videos: int
    accumulate: int
    clips_per_video: int
    expand_k: int
    freeze_epochs: int
    freeze_bn_epochs: int
    bn_batch_stats: bool
    bn_scale: bool
    bn_momentum: float
    dropout: float
    class_weights: str
    lambda_guided: float
    label_interp: str
    augment: str
    train_size: tuple[int, int]
    grayscale: float
    test_crops: str | None
    test_size: tuple[int, int]
    input_norm: tuple[float, float] | None
    resize_dtype: str | None


#: the values of the recipe-dependent stage II settings per official script (fjchange/MIST_VAD):
#: sht_i3d = stage2training/SHT_I3D_train.sh + configs/SHT_I3D_options.py + Train_TemAug_Dataset_SHT_I3D /
#: Test_Dataset_SHT_I3D; sht_c3d = SHT_C3D_train.sh + SHT_C3D_options.py + ..._SHT_C3D (its .sh passes
#: "freeze_epochs 30" without "--", the options' default is 30 too); ucf_c3d = UCF_C3D_train.sh +
#: UCF_C3D_options.py + Train_TemAug_Dataset_C3D / Test_Dataset_C3D (biases without weight decay there).
STAGE2_RECIPES: dict[str, dict[str, Any]] = {
    "sht_i3d": {"grad_clip": 20.0, "batch_videos": 10, "accumulate": 3, "freeze_epochs": 30, "decay_biases": True,
                "class_weights": "0.8,0.65", "label_interp": "swapped", "train_size": (256, 340), "grayscale": 0.0,
                "test_crops": "none", "test_size": (240, 320), "input_norm": (128.0, 128.0)},
    "sht_c3d": {"grad_clip": 10.0, "batch_videos": 10, "accumulate": 1, "freeze_epochs": 30, "decay_biases": True,
                "class_weights": "1,1", "label_interp": "max", "train_size": (128, 171), "grayscale": 0.1,
                "test_crops": "center", "test_size": (128, 171), "input_norm": None},
    "ucf_c3d": {"grad_clip": 20.0, "batch_videos": 32, "accumulate": 5, "freeze_epochs": 60, "decay_biases": False,
                "class_weights": "1,1", "label_interp": "max", "train_size": (128, 171), "grayscale": 0.1,
                "test_crops": "center", "test_size": (128, 171), "input_norm": None},
}

#: MultiScaleCrop scales of the short side (official datasets/dataset.py Train_TemAug_*: [1.0, 0.8], max_distort 1)
CROP_SCALES = (1.0, 0.8)


def stage2_settings(cfg: Any, backbone: str) -> Stage2Settings:
    """Resolve ``cfg`` (a :class:`models.mist.MistConfig`) for extract.backbone ``backbone``: sentinel
    values (``''``, 0, -1) take the recipe's (:data:`STAGE2_RECIPES`); ``ft_recipe=auto`` is
    ``sht_c3d`` for a C3D backbone, else ``sht_i3d``."""
    from models.mist import parse_size

    name = cfg.ft_recipe if cfg.ft_recipe != "auto" else ("sht_c3d" if "c3d" in backbone else "sht_i3d")
    r = STAGE2_RECIPES[name]
    freeze = cfg.ft_freeze_epochs if cfg.ft_freeze_epochs >= 0 else r["freeze_epochs"]
    decay_biases = r["decay_biases"] if cfg.ft_decay_biases == "" else cfg.ft_decay_biases == "yes"
    return Stage2Settings(
        recipe=name, epochs=cfg.ft_epochs, lr=cfg.ft_lr, warmup_epochs=cfg.ft_warmup_epochs,
        weight_decay=cfg.ft_weight_decay, decay_biases=decay_biases,
        grad_clip=cfg.ft_grad_clip if cfg.ft_grad_clip >= 0 else r["grad_clip"],
        batch_videos=cfg.ft_batch_videos or r["batch_videos"], accumulate=cfg.ft_accumulate or r["accumulate"],
        clips_per_video=cfg.ft_clips_per_video, expand_k=cfg.ft_expand_k, freeze_epochs=freeze,
        freeze_bn_epochs=cfg.ft_freeze_bn_epochs if cfg.ft_freeze_bn_epochs >= 0 else freeze,
        bn_batch_stats=cfg.ft_bn_stats == "batch", bn_scale=bool(cfg.ft_bn_scale), bn_momentum=cfg.ft_bn_momentum, dropout=cfg.ft_dropout,
        class_weights=cfg.ft_class_weights or r["class_weights"], lambda_guided=cfg.ft_lambda_guided,
        label_interp=cfg.ft_label_interp or r["label_interp"], augment=cfg.ft_augment,
        train_size=parse_size(cfg.ft_train_size, "ft_train_size") if cfg.ft_train_size else r["train_size"],
        grayscale=cfg.ft_grayscale if cfg.ft_grayscale >= 0 else r["grayscale"],
        test_crops=r["test_crops"] if cfg.ft_test_input == "official" else None,
        test_size=parse_size(cfg.ft_test_size, "ft_test_size") if cfg.ft_test_size else r["test_size"],
        # the C3D recipes' scaling is the C3D extractor's own (None: use the extractor's)
        input_norm=r["input_norm"] if cfg.ft_input_norm == "official" else None,
        # every recipe's frames go through cv2.resize (None: the extract stage's extract.resize_dtype)
        resize_dtype="opencv" if cfg.ft_resize == "official" else None,
    )


def lr_factor(epoch: int, warmup_epochs: int) -> float:
    """Learning-rate multiplier of ``epoch`` (0-based): ``(epoch + 0.5) / warmup`` during the warm-up,
    then 1 (official utils/utils.py ``get_lr_scheduler``, a LambdaLR stepped once per epoch)."""
    return (epoch + 0.5) / warmup_epochs if epoch < warmup_epochs else 1.0


def decode_clips(path: Any, starts: list[int], clip_len: int, folder_fps: float) -> np.ndarray:
    """Frames ``[start, start + clip_len)`` of ``path`` for each start, in one sequential pass.

    A clip running past the last frame repeats it (the extract stage's padding). Returns
    ``[len(starts), clip_len, H, W, 3]`` uint8 RGB. Raises VideoDecodeError for an unreadable video.
    """
    from pipeline.core.video import VideoDecodeError, open_video

    need: dict[int, list[tuple[int, int]]] = {}  # frame -> (clip, position) slots it fills
    for i, s in enumerate(starts):
        for t in range(clip_len):
            need.setdefault(s + t, []).append((i, t))
    out: np.ndarray | None = None
    filled = np.zeros((len(starts), clip_len), bool)
    last = max(starts) + clip_len
    with open_video(path, folder_fps=folder_fps) as src:
        for start, frames in src.iter_chunks(64):
            for j, frame in enumerate(frames):
                for i, t in need.get(start + j, ()):
                    if out is None:
                        out = np.empty((len(starts), clip_len, *frame.shape), np.uint8)
                    out[i, t] = frame
                    filled[i, t] = True
            if start + len(frames) >= last:
                break
    if out is None:
        raise VideoDecodeError(f"{path}: no frame decoded; clips at frames {starts} are past the video's end")
    for i in range(len(starts)):  # pad past the end with the last real frame
        real = np.flatnonzero(filled[i])
        if not len(real):
            raise VideoDecodeError(f"{path}: clip at frame {starts[i]} is past the video's end")
        out[i, real[-1] + 1 :] = out[i, real[-1]]
    return out


def _randint(lo: int, hi: int, gen: torch.Generator) -> int:
    """Uniform integer in ``[lo, hi]`` (both included)."""
    return lo + int(torch.randint(hi - lo + 1, (1,), generator=gen))


def stratified_clips(n: int, k: int, gen: torch.Generator) -> list[int]:
    """``k`` clip indices of ``[0, n)``, one per equal span, as the official ``random_perturb(n, k)``
    (utils/utils.py): span i starts at ``floor(i n / k)``; the index is uniform from there to the next
    span's start, both included (the last span: to ``n - 1``), or the start when that range is one value."""
    edges = [int(i * n / k) for i in range(k)]
    out = []
    for i, lo in enumerate(edges):
        hi = edges[i + 1] if i < k - 1 else n - 1
        out.append(_randint(lo, hi, gen) if hi > lo else lo)
    return out


def jitter_label(labels: np.ndarray, c: int, offset: int, clip_len: int, mode: str) -> float:
    """Label of the clip of ``clip_len`` frames starting ``offset`` frames into pseudo-labelled clip
    ``c`` (so it spans clips ``c`` and ``c + 1``); ``labels`` ``[n]`` in [0, 1]; ``mode`` as
    ``train.ft_label_interp``. Past the last clip: the last label (official Train_TemAug_Dataset_*)."""
    if c + 1 >= len(labels):
        return float(labels[min(c, len(labels) - 1)])
    a, b, p = float(labels[c]), float(labels[c + 1]), offset / clip_len
    if mode == "swapped":
        return p * a + (1 - p) * b
    if mode == "overlap":
        return (1 - p) * a + p * b
    if mode == "max":
        return max(a, b)
    raise ValueError(f"unknown label interpolation {mode!r}")


def multiscale_crop_box(h: int, w: int, size: int, gen: torch.Generator) -> tuple[int, int, int, int]:
    """``(top, left, crop_h, crop_w)`` of one random multi-scale crop of an ``h x w`` frame (official
    opencv_videovision/transforms.py ``MultiScaleCrop(size, [1.0, 0.8], max_distort=1, fix_crop=True)``):
    side lengths ``int(min(h, w) * s)`` for s in :data:`CROP_SCALES` (snapped to ``size`` within 2
    pixels), a random (height, width) pair of them at most one scale apart, placed at one of 13 fixed
    places (corners, centre, edge middles, quarter points; ``fill_fix_offset`` with more_fix_crop)."""
    sides = [int(min(h, w) * s) for s in CROP_SCALES]
    sides = [size if abs(v - size) < 3 else v for v in sides]
    pairs = [(a, b) for i, a in enumerate(sides) for j, b in enumerate(sides) if abs(i - j) <= 1]
    ch, cw = pairs[_randint(0, len(pairs) - 1, gen)]
    ws, hs = (w - cw) // 4, (h - ch) // 4
    places = [(0, 0), (4, 0), (0, 4), (4, 4), (2, 2), (0, 2), (4, 2), (2, 4), (2, 0), (1, 1), (3, 1), (1, 3), (3, 3)]
    x, y = places[_randint(0, len(places) - 1, gen)]
    return y * hs, x * ws, ch, cw


def augment_clips(frames: torch.Tensor, size: int, gen: torch.Generator, grayscale: float, augment: bool) -> torch.Tensor:
    """Spatial augmentation of resized training clips (official Train_TemAug_Dataset_*: MultiScaleCrop,
    RandomHorizontalFlip p=0.5, RandomGrayScale p=``grayscale``), each clip with its own draw.

    Args:
        frames: ``[K, 3, T, H, W]`` float32 RGB in [0, 255] (already resized to ``ft_train_size``).
        size: the backbone's crop side ``s``.
        augment: False = the centre ``s x s`` crop, nothing else.
    Returns:
        ``[K, 3, T, s, s]`` float32 in [0, 255]. The crop is resized bilinearly without antialiasing
        (as cv2.INTER_LINEAR); grayscale is ``0.299 B + 0.587 G + 0.114 R`` in all three channels, the
        official cv2 RGB2GRAY applied to the BGR frames its C3D datasets decode.
    """
    k, _, t, h, w = frames.shape
    out = frames.new_empty((k, 3, t, size, size))
    gray_w = frames.new_tensor([0.114, 0.587, 0.299]).view(3, 1, 1, 1)
    for i in range(k):
        if augment:
            top, left, ch, cw = multiscale_crop_box(h, w, size, gen)
        else:
            top, left, ch, cw = round((h - size) / 2), round((w - size) / 2), size, size  # as the extract stage's centre crop
        crop = frames[i, :, :, top : top + ch, left : left + cw].transpose(0, 1)  # [T, 3, ch, cw]
        if (ch, cw) != (size, size):
            crop = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)
        clip = crop.transpose(0, 1)
        if augment and float(torch.rand((), generator=gen)) < 0.5:
            clip = clip.flip(-1)
        if augment and grayscale > 0 and float(torch.rand((), generator=gen)) < grayscale:
            clip = (clip * gray_w).sum(0, keepdim=True).expand(3, -1, -1, -1)
        out[i] = clip
    return out


def finetune_losses(model: Any, x: torch.Tensor, y: torch.Tensor, w_anomalous: float, w_normal: float, autocast: Any,
                    lambda_guided: float = 1.0) -> dict[str, torch.Tensor]:
    """``L = L_main + lambda_guided L_guided`` (official SHT_I3D_train.py ``train_SG_epoch``: the class-
    weighted cross-entropy of the softmax class-1 probability of the main head and of the guided head
    H_g, against the clip labels ``y`` ``[N]`` in [0, 1]); ``x`` ``[N, 3, T, s, s]`` normalised clips."""
    from models.mist import class_weighted_ce

    with autocast:
        out = model(x)
    p = torch.softmax(out.logits.float(), dim=-1)[:, 1]
    pg = torch.softmax(out.guided_logits.float(), dim=-1)[:, 1]
    main = class_weighted_ce(p, y, w_anomalous, w_normal)
    guided = class_weighted_ce(pg, y, w_anomalous, w_normal)
    return {"main": main, "guided": guided, "total": main + lambda_guided * guided}


def _training_clips(ctx: Context, inputs: dict[str, StageDir]) -> list[dict[str, Any]]:
    """Every training video with pseudo-labels: id, path, video label, clip start frames and clip labels ``[T]``."""
    ext, pseudo = inputs["extract"], inputs["mist_pseudo"]
    have = set(pseudo.complete_items()) & set(ext.complete_items())
    out = []
    for v in ctx.manifest.split("train"):
        if v.id not in have:
            continue
        ranges = ext.load_meta(v.id)["clip_ranges"]
        labels = pseudo.load_item(v.id)[1]["labels"]
        if len(labels) != len(ranges):
            raise StageError(f"{v.id}: {len(labels)} pseudo-labels for {len(ranges)} clips; rerun mist_pseudo with --force")
        out.append({"id": v.id, "path": ctx.manifest.resolve(v), "label": int(v.label),
                    "starts": [int(a) for a, _ in ranges], "labels": labels.astype(np.float32)})
    if not any(v["label"] == 1 and len(v["labels"]) and v["labels"].max() > 0 for v in out):
        raise StageError("MIST stage II: no anomalous training clip has a positive pseudo-label")
    return out


def balanced_batches(abnormal: list[int], normal: list[int], per_class: int, gen: torch.Generator) -> list[list[int]]:
    """One epoch of class-balanced batches (official SHT_I3D_train.py: two shuffled DataLoaders of
    ``per_class`` videos, ``drop_last``, zipped): batch i = normal videos ``i B .. i B + B - 1`` of a
    fresh permutation, then the same slice of the anomalous ones; ``min(len // B)`` batches."""
    a = [abnormal[i] for i in torch.randperm(len(abnormal), generator=gen).tolist()]
    n = [normal[i] for i in torch.randperm(len(normal), generator=gen).tolist()]
    count = min(len(a), len(n)) // per_class
    return [n[i * per_class : (i + 1) * per_class] + a[i * per_class : (i + 1) * per_class] for i in range(count)]


def make_stage2_optimizer(model: torch.nn.Module, s: Stage2Settings) -> torch.optim.Optimizer:
    """Adam (betas 0.9, 0.999) with L2 weight decay over every parameter of E_SGA (official
    get_optimizer, ``--optim adam``; frozen parameters get no gradient, so Adam skips them); without
    ``decay_biases`` the parameters whose name lacks ``weight`` form a group without decay (ucf_c3d)."""
    if s.decay_biases:
        return torch.optim.Adam(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    named = list(model.named_parameters())
    groups = [{"params": [p for n, p in named if "weight" in n], "weight_decay": s.weight_decay},
              {"params": [p for n, p in named if "weight" not in n], "weight_decay": 0.0}]
    return torch.optim.Adam(groups, lr=s.lr)


def sample_training_batch(videos: list[dict[str, Any]], ids: list[int], s: Stage2Settings, extractor: Any,
                          clip_len: int, folder_fps: float, resize_dtype: str, device: torch.device,
                          gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The clips and labels of one batch: for each video, ``clips_per_video`` clips at
    :func:`stratified_clips` of its first ``n - 1`` clips (all ``n`` when it has one), each shifted by
    a random 0..clip_len-1 frames (temporal jitter, official ``begin``; 0 without augmentation),
    labelled by :func:`jitter_label` (normal videos 0), resized to ``train_size``, augmented
    (:func:`augment_clips`) and normalised by the extractor. Returns ``x`` ``[N, 3, T, s, s]``
    float32 and ``y`` ``[N]`` float32 on ``device``, ``N = len(ids) * clips_per_video``."""
    from extractors.sga import normalize_input
    from extractors.transforms import preprocess_clips

    xs, ys = [], []
    for i in ids:
        v = videos[i]
        n = len(v["starts"])
        picks = stratified_clips(n - 1, s.clips_per_video, gen) if n > 1 else [0] * s.clips_per_video
        offsets = [_randint(0, clip_len - 1, gen) if s.augment == "official" and n > 1 else 0 for _ in picks]
        ys += [0.0 if v["label"] == 0 else jitter_label(v["labels"], c, b, clip_len, s.label_interp)
               for c, b in zip(picks, offsets)]
        raw = decode_clips(v["path"], [v["starts"][c] + b for c, b in zip(picks, offsets)], clip_len, folder_fps)
        resized = preprocess_clips(torch.from_numpy(raw).to(device), ("fixed", *s.train_size), extractor.crop_size,
                                   "none", resize_dtype=resize_dtype)  # [K, 3, T, H, W] in [0, 255]
        xs.append(augment_clips(resized, extractor.crop_size, gen, s.grayscale, s.augment == "official"))
    x = normalize_input(torch.cat(xs), s.input_norm, extractor)
    return x, torch.tensor(ys, dtype=torch.float32, device=device)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Gradients held by ``model`` (accumulated, not yet stepped), on the CPU."""
    return {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.grad is not None}


def _restore_grads(model: torch.nn.Module, grads: dict[str, torch.Tensor]) -> None:
    for n, p in model.named_parameters():
        p.grad = grads[n].to(p.device) if n in grads else None


def finetune(ctx: Context, out: StageDir, inputs: dict[str, StageDir]) -> dict[str, Any]:
    """Stage II: fine-tune E_SGA on sampled raw clips; writes ``encoder.pt``, ``model.pt`` (the MIST
    detector scoring with E_SGA's main head) and ``train_log.csv`` (one row per batch); resumable
    from ``checkpoint.pt``.

    Schedule (official stage2training/*_train.py ``trainer`` / ``train_SG_epoch``; values per
    :func:`stage2_settings`): epoch e trains at ``lr * lr_factor(e)``; the backbone is frozen (run
    without gradients) while ``e < freeze_epochs`` and its batch-norm affine parameters while also
    ``e < freeze_bn_epochs``; its batch norms use batch statistics throughout (``bn_batch_stats``).
    An epoch is :func:`balanced_batches`; each batch's loss is backpropagated and the gradients are
    summed, the optimiser stepping (after clipping their norm at ``grad_clip``) after batch i of the
    epoch when ``i % accumulate == 0``, so gradients left at an epoch's end join the next epoch's first
    step (the official counter restarts every epoch).
    """
    from extractors.build import build_extractor
    from extractors.sga import build_esga
    from models import DETECTORS
    from models.mist import class_weights

    cfg, ext = ctx.cfg.train, ctx.cfg.extract
    if ext.import_format:
        raise StageError("MIST stage II fine-tunes the encoder on raw videos; features were imported "
                         f"(extract.import_format={ext.import_format})")
    if ext.target_fps:
        raise StageError("MIST stage II decodes clips at the video's own frame rate; unset extract.target_fps")
    if ext.encoder:
        raise StageError("extract.encoder is for other detectors; --method mist fine-tunes its own encoder")
    s = stage2_settings(cfg, ext.backbone)
    device = torch.device(resolve_device(cfg.device))
    videos = _training_clips(ctx, inputs)
    abnormal = [i for i, v in enumerate(videos) if v["label"] == 1]
    normal = [i for i, v in enumerate(videos) if v["label"] == 0]
    if min(len(abnormal), len(normal)) < s.batch_videos:
        raise StageError(f"MIST stage II batches hold {s.batch_videos} anomalous and {s.batch_videos} normal videos; "
                         f"the training set has {len(abnormal)} and {len(normal)}: lower train.ft_batch_videos")
    try:  # the videos are available: the runner made them so for extract, upstream of this stage
        extractor = build_extractor(ext, device)
        torch.manual_seed(cfg.seed)  # E_SGA's new layers start alike whatever ran before in this process
        model = build_esga(extractor, s.expand_k, s.dropout, ext.clip_len, s.bn_batch_stats, s.bn_scale).to(device)
    except (TypeError, ValueError, OSError) as e:
        raise StageError(f"train: cannot build E_SGA on {ext.backbone}: {e}") from e
    model.set_bn_momentum(s.bn_momentum)
    w_a, w_n = class_weights(s.class_weights, np.concatenate([v["labels"] for v in videos]))
    log.info("train: MIST stage II recipe %s: %d + %d videos per batch, %d clips each, %d batches per step, "
             "class weights %.3g / %.3g", s.recipe, s.batch_videos, s.batch_videos, s.clips_per_video, s.accumulate, w_a, w_n)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    optimizer = make_stage2_optimizer(model, s)
    # mixed precision on CUDA (bf16 where supported, else fp16 with a scaler), fp32 on the CPU
    amp, scaler = autocast(device, "auto"), grad_scaler(device, "auto")
    per_epoch = min(len(abnormal), len(normal)) // s.batch_videos  # batches in every epoch (balanced_batches)
    total = s.epochs * per_epoch
    rows: list[dict[str, float]] = []
    epoch_state: dict[str, Any] = {"order": None, "epoch": None}  # this epoch's batches; the epoch set up last
    start = 0
    ckpt_path = out.path / "checkpoint.pt"
    ckpt = load_checkpoint(ckpt_path, device)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        _restore_grads(model, ckpt["grads"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"], gen)
        rows, epoch_state["order"] = ckpt["log"], ckpt["order"]
        start = ckpt["step"] if "step" in ckpt else ckpt["epoch"] * per_epoch + ckpt["pos"]  # older checkpoints
        log.info("train: MIST stage II resuming at epoch %d, batch %d (%s)", start // per_epoch, start % per_epoch, ckpt_path)

    def checkpoint(done: int) -> None:
        order = epoch_state["order"] if done % per_epoch else None  # at an epoch's end the next one draws its own
        save_checkpoint(ckpt_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                    "grads": _grads(model), "scaler": scaler.state_dict() if scaler else None,
                                    "rng": rng_state(gen), "log": rows, "step": done, "order": order})
        write_log(out.path / "train_log.csv", rows)

    def step(i: int) -> dict[str, float]:
        epoch, pos = divmod(i, per_epoch)
        if epoch_state["epoch"] != epoch:  # an epoch's settings, also when resuming inside it
            for group in optimizer.param_groups:
                group["lr"] = s.lr * lr_factor(epoch, s.warmup_epochs)
            model.set_backbone_trainable(epoch >= s.freeze_epochs, epoch >= s.freeze_bn_epochs)
            model.train()
            epoch_state["epoch"] = epoch
        if pos == 0 or epoch_state["order"] is None:
            epoch_state["order"] = balanced_batches(abnormal, normal, s.batch_videos, gen)
        t0 = time.perf_counter()
        x, y = sample_training_batch(videos, epoch_state["order"][pos], s, extractor, ext.clip_len, ctx.cfg.data.folder_fps,
                                     s.resize_dtype or ext.resize_dtype, device, gen)
        stepping = pos % s.accumulate == 0
        terms = finetune_step(model, optimizer, scaler, x, y, w_a, w_n, amp, lambda_guided=s.lambda_guided,
                              step=stepping, grad_clip=s.grad_clip)
        return {"step": i + 1, "epoch": epoch, **terms, "optimizer_step": int(stepping),
                "lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - t0}

    # checkpoints every ft_checkpoint_every batches and at every epoch's end
    training_loop(step, total=total, start=start, rows=rows, checkpoint=checkpoint,
                  checkpoint_when=lambda done: done % cfg.ft_checkpoint_every == 0 or done % per_epoch == 0,
                  progress=ctx.progress, desc="mist stage II", unit="batch", hint="lower train.ft_lr?")

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    test_input = None if s.test_crops is None else {"resize": ["fixed", *s.test_size], "crops": s.test_crops}
    atomic_torch_save(out.path / "encoder.pt", {
        "backbone": ext.backbone, "expand_k": s.expand_k, "clip_len": ext.clip_len, "bn_scale": s.bn_scale,
        "feature_dim": model.feature_dim, "state_dict": state, "test_input": test_input, "recipe": s.recipe,
        "input_norm": list(s.input_norm) if s.input_norm is not None else None, "resize_dtype": s.resize_dtype,
    })
    head = DETECTORS.get("mist", feature_dim=model.feature_dim, cfg=cfg)
    head.set_head(model.head)
    write_model(out, ctx, head, head.state_dict(), len(rows))
    write_log(out.path / "train_log.csv", rows)
    return {"epochs": s.epochs, "batches": len(rows), "final_loss": rows[-1]["total"] if rows else None,
            "train_videos": len(videos), "recipe": s.recipe, "class_weights": [w_a, w_n],
            "encoder": str(out.path / "encoder.pt")}


def finetune_step(model: Any, optimizer: torch.optim.Optimizer, scaler: Any, x: torch.Tensor, y: torch.Tensor,
                  w_anomalous: float, w_normal: float, autocast: Any, *, lambda_guided: float = 1.0,
                  step: bool = True, grad_clip: float = 0.0) -> dict[str, float]:
    """Backpropagate one batch's loss (:func:`finetune_losses`), adding to the gradients already held;
    with ``step``, clip the summed gradients' norm at ``grad_clip`` (0 = no clipping), take an
    optimiser step and zero the gradients. Returns the loss terms as floats."""
    terms = finetune_losses(model, x, y, w_anomalous, w_normal, autocast, lambda_guided)
    (scaler.scale(terms["total"]) if scaler is not None else terms["total"]).backward()
    if step:
        if scaler is not None:
            scaler.unscale_(optimizer)
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {k: float(v.detach()) for k, v in terms.items()}


# ------------------------------------------------------------------------- after stage II


def fine_tuned_extractor(extract_cfg: Any, encoder_path: str | Path, device: str) -> Any:
    """The extractor of a finished stage II: ``extract_cfg.backbone`` (with its weights) wrapped in
    the fine-tuned E_SGA of ``encoder_path`` (its ``encoder.pt``; an :class:`extractors.sga.SGAExtractor`:
    ``[N, D]`` attended features per clip, attention maps kept). Used by re-extraction
    (:class:`MistExtractStage`) and by ``pipeline score`` on a MIST run or an ``extract.encoder``
    run, so a scored video is featurised as the evaluated ones were.

    Raises FileNotFoundError (no ``encoder.pt``) or ValueError (fine-tuned from another backbone).
    """
    from extractors.build import build_extractor
    from extractors.sga import SGAExtractor

    base = build_extractor(extract_cfg, device)
    return SGAExtractor(base, encoder_path)


class MistExtractStage(ExtractStage):
    """Re-extraction with the fine-tuned encoder of the train stage (``encoder.pt``): the extract
    stage's decoding and clips, the test-time input stage II recorded (``train.ft_test_input``; by
    default the official one, e.g. the whole frame at 240x320 for ShanghaiTech I3D, one "crop"),
    E_SGA's attended features, plus ``attention`` ``[T, C, h, w]`` float16 per video. Each item's
    metadata records ``crop_setting`` and ``input_resize``. Its key holds the train stage's, so the
    pretrained features stay cached. Version 2: the official test-time input."""

    name = "mist_extract"
    version = 2
    upstream = ("train",)
    optional = True

    def upstream_for(self, cfg: Any) -> tuple[str, ...]:
        """The fine-tuned encoder only (not the extract stage's own upstream, e.g. optical flow)."""
        return self.upstream

    def prepare(self, ctx: Context, out: StageDir) -> None:
        """Nothing: not the extract stage's pretrained network; :meth:`process` builds the fine-tuned
        one from the train stage's ``encoder.pt`` (an input ``prepare`` does not receive)."""

    def process(self, ctx: Context, video: Any, out: StageDir, inputs: dict[str, StageDir]) -> None:
        if self.extractor is None:
            cfg = ctx.cfg.extract
            self.extractor = fine_tuned_extractor(cfg, inputs["train"].path / "encoder.pt", resolve_device(cfg.device))
        self.extractor.attention.clear()
        feats, meta = self._extract_rgb(ctx, video)  # from the decode workers when there are some
        att = np.concatenate(self.extractor.attention).reshape(feats.shape[0], feats.shape[1], *self.extractor.attention[0].shape[-2:])
        meta["input_resize"] = list(self.extractor.resize)
        out.save_item(video.id, {"features": feats, "attention": att.astype(np.float16)}, meta)


class MistExplainStage(Stage):
    """Spatial explanation: for each video of ``train.explain``, ``overlays/<id>/clip_NNNN_frame_SSSSSS.png``
    (``SSSSSS`` the clip's first frame): the middle frame of every clip with E_SGA's attention map (of
    the whole frame with the official ShanghaiTech I3D test input, else of the centre crop) blended over
    the region it covers, a colour bar of the attention's range, and a title with the clip's frames
    and its anomaly score: the trained detector's score of the clip from the re-extracted features,
    computed as the evaluate stage does (:func:`stages.evaluate.score_units`: crops averaged).
    Version 2: colour bar and title (version 1 wrote the bare blended frame)."""

    name = "mist_explain"
    version = 2
    reads = ("train.explain",)
    manifest_columns = ("id", "path")
    upstream = ("mist_extract", "train")
    per_video = False
    optional = True

    def run_whole(self, ctx: Context, out: StageDir, inputs: dict[str, StageDir]) -> dict[str, Any]:
        from .evaluate import score_units

        ids = ctx.cfg.train.explain_ids()
        done = set(inputs["mist_extract"].complete_items())
        unknown = [i for i in ids if i not in done]
        if unknown:
            raise StageError(f"mist_explain: no re-extracted features for {', '.join(unknown)} (train.explain)")
        device = resolve_device(ctx.cfg.train.device)  # the evaluate stage's device
        model = load_detector(inputs["train"], device)
        written = 0
        videos = ctx.manifest.by_id()
        for vid in ids:
            video = videos[vid]
            meta, arrays = inputs["mist_extract"].load_item(vid)
            scores, _ = score_units(model, (meta, arrays), None, device)
            written += write_overlays(out.path / "overlays" / vid, ctx, ctx.manifest.resolve(video), meta,
                                      arrays["attention"], scores, vid)
        return {"videos": len(ids), "overlays": written}


#: colour map of the attention overlays (our choice, kept from version 1: blue low, red high)
OVERLAY_CMAP = "jet"


def overlay_image(frame: np.ndarray, attention: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """``frame`` ``[H, W, 3]`` uint8 with ``attention`` ``[h, w]`` (values in [0, 1]) resized bilinearly
    to ``box`` (left, top, right, bottom, source pixels), coloured by :data:`OVERLAY_CMAP` over [0, 1]
    and blended half and half over the box; ``[H, W, 3]`` uint8."""
    import matplotlib
    from PIL import Image

    a = np.asarray(attention, np.float32)
    heat = Image.fromarray(a, mode="F").resize((box[2] - box[0], box[3] - box[1]), Image.BILINEAR)
    rgb = (matplotlib.colormaps[OVERLAY_CMAP](np.clip(np.asarray(heat), 0, 1))[..., :3] * 255).astype(np.float32)
    img = frame.astype(np.float32)
    region = img[box[1] : box[3], box[0] : box[2]]
    img[box[1] : box[3], box[0] : box[2]] = 0.5 * region + 0.5 * rgb
    return img.clip(0, 255).astype(np.uint8)


def overlay_figure(frame: np.ndarray, attention: np.ndarray, box: tuple[int, int, int, int], score: float,
                   frames: tuple[int, int], video: str = "", clip: int | None = None, shown: int | None = None) -> Any:
    """The matplotlib figure of one overlay: :func:`overlay_image`, a colour bar over the attention's
    range [0, 1] (E_SGA's attention is a sigmoid output, :class:`extractors.sga.SelfGuidedAttention`,
    and is drawn as is, not rescaled per map; the bar's label gives this map's own min and max), and
    the title ``"<video> clip <clip>: frames <first>-<last>[ (frame <shown> shown)], score <score>"``
    with ``frames`` the clip's ``[start, end)`` and ``score`` to 3 decimals. The caller closes it
    (:func:`stages.report.fig_png` does)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    h, w = frame.shape[:2]
    scale = max(1.0, 320 / w)  # tiny frames drawn at least 320 pixels wide, so the title fits (our choice)
    fig, ax = plt.subplots(figsize=(w * scale / 100 + 1.2, h * scale / 100 + 0.6))
    ax.imshow(overlay_image(frame, attention, box), interpolation="nearest")
    ax.set_axis_off()
    a = np.asarray(attention, np.float32)
    bar = fig.colorbar(ScalarMappable(Normalize(0.0, 1.0), OVERLAY_CMAP), ax=ax, fraction=0.046, pad=0.02)
    bar.set_label(f"E_SGA attention, 0-1 (this map {a.min():.2f}-{a.max():.2f})", fontsize=7)
    bar.ax.tick_params(labelsize=7)
    where = f" (frame {shown} shown)" if shown is not None else ""
    name = " ".join(p for p in (video, f"clip {clip}" if clip is not None else "") if p)
    ax.set_title(f"{name + ': ' if name else ''}frames {frames[0]}-{frames[1] - 1}{where}, score {score:.3f}", fontsize=8)
    return fig


def write_overlays(folder: Path, ctx: Context, path: Any, meta: dict[str, Any], attention: np.ndarray,
                   scores: np.ndarray, video: str = "") -> int:
    """Write one overlay PNG per clip (see :class:`MistExplainStage`; :func:`overlay_figure`, ``scores``
    the clips' scores); returns how many."""
    from extractors import EXTRACTORS
    from extractors.transforms import crop_boxes, crop_names, resized_size

    from .report import fig_png

    cfg = ctx.cfg.extract
    cls = EXTRACTORS.get_class(cfg.backbone)
    crops = meta.get("crop_setting", cfg.crops)  # what re-extraction fed E_SGA (its metadata)
    resize = tuple(meta.get("input_resize", cls.resize))
    names = crop_names(crops, cfg.crop_order)
    crop = names.index("c") if "c" in names else 0
    n = int(meta["n_frames"])
    mids = [min(a + (b - a) // 2, n - 1) for a, b in meta["clip_ranges"]]
    ranges = [(int(a), min(int(b), n)) for a, b in meta["clip_ranges"]]  # a padded last clip: its real frames
    frames = decode_clips(path, mids, 1, ctx.cfg.data.folder_fps)[:, 0]  # [T, H, W, 3]
    h, w = frames.shape[1:3]
    rh, rw = resized_size(h, w, resize)
    if crops == "none":
        box = (0, 0, w, h)
    else:  # the centre crop's box in the resized frame, mapped back to source pixels
        s = cls.crop_size
        top, left = crop_boxes(rh, rw, s)["c"]
        box = (round(left * w / rw), round(top * h / rh), round((left + s) * w / rw), round((top + s) * h / rh))
    for i, frame in enumerate(frames):
        fig = overlay_figure(frame, attention[i, crop], box, float(scores[i]), ranges[i], video, i, mids[i])
        atomic_write_bytes(folder / f"clip_{i:04d}_frame_{ranges[i][0]:06d}.png", fig_png(fig))
    return len(frames)


def mist_stages() -> list[Stage]:
    """MIST's stages, in the order ``stages.all_stages`` places them (generator and pseudo-labels
    before train, re-extraction and overlays after it)."""
    return [MistGeneratorStage(), MistPseudoStage(), MistExtractStage(), MistExplainStage()]


#: how the train and evaluate stages run ``--method mist``: its train stage is stage II (the
#: encoder fine-tuning, which reads the raw clips' ranges and the pseudo-labels); evaluation and
#: ``pipeline score`` read the features re-extracted with the fine-tuned encoder
MIST_CHAIN = OwnTraining(
    train_inputs=("extract", "mist_pseudo"),
    run_train=finetune,
    feature_stage="mist_extract",
    eval_inputs=("mist_extract", "mist_explain", "train"),
)
