"""RTFM's ResNet-50 I3D: one 2048-D feature per 16-frame clip, as RTFM's published features were made.

RTFM issue 33 names Tushar-N/pytorch-resnet3d as their extractor: ``I3Res50`` (``models/resnet.py``,
no non-local blocks) loaded with facebookresearch/video-nonlocal-net's Caffe2 weights
``i3d_baseline_32x2_IN_pretrain_400k.pkl`` (ImageNet-inflated ResNet-50 I3D trained on Kinetics-400 with
32-frame clips at stride 2; README "Main Results", 73.6 % top-1), renamed blob by blob by that repository's
``utils/convert_weights.py``. The network here is built from pytorchvideo 0.1.5 blocks
(``pytorchvideo.models.stem.create_res_basic_stem``, ``pytorchvideo.models.resnet.create_res_stage``,
``pytorchvideo.models.head.create_res_basic_head``) with I3Res50's settings.

Checked against Tushar-N's ``models/resnet.py`` (``I3Res50``, ``Bottleneck``) and video-nonlocal-net's
``lib/models/resnet_video_org.py`` (``obtain_arc(2)``, the 32-frame I3D that produced the weights), compared
with pytorchvideo's own ``i3d_r50`` (:mod:`extractors.i3d_r50`):

- the same: bottleneck blocks of depths 3, 4, 6, 3; the temporal kernel on ``conv_a`` (Tushar-N ``conv1``,
  Caffe2 ``branch2a``), ``temp_conv`` 1 -> 3x1x1, 0 -> 1x1x1: res2 3,3,3; res3 3,1,3,1; res4 3,1,3,1,3,1;
  res5 1,3,1; all temporal strides 1 inside the stages; the spatial stride 2 of res3-res5 on ``conv_b``
  (the 1x3x3 conv; Tushar-N ``conv2``, Caffe2 ``branch2b``) of each stage's first block, and on its 1x1x1
  shortcut conv (stride (1, 2, 2); res2's shortcut has stride 1 and exists because 64 != 256 channels); a
  2x1x1 temporal max-pool (stride 2, no padding) after res2; BatchNorm eps 1e-5 (torch's default, which
  Tushar-N's ``nn.BatchNorm3d`` uses; Caffe2 trained with ``BN_EPSILON`` 1.0000001e-5, a difference of
  1e-12 in the variance); bias-free convolutions; ReLU after each BN except the block's last, ReLU after
  the residual sum;
- different, as Tushar-N's ``I3Res50`` has it: stem conv 5x7x7 with stride (2, 2, 2) and padding (2, 3, 3)
  (pytorchvideo: stride (1, 2, 2)); stem max-pool kernel (2, 3, 3), stride (2, 2, 2), **no** padding
  (pytorchvideo: kernel (1, 3, 3), padding (0, 1, 1)); head = plain mean over res5's T, H, W
  (``AdaptiveAvgPool3d(1)``; pytorchvideo: ``AvgPool3d((4, 7, 7), stride 1)`` then a global mean).
  No other difference was found.

For a 16x224x224 clip: stem conv ``[N, 64, 8, 112, 112]``, stem pool ``[N, 64, 4, 55, 55]``, res2
``[N, 256, 4, 55, 55]``, pool ``[N, 256, 2, 55, 55]``, res3 ``[N, 512, 2, 28, 28]``, res4
``[N, 1024, 2, 14, 14]``, res5 ``[N, 2048, 2, 7, 7]``.

Feature (:func:`rtfm_i3d_features`): res5 (after its last ReLU) averaged over T, H and W: ``[N, 2048]``
float32, the input of the classifier (Tushar-N ``avgpool`` output; RTFM's ``[T, 10, 2048]`` files hold one
per clip and crop). The classifier ``Linear(2048, 400)`` (Caffe2 ``pred``, Tushar-N ``fc``) is kept in the
network, so that every tensor of a weights file is accounted for and checked, and ``model(x)`` gives the
Kinetics-400 logits for sanity checks; the feature does not use it.

Preprocessing (RTFM issue 21): short side resized to 256, 224x224 crops (10-crop, done by the extract
stage), RGB in [0, 255], normalised with mean 114.75 and std 57.375 for every channel
(:data:`extractors.i3d_r50.RTFM_MEAN`, :data:`~extractors.i3d_r50.RTFM_STD`).

Weights:

- default: ``i3d_baseline_32x2_IN_pretrain_400k.pkl`` at the URL of video-nonlocal-net's README
  (:data:`RTFM_I3D_URL`), released under **CC-BY-NC 4.0** (non-commercial; README "License"). No sha256 is
  published, so the first download is pinned (trust on first use, :mod:`extractors.weights`). The file is a
  Python 2 pickle of ``{"blobs": {name: numpy array}}`` written by Caffe2's ``save_model_params``
  (``lib/utils/checkpoints.py``): the model blobs, one ``<param>_momentum`` per trainable parameter, ``lr``
  and ``model_iter``. It is read with :class:`extractors.i3d_inception.RestrictedUnpickler` (numpy arrays
  only, no other class, so no code runs; ``encoding="latin1"`` for Python 2 byte strings). The
  ``*_momentum`` blobs (dropped by ``convert_weights.py`` too), ``lr`` and ``model_iter`` are dropped; every
  other blob must be one of the 267 of :func:`rtfm_weight_names`, with its exact shape. Caffe2's BN blobs
  ``_s``, ``_b``, ``_rm``, ``_riv`` are the scale, shift, running mean and running **variance** (despite
  the name: video-nonlocal-net ``lib/utils/bn_helper.py`` says "riv is actually running var", and
  ``convert_weights.py`` copies it to ``running_var`` unchanged); they are used as they are.
- ``extract.weights=PATH``: Tushar-N's converted ``i3d_r50_kinetics.pth`` (a ``torch.save``'d state dict
  under ``I3Res50``'s names ``conv1``, ``bn1``, ``layer1``-``layer4``, ``fc``; read with
  ``torch.load(weights_only=True)``), or a Caffe2 ``.pkl`` as above. The format is told by the content (a
  zip archive or a pickle starting with torch's legacy magic number is a torch file; a pickled dict is a
  Caffe2 file), not the extension. Loading is strict in both layouts: missing, unexpected and mis-shaped
  tensors are listed, by the file's own names, in one :class:`~extractors.weights.WeightsError`. The
  file's sha256 enters the cache key.
"""

