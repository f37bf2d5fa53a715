"""Train stage: fit the chosen detector on cached features, resumably.

Segment-level detectors (``training_level() == "segments"``) train on the segment stage's bags, all loaded
once into one ``[N, C, S, D]`` tensor; clip-level ones (AR-Net, CLAWS) on the extract stage's clips,
concatenated into one ``[sum T, C, D]`` :class:`~models.base.ClipBank`. Either is memory-mapped from
a file when larger than ``train.mmap_over_gb``; there are no per-step file reads. On a GPU the bank
is moved to the device when it fits (:func:`bank_on_device`). Every
``train.checkpoint_every`` steps the model, optimiser, step, RNG states and config are written
atomically to ``checkpoint.pt``; a rerun after a kill resumes from it and, with the same seed,
ends with the same weights as an uninterrupted run. Model selection never looks at the test set:
``train.selection=last`` keeps the last step, ``val`` the best step on a validation split carved
(stratified, seeded) from the training videos, scored by video-level AUC of the max segment score.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models import DETECTORS, ClipBank, FeatureBank
from stages.chains import OwnTraining
from pipeline.core.store import atomic_torch_save, verified_torch_load
from pipeline.core.errors import CorruptArtifact, StageError
from pipeline.core.runner import resolve_device
from pipeline.core.stage import Context, Stage, check_features
from pipeline.core.training import load_checkpoint, rng_state, save_checkpoint, set_rng_state, training_loop, write_log
from pipeline.core.store import StageDir

log = logging.getLogger(__name__)


def _mapped(nbytes: int, limit_gb: float) -> bool:
    """Whether a bank of ``nbytes`` is memory-mapped rather than held in RAM (``train.mmap_over_gb``)."""
    return nbytes > limit_gb * 2**30


#: most of the GPU's free memory a memory-mapped bank may take when it is copied to the GPU (the
#: rest is left to the model, its activations and the optimiser)
GPU_BANK_SHARE = 0.5
#: bytes copied from a memory-mapped bank to the GPU at a time (bounds the host memory it touches)
GPU_COPY_CHUNK_BYTES = 256 * 2**20


def bank_on_device(features: torch.Tensor, device: torch.device, limit_gb: float,
                   free_bytes: int | None = None) -> torch.Tensor:
    """Where training reads the bank from.

    A bank held in RAM (at most ``train.mmap_over_gb``) goes to the training device whole. A
    memory-mapped one stays mapped on the CPU, except on CUDA when it takes at most
    :data:`GPU_BANK_SHARE` of the device's free memory (``free_bytes``, default from
    ``torch.cuda.mem_get_info``): then it is copied to the GPU in chunks of
    :data:`GPU_COPY_CHUNK_BYTES` (never whole in host RAM), so that each step's gathers run on
    the GPU instead of reading the mapped file (UCF-Crime's one-crop clip bank, 5.4 GB, fits an
    80 GB GPU; its ten-crop one, 54 GB, stays mapped).

    Args:
        features: the bank's ``[N, ...]`` float tensor (in RAM or memory-mapped).
    Returns:
        ``features`` itself, or its copy on ``device``.
    """
    nbytes = features.numel() * features.element_size()
    if not _mapped(nbytes, limit_gb):
        return features.to(device)
    if device.type != "cuda":
        return features
    free = torch.cuda.mem_get_info(device)[0] if free_bytes is None else free_bytes
    if nbytes > GPU_BANK_SHARE * free:
        log.info("train: the %.1f GB bank stays memory-mapped (more than %.0f%% of the GPU's %.1f GB free)",
                 nbytes / 1e9, 100 * GPU_BANK_SHARE, free / 1e9)
        return features
    log.info("train: copying the %.1f GB memory-mapped bank to %s", nbytes / 1e9, device)
    return copy_in_chunks(features, device)


def copy_in_chunks(src: torch.Tensor, device: torch.device, chunk_bytes: int = GPU_COPY_CHUNK_BYTES) -> torch.Tensor:
    """``src`` copied to ``device`` a block of rows (at most ``chunk_bytes``, at least one row) at a time."""
    out = torch.empty(src.shape, dtype=src.dtype, device=device)
    row_bytes = max(1, src[:1].numel() * src.element_size())
    rows = max(1, chunk_bytes // row_bytes)
    for start in range(0, src.shape[0], rows):
        out[start : start + rows].copy_(src[start : start + rows])
    return out


def _bank_storage(shape: tuple[int, ...], limit_gb: float, folder: Path) -> np.ndarray:
    """An empty float32 array of ``shape``: in RAM, or memory-mapped from ``folder/bank.npy`` when it
    is larger than ``limit_gb`` GiB (UCF-Crime's 10-crop 2048-D clips are ~60 GB)."""
    nbytes = int(np.prod(shape)) * 4
    if not _mapped(nbytes, limit_gb):
        return np.empty(shape, np.float32)
    path = folder / "bank.npy"
    log.info("train: feature bank is %.1f GiB; memory-mapping it from %s", nbytes / 2**30, path)
    return np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)


