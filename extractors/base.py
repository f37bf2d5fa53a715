"""The interface every clip feature extractor implements.

The extract stage does the decoding, resizing and cropping (``extractors.transforms``); an extractor
only says how big its input is, how to scale pixel values, and how to turn a batch of clips into
feature vectors.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import torch


class ClipExtractor(ABC):
    """A network mapping 16-frame clips to one feature vector each.

    Class attributes a subclass sets:
        feature_dim: D, length of the output vector.
        clip_len: frames per clip (16 for every published WS-VAD feature).
        crop_size: side of the square crop fed to the network (224 for I3D, 112 for C3D).
        resize: ``("short", s)`` resizes the short side to ``s`` keeping the aspect ratio;
            ``("fixed", h, w)`` resizes to exactly ``h x w`` (C3D's 128x171).
    """

    feature_dim: int
    clip_len: int = 16
    crop_size: int = 224
    resize: tuple = ("short", 256)
    registry_name: str
    #: where the default weights come from (an ``extractors.weights.WeightSpec``)
    weights_spec: ClassVar[Any] = None
    #: True when :meth:`normalize` is pointwise (each output value depends only on its own pixel's
    #: channel values, e.g. a per-channel scale, mean and std): the extract stage then normalises each
    #: resized frame once, before the crops are cut (the same values, fewer operations). Set False
    #: for anything else; the stage then normalises the cropped clips.
    pointwise_normalize: ClassVar[bool] = True

    @classmethod
    def expected_checksum(cls, weights: str | None = None) -> str:
        """sha256 of the weights a run will use, without loading them: the spec's checksum, or the
        local override file's (an override identical to the spec's archive counts as the spec)."""
        if weights:
            from pipeline.core.store import sha256_file

            path = Path(weights).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"{path}: weights file not found (extract.weights)")
            digest = sha256_file(path)
            spec = cls.weights_spec
            if spec is not None and digest == getattr(spec, "archive_sha256", None):
                return spec.sha256
            return digest
        if cls.weights_spec is None:
            raise NotImplementedError(f"{cls.__name__} has no default weights; set extract.weights")
        if cls.weights_spec.sha256 is None:
            # no published sha256 (ResNet-50 I3D, C3D): the download pinned on first use keys the
            # cache, so default weights not yet downloaded are fetched now (may raise StageError)
            from extractors.weights import WeightsError, default_weights_sha256
            from pipeline.core.errors import StageError

            try:
                return default_weights_sha256(cls.weights_spec)
            except WeightsError as exc:  # called before the runner's error handling: one line, not a traceback
                raise StageError(f"extract: {exc}") from exc
        return cls.weights_spec.sha256

    @classmethod
    def config_options(cls, extract_cfg: Any) -> dict[str, Any]:
        """Keyword arguments of the constructor, beyond ``weights`` and ``device``, that the run's
        ``extract`` settings give this extractor (e.g. C3D's mean); the default has none."""
        return {}

    @classmethod
    def key_inputs(cls, extract_cfg: Any) -> dict[str, Any]:
        """What those options contribute to the extract stage's cache key (e.g. a file's sha256), without
        building the network; the default contributes nothing."""
        return {}

    def __init__(self, weights: str | None = None, device: str = "cpu") -> None:
        self.weights_override = weights
        self.device = torch.device(device)

    def set_memory_format(self, memory_format: torch.memory_format) -> None:
        """Lay the network's weights out in ``memory_format`` (the extract stage passes
        ``torch.channels_last_3d`` on CUDA and feeds clips in the same layout).

        The default converts ``self.model`` when it is an ``nn.Module`` (only its 5-D conv weights
        change layout) and otherwise does nothing; override it for networks stored elsewhere.
        """
        model = getattr(self, "model", None)
        if isinstance(model, torch.nn.Module):
            model.to(memory_format=memory_format)

    @property
    @abstractmethod
    def weights_checksum(self) -> str:
        """sha256 of the weights in use; part of the extract stage's cache key."""

    @abstractmethod
    def normalize(self, clips: torch.Tensor) -> torch.Tensor:
        """Scale pixel values for the network.

        Args:
            clips: ``[N, 3, T, H, W]`` float32 with values in [0, 255], RGB order.
        Returns:
            ``[N, 3, T, H, W]`` float32 in the network's input range.
        """

    def normalize_(self, clips: torch.Tensor) -> torch.Tensor:
        """:meth:`normalize` written into ``clips`` (float32, any strides), which it returns.

        The extract stage normalises the float frames it owns in place, so that no temporaries are
        allocated per batch (each fresh temporary of a few tens of MB costs its page faults on the
        CPU). This default computes :meth:`normalize` and copies it back; subclasses override it
        with the same operations done in place, which give the same values bit for bit.
        """
        return clips.copy_(self.normalize(clips))

    @abstractmethod
    def features(self, clips: torch.Tensor) -> torch.Tensor:
        """Clip features.

        Args:
            clips: ``[N, 3, T, H, W]`` float32, output of :meth:`normalize`, on ``self.device``.
        Returns:
            ``[N, feature_dim]`` float32.
        """
