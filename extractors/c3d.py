"""C3D (Sports-1M) fc6 features: one 4096-D vector per 16-frame clip, as Sultani et al. 2018 used.

Network (Tran et al., "Learning Spatiotemporal Features with 3D Convolutional Networks", ICCV 2015,
arXiv:1412.0767, the Sports-1M model of the C3D v1.0 Caffe release): eight 3x3x3 convolutions (stride 1,
padding 1, ReLU) conv1a 64, conv2a 128, conv3a/b 256, conv4a/b 512, conv5a/b 512; max-pools pool1 1x2x2 and
pool2..pool5 2x2x2 (stride = kernel); fc6 8192->4096, fc7 4096->4096 (ReLU, dropout 0.5 in training),
fc8 4096->487 Sports-1M classes. A 16x112x112 clip gives conv5b ``[512, 2, 7, 7]`` and pool5 ``[512, 1, 4, 4]``.

pool5: Caffe's C3D pooling rounds the output size *up* (``ceil``), so its pool5 turns the 7x7 map into 4x4
with windows starting at 0, 2, 4, 6 (the last one clipped to the border). ``pool5="caffe"`` (default) does
exactly that (``ceil_mode=True``, no padding). The PyTorch port whose weights are used here instead pads
pool5 by (0, 1, 1), which also gives 4x4 but with windows shifted by one pixel (-1..0, 1..2, 3..4, 5..6);
``pool5="port"`` reproduces the port. The weights were trained in Caffe, so the default follows Caffe.

Feature (``fc6``), after the ReLU by default (``fc6_relu=True``; ``False`` gives the pre-activation):
in C3D's feature-extraction prototxt (``c3d_sport1m_feature_extractor_*.prototxt``) the ReLU ``relu6`` and
the dropout ``drop6`` work *in place* on the ``fc6-1`` blob, so the ``fc6-1`` features its
``extract_image_features`` tool writes are after the ReLU (dropout is an identity at test time). Sultani et
al.'s released features agree: the 10 ``SampleVideos/*.txt`` files in ``../shared/data/sultani_c3d`` (32
segments x 4096, each a mean of clip features, L2-normalised) have no negative value and 65-83 % exact
zeros, which pre-activation fc6 values would not give.

Preprocessing (C3D paper; MIST's C3D datasets, fjchange/MIST_VAD datasets/dataset.py Test_Dataset_C3D and
configs/constant.py C3D_MEAN): frames resized to exactly
128x171 (``resize = ("fixed", 128, 171)``), 112x112 crops (the stage's centre/5/10-crop), pixel values in
[0, 255] with the per-channel mean [90.25, 97.66, 101.41] subtracted, no scaling. That mean is in *BGR*
order, as Caffe (OpenCV) reads frames and as the network was trained; the stage hands RGB frames, so
:meth:`C3dFc6Extractor.normalize` reverses the channels to BGR before subtracting it. (The Caffe original
subtracts a full 16x128x171 mean cube before cropping; MIST's per-channel values stand in for it.)

Weights: the PyTorch port of the Sports-1M Caffe model in github.com/DavideA/c3d-pytorch, file
``c3d.pickle`` at the URL of that repository's README, a ``torch.save``'d state dict with the port's names
(``conv1``, ``conv2``, ``conv3a`` ... ``fc8``; mapped to ``conv1a``/``conv2a`` here). No checksum is
published and the server speaks plain HTTP, so ``sha256`` is ``None``: the first download is pinned (trust
on first use, :mod:`extractors.weights`). ``extract.weights`` may name a local file in the port's layout or
this module's (``conv1a`` ...), optionally under ``"state_dict"``/``"model_state"``; it is checked
strictly when loaded and its own sha256 enters the cache key.

Caveat on the input convention: the Sports-1M weights exist only as the C3D Caffe release, trained on BGR
mean-subtracted input, and this module assumes the port kept that convention. That cannot be checked
without the file (not downloadable here); the port's own ``predict.py`` feeds RGB [0, 255] without mean
subtraction, and its README says it was tested only qualitatively. If the real weights turn out to
expect RGB, that is a one-line change in :meth:`C3dFc6Extractor.normalize` (and a new cache key).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from extractors.registry import EXTRACTORS
from extractors.base import ClipExtractor
from extractors.i3d_r50 import load_state_dict_checked, read_state_dict
from extractors.weights import WeightSpec, fetch_weights, pinned_sha256
from pipeline.core.store import sha256_file

logger = logging.getLogger(__name__)

#: README of github.com/DavideA/c3d-pytorch ("Download the pretrained weights from here").
C3D_PORT_URL = "http://imagelab.ing.unimore.it/files/c3d_pytorch/c3d.pickle"

C3D_SPORTS1M = WeightSpec(
    name="C3D Sports-1M (DavideA/c3d-pytorch port, c3d.pickle)",
    url=C3D_PORT_URL,
    sha256=None,  # not published: pinned on first download (extractors.weights)
    filename="c3d-sports1m-davidea.pickle",
)

#: Per-channel mean in **BGR** order, pixels in [0, 255]: the values of fjchange/MIST_VAD datasets/dataset.py
#: (Test_Dataset_C3D, std 1) and configs/constant.py (C3D_MEAN); BGR because C3D v1.0's Caffe video data
#: layer reads frames with OpenCV, the order the network was trained in.
C3D_MEAN_BGR = (90.25, 97.66, 101.41)

#: Frames are resized to exactly 128x171 before cropping (Tran et al. 2015: 3x16x128x171 inputs;
#: fjchange/MIST_VAD datasets/dataset.py, Test_Dataset_C3D: height 128, width 171).
C3D_RESIZE = ("fixed", 128, 171)
#: Crop side (Tran et al. 2015: 3x16x112x112 inputs).
C3D_CROP = 112
#: fc6 output length.
C3D_FC6_DIM = 4096
#: Sports-1M classes (fc8).
SPORTS1M_CLASSES = 487

#: (name, in channels, out channels, pool after it: (kernel, name) or None), in order.
_CONVS: tuple[tuple[str, int, int, tuple[tuple[int, int, int], str] | None], ...] = (
    ("conv1a", 3, 64, ((1, 2, 2), "pool1")),
    ("conv2a", 64, 128, ((2, 2, 2), "pool2")),
    ("conv3a", 128, 256, None),
    ("conv3b", 256, 256, ((2, 2, 2), "pool3")),
    ("conv4a", 256, 512, None),
    ("conv4b", 512, 512, ((2, 2, 2), "pool4")),
    ("conv5a", 512, 512, None),
    ("conv5b", 512, 512, ((2, 2, 2), "pool5")),
)

#: the port's names -> this module's (every other name is the same).
_PORT_NAMES = {"conv1": "conv1a", "conv2": "conv2a"}


class C3D(nn.Module):
    """C3D, Sports-1M layout (see the module docstring); parameter names ``conv1a.weight`` ... ``fc8.bias``.

    Input of every ``forward_*`` method: ``[N, 3, 16, 112, 112]`` float32, **BGR**, pixel values in
    [0, 255] minus :data:`C3D_MEAN_BGR` (what :meth:`C3dFc6Extractor.normalize` returns).

    Args:
        num_classes: size of fc8 (487 Sports-1M classes).
        pool5: ``"caffe"`` (ceil-mode windows, as the original) or ``"port"`` (padding (0, 1, 1), as the
            PyTorch port); both give a 4x4 pool5 map for 112x112 clips.
    """

    def __init__(self, num_classes: int = SPORTS1M_CLASSES, pool5: str = "caffe") -> None:
        super().__init__()
        if pool5 not in ("caffe", "port"):
            raise ValueError(f"pool5 must be 'caffe' or 'port', got {pool5!r}")
        self.pool5_mode = pool5
        self._trunk: list[str] = []
        for name, c_in, c_out, pool in _CONVS:
            self.add_module(name, nn.Conv3d(c_in, c_out, kernel_size=3, padding=1))
            self._trunk.append(name)
            if pool is not None:
                kernel, pool_name = pool
                if pool_name == "pool5" and pool5 == "caffe":
                    layer = nn.MaxPool3d(kernel, stride=kernel, ceil_mode=True)
                elif pool_name == "pool5":
                    layer = nn.MaxPool3d(kernel, stride=kernel, padding=(0, 1, 1))
                else:
                    layer = nn.MaxPool3d(kernel, stride=kernel)
                self.add_module(pool_name, layer)
                self._trunk.append(pool_name)
        self.fc6 = nn.Linear(512 * 1 * 4 * 4, C3D_FC6_DIM)
        self.fc7 = nn.Linear(C3D_FC6_DIM, C3D_FC6_DIM)
        self.fc8 = nn.Linear(C3D_FC6_DIM, num_classes)
        self.dropout = nn.Dropout(p=0.5)

    def pool5_map(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, 3, 16, 112, 112]`` -> pool5 ``[N, 512, 1, 4, 4]`` float32 (non-negative)."""
        if x.dim() != 5 or x.shape[1] != 3:
            raise ValueError(f"C3D expects [N, 3, T, H, W] clips, got shape {tuple(x.shape)}")
        for name in self._trunk:
            layer = getattr(self, name)
            x = F.relu(layer(x)) if name.startswith("conv") else layer(x)
        if tuple(x.shape[2:]) != (1, 4, 4):
            raise ValueError(
                f"C3D's fc6 needs 16x112x112 clips (pool5 1x4x4), got input {tuple(x.shape)} -> pool5 "
                f"{tuple(x.shape[2:])}; use 112-pixel crops (extract.crops 10, 5 or center, not none)"
            )
        return x

    def conv_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """conv4b and conv5b activations (after ReLU) in one pass, for MIST's self-guided attention
        (``extractors.sga``): ``[N, 3, T, H, W]`` -> ``[N, 512, T/4, H/8, W/8]`` and
        ``[N, 512, T/8, H/16, W/16]`` float32 (``[N, 512, 4, 14, 14]`` and ``[N, 512, 2, 7, 7]`` for
        16x112x112 clips). Any size divisible by 16 works (no fc layer is involved)."""
        if x.dim() != 5 or x.shape[1] != 3:
            raise ValueError(f"C3D expects [N, 3, T, H, W] clips, got shape {tuple(x.shape)}")
        conv4b = x
        for name in self._trunk:
            if name == "pool5":
                break
            layer = getattr(self, name)
            x = F.relu(layer(x)) if name.startswith("conv") else layer(x)
            if name == "conv4b":
                conv4b = x
        return conv4b, x

    def forward_fc6(self, x: torch.Tensor, relu: bool = True) -> torch.Tensor:
        """fc6 activations: ``[N, 3, 16, 112, 112]`` -> ``[N, 4096]`` float32 (after ReLU when ``relu``)."""
        h = self.fc6(self.pool5_map(x).flatten(1))
        return F.relu(h) if relu else h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Sports-1M logits ``[N, num_classes]`` (fc6 -> ReLU -> dropout -> fc7 -> ReLU -> dropout -> fc8)."""
        h = self.dropout(self.forward_fc6(x, relu=True))
        h = self.dropout(F.relu(self.fc7(h)))
        return self.fc8(h)


def port_to_c3d_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the port's keys: ``conv1.*`` -> ``conv1a.*``, ``conv2.*`` -> ``conv2a.*``; other keys unchanged."""
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for key, value in state.items():
        layer, _, leaf = key.partition(".")
        out[f"{_PORT_NAMES.get(layer, layer)}.{leaf}" if leaf else key] = value
    return out