from __future__ import annotations

import logging
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from extractors.base import ClipExtractor
from extractors.i3d_inception import RestrictedUnpickler
from extractors.i3d_r50 import (
    R50_FEATURE_DIM,
    ResNet50I3dExtractor,
    load_state_dict_checked,
    read_state_dict,
)
from extractors.registry import EXTRACTORS
from extractors.weights import WeightsError, WeightSpec, fetch_pinned_weights

logger = logging.getLogger(__name__)

#: facebookresearch/video-nonlocal-net README, "Main Results", run_i3d_baseline_400k_32f.sh "model" link.
RTFM_I3D_URL = "https://dl.fbaipublicfiles.com/video-nonlocal/i3d_baseline_32x2_IN_pretrain_400k.pkl"

RTFM_I3D_K400 = WeightSpec(
    name="ResNet-50 I3D Kinetics-400 (video-nonlocal-net i3d_baseline_32x2_IN_pretrain_400k, Caffe2; CC-BY-NC 4.0)",
    url=RTFM_I3D_URL,
    sha256=None,  # not published: pinned on first download (extractors.weights)
    filename="i3d_baseline_32x2_IN_pretrain_400k.pkl",
)

NETWORK_NAME = "ResNet-50 I3D (RTFM: Tushar-N I3Res50 / Caffe2 i3d_baseline_32x2)"

