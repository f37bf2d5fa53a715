"""MIST's stages (``models/mist.py`` describes the chain): generator, pseudo-labels, stage II
fine-tuning (the train stage of ``--method mist``), re-extraction and attention overlays.

Each is an ordinary runner stage with its own cache key, so a killed ``--method mist`` run resumes
at the step it was in: finished stages are reused, the generator and the fine-tuning continue from
their last checkpoint, re-extraction skips completed videos. The stages are ``optional``: they run
(and ``pipeline status`` lists them) only when the chosen detector's train or evaluate stage reads
them.

Stage II (:func:`finetune`) decodes the training clips it samples from the raw videos with the
extract stage's decoder (``pipeline.video.open_video``) and preprocessing
(``extractors.transforms.preprocess_clips``, the extractor's resize, centre crop and
normalisation), so that training and re-extraction see the same inputs.
"""

from __future__ import annotations

import io
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.cache import atomic_torch_save, atomic_write_bytes
from pipeline.runner import Context, Stage, StageDir, StageError, progress_bar, resolve_device

from .extract import ExtractStage, extract_video, network_input
from .train import _load_checkpoint, _rng_state, _set_rng_state, _write_log, load_detector, train_detector

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
    """Clip pseudo-labels of the training videos: ``items/<id>.{scores,labels}.npy`` (G's raw clip
    scores and the refined labels, ``[T]`` float32) and ``plots/<id>.png`` per anomalous video."""

    name = "mist_pseudo"
    reads = ("train",)
    manifest_columns = ("id", "split", "label")
    upstream = ("extract", "mist_generator")
    per_video = False
    optional = True

    def config_inputs(self, cfg: Any) -> dict[str, Any]:
        return _mist_config_inputs(self, cfg, stage2=False)

    def run_whole(self, ctx: Context, out: StageDir, inputs: dict[str, StageDir]) -> dict[str, Any]:
        from models.mist import refine_pseudo_labels

        cfg = ctx.cfg.train
        model = load_detector(inputs["mist_generator"], "cpu")
        done = set(inputs["extract"].complete_items())
        videos = [v for v in ctx.manifest.split("train") if v.id in done]
        for v in videos:
            if out.item_complete(v.id):
                continue
            feats = inputs["extract"].load_item(v.id)[1]["features"]  # [T, C, D]
            scores = model.score(torch.from_numpy(feats).float().permute(1, 0, 2)).numpy().astype(np.float32)
            if v.label == 1:
                labels = refine_pseudo_labels(scores, cfg.smooth_window, cfg.smooth_passes)
                _plot_pseudo_labels(out.path / "plots" / f"{v.id}.png", v.id, scores, labels)
            else:
                labels = np.zeros_like(scores)  # normal videos: every clip is normal (Algorithm 1)
            out.save_item(v.id, {"scores": scores, "labels": labels}, {"label": v.label, "clips": len(scores)})
        abnormal = [v for v in videos if v.label == 1]
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


def decode_clips(path: Any, starts: list[int], clip_len: int, folder_fps: float) -> np.ndarray:
    """Frames ``[start, start + clip_len)`` of ``path`` for each start, in one sequential pass.

    A clip running past the last frame repeats it (the extract stage's padding). Returns
    ``[len(starts), clip_len, H, W, 3]`` uint8 RGB. Raises VideoDecodeError for an unreadable video.
    """
    from pipeline.video import VideoDecodeError, open_video

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


def _autocast(device: torch.device) -> tuple[Any, Any]:
    """Mixed precision on CUDA (bf16 where supported, else fp16 with a gradient scaler); fp32 on the CPU."""
    if device.type != "cuda":
        import contextlib

        return contextlib.nullcontext(), None
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return torch.autocast("cuda", dtype=dtype), scaler


