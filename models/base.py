"""What every detector implements, and the in-memory feature bank it trains from.

A detector is an ``nn.Module`` scoring each temporal unit (segment or clip) of a video in [0, 1],
plus its own loss, optimiser and batch composition. The generic loop in ``stages/train.py`` does
the rest (sampling RNG, checkpoints, resume, logging).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, ClassVar, Iterable

import numpy as np
import torch
from torch import nn

from pipeline.core.training import training_loop
from pipeline.core.config import choice, opt


@dataclass
class TrainConfig:
    """Settings every detector has; a detector's ``Config`` subclasses this with its own defaults."""

    method: ClassVar[str] = ""
    seed: int = opt(0, "seed of parameter init, dropout and batch sampling")
    iterations: int = opt(1000, "optimisation steps")
    lr: float = opt(1e-3, "learning rate")
    weight_decay: float = opt(0.0, "L2 weight decay")
    batch_abnormal: int = opt(32, "anomalous videos per batch")
    batch_normal: int = opt(32, "normal videos per batch")
    selection: str = choice(
        "last",
        ("last", "val"),
        "which checkpoint to keep: the last one, or the best on a validation split carved from the "
        "training videos (never the test set)",
    )
    val_fraction: float = opt(0.2, "share of training videos held out when selection=val")
    val_every: int = opt(100, "validate every N steps when selection=val")
    checkpoint_every: int = opt(100, "write a resumable checkpoint every N steps", key=False)
    mmap_over_gb: float = opt(
        4.0,
        "a training feature bank larger than this many GiB is memory-mapped from a file in the train "
        "stage's folder instead of being held in RAM",
        key=False,
    )
    device: str = opt("auto", "'auto', 'cpu' or 'cuda[:N]'", key=False)

    def validate(self) -> None:
        if self.iterations < 1:
            raise ValueError("iterations must be >= 1")
        if self.lr <= 0:
            raise ValueError("lr must be > 0")
        if self.batch_abnormal < 1 or self.batch_normal < 1:
            raise ValueError("batch_abnormal and batch_normal must be >= 1")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError("val_fraction must be in (0, 1)")


class _LabelledVideos:
    """Index helpers shared by the banks (each has ``labels`` ``[N]`` int64)."""

    labels: torch.Tensor

    @property
    def abnormal_index(self) -> torch.Tensor:
        """``[Na]`` int64: the anomalous videos' indices."""
        return torch.nonzero(self.labels == 1).flatten()

    @property
    def normal_index(self) -> torch.Tensor:
        """``[Nn]`` int64: the normal videos' indices."""
        return torch.nonzero(self.labels == 0).flatten()


@dataclass
class FeatureBank(_LabelledVideos):
    """All training bags of a dataset, loaded once.

    Attributes:
        features: ``[N, C, S, D]`` float32: N videos, C crops, S segments (or clips), D feature dims.
        labels: ``[N]`` int64, 1 anomalous / 0 normal.
        ids: the N video ids.
    """

    features: torch.Tensor
    labels: torch.Tensor
    ids: list[str]

    def subset(self, index: torch.Tensor) -> "FeatureBank":
        return FeatureBank(self.features[index], self.labels[index], [self.ids[int(i)] for i in index])

    def bags(self, i: int) -> torch.Tensor:
        """Video ``i``'s ``[C, S, D]`` segment bags, as :meth:`Detector.score` takes them."""
        return self.features[i]