#: Blocks per stage res2..res5 (ResNet-50; Tushar-N ``I3Res50(layers=[3, 4, 6, 3])``).
STAGE_DEPTHS = (3, 4, 6, 3)
#: Temporal kernel of each block's first conv, per stage (Tushar-N ``temp_conv`` lists, 1 -> 3, 0 -> 1;
#: video-nonlocal-net ``resnet_video_org.obtain_arc(2)`` ``use_temp_convs_2..5``).
TEMPORAL_KERNELS = ((3, 3, 3), (3, 1, 3, 1), (3, 1, 3, 1, 3, 1), (1, 3, 1))
#: Spatial stride of each stage's first block (on its 1x3x3 conv and its shortcut; Tushar-N ``_make_layer``).
STAGE_SPATIAL_STRIDES = (1, 2, 2, 2)
#: Stem conv (Tushar-N ``I3Res50.conv1``).
STEM_CONV = {"kernel": (5, 7, 7), "stride": (2, 2, 2), "padding": (2, 3, 3)}
#: Stem max-pool (Tushar-N ``I3Res50.maxpool1``: no padding).
STEM_POOL = {"kernel": (2, 3, 3), "stride": (2, 2, 2), "padding": (0, 0, 0)}
#: Temporal max-pool after res2 (Tushar-N ``I3Res50.maxpool2``; kernel = stride).
RES2_POOL = (2, 1, 1)
#: Kinetics-400 classes of the classifier (Caffe2 ``pred``, Tushar-N ``fc``).
NUM_CLASSES = 400
#: Smallest clip the network takes: T >= 7 (the two temporal pools need 2 steps each), H, W >= 5.
MIN_FRAMES, MIN_SIDE = 7, 5

#: Index in ``model.blocks`` of each stage res2..res5 (0 is the stem, 2 the pool after res2, 6 the head).
_STAGE_BLOCKS = (1, 3, 4, 5)
_HEAD_BLOCK = 6
#: Blobs of a Caffe2 checkpoint that are not model weights (``lib/utils/checkpoints.py save_model_params``),
#: besides the ``*_momentum`` ones.
CAFFE2_TRAINING_BLOBS = ("lr", "model_iter")
#: ``torch.serialization.MAGIC_NUMBER``: the first object pickled in a legacy (pre-zip) ``torch.save`` file.
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
#: Caffe2 BN blob suffix -> torch BatchNorm tensor (Tushar-N ``convert_weights.py`` ``suffix_dict``).
_BN_SUFFIXES = (("s", "weight"), ("b", "bias"), ("rm", "running_mean"), ("riv", "running_var"))


# --------------------------------------------------------------------------------------------------
# Network