def _split_videos(ctx: Context, src: StageDir, split: str) -> list[Any]:
    done = set(src.complete_items())
    videos = [v for v in ctx.manifest.split(split) if v.id in done]
    if not videos:
        raise StageError(f"no {split} videos have features in {src.path}")
    return videos


def _check_bank_features(arr: np.ndarray, path: Path, bank: np.ndarray | None) -> None:
    """A video's features must be finite and as wide as the bank's first video's; else a StageError
    naming the file (training on NaN or mixed features would fail later, or silently)."""
    try:
        check_features(arr, path, None if bank is None else int(bank.shape[-1]))
    except ValueError as e:
        raise StageError(f"train: {e}") from None


def load_bank(ctx: Context, seg_dir: StageDir, split: str = "train", folder: Path | None = None) -> FeatureBank:
    """Every ``split`` video's segments as one ``[N, C, S, D]`` FeatureBank, each file read once
    (videos whose segments are missing are skipped)."""
    videos = _split_videos(ctx, seg_dir, split)
    limit = getattr(ctx.cfg.train, "mmap_over_gb", 4.0)
    feats: np.ndarray | None = None
    for i, v in enumerate(videos):
        seg = seg_dir.load_item(v.id)[1]["segments"]
        _check_bank_features(seg, seg_dir.item_file(v.id, "segments"), feats)
        if feats is None:  # the first video gives the bank's shape
            feats = _bank_storage((len(videos), *seg.shape), limit, folder or seg_dir.path)
        if seg.shape != feats.shape[1:]:
            raise StageError(
                f"segment features of different shapes ({feats.shape[1:]} and {seg.shape} for {v.id}); "
                "rerun segment with --force"
            )
        feats[i] = seg
    labels = torch.tensor([v.label for v in videos])
    return FeatureBank(torch.from_numpy(feats), labels, [v.id for v in videos])


def load_clip_bank(ctx: Context, ext_dir: StageDir, split: str = "train", folder: Path | None = None) -> ClipBank:
    """Every ``split`` video's clip features ``[T_i, C, D]`` concatenated into one ClipBank, each file
    read once (the clip counts come from the metadata, so the bank is allocated before any array is read)."""
    videos = _split_videos(ctx, ext_dir, split)
    lengths = [len(ext_dir.load_meta(v.id)["clip_ranges"]) for v in videos]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    limit = getattr(ctx.cfg.train, "mmap_over_gb", 4.0)
    feats: np.ndarray | None = None
    for i, v in enumerate(videos):
        f = ext_dir.load_item(v.id)[1]["features"]
        _check_bank_features(f, ext_dir.item_file(v.id, "features"), feats)
        if feats is None:  # the first video gives the crop and feature dimensions
            feats = _bank_storage((int(offsets[-1]), *f.shape[1:]), limit, folder or ext_dir.path)
        if f.shape[1:] != feats.shape[1:] or f.shape[0] != lengths[i]:
            raise StageError(
                f"{v.id}: clip features of shape {f.shape}, expected [{lengths[i]}, {feats.shape[1]}, {feats.shape[2]}]"
            )
        feats[offsets[i] : offsets[i + 1]] = f
    labels = torch.tensor([v.label for v in videos])
    return ClipBank(torch.from_numpy(feats), torch.from_numpy(offsets), labels, [v.id for v in videos])