def load_c3d(path: str | Path, pool5: str = "caffe") -> C3D:
    """A :class:`C3D` in eval mode filled from ``path`` (the port's ``c3d.pickle`` or this module's layout)."""
    model = C3D(pool5=pool5)
    state = port_to_c3d_names(read_state_dict(path, "C3D Sports-1M"))
    load_state_dict_checked(model, state, path, "C3D Sports-1M")
    logger.info("loaded C3D weights from %s (%d tensors)", path, len(state))
    return model.eval()


@EXTRACTORS.register("c3d_fc6")
class C3dFc6Extractor(ClipExtractor):
    """C3D Sports-1M fc6 (after ReLU by default): one 4096-D vector per 16-frame clip.

    Preprocessing (done by the extract stage): frames resized to 128x171, 112x112 crops; :meth:`normalize`
    turns RGB [0, 255] into Caffe's BGR minus the channel mean.

    Args:
        weights: optional local file (``--set extract.weights=PATH``): the port's ``c3d.pickle`` or a
            state dict of :class:`C3D`; without it the default weights are fetched into the user cache
            and pinned on first download.
        device: torch device for the network.
        fc6_relu: fc6 after the ReLU (default, as C3D's in-place ``relu6`` on ``fc6-1``) or before it.
        pool5: ``"caffe"`` (default) or ``"port"``, see :class:`C3D`.

    ``fc6_relu`` and ``pool5`` are not configuration keys (the extract stage builds the defaults and they
    do not enter its cache key); they exist for comparisons in code.
    """

    feature_dim = C3D_FC6_DIM
    clip_len = 16
    crop_size = C3D_CROP
    resize = C3D_RESIZE
    weights_spec = C3D_SPORTS1M

    def __init__(
        self,
        weights: str | None = None,
        device: str = "cpu",
        fc6_relu: bool = True,
        pool5: str = "caffe",
    ) -> None:
        super().__init__(weights=weights, device=device)
        self.fc6_relu = fc6_relu
        path = fetch_weights(self.weights_spec, local_path=weights)
        digest = sha256_file(path) if weights else pinned_sha256(self.weights_spec)
        assert digest is not None  # fetch_weights pins the default weights or raises
        self._checksum = digest
        self.model = load_c3d(path, pool5=pool5).to(self.device)
        self._mean_bgr = torch.tensor(C3D_MEAN_BGR, dtype=torch.float32).view(1, 3, 1, 1, 1)

    @property
    def weights_checksum(self) -> str:
        """sha256 of the weights file loaded (the local file, or the pinned default download)."""
        return self._checksum

    def normalize(self, clips: torch.Tensor) -> torch.Tensor:
        """RGB to Caffe's input: ``[N, 3, T, H, W]`` RGB in [0, 255] -> float32 **BGR** minus :data:`C3D_MEAN_BGR`.

        Output channel 0 is blue minus 90.25, 1 green minus 97.66, 2 red minus 101.41; values in about
        [-101.4, 164.8].
        """
        bgr = clips.to(torch.float32).flip(1)
        return bgr - self._mean_bgr.to(bgr.device)

    def normalize_(self, clips: torch.Tensor) -> torch.Tensor:
        """:meth:`normalize` in place on float32 ``clips``: channels 0 and 2 swapped, then the mean."""
        red = clips[:, 0].clone()
        clips[:, 0].copy_(clips[:, 2])
        clips[:, 2].copy_(red)
        return clips.sub_(self._mean_bgr.to(clips.device))

    def features(self, clips: torch.Tensor) -> torch.Tensor:
        """``[N, 3, 16, 112, 112]`` float32 from :meth:`normalize` -> ``[N, 4096]`` float32 fc6
        (non-negative when ``fc6_relu``)."""
        with torch.inference_mode():
            x = clips.to(self.device, torch.float32)
            return self.model.forward_fc6(x, relu=self.fc6_relu).float()