@dataclass
class ClipBank(_LabelledVideos):
    """All training videos' clip-level features (variable length), loaded once.

    For detectors trained on clips rather than 32 segments (AR-Net, CLAWS). The clips of every video
    are concatenated along the first axis (no padding, so one long video costs no memory for the
    others); ``features`` may be backed by a memory-mapped file when the bank is large.

    Attributes:
        features: ``[sum T_i, C, D]`` float32: all videos' clips, video after video.
        offsets: ``[N + 1]`` int64: video i's clips are rows ``offsets[i]:offsets[i+1]``.
        labels: ``[N]`` int64, 1 anomalous / 0 normal.
        ids: the N video ids.
    """

    features: torch.Tensor
    offsets: torch.Tensor
    labels: torch.Tensor
    ids: list[str]

    @classmethod
    def from_videos(cls, videos: "list[np.ndarray | torch.Tensor]", labels: "list[int]", ids: "list[str]") -> "ClipBank":
        """A bank of the videos' ``[T_i, C, D]`` float32 clip features (copied into one tensor)."""
        feats = torch.cat([torch.as_tensor(v, dtype=torch.float32) for v in videos])
        offsets = torch.tensor([0] + [len(v) for v in videos], dtype=torch.int64).cumsum(0)
        return cls(feats, offsets, torch.tensor(labels), list(ids))

    @property
    def lengths(self) -> torch.Tensor:
        """``[N]`` int64: clips per video."""
        return self.offsets[1:] - self.offsets[:-1]

    def clips(self, i: int) -> torch.Tensor:
        """Video ``i``'s ``[T_i, C, D]`` clip features (a view)."""
        return self.features[int(self.offsets[i]) : int(self.offsets[i + 1])]

    def bags(self, i: int) -> torch.Tensor:
        """Video ``i``'s ``[C, T_i, D]`` clip bags, as :meth:`Detector.score` takes them."""
        return self.clips(i).permute(1, 0, 2)

    def subset(self, index: torch.Tensor) -> "ClipBank":
        parts = [self.clips(int(i)) for i in index]
        lengths = torch.tensor([0] + [p.shape[0] for p in parts], dtype=torch.int64)
        return ClipBank(torch.cat(parts), lengths.cumsum(0), self.labels[index], [self.ids[int(i)] for i in index])