def finetune_losses(model: Any, x: torch.Tensor, y: torch.Tensor, w0: float, w1: float, autocast: Any) -> dict[str, torch.Tensor]:
    """L = L1 + L2 (poster, stage II): class-weighted CE of the main head (L1) and of the guided head
    H_g (L2) against the clip labels ``y`` ``[N]`` in [0, 1]; ``x`` ``[N, 3, T, s, s]`` normalised clips."""
    from models.mist import class_weighted_ce

    with autocast:
        out = model(x)
    p = torch.softmax(out.logits.float(), dim=-1)[:, 1]
    pg = torch.softmax(out.guided_logits.float(), dim=-1)[:, 1]
    l1 = class_weighted_ce(p, y, w0, w1)
    l2 = class_weighted_ce(pg, y, w0, w1)
    return {"main": l1, "guided": l2, "total": l1 + l2}


def _training_clips(ctx: Context, inputs: dict[str, StageDir]) -> list[dict[str, Any]]:
    """Every training video with pseudo-labels: id, path, clip start frames and clip labels ``[T]``."""
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
        out.append({"id": v.id, "path": ctx.manifest.resolve(v), "starts": [int(a) for a, _ in ranges],
                    "labels": labels.astype(np.float32)})
    if not any(len(v["labels"]) and v["labels"].max() > 0 for v in out):
        raise StageError("MIST stage II: no anomalous training clip has a positive pseudo-label")
    return out


