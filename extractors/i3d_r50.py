"""ResNet-50 I3D (pytorchvideo's ``i3d_r50``, Kinetics-400): one 2048-D feature per 16-frame clip.

Network: the ResNet-50 I3D of pytorchvideo 0.1.5, built with its own hub builder
(``pytorchvideo.models.hub.resnet.i3d_r50(pretrained=False)``, i.e. ``pytorchvideo.models.resnet.create_resnet``
with a 5x7x7 stem, a 2x1x1 temporal max-pool after res2 and inflated 3x1x1 ``conv_a`` kernels in some
blocks), so that the
checkpoint below loads strictly. Input ``[N, 3, T, H, W]``; for a 16x224x224 clip res5 is ``[N, 2048, 8, 7, 7]``.

Weights: pytorchvideo's model-zoo checkpoint ``I3D_8x8_R50.pyth`` (Kinetics-400, 8 frames at stride 8,
top-1 73.27 %), at the URL pytorchvideo's hub uses (``checkpoint_paths["i3d_r50"]`` in
``pytorchvideo/models/hub/resnet.py``). It is a ``torch.save``'d dict whose ``"model_state"`` is the state
dict. Facebook publishes no checksum for it, so ``sha256`` is ``None``: the first download is pinned (trust
on first use, see :mod:`extractors.weights`). ``extract.weights`` may name a local file holding either that
checkpoint layout or a bare state dict; such a file is not checked against any published value (there is
none), its layout is checked strictly when it is loaded, and its own sha256 enters the cache key.
Checkpoints are read with ``torch.load(weights_only=True)``, which cannot run code.

Feature (:func:`i3d_r50_features`): the input of the classification projection. The head is
``AvgPool3d(kernel (4, 7, 7), stride 1)`` -> dropout -> ``Linear(2048, 400)`` -> global average; the
feature is the head's pooling output globally averaged with the head's own ``output_pool``, with the
projection (and dropout, an identity in eval mode) left out. Since the projection is linear,
``proj(feature)`` equals the model's logits. For a 16-frame clip the 4-step pooling window over the 8 res5
time steps weights them 1, 2, 3, 4, 4, 3, 2, 1 (/20) rather than uniformly; for 224x224 crops the 7x7
spatial map is averaged uniformly.

Preprocessing (RTFM issue 21, the author's feature extraction set-up): short side resized to 256, 224x224
crops (10-crop by default, done by the extract stage), RGB pixel values in [0, 255] normalised with mean
114.75 and std 57.375 for every channel. These are pytorchvideo's own Kinetics values times 255 (mean 0.45,
std 0.225 on [0, 1]: the defaults of ``pytorchvideo.transforms.create_video_transform``), so the network
sees the input range it was trained on; channel order RGB, as pytorchvideo decodes (PyAV).

Difference from RTFM's published features: RTFM issue 33 names Tushar-N/pytorch-resnet3d as their ResNet-50 I3D,
whose weights are facebookresearch/video-nonlocal-net's ``i3d_baseline_32x2_IN_pretrain_400k`` (Caffe2,
ImageNet-inflated, 32 frames at stride 2; converted by that repository's ``utils/convert_weights.py``).
pytorchvideo's ``i3d_r50`` is the closest builder available here (same depth, same 2048-D res5 output, same
normalisation), but it is a different training run with different inflation choices and frame sampling,
so its features are *not* interchangeable with RTFM's ``[T, 10, 2048]`` files: train and test on features
from the same extractor.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from extractors.registry import EXTRACTORS
from extractors.base import ClipExtractor
from extractors.weights import (
    WeightsError,
    WeightSpec,
    fetch_pinned_weights,
)

logger = logging.getLogger(__name__)

#: pytorchvideo 0.1.5, ``pytorchvideo/models/hub/resnet.py``: ``checkpoint_paths["i3d_r50"]``.
I3D_R50_URL = "https://dl.fbaipublicfiles.com/pytorchvideo/model_zoo/kinetics/I3D_8x8_R50.pyth"

I3D_R50_K400 = WeightSpec(
    name="ResNet-50 I3D Kinetics-400 (pytorchvideo i3d_r50, I3D_8x8_R50.pyth)",
    url=I3D_R50_URL,
    sha256=None,  # not published by pytorchvideo: pinned on first download (extractors.weights)
    filename="I3D_8x8_R50.pyth",
)

#: RTFM's normalisation mean, for pixel values in [0, 255] (RTFM issue 21: mean 114.75 per channel).
RTFM_MEAN = 114.75
#: RTFM's normalisation std, for pixel values in [0, 255] (RTFM issue 21: std 57.375 per channel).
RTFM_STD = 57.375

#: Feature length: res5 channels of ResNet-50.
R50_FEATURE_DIM = 2048


# --------------------------------------------------------------------------------------------------
# Checkpoint reading, shared with extractors.c3d


def read_state_dict(
    path: str | Path, what: str, containers: tuple[str, ...] = ("model_state", "state_dict")
) -> dict[str, torch.Tensor]:
    """Read a state dict saved with ``torch.save``, safely (``weights_only=True``: no code runs).

    Args:
        path: the file.
        what: the network's name, for messages.
        containers: keys under which a checkpoint dict may hold the state dict (pytorchvideo and
            PySlowFast use ``"model_state"``); a file that is itself a state dict is used as is.
    Returns:
        ``{name: tensor}`` on the CPU; a ``module.`` prefix (``DataParallel``) present on every key is removed.
    Raises:
        WeightsError: naming ``path``, for an unreadable file or a content that is not a state dict.
    """
    path = Path(path)
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ... on bad files
        raise WeightsError(
            f"{path} is not a readable {what} checkpoint ({type(exc).__name__}: {str(exc).strip()[:300]}); "
            "expected a file written by torch.save holding a state dict, or a dict with it under "
            + " or ".join(repr(c) for c in containers)
        ) from exc
    if isinstance(obj, Mapping):
        for key in containers:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(f"{path} holds a {type(obj).__name__}, not a {what} state dict")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(
            f"{path} is not a {what} state dict: {len(bad)} entries are not named tensors "
            f"(e.g. {', '.join(bad[:5])})"
        )
    state = dict(obj)
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_state_dict_checked(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    path: str | Path,
    what: str,
    optional_suffixes: tuple[str, ...] = ("num_batches_tracked",),
) -> None:
    """Load ``state`` into ``model`` strictly, with one readable error listing every mismatch.

    Every parameter and buffer of ``model`` must be in ``state`` with the same shape (except buffers
    whose name ends with one of ``optional_suffixes``, which keep the model's values), and ``state`` must
    hold nothing else. Values are cast to the model's dtypes.

    Raises:
        WeightsError: naming ``path``: missing, unexpected or mis-shaped tensors (up to 8 of each listed).
    """
    targets = model.state_dict()
    missing = [k for k in targets if k not in state and not k.endswith(optional_suffixes)]
    unexpected = [k for k in state if k not in targets]
    shapes = [
        f"{k}: file {tuple(state[k].shape)}, model {tuple(targets[k].shape)}"
        for k in targets
        if k in state and tuple(state[k].shape) != tuple(targets[k].shape)
    ]
    problems: list[str] = []
    for label, items in (("missing from the file", missing), ("not in the model", unexpected), ("wrong shape", shapes)):
        if items:
            more = f" (and {len(items) - 8} more)" if len(items) > 8 else ""
            problems.append(f"{len(items)} tensors {label}: {', '.join(items[:8])}{more}")
    if problems:
        raise WeightsError(f"{path} does not hold {what} weights:\n  " + "\n  ".join(problems))
    full = {k: (state[k] if k in state else v) for k, v in targets.items()}
    model.load_state_dict(full, strict=True)


# --------------------------------------------------------------------------------------------------
# Network


def build_i3d_r50(num_classes: int = 400) -> nn.Module:
    """pytorchvideo's ResNet-50 I3D, randomly initialised, in eval mode (the hub builder, ``pretrained=False``).

    pytorchvideo is imported here, not at module import, since it takes seconds to import (and warns
    about ``torch.jit.script``, silenced here).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        from pytorchvideo.models.hub.resnet import i3d_r50

        model = i3d_r50(pretrained=False, model_num_class=num_classes)
    return model.eval()


def i3d_r50_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The 2048-D input of the classification projection (see the module docstring).

    Args:
        model: a network from :func:`build_i3d_r50` (``model.blocks[-1]`` is its ``ResNetBasicHead``).
        x: ``[N, 3, T, H, W]`` float32, RGB normalised with :data:`RTFM_MEAN` / :data:`RTFM_STD`;
            T >= 8 and H, W >= 193 (the head pools 4x7x7 res5 windows); 16x224x224 for WS-VAD clips.
    Returns:
        ``[N, 2048]`` float32, non-negative (res5 is after a ReLU); ``head.proj`` of it gives the logits.
    """
    channels = model.blocks[0].conv.in_channels  # 3 (RGB), 2 for the flow stream (extractors.flow)
    if x.dim() != 5 or x.shape[1] != channels:
        raise ValueError(f"ResNet-50 I3D expects [N, {channels}, T, H, W] clips, got shape {tuple(x.shape)}")
    *trunk, head = model.blocks
    for block in trunk:
        x = block(x)
    kernel = tuple(head.pool.kernel_size)
    if any(s < k for s, k in zip(x.shape[2:], kernel, strict=True)):
        raise ValueError(
            f"the clip is too small for the ResNet-50 I3D head: res5 map {tuple(x.shape[2:])} is smaller "
            f"than its {kernel} pooling window (needs T >= 8 frames and H, W >= 193 pixels)"
        )
    x = head.pool(x)  # [N, 2048, T'-3, H'-6, W'-6]
    return head.output_pool(x).flatten(1)  # [N, 2048]


def load_i3d_r50(path: str | Path) -> nn.Module:
    """A :func:`build_i3d_r50` network filled from ``path`` (pytorchvideo checkpoint or bare state dict)."""
    model = build_i3d_r50()
    state = read_state_dict(path, "ResNet-50 I3D (pytorchvideo i3d_r50)")
    load_state_dict_checked(model, state, path, "ResNet-50 I3D (pytorchvideo i3d_r50)")
    logger.info("loaded ResNet-50 I3D weights from %s (%d tensors)", path, len(state))
    return model.eval()


# --------------------------------------------------------------------------------------------------
# Registered extractor


@EXTRACTORS.register("resnet50_i3d")
class ResNet50I3dExtractor(ClipExtractor):
    """ResNet-50 I3D (pytorchvideo ``i3d_r50``, Kinetics-400): one 2048-D feature per 16-frame clip.

    Preprocessing (done by the extract stage): short side resized to 256, 224x224 crops, RGB; pixel
    values normalised by :meth:`normalize` as RTFM did (RTFM issue 21).

    Args:
        weights: optional local file (``--set extract.weights=PATH``): the pytorchvideo checkpoint
            (``{"model_state": ...}``) or a bare state dict; without it the default weights are fetched
            into the user cache and pinned on first download.
        device: torch device for the network.
    """

    feature_dim = R50_FEATURE_DIM
    clip_len = 16
    crop_size = 224
    resize = ("short", 256)
    weights_spec = I3D_R50_K400

    def __init__(self, weights: str | None = None, device: str = "cpu") -> None:
        super().__init__(weights=weights, device=device)
        path, self._checksum = fetch_pinned_weights(self.weights_spec, local_path=weights)
        self.model = load_i3d_r50(path).to(self.device)

    @property
    def weights_checksum(self) -> str:
        """sha256 of the weights file loaded (the local file, or the pinned default download)."""
        return self._checksum

    def normalize(self, clips: torch.Tensor) -> torch.Tensor:
        """``[N, 3, T, H, W]`` RGB in [0, 255] -> float32 ``(x - 114.75) / 57.375``, about [-2, 2.44]."""
        return (clips.to(torch.float32) - RTFM_MEAN) / RTFM_STD

    def normalize_(self, clips: torch.Tensor) -> torch.Tensor:
        """:meth:`normalize` in place on float32 ``clips``."""
        return clips.sub_(RTFM_MEAN).div_(RTFM_STD)

    def features(self, clips: torch.Tensor) -> torch.Tensor:
        """``[N, 3, 16, 224, 224]`` float32 from :meth:`normalize` -> ``[N, 2048]`` float32, non-negative."""
        with torch.inference_mode():
            return i3d_r50_features(self.model, clips.to(self.device, torch.float32)).float()