def split_validation(bank: FeatureBank, fraction: float, seed: int) -> tuple[FeatureBank, FeatureBank]:
    """Stratified, seeded carve of ``fraction`` of each label's videos into a validation bank."""
    gen = torch.Generator().manual_seed(seed + 7919)
    train_idx, val_idx = [], []
    for label in (0, 1):
        idx = torch.nonzero(bank.labels == label).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        k = max(1, round(fraction * idx.numel())) if idx.numel() > 1 else 0
        val_idx.append(idx[:k])
        train_idx.append(idx[k:])
    return bank.subset(torch.cat(train_idx).sort().values), bank.subset(torch.cat(val_idx).sort().values)


def video_auc(model: torch.nn.Module, bank: FeatureBank) -> float:
    """Video-level ROC AUC of each bag's max segment score (for validation; labels are video-level)."""
    from sklearn.metrics import roc_auc_score

    device = next(model.parameters()).device
    scores = [float(model.score(bank.bags(i).to(device)).max()) for i in range(len(bank.ids))]
    labels = bank.labels.numpy()
    return float(roc_auc_score(labels, scores)) if len(set(labels.tolist())) == 2 else float("nan")


class TrainStage(Stage):
    name = "train"
    version = 1
    reads = ("train",)
    manifest_columns = ("id", "split", "label")
    upstream = ("segment",)
    per_video = False

    def __init__(self, chains: dict[str, OwnTraining] | None = None) -> None:
        #: detectors that train through their own stages (``stages.all_stages`` passes MIST's)
        self.chains = chains or {}

    def upstream_for(self, cfg: Any) -> tuple[str, ...]:
        """Segment-level detectors train on the segment stage's bags, clip-level ones on extract's
        clips; a detector with its own chain (MIST) names its inputs (``stages.chains``)."""
        cls = DETECTORS.get_class(cfg.train.method)
        if imported_checkpoint(cfg.train) is not None:
            return ()  # nothing to train on: the weights come from train.checkpoint
        chain = self.chains.get(cfg.train.method)
        if chain is not None:
            return chain.train_inputs
        return ("segment",) if cls.training_level() == "segments" else ("extract",)

    def extra_inputs(self, ctx: Context) -> dict[str, Any]:
        out: dict[str, Any] = {"detector_version": DETECTORS.get_class(ctx.cfg.train.method).version}
        path = imported_checkpoint(ctx.cfg.train)
        if path is not None:
            out["checkpoint_sha256"] = checkpoint_checksum(path)
        return out

    def run_whole(self, ctx: Context, out: StageDir, inputs: dict[str, StageDir]) -> dict[str, Any]:
        if imported_checkpoint(ctx.cfg.train) is not None:
            return import_checkpoint(ctx, out)
        chain = self.chains.get(ctx.cfg.train.method)
        if chain is not None:
            return chain.run_train(ctx, out, inputs)
        return train_detector(ctx, out, inputs)