def pad_clip_batch(
    bank: ClipBank, index: torch.Tensor, crops: torch.Tensor, max_len: int, gen: torch.Generator, mode: str = "uniform"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Variable-length clip sequences of the videos ``index`` (one crop each), zero-padded.

    Args:
        index: ``[B]`` video indices; crops: ``[B]`` crop index of each.
        max_len: longest sequence kept (0: no limit). A longer video is cut down to ``max_len``
            clips: ``uniform`` takes ``max_len`` evenly spaced clips with a random jitter inside each
            stride (the W-TALC / AR-Net data loaders' sampling), ``window`` a random contiguous window.
    Returns:
        ``x`` ``[B, L, D]`` float32 (zeros after each sequence's end) and ``lengths`` ``[B]`` int64,
        ``L = max(lengths)``.
    """
    seqs = []
    for i, c in zip(index.tolist(), crops.tolist()):
        x = bank.clips(i)[:, c]  # [T, D]
        t = x.shape[0]
        if max_len and t > max_len:
            if mode == "window":
                s = int(torch.randint(t - max_len + 1, (1,), generator=gen))
                x = x[s : s + max_len]
            else:
                edges = torch.linspace(0, t, max_len + 1)
                pick = (edges[:-1] + torch.rand(max_len, generator=gen) * (edges[1:] - edges[:-1])).long()
                x = x[pick.clamp_(max=t - 1)]
        seqs.append(torch.as_tensor(x, dtype=torch.float32))
    lengths = torch.tensor([s.shape[0] for s in seqs], dtype=torch.int64)
    return torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True), lengths


def length_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """``[B, max_len]`` bool, True on the first ``lengths[b]`` positions of row b."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


@dataclass
class MILBatch:
    """One training batch: ``abnormal`` ``[Ba, S, D]`` and ``normal`` ``[Bn, S, D]`` float32 bags.

    For clip-level detectors the bags are zero-padded variable-length sequences and
    ``abnormal_lengths`` / ``normal_lengths`` (``[Ba]`` / ``[Bn]`` int64) give each one's true length;
    for 32-segment bags they are None (every bag is full).
    """

    abnormal: torch.Tensor
    normal: torch.Tensor
    abnormal_lengths: torch.Tensor | None = None
    normal_lengths: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> "MILBatch":
        """The same batch (same class: detectors subclass it with extra fields) with every tensor on ``device``."""
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=True)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **moved)


@dataclass
class CropsBatch(MILBatch):
    """A :class:`MILBatch` of all crops (RTFM's and NG-MIL's composition): ``abnormal`` ``[Ba*C, S, D]``,
    ``normal`` ``[Bn*C, S, D]``.

    Video-major rows: rows ``i*C .. i*C+C-1`` are the C crops of video i.
    """

    crops: int = 1


def stack_crops(batch: MILBatch) -> tuple[torch.Tensor, int, int, int, torch.Tensor]:
    """One tensor of a (:class:`CropsBatch` or one-crop) batch's bags, anomalous first.

    Returns:
        ``x`` ``[(Va+Vn)*C, S, D]`` (video-major rows), ``va``, ``vn`` (videos), ``c`` (crops per
        video) and ``labels`` ``[Va+Vn]`` int64 on ``x``'s device (1 anomalous, 0 normal).
    """
    c = int(getattr(batch, "crops", 1))
    x = torch.cat([batch.abnormal, batch.normal])
    va, vn = batch.abnormal.shape[0] // c, batch.normal.shape[0] // c
    labels = torch.cat([torch.ones(va, dtype=torch.long), torch.zeros(vn, dtype=torch.long)]).to(x.device)
    return x, va, vn, c, labels


def all_crops_batch(
    bank: "FeatureBank", batch_abnormal: int, batch_normal: int, gen: torch.Generator,
    step: int | None = None, seed: int = 0,
) -> CropsBatch:
    """``batch_abnormal`` anomalous + ``batch_normal`` normal videos of ``bank``, each with all its crops
    (official RTFM dataset.py / model.py: every batch holds all 10 crops of each video).

    ``step`` None: each class drawn afresh from ``gen`` (:func:`draw_videos`); an int: the ``step``-th batch
    of shuffled, cycled, drop-last loaders (:func:`loader_draw`, seeded by ``seed``).
    """
    if step is None:
        a = draw_videos(bank.abnormal_index, batch_abnormal, gen)
        n = draw_videos(bank.normal_index, batch_normal, gen)
    else:
        a = loader_draw(bank.abnormal_index, batch_abnormal, step, seed, salt=1)
        n = loader_draw(bank.normal_index, batch_normal, step, seed, salt=0)
    return CropsBatch(
        abnormal=torch.as_tensor(bank.features[a]).flatten(0, 1),
        normal=torch.as_tensor(bank.features[n]).flatten(0, 1),
        crops=int(bank.features.shape[1]),
    )


def loader_draw(index: torch.Tensor, k: int, step: int, seed: int, salt: int = 0) -> torch.Tensor:
    """Batch number ``step`` (from 0) of ``k`` entries of ``index`` drawn as a PyTorch
    ``DataLoader(shuffle=True, drop_last=True)`` that is restarted whenever it runs out (official
    RTFM main.py: each class has its own such loader, re-iterated every ``len(loader)`` steps).

    Each pass ("epoch") over ``index`` is a fresh permutation, of which the ``len(index) // k`` full
    batches are used in turn and the remainder is dropped, so no video repeats within a pass. The
    permutation of pass e depends only on ``(seed, salt, e)``, never on earlier draws, so a resumed
    run draws the same batches. With fewer than ``k`` entries (where the official loader would have
    no batch at all) every batch is all of them, shuffled (from ``(seed, salt, step)``).

    Returns:
        ``[min(k, len(index))]`` distinct entries of ``index``.
    """
    n = index.numel()
    per_pass = n // k

    def seeded(*parts: int) -> torch.Generator:  # an arithmetic mix: the same in every process
        value = 0
        for part in (seed, salt, *parts):
            value = (value * 1_000_003 + part) % (2**61 - 1)
        return torch.Generator().manual_seed(value)

    if per_pass == 0:
        return index[torch.randperm(n, generator=seeded(1, step))]
    epoch, pos = divmod(step, per_pass)
    return index[torch.randperm(n, generator=seeded(0, epoch))[pos * k : (pos + 1) * k]]


def draw_videos(index: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """``k`` entries of ``index`` without replacement, or with replacement when there are fewer than ``k``."""
    n = index.numel()
    if n >= k:
        return index[torch.randperm(n, generator=gen)[:k]]
    return index[torch.randint(n, (k,), generator=gen)]


def mlp_head(in_dim: int, hidden: "tuple[int, ...] | list[int]", dropout: float) -> nn.Sequential:
    """FC ``in_dim``-hidden...-1: each hidden layer followed by ReLU and dropout, a linear output
    (RTFM's and NG-MIL's snippet classifiers; the sigmoid is the caller's). ``[..., in_dim]`` -> ``[..., 1]``."""
    sizes = [in_dim, *hidden]
    layers: list[nn.Module] = []
    for a, b in zip(sizes, sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU(), nn.Dropout(dropout)]
    layers.append(nn.Linear(sizes[-1], 1))
    return nn.Sequential(*layers)


def xavier_init_(modules: "Iterable[nn.Module]") -> None:
    """Xavier-uniform weights and zero biases (where a layer has one) for every ``nn.Linear`` /
    ``nn.Conv1d`` in ``modules``."""
    for m in modules:
        if isinstance(m, (nn.Linear, nn.Conv1d)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class Detector(nn.Module):
    """Base class of the detectors.

    Class attributes:
        Config: the detector's config dataclass (a :class:`TrainConfig` subclass).
        input_level: ``"segments"`` if it scores the fixed-length segment bags at test time (Sultani),
            ``"clips"`` if it scores every clip.
        train_level: what it trains on: ``"segments"`` (a :class:`FeatureBank` of 32-segment bags,
            from the segment stage) or ``"clips"`` (a :class:`ClipBank` of every clip, from the
            extract stage). None (the default) means the same as ``input_level``; RTFM trains on
            segments but scores clips.
        causal: True if it can score a video online, one clip at a time as the clip's frames are
            decoded (``pipeline score --online``): each unit's score depends only on that unit's
            feature (and, at most, earlier ones), never on later clips or on the whole video (as
            32-segment pooling, or temporal convolutions / attention over the whole video, do).
            Causal today: ``sultani_mil`` (its MLP scores each unit on its own; online, it scores
            each clip feature, normalised as its segments are, which approximates its offline
            segment scores).
    """

    Config: ClassVar[type[TrainConfig]] = TrainConfig
    input_level: ClassVar[str] = "segments"
    train_level: ClassVar[str | None] = None
    #: bump when a change to the detector's code changes what training produces: it enters the
    #: train stage's cache key, so old trained models are not reused for new code
    version: ClassVar[int] = 1
    causal: ClassVar[bool] = False
    #: settings for short runs on small data (the registry tests' 300-400 steps on a few dozen
    #: synthetic videos), applied over ``Config``'s defaults there. The published defaults are tuned
    #: for thousands of steps on datasets like UCF-Crime; each detector says why its entries differ.
    short_schedule: ClassVar[dict[str, object]] = {}
    #: what ``segment.scheme=auto`` (the default) resolves to for this detector: the 32-segment
    #: pooling of the authors' own code (``sultani``: Sultani et al.'s Save_C3DFeatures_32Segments.m;
    #: RTFM overrides it with ``rtfm``, its utils.py process_feat)
    segment_scheme: ClassVar[str] = "sultani"
    registry_name: ClassVar[str]

    def __init__(self, feature_dim: int, cfg: TrainConfig) -> None:
        super().__init__()
        self.feature_dim = feature_dim
        self.cfg = cfg

    @classmethod
    def training_level(cls) -> str:
        """``train_level``, or ``input_level`` when it is None."""
        return cls.train_level or cls.input_level

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Anomaly scores. ``x``: ``[B, S, D]`` float32 -> ``[B, S]`` float32 in [0, 1]."""
        raise NotImplementedError

    def losses(self, batch: MILBatch) -> dict[str, torch.Tensor]:
        """Loss terms for one batch; key ``"total"`` is what is minimised."""
        raise NotImplementedError

    def make_optimizer(self) -> torch.optim.Optimizer:
        raise NotImplementedError

    def clip_gradients(self) -> None:
        """Called after ``backward``, before the optimiser step. Opt-in: where the config has a
        ``grad_clip`` field > 0 (MIST stage I), the gradient norm of all parameters is clipped to it;
        otherwise nothing."""
        limit = float(getattr(self.cfg, "grad_clip", 0.0))
        if limit > 0:
            nn.utils.clip_grad_norm_(self.parameters(), limit)

    def train_step(self, bank: "FeatureBank | ClipBank", step: int, gen: torch.Generator,
                   optimizer: torch.optim.Optimizer, device: "torch.device | None" = None) -> dict[str, torch.Tensor]:
        """One training step, the same for the train stage and :func:`fit`: :meth:`before_step`, a
        batch (:meth:`sample_batch`, moved to ``device``), :meth:`losses`, backward,
        :meth:`clip_gradients`, one optimiser step. Returns the loss terms (with their graphs)."""
        self.before_step(bank, step, gen)
        batch = self.sample_batch(bank, gen)
        if device is not None:
            batch = batch.to(device)
        terms = self.losses(batch)
        optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        self.clip_gradients()
        optimizer.step()
        return terms

    def setup(self, bank: "FeatureBank | ClipBank", gen: torch.Generator) -> None:
        """Called once before the first step of a fresh run (not on resume, where the checkpoint
        restores the state), e.g. NG-MIL's k-means prototype initialisation. Default: nothing."""

    def before_step(self, bank: "FeatureBank | ClipBank", step: int, gen: torch.Generator) -> None:
        """Called before each step's batch is drawn (``step`` counts from 0), e.g. CLAWS's per-epoch
        k-means. State it keeps must live in buffers so that checkpoints carry it. Default: nothing."""

    def sample_batch(self, bank: "FeatureBank | ClipBank", gen: torch.Generator) -> MILBatch:
        """Default composition: ``batch_abnormal`` anomalous + ``batch_normal`` normal videos, one random crop each.

        From a :class:`ClipBank` the bags are padded clip sequences cut to ``cfg.max_clips`` (if the
        config has one) by :func:`pad_clip_batch`.
        """
        a = draw_videos(bank.abnormal_index, self.cfg.batch_abnormal, gen)
        n = draw_videos(bank.normal_index, self.cfg.batch_normal, gen)
        crops = bank.features.shape[1]
        ca = torch.randint(crops, (a.numel(),), generator=gen)
        cn = torch.randint(crops, (n.numel(),), generator=gen)
        if isinstance(bank, ClipBank):
            max_len = int(getattr(self.cfg, "max_clips", 0))
            xa, la = pad_clip_batch(bank, a, ca, max_len, gen)
            xn, ln = pad_clip_batch(bank, n, cn, max_len, gen)
            return MILBatch(xa, xn, la, ln)
        return MILBatch(abnormal=torch.as_tensor(bank.features[a, ca]), normal=torch.as_tensor(bank.features[n, cn]))

    @torch.no_grad()
    def score(self, bags: torch.Tensor) -> torch.Tensor:
        """Test-time scores averaged over crops, as the authors' test code does.

        RTFM ``test_10crop.py`` and Roc-Ng/XDVioDet ``test.py`` (``test``) take the mean over the crops.

        ``bags``: ``[C, S, D]`` float32 -> ``[S]`` float32 in [0, 1].
        """
        was_training = self.training
        self.eval()
        out = self.forward(bags).mean(0)
        self.train(was_training)
        return out


def fit(
    model: Detector,
    bank: FeatureBank | ClipBank,
    iterations: int,
    gen: torch.Generator,
    on_step: Callable[[int, dict[str, torch.Tensor]], None] | None = None,
) -> Detector:
    """Train ``model`` in memory for ``iterations`` steps (no checkpoints) and return it in eval mode.

    The train stage's loop (:func:`pipeline.core.training.training_loop` over
    :meth:`Detector.train_step`) without checkpoints, for tests and benchmarks that need no
    resumability. ``on_step(step, terms)``, if given, sees each step's detached loss terms after
    its update.
    """
    opt = model.make_optimizer()
    model.setup(bank, gen)
    model.train()

    def step(i: int) -> dict[str, float]:
        terms = {k: v.detach() for k, v in model.train_step(bank, i, gen, opt).items()}
        if on_step is not None:
            on_step(i, terms)
        return {k: float(v) for k, v in terms.items()}

    training_loop(step, total=iterations, desc="fit")
    return model.eval()
