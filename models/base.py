"""What every detector implements, and the in-memory feature bank it trains from.

A detector is an ``nn.Module`` scoring each temporal unit (segment or clip) of a video in [0, 1],
plus its own loss, optimiser and batch composition. The generic loop in ``stages/train.py`` does
the rest (sampling RNG, checkpoints, resume, logging).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from pipeline.config import choice, opt


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


@dataclass
class FeatureBank:
    """All training bags of a dataset, loaded once.

    Attributes:
        features: ``[N, C, S, D]`` float32: N videos, C crops, S segments (or clips), D feature dims.
        labels: ``[N]`` int64, 1 anomalous / 0 normal.
        ids: the N video ids.
    """

    features: torch.Tensor
    labels: torch.Tensor
    ids: list[str]

    @property
    def abnormal_index(self) -> torch.Tensor:
        return torch.nonzero(self.labels == 1).flatten()

    @property
    def normal_index(self) -> torch.Tensor:
        return torch.nonzero(self.labels == 0).flatten()

    def subset(self, index: torch.Tensor) -> "FeatureBank":
        return FeatureBank(self.features[index], self.labels[index], [self.ids[int(i)] for i in index])


@dataclass
class MILBatch:
    """One training batch: ``abnormal`` ``[Ba, S, D]`` and ``normal`` ``[Bn, S, D]`` float32 bags."""

    abnormal: torch.Tensor
    normal: torch.Tensor


def _draw(index: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """``k`` entries of ``index`` without replacement, or with replacement when there are fewer than ``k``."""
    n = index.numel()
    if n >= k:
        return index[torch.randperm(n, generator=gen)[:k]]
    return index[torch.randint(n, (k,), generator=gen)]


class Detector(nn.Module):
    """Base class of the detectors.

    Class attributes:
        Config: the detector's config dataclass (a :class:`TrainConfig` subclass).
        input_level: ``"segments"`` if it scores the fixed-length segment bags at test time (Sultani),
            ``"clips"`` if it scores every clip.
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
    #: bump when a change to the detector's code changes what training produces: it enters the
    #: train stage's cache key, so old trained models are not reused for new code
    version: ClassVar[int] = 1
    causal: ClassVar[bool] = False
    registry_name: ClassVar[str]

    def __init__(self, feature_dim: int, cfg: TrainConfig) -> None:
        super().__init__()
        self.feature_dim = feature_dim
        self.cfg = cfg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Anomaly scores. ``x``: ``[B, S, D]`` float32 -> ``[B, S]`` float32 in [0, 1]."""
        raise NotImplementedError

    def losses(self, batch: MILBatch) -> dict[str, torch.Tensor]:
        """Loss terms for one batch; key ``"total"`` is what is minimised."""
        raise NotImplementedError

    def make_optimizer(self) -> torch.optim.Optimizer:
        raise NotImplementedError

    def sample_batch(self, bank: FeatureBank, gen: torch.Generator) -> MILBatch:
        """Default composition: ``batch_abnormal`` anomalous + ``batch_normal`` normal videos, one random crop each."""
        a = _draw(bank.abnormal_index, self.cfg.batch_abnormal, gen)
        n = _draw(bank.normal_index, self.cfg.batch_normal, gen)
        crops = bank.features.shape[1]
        ca = torch.randint(crops, (a.numel(),), generator=gen)
        cn = torch.randint(crops, (n.numel(),), generator=gen)
        return MILBatch(abnormal=bank.features[a, ca], normal=bank.features[n, cn])

    @torch.no_grad()
    def score(self, bags: torch.Tensor) -> torch.Tensor:
        """Test-time scores averaged over crops, as the authors do (PROTOCOLS.md, 'Evaluation').

        ``bags``: ``[C, S, D]`` float32 -> ``[S]`` float32 in [0, 1].
        """
        was_training = self.training
        self.eval()
        out = self.forward(bags).mean(0)
        self.train(was_training)
        return out