def build_rtfm_i3d_r50() -> nn.Module:
    """Tushar-N's ``I3Res50(use_nl=False)`` from pytorchvideo blocks, randomly initialised, in eval mode.

    ``model.blocks``: 0 stem (conv, norm, ReLU, pool), 1 res2, 2 temporal max-pool, 3-5 res3-res5, 6 head
    (``pool`` = ``AdaptiveAvgPool3d(1)``, dropout 0.5, ``proj`` = ``Linear(2048, 400)``). ``model(x)``
    gives ``[N, 400]`` logits; :func:`rtfm_i3d_features` the 2048-D feature.
    """
    with warnings.catch_warnings():  # pytorchvideo warns about torch.jit.script on import
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        from pytorchvideo.models.head import create_res_basic_head
        from pytorchvideo.models.net import Net
        from pytorchvideo.models.resnet import create_bottleneck_block, create_res_stage
        from pytorchvideo.models.stem import create_res_basic_stem

    blocks: list[nn.Module] = [
        create_res_basic_stem(
            in_channels=3, out_channels=64,
            conv_kernel_size=STEM_CONV["kernel"], conv_stride=STEM_CONV["stride"], conv_padding=STEM_CONV["padding"],
            pool=nn.MaxPool3d,
            pool_kernel_size=STEM_POOL["kernel"], pool_stride=STEM_POOL["stride"], pool_padding=STEM_POOL["padding"],
        )
    ]
    dim_in = 64
    stages = zip(STAGE_DEPTHS, TEMPORAL_KERNELS, STAGE_SPATIAL_STRIDES, strict=True)
    for idx, (depth, kernels, stride) in enumerate(stages):
        dim_out = 256 * 2**idx
        blocks.append(
            create_res_stage(
                depth=depth, dim_in=dim_in, dim_inner=dim_out // 4, dim_out=dim_out,
                bottleneck=create_bottleneck_block,
                conv_a_kernel_size=[(k, 1, 1) for k in kernels],  # one per block
                conv_a_stride=(1, 1, 1),
                conv_a_padding=[(k // 2, 0, 0) for k in kernels],
                conv_b_kernel_size=(1, 3, 3), conv_b_stride=(1, stride, stride), conv_b_padding=(0, 1, 1),
            )
        )
        if idx == 0:
            blocks.append(nn.MaxPool3d(kernel_size=RES2_POOL, stride=RES2_POOL))
        dim_in = dim_out
    blocks.append(
        create_res_basic_head(
            in_features=dim_in, out_features=NUM_CLASSES, pool=nn.AdaptiveAvgPool3d, output_size=(1, 1, 1),
            dropout_rate=0.5,  # Tushar-N I3Res50.drop; an identity in eval mode
        )
    )
    return Net(blocks=nn.ModuleList(blocks)).eval()


def rtfm_i3d_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The 2048-D clip feature: res5 (after its last ReLU) averaged over T, H, W.

    Args:
        model: a network from :func:`build_rtfm_i3d_r50`.
        x: ``[N, 3, T, H, W]`` float32, RGB normalised with RTFM's mean 114.75 / std 57.375;
            16x224x224 for WS-VAD clips (T >= 7, H, W >= 5 at the least).
    Returns:
        ``[N, 2048]`` float32, non-negative.
    """
    if x.dim() != 5 or x.shape[1] != 3:
        raise ValueError(f"ResNet-50 I3D expects [N, 3, T, H, W] clips, got shape {tuple(x.shape)}")
    if x.shape[2] < MIN_FRAMES or min(x.shape[3:]) < MIN_SIDE:
        raise ValueError(
            f"the clip {tuple(x.shape[2:])} is too small for the RTFM ResNet-50 I3D "
            f"(needs T >= {MIN_FRAMES} frames and H, W >= {MIN_SIDE} pixels)"
        )
    *trunk, head = model.blocks
    for block in trunk:
        x = block(x)
    return head.pool(x).flatten(1)  # [N, 2048, 1, 1, 1] -> [N, 2048]


# --------------------------------------------------------------------------------------------------
# Weight names


class WeightName(NamedTuple):
    """One tensor under its three names."""

    caffe2: str  #: blob in video-nonlocal-net's pickle (``res2_0_branch2a_bn_riv``)
    tushar: str  #: key in Tushar-N's ``i3d_r50_kinetics.pth`` (``layer1.0.bn1.running_var``)
    model: str  #: key in :func:`build_rtfm_i3d_r50`'s state dict (``blocks.1.res_blocks.0.branch2.norm_a.running_var``)


def _conv_bn(caffe2: tuple[str, str], tushar: tuple[str, str], model: tuple[str, str]) -> Iterator[WeightName]:
    """A bias-free conv and its BN, each pair being (conv, BN) prefixes: Caffe2 ``<conv>_w`` and
    ``<BN>_{s,b,rm,riv}``; torch ``<conv>.weight`` and ``<BN>.{weight,bias,running_mean,running_var}``."""
    yield WeightName(f"{caffe2[0]}_w", f"{tushar[0]}.weight", f"{model[0]}.weight")
    for suffix, tensor in _BN_SUFFIXES:
        yield WeightName(f"{caffe2[1]}_{suffix}", f"{tushar[1]}.{tensor}", f"{model[1]}.{tensor}")


def rtfm_weight_names() -> list[WeightName]:
    """The 267 tensors of the network under their Caffe2, Tushar-N and pytorchvideo-block names.

    The Caffe2 <-> Tushar-N pairs are those of Tushar-N's ``utils/convert_weights.py``: ``conv1_w`` and
    ``res_conv1_bn_*`` -> ``conv1``, ``bn1``; ``res{s}_{b}_branch2{a,b,c}_w`` / ``_bn_*`` ->
    ``layer{s-1}.{b}.conv{1,2,3}`` / ``bn{1,2,3}``; ``res{s}_0_branch1_w`` / ``_bn_*`` ->
    ``layer{s-1}.0.downsample.0`` / ``downsample.1``; ``pred_w``, ``pred_b`` -> ``fc``. Counts: stem 5,
    16 blocks x 3 convs x 5 = 240, 4 shortcuts x 5 = 20, classifier 2.
    """
    names = list(_conv_bn(("conv1", "res_conv1_bn"), ("conv1", "bn1"), ("blocks.0.conv", "blocks.0.norm")))
    for stage, (depth, index) in enumerate(zip(STAGE_DEPTHS, _STAGE_BLOCKS, strict=True), start=2):
        for block in range(depth):
            caffe2 = f"res{stage}_{block}"
            tushar = f"layer{stage - 1}.{block}"
            model = f"blocks.{index}.res_blocks.{block}"
            for letter, number in zip("abc", (1, 2, 3)):
                names += _conv_bn(
                    (f"{caffe2}_branch2{letter}", f"{caffe2}_branch2{letter}_bn"),
                    (f"{tushar}.conv{number}", f"{tushar}.bn{number}"),
                    (f"{model}.branch2.conv_{letter}", f"{model}.branch2.norm_{letter}"),
                )
            if block == 0:  # the projection shortcut
                names += _conv_bn(
                    (f"{caffe2}_branch1", f"{caffe2}_branch1_bn"),
                    (f"{tushar}.downsample.0", f"{tushar}.downsample.1"),
                    (f"{model}.branch1_conv", f"{model}.branch1_norm"),
                )
    names += [
        WeightName("pred_w", "fc.weight", f"blocks.{_HEAD_BLOCK}.proj.weight"),
        WeightName("pred_b", "fc.bias", f"blocks.{_HEAD_BLOCK}.proj.bias"),
    ]
    return names


# --------------------------------------------------------------------------------------------------
# Reading weights files


def read_rtfm_weights(path: str | Path) -> tuple[str, dict[str, torch.Tensor]]:
    """Read a weights file of either layout, told by its content.

    Returns:
        ``("caffe2", {blob: float32 tensor})`` for a Caffe2 pickle (training-only blobs dropped), or
        ``("tushar", {key: tensor})`` for a ``torch.save``'d state dict; names are the file's own.
    Raises:
        WeightsError: naming ``path``: unreadable, a refused pickle global, or neither layout.
    """
    path = Path(path)
    if zipfile.is_zipfile(path):  # torch.save's format since torch 1.6
        return "tushar", read_state_dict(path, NETWORK_NAME)
    try:
        with open(path, "rb") as fh:
            first = RestrictedUnpickler(fh, encoding="latin1").load()  # only the first pickled object
    except Exception as exc:  # a refused global raises UnpicklingError; malformed pickles all sorts of errors
        raise WeightsError(
            f"{path} is not a readable {NETWORK_NAME} weights file (a Caffe2 pickle or a torch.save state dict): "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if isinstance(first, int) and first == _TORCH_LEGACY_MAGIC:  # torch.save before 1.6 (Tushar-N's .pth)
        return "tushar", read_state_dict(path, NETWORK_NAME)
    if isinstance(first, dict):
        blobs = first["blobs"] if isinstance(first.get("blobs"), dict) else first
        return "caffe2", caffe2_model_blobs(blobs, path)
    raise WeightsError(
        f"{path} holds a pickled {type(first).__name__}: neither a Caffe2 blob dict nor a torch.save file"
    )


def caffe2_model_blobs(blobs: Mapping[Any, Any], path: str | Path) -> dict[str, torch.Tensor]:
    """The model blobs of a Caffe2 checkpoint, as float32 tensors.

    Drops ``*_momentum`` (SGD state) and :data:`CAFFE2_TRAINING_BLOBS`; every other entry must be a
    named floating-point numpy array (its name is checked later, against :func:`rtfm_weight_names`).
    """
    kept = {
        k: v for k, v in blobs.items()
        if not (isinstance(k, str) and (k.endswith("_momentum") or k in CAFFE2_TRAINING_BLOBS))
    }
    bad = [
        f"{k!r} ({type(v).__name__})" for k, v in kept.items()
        if not isinstance(k, str) or not isinstance(v, np.ndarray) or v.dtype.kind != "f"
    ]
    if bad:
        more = f" (and {len(bad) - 8} more)" if len(bad) > 8 else ""
        raise WeightsError(f"{path}: {len(bad)} blobs are not float arrays: {', '.join(bad[:8])}{more}")
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in kept.items()}


def _shape_holder(shapes: Mapping[str, torch.Size]) -> nn.Module:
    """A module whose buffers have the names ``shapes`` gives (dotted names nest) and those shapes.

    The buffers live on the meta device (no memory): the module only lets
    :func:`~extractors.i3d_r50.load_state_dict_checked` check a file under the file's own names.
    """
    root = nn.Module()
    for name, shape in shapes.items():
        *parents, leaf = name.split(".")
        module = root
        for part in parents:
            child = dict(module.named_children()).get(part)
            if child is None:
                child = nn.Module()
                module.add_module(part, child)
            module = child
        module.register_buffer(leaf, torch.empty(shape, device="meta"))
    return root


def _check_file_names(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size], path: Path) -> None:
    """WeightsError naming the file's missing, unexpected and mis-shaped tensors by the file's names."""
    with warnings.catch_warnings():  # loading into meta buffers is a no-op, which torch warns about
        warnings.filterwarnings("ignore", message=".*meta parameter.*", category=UserWarning)
        load_state_dict_checked(_shape_holder(expected), state, path, NETWORK_NAME)


def load_rtfm_i3d_r50(path: str | Path) -> nn.Module:
    """A :func:`build_rtfm_i3d_r50` network filled from ``path`` (Caffe2 pickle or Tushar-N state dict).

    Raises:
        WeightsError: naming ``path``, with every missing, unexpected or mis-shaped tensor (up to 8 of
            each) under the file's own names.
    """
    path = Path(path)
    layout, state = read_rtfm_weights(path)
    model = build_rtfm_i3d_r50()
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    names = rtfm_weight_names()
    rename = {getattr(n, layout): n.model for n in names}
    if layout == "tushar":  # BN step counters, present when saved from a torch >= 0.4.1 I3Res50; optional
        counter = "num_batches_tracked"
        rename.update({
            n.tushar.replace("running_mean", counter): n.model.replace("running_mean", counter)
            for n in names if n.tushar.endswith(".running_mean")
        })
    _check_file_names(state, {name: shapes[ours] for name, ours in rename.items()}, path)
    load_state_dict_checked(model, {rename[k]: v for k, v in state.items()}, path, NETWORK_NAME)
    logger.info("loaded %s weights (%s layout) from %s (%d tensors)", NETWORK_NAME, layout, path, len(state))
    return model.eval()


# --------------------------------------------------------------------------------------------------
# Registered extractor


@EXTRACTORS.register("resnet50_i3d_rtfm")
class ResNet50I3dRtfmExtractor(ClipExtractor):
    """RTFM's ResNet-50 I3D (Tushar-N ``I3Res50``, Caffe2 ``i3d_baseline_32x2`` weights): 2048-D per clip.

    Preprocessing (done by the extract stage): short side resized to 256, 224x224 crops, RGB; pixel
    values normalised by :meth:`normalize` as RTFM did (RTFM issue 21), the same as ``resnet50_i3d``.

    Args:
        weights: optional local file (``--set extract.weights=PATH``): the Caffe2 ``.pkl`` or Tushar-N's
            ``i3d_r50_kinetics.pth``; without it the Caffe2 file (CC-BY-NC 4.0) is fetched into the user
            cache and pinned on first download.
        device: torch device for the network.
    """

    feature_dim = R50_FEATURE_DIM
    clip_len = 16
    crop_size = 224
    resize = ("short", 256)
    weights_spec = RTFM_I3D_K400
    # RTFM's normalisation, (x - 114.75) / 57.375 on [0, 255]: the same functions as resnet50_i3d's
    normalize = ResNet50I3dExtractor.normalize
    normalize_ = ResNet50I3dExtractor.normalize_

    def __init__(self, weights: str | None = None, device: str = "cpu") -> None:
        super().__init__(weights=weights, device=device)
        path, self._digest = fetch_pinned_weights(self.weights_spec, local_path=weights)
        self.model = load_rtfm_i3d_r50(path).to(self.device)

    @property
    def weights_checksum(self) -> str:
        """sha256 of the weights file loaded (the local file, or the pinned default download)."""
        return self._digest

    def features(self, clips: torch.Tensor) -> torch.Tensor:
        """``[N, 3, 16, 224, 224]`` float32 from :meth:`normalize` -> ``[N, 2048]`` float32, non-negative."""
        with torch.inference_mode():
            return rtfm_i3d_features(self.model, clips.to(self.device, torch.float32)).float()