def train_detector(ctx: Context, out: StageDir, inputs: dict[str, StageDir]) -> dict[str, Any]:
    """Train ``ctx.cfg.train.method`` from the upstream features; see the module docstring."""
    cfg = ctx.cfg.train
    device = torch.device(resolve_device(cfg.device))
    bank: FeatureBank | ClipBank
    if "segment" in inputs:
        bank = load_bank(ctx, inputs["segment"], folder=out.path)
    else:
        bank = load_clip_bank(ctx, inputs["extract"], folder=out.path)
    if bank.abnormal_index.numel() == 0 or bank.normal_index.numel() == 0:
        raise StageError("training needs both anomalous (label 1) and normal (label 0) training videos")
    val = None
    if cfg.selection == "val":
        bank, val = split_validation(bank, cfg.val_fraction, cfg.seed)
    warn_small_training_set(cfg, int(bank.abnormal_index.numel()), int(bank.normal_index.numel()))
    bank.features = bank_on_device(bank.features, device, cfg.mmap_over_gb)
    feature_dim = int(bank.features.shape[-1])

    torch.manual_seed(cfg.seed)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    model = DETECTORS.get(cfg.method, feature_dim=feature_dim, cfg=cfg).to(device)
    optimizer = model.make_optimizer()
    rows: list[dict[str, float]] = []
    best: dict[str, Any] = {"step": None, "val_auc": None}
    start = 0
    ckpt_path = out.path / "checkpoint.pt"
    ckpt = load_checkpoint(ckpt_path, device)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"], gen)
        rows, best, start = ckpt["log"], ckpt["best"], ckpt["step"]
        log.info("train: resuming from step %d of %d (%s)", start, cfg.iterations, ckpt_path)
    else:
        model.setup(bank, gen)

    def checkpoint(step: int) -> None:
        save_checkpoint(ckpt_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                    "rng": rng_state(gen), "step": step, "log": rows, "best": best,
                                    "config": ctx.cfg.to_dict()})
        write_log(out.path / "train_log.csv", rows)

    def step(i: int) -> dict[str, float]:
        terms = model.train_step(bank, i, gen, optimizer, device)
        row = {"step": i + 1, **{k: float(v.detach()) for k, v in terms.items()}}
        done = i + 1
        if val is not None and np.isfinite(row["total"]) and (done % cfg.val_every == 0 or done == cfg.iterations):
            row["val_auc"] = video_auc(model, val)
            if best["val_auc"] is None or row["val_auc"] > best["val_auc"]:
                best.update(step=done, val_auc=row["val_auc"])
                atomic_torch_save(out.path / "best.pt", model.state_dict())
            model.train()
        return row

    model.train()
    training_loop(step, total=cfg.iterations, start=start, rows=rows, checkpoint=checkpoint,
                  checkpoint_when=lambda done: done % cfg.checkpoint_every == 0, progress=ctx.progress,
                  desc="train", hint="lower train.lr?")

    state = model.state_dict()
    if cfg.selection == "val" and best["step"] is not None:
        try:
            state = verified_torch_load(out.path / "best.pt", map_location=device)
        except ValueError as e:
            raise CorruptArtifact(str(e), out.path / "best.pt") from e
    write_model(out, ctx, model, state, best["step"] if cfg.selection == "val" else cfg.iterations)
    (out.path / "bank.npy").unlink(missing_ok=True)  # the memory-mapped bank, if any, is rebuilt on demand
    final = rows[-1] if rows else {}
    return {
        "iterations": cfg.iterations,
        "selection": cfg.selection,
        "selected_step": best["step"] if cfg.selection == "val" else cfg.iterations,
        "final_loss": final.get("total"),
        "train_videos": len(bank.ids),
        "val_videos": len(val.ids) if val is not None else 0,
    }


def write_model(out: StageDir, ctx: Context, model: Any, state: dict[str, torch.Tensor], selected_step: int | None) -> None:
    """Write the train stage's result ``model.pt`` atomically (what :func:`load_detector` reads):
    the detector ``model``'s method, feature width and input level, the weights ``state`` (on the
    CPU), the run's train config and the step they come from (None: imported, ``train.checkpoint``)."""
    atomic_torch_save(
        out.path / "model.pt",
        {
            "method": ctx.cfg.train.method,
            "feature_dim": int(model.feature_dim),
            "input_level": model.input_level,
            "state_dict": {k: v.cpu() for k, v in state.items()},
            "train_config": ctx.cfg.to_dict()["train"],
            "selected_step": selected_step,
        },
    )