def finetune(ctx: Context, out: StageDir, inputs: dict[str, StageDir]) -> dict[str, Any]:
    """Stage II: fine-tune E_SGA on sampled raw clips; writes ``encoder.pt``, ``model.pt`` (the MIST
    detector scoring with E_SGA's main head) and ``train_log.csv``; resumable from ``checkpoint.pt``.

    Schedule (PROTOCOLS.md): ``ft_epochs`` epochs; an epoch visits every training video once in a
    seeded random order, ``ft_batch_videos`` videos per step, ``ft_clips_per_video`` clips drawn per
    video (without replacement where it has enough), all of a step's clips in one batch; the
    backbone is frozen for the first ``ft_freeze_epochs`` epochs (and run without gradients), then
    fine-tuned with the rest. Adam over every parameter, lr ``ft_lr``.
    """
    from extractors import EXTRACTORS
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
    device = torch.device(resolve_device(cfg.device))
    videos = _training_clips(ctx, inputs)
    ctx.ensure_data()
    try:
        extractor = EXTRACTORS.get(ext.backbone, weights=ext.weights or None, device=str(device))
        torch.manual_seed(cfg.seed)  # E_SGA's new layers start alike whatever ran before in this process
        model = build_esga(extractor, cfg.ft_expand_k, cfg.ft_dropout, ext.clip_len).to(device)
    except (TypeError, ValueError, OSError) as e:
        raise StageError(f"train: cannot build E_SGA on {ext.backbone}: {e}") from e
    w0, w1 = class_weights(np.concatenate([v["labels"] for v in videos]), cfg.ft_class_weights)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.ft_lr)
    autocast, scaler = _autocast(device)
    steps_per_epoch = math.ceil(len(videos) / cfg.ft_batch_videos)
    rows: list[dict[str, float]] = []
    epoch, pos, order = 0, 0, None
    ckpt_path = out.path / "checkpoint.pt"
    ckpt = _load_checkpoint(ckpt_path, device)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        _set_rng_state(ckpt["rng"], gen)
        rows, epoch, pos, order = ckpt["log"], ckpt["epoch"], ckpt["pos"], ckpt["order"]
        log.info("train: MIST stage II resuming at epoch %d, step %d of %d (%s)", epoch, pos, steps_per_epoch, ckpt_path)

    def checkpoint() -> None:
        atomic_torch_save(ckpt_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                      "rng": _rng_state(gen), "log": rows, "epoch": epoch, "pos": pos,
                                      "order": order})
        _write_log(out, rows)

    def batch(ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        frames, labels = [], []
        for i in ids:
            v = videos[i]
            n, k = len(v["starts"]), cfg.ft_clips_per_video
            pick = torch.randperm(n, generator=gen)[:k] if n >= k else torch.randint(n, (k,), generator=gen)
            pick = pick.sort().values.tolist()
            frames.append(decode_clips(v["path"], [v["starts"][j] for j in pick], ext.clip_len, ctx.cfg.data.folder_fps))
            labels.append(v["labels"][pick])
        clips = torch.from_numpy(np.concatenate(frames)).to(device)
        x = network_input(extractor, clips, "center", "torchvision", ctx.cfg.extract.resize_dtype)
        return x, torch.from_numpy(np.concatenate(labels)).to(device)

    model.train()
    bar = progress_bar(range(epoch, cfg.ft_epochs), ctx.progress, desc="mist stage II", unit="epoch",
                       initial=epoch, total=cfg.ft_epochs)
    for epoch in bar:
        model.set_backbone_trainable(epoch >= cfg.ft_freeze_epochs)
        if order is None:
            order = torch.randperm(len(videos), generator=gen).tolist()
        while pos < steps_per_epoch:
            t0 = time.perf_counter()
            x, y = batch(order[pos * cfg.ft_batch_videos : (pos + 1) * cfg.ft_batch_videos])
            terms = finetune_step(model, optimizer, scaler, x, y, w0, w1, autocast)
            pos += 1
            rows.append({"step": len(rows) + 1, "epoch": epoch, **terms, "seconds": time.perf_counter() - t0})
            if not np.isfinite(terms["total"]):
                raise StageError(f"train: MIST stage II loss became {terms['total']} at epoch {epoch}; lower train.ft_lr?")
            if len(rows) % cfg.ft_checkpoint_every == 0 and pos < steps_per_epoch:
                checkpoint()
        pos, order = 0, None
        epoch += 1
        checkpoint()  # at every epoch's end: a rerun resumes at the next epoch
    epoch = cfg.ft_epochs

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_torch_save(out.path / "encoder.pt", {
        "backbone": ext.backbone, "expand_k": cfg.ft_expand_k, "clip_len": ext.clip_len,
        "feature_dim": model.feature_dim, "state_dict": state,
    })
    head = DETECTORS.get("mist", feature_dim=model.feature_dim, cfg=cfg)
    head.set_head(model.head)
    atomic_torch_save(out.path / "model.pt", {
        "method": cfg.method, "feature_dim": model.feature_dim, "input_level": head.input_level,
        "state_dict": {k: v.cpu() for k, v in head.state_dict().items()},
        "train_config": ctx.cfg.to_dict()["train"], "selected_step": len(rows),
    })
    _write_log(out, rows)
    return {"epochs": cfg.ft_epochs, "steps": len(rows), "final_loss": rows[-1]["total"] if rows else None,
            "train_videos": len(videos), "class_weights": [w0, w1], "encoder": str(out.path / "encoder.pt")}


def finetune_step(model: Any, optimizer: torch.optim.Optimizer, scaler: Any, x: torch.Tensor, y: torch.Tensor,
                  w0: float, w1: float, autocast: Any) -> dict[str, float]:
    """One optimiser step on clips ``x`` with labels ``y``; returns the loss terms as floats."""
    terms = finetune_losses(model, x, y, w0, w1, autocast)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(terms["total"]).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        terms["total"].backward()
        optimizer.step()
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
    from extractors import EXTRACTORS
    from extractors.sga import SGAExtractor

    base = EXTRACTORS.get(extract_cfg.backbone, weights=extract_cfg.weights or None, device=device)
    return SGAExtractor(base, encoder_path)


class MistExtractStage(ExtractStage):
    """Re-extraction with the fine-tuned encoder of the train stage (``encoder.pt``): the extract
    stage's path and settings, E_SGA's attended features, plus ``attention`` ``[T, C, h, w]`` float16
    per video. Its key holds the train stage's, so the pretrained features stay cached."""

    name = "mist_extract"
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
        feats, meta = extract_video(ctx, self.extractor, ctx.manifest.resolve(video))
        att = np.concatenate(self.extractor.attention).reshape(feats.shape[0], feats.shape[1], *self.extractor.attention[0].shape[-2:])
        out.save_item(video.id, {"features": feats, "attention": att.astype(np.float16)}, meta)


class MistExplainStage(Stage):
    """Spatial explanation: for each video of ``train.explain``, ``overlays/<id>/clip_NNNN.png``: the
    middle frame of every clip with E_SGA's attention map (of the centre crop, or of the whole
    frame with ``extract.crops=none``) blended over the region it covers."""

    name = "mist_explain"
    reads = ("train.explain",)
    manifest_columns = ("id", "path")
    upstream = ("mist_extract",)
    per_video = False
    optional = True

    def run_whole(self, ctx: Context, out: StageDir, inputs: dict[str, StageDir]) -> dict[str, Any]:
        ids = ctx.cfg.train.explain_ids()
        done = set(inputs["mist_extract"].complete_items())
        unknown = [i for i in ids if i not in done]
        if unknown:
            raise StageError(f"mist_explain: no re-extracted features for {', '.join(unknown)} (train.explain)")
        written = 0
        videos = ctx.manifest.by_id()
        for vid in ids:
            video = videos[vid]
            meta, arrays = inputs["mist_extract"].load_item(vid)
            written += write_overlays(out.path / "overlays" / vid, ctx, ctx.manifest.resolve(video), meta, arrays["attention"])
        return {"videos": len(ids), "overlays": written}


def write_overlays(folder: Path, ctx: Context, path: Any, meta: dict[str, Any], attention: np.ndarray) -> int:
    """Write one overlay PNG per clip (see :class:`MistExplainStage`); returns how many."""
    from PIL import Image

    from extractors import EXTRACTORS
    from extractors.transforms import _crop_boxes, crop_names, resized_size

    cfg = ctx.cfg.extract
    cls = EXTRACTORS.get_class(cfg.backbone)
    names = crop_names(cfg.crops, cfg.crop_order)
    crop = names.index("c") if "c" in names else 0
    starts = [a for a, _ in meta["clip_ranges"]]
    mids = [min(a + (b - a) // 2, meta["n_frames"] - 1) for a, b in meta["clip_ranges"]]
    frames = decode_clips(path, mids, 1, ctx.cfg.data.folder_fps)[:, 0]  # [T, H, W, 3]
    h, w = frames.shape[1:3]
    rh, rw = resized_size(h, w, cls.resize)
    if cfg.crops == "none":
        box = (0, 0, w, h)
    else:  # the centre crop's box in the resized frame, mapped back to source pixels
        s = cls.crop_size
        top, left = _crop_boxes(rh, rw, s)["c"]
        box = (round(left * w / rw), round(top * h / rh), round((left + s) * w / rw), round((top + s) * h / rh))
    import matplotlib

    jet = matplotlib.colormaps["jet"]
    for i, frame in enumerate(frames):
        a = attention[i, crop].astype(np.float32)
        heat = Image.fromarray(a, mode="F").resize((box[2] - box[0], box[3] - box[1]), Image.BILINEAR)
        rgb = (jet(np.clip(np.asarray(heat), 0, 1))[..., :3] * 255).astype(np.float32)
        img = frame.astype(np.float32)
        region = img[box[1] : box[3], box[0] : box[2]]
        img[box[1] : box[3], box[0] : box[2]] = 0.5 * region + 0.5 * rgb
        buf = io.BytesIO()
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(buf, format="PNG")
        atomic_write_bytes(folder / f"clip_{i:04d}_frame_{starts[i]:06d}.png", buf.getvalue())
    return len(frames)


def mist_stages() -> list[Stage]:
    """MIST's stages, in the order ``stages.all_stages`` places them (generator and pseudo-labels
    before train, re-extraction and overlays after it)."""
    return [MistGeneratorStage(), MistPseudoStage(), MistExtractStage(), MistExplainStage()]