def imported_checkpoint(train_cfg: Any) -> Path | None:
    """The file named by ``train.checkpoint`` (a detector whose config has that setting: RTFM), or
    None when it is unset and the detector is trained."""
    path = getattr(train_cfg, "checkpoint", "")
    return Path(path).expanduser() if path else None


def checkpoint_checksum(path: Path) -> str:
    """sha256 of the ``train.checkpoint`` file (it enters the train stage's cache key); a missing
    file is a StageError naming it."""
    from pipeline.core.store import sha256_file

    if not path.is_file():
        raise StageError(f"train.checkpoint: {path}: file not found")
    return sha256_file(path)


def import_checkpoint(ctx: Context, out: StageDir) -> dict[str, Any]:
    """The train stage's work when ``train.checkpoint`` is set: load that state dict (e.g. a released
    official RTFM ``.pkl``, ``torch.save(model.state_dict())``) into the detector with strict key
    and shape matching, and write it as ``model.pt`` as training would. Nothing is trained.

    Raises:
        StageError: one line naming the file: unreadable, not a state dict, or keys / shapes that
            are not the detector's (``Detector.load_official``).
    """
    cfg = ctx.cfg.train
    path = imported_checkpoint(cfg)
    assert path is not None
    digest = checkpoint_checksum(path)
    cls = DETECTORS.get_class(cfg.method)
    try:
        state = verified_torch_load(path, map_location="cpu")
    except ValueError as e:  # the message names the file
        raise StageError(f"train.checkpoint: {e}") from None
    try:
        if not isinstance(state, dict):
            raise ValueError(f"holds a {type(state).__name__}, not a state dict (torch.save(model.state_dict()))")
        model = cls(feature_dim=cls.feature_dim_of(state), cfg=cfg)
        model.load_official(state)
    except ValueError as e:
        raise StageError(f"train.checkpoint: {path}: {e}") from None
    write_model(out, ctx, model, model.state_dict(), None)
    log.info("train: %s loaded from %s (sha256 %s), not trained", cfg.method, path, digest[:12])
    return {"iterations": 0, "checkpoint": str(path), "checkpoint_sha256": digest, "feature_dim": model.feature_dim}


def warn_small_training_set(cfg: Any, n_abnormal: int, n_normal: int) -> None:
    """Say so when a batch asks for more videos of a class than the training set has: the published
    batch sizes (30-40 of each class) are for UCF-Crime and ShanghaiTech, and on a small dataset every
    batch then repeats videos (or is all of them), which changes what the loss sees (issue 19)."""
    for name, want, have in (("batch_abnormal", cfg.batch_abnormal, n_abnormal), ("batch_normal", cfg.batch_normal, n_normal)):
        if want > have:
            log.warning("train.%s=%d asks for more videos than the %d %s training videos; every batch repeats "
                        "videos or holds all of them (set train.%s=%d or fewer for a small dataset)", name, want,
                        have, "anomalous" if name == "batch_abnormal" else "normal", name, have)


def load_detector(train_dir: StageDir, device: str = "cpu") -> torch.nn.Module:
    """The trained detector saved by the train stage, in eval mode."""
    path = train_dir.path / "model.pt"
    if not path.is_file():
        raise StageError(f"{train_dir.path}: no trained detector (model.pt); run --stage train first")
    try:
        saved = verified_torch_load(path, map_location=device)
    except ValueError as e:
        raise CorruptArtifact(str(e), path) from e
    cls = DETECTORS.get_class(saved["method"])
    cfg = cls.Config()
    for k, v in saved["train_config"].items():
        if hasattr(cfg, k):
            setattr(cfg, k, tuple(v) if isinstance(getattr(cfg, k), tuple) else v)
    model = cls(feature_dim=saved["feature_dim"], cfg=cfg)
    model.load_state_dict(saved["state_dict"])
    return model.to(device).eval()
