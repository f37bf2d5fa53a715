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
[0, 255] minus a mean, no scaling, in *BGR* order, as Caffe (OpenCV) reads frames and as the network was
trained; the stage hands RGB frames, so :meth:`C3dFc6Extractor.normalize` reverses the channels to BGR.

The mean (``extract.c3d_mean``, :func:`resolve_c3d_mean`):

- ``"channel"`` (default): the per-channel BGR mean [90.25, 97.66, 101.41] of MIST's C3D datasets,
  subtracted by :meth:`C3dFc6Extractor.normalize` (``frame_mean`` is None).
- ``"sports1m"``: the C3D v1.0 release's Sports-1M mean cube, as the Caffe original subtracts it:
  facebookarchive/C3D ``C3D-v1.0/examples/c3d_feature_extraction/sport1m_train16_128_mean.binaryproto``,
  the ``mean_file`` of ``prototxt/c3d_sport1m_feature_extractor_frm.prototxt`` and ``_video.prototxt``
  (the prototxts Sultani et al.'s features come from), a BlobProto of shape 1x3x16x128x171 (BGR).
  ``src/caffe/layers/video_data_layer.cpp`` (``VideoDataLayerPrefetch``) subtracts it from the
  16x128x171 resized clip *before* the 112x112 crop, value by value at the crop's own position
  (``mean[((c * length + l) * height + h + h_off) * width + w + w_off]``), after checking that its
  shape equals the clip's. The file is downloaded once (:data:`C3D_SPORTS1M_MEAN`, pinned on first
  download and checked against its git blob id); when it cannot be had, one warning says so and the
  per-channel mean is used (and keyed) instead: those features are NOT the original's.
- a local ``.binaryproto`` (C3D's BlobProto, :func:`read_blobproto`) or ``.npy`` ``[3, 16, 128, 171]``
  float (channels B, G, R, as the cube is stored): :func:`load_c3d_mean`.

With a cube, the extractor's ``frame_mean`` is the cube minus the per-channel mean, in RGB order, which
:func:`extractors.transforms.preprocess_clips` subtracts from the resized clip before cutting the crops;
:meth:`~C3dFc6Extractor.normalize` then reverses the channels and subtracts the per-channel mean as
always, so the network sees ``BGR - cube`` (equal to Caffe's values up to float32 rounding, about
1e-5). Splitting it this way keeps a caller that knows nothing of ``frame_mean`` (MIST's stage II
training, which normalises its own augmented crops with ``normalize``) at the per-channel mean of MIST's
recipe instead of no mean at all.

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

import hashlib
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from extractors.registry import EXTRACTORS
from extractors.base import ClipExtractor
from extractors.i3d_r50 import load_state_dict_checked, read_state_dict
from extractors.weights import WeightsError, WeightSpec, cached_weights_path, fetch_pinned_weights, fetch_weights
from pipeline.core.errors import StageError
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

#: The Sports-1M mean cube of the C3D v1.0 release (module docstring): the raw file of
#: facebookarchive/C3D at its last commit (71336a2, 2019-07-31; the file dates from ef7c013, 2017-03-01).
C3D_MEAN_URL = (
    "https://raw.githubusercontent.com/facebookarchive/C3D/71336a2202e7d605a138c239f56be7b8fcfaaf5b/"
    "C3D-v1.0/examples/c3d_feature_extraction/sport1m_train16_128_mean.binaryproto"
)
#: git blob id (sha1 of ``b"blob <size>\0" + content``) of that file in facebookarchive/C3D's tree: the
#: only published checksum, checked after the (pinned on first use) download.
C3D_MEAN_GIT_BLOB = "85608a7a4de476457ee5dfa14857b9ad16f5d913"

C3D_SPORTS1M_MEAN = WeightSpec(
    name="C3D Sports-1M mean cube (facebookarchive/C3D sport1m_train16_128_mean.binaryproto)",
    url=C3D_MEAN_URL,
    sha256=None,  # no sha256 published: pinned on first download, and C3D_MEAN_GIT_BLOB checked
    filename="c3d-sport1m-train16-128-mean.binaryproto",
)

#: Shape of the mean cube, channels (B, G, R) x frames x height x width: C3D's video data layer checks
#: the mean's shape against the 3x16x128x171 clip (src/caffe/layers/video_data_layer.cpp, SetUp).
C3D_MEAN_SHAPE = (3, 16, 128, 171)
#: values of ``extract.c3d_mean`` that are not a file
C3D_MEAN_CHANNEL, C3D_MEAN_SPORTS1M = "channel", "sports1m"

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
    [0, 255] minus :data:`C3D_MEAN_BGR` or minus the mean cube at the crop's position (what the extract
    stage and :meth:`C3dFc6Extractor.normalize` make; module docstring).

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


# -- the mean cube ------------------------------------------------------------------------------------
#: C3D's BlobProto (C3D-v1.0/src/caffe/proto/caffe.proto): num = 1, channels = 2, length = 3 (C3D's
#: temporal dimension), height = 4, width = 5 (int32 varints); data = 6 (repeated float, packed);
#: diff = 7 (skipped). BVLC Caffe numbers them differently (height 3, width 4, data 5).
_BLOB_DIMS = {1: "num", 2: "channels", 3: "length", 4: "height", 5: "width"}
_BLOB_DATA = 6
_VARINT, _FIXED64, _BYTES, _FIXED32 = 0, 1, 2, 5


def _varint(buf: bytes, pos: int, path: Path) -> tuple[int, int]:
    """The protobuf varint at ``buf[pos]`` and the position after it."""
    value = 0
    for i in range(10):
        if pos + i >= len(buf):
            raise WeightsError(f"{path}: truncated BlobProto (a varint runs past the end of the file)")
        byte = buf[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return value, pos + i + 1
    raise WeightsError(f"{path}: not a BlobProto (a varint longer than 10 bytes at byte {pos})")


def _unpacked_floats(buf: bytes, pos: int, tag: int) -> tuple[np.ndarray, int]:
    """The run of unpacked float fields starting at ``buf[pos]`` (one-byte ``tag``, then 4 bytes each),
    read at once: the floats and the position after the run."""
    records = (len(buf) - pos) // 5
    tags = np.frombuffer(buf, np.uint8, count=records * 5, offset=pos)[::5]
    run = int(np.argmin(tags == tag)) if not bool((tags == tag).all()) else records
    values = np.ndarray((run,), dtype="<f4", buffer=buf, offset=pos + 1, strides=(5,))
    return values.astype(np.float32), pos + 5 * run


def read_blobproto(path: str | Path) -> np.ndarray:
    """The array of a C3D Caffe ``.binaryproto`` BlobProto, read without protobuf or Caffe.

    A minimal protobuf wire-format reader: varint, 64-bit, length-delimited and 32-bit fields; ``data``
    (field 6) packed or not, possibly in several pieces; unknown fields skipped. Field numbers are those of
    C3D's own ``caffe.proto`` (:data:`_BLOB_DIMS`); ``length`` 0 or absent means 1, as C3D's
    ``Blob::FromProto`` reads it.

    Returns:
        float32 ``[num, channels, length, height, width]`` (Caffe's NCLHW order).
    Raises:
        WeightsError: unreadable, truncated or malformed file, or data whose count is not the product
            of the dimensions (one line naming the file).
    """
    path = Path(path)
    try:
        buf = path.read_bytes()
    except OSError as exc:
        raise WeightsError(f"{path}: cannot read the C3D mean file: {exc.strerror or exc}") from None
    dims = {name: 0 for name in _BLOB_DIMS.values()}
    chunks: list[np.ndarray] = []
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos, path)
        field, wire = tag >> 3, tag & 7
        if field in _BLOB_DIMS and wire != _VARINT or field == _BLOB_DATA and wire not in (_BYTES, _FIXED32):
            raise WeightsError(f"{path}: not a C3D BlobProto (field {field} has wire type {wire}; a BVLC Caffe "
                               "mean, or another message?)")
        if wire == _VARINT:
            value, pos = _varint(buf, pos, path)
            if field in _BLOB_DIMS:
                dims[_BLOB_DIMS[field]] = value
        elif wire == _FIXED32 and field == _BLOB_DATA:
            values, pos = _unpacked_floats(buf, pos - 1, tag)  # field 6's tag is one byte (0x35)
            if not values.size:
                raise WeightsError(f"{path}: truncated BlobProto (a float runs past the end of the file)")
            chunks.append(values)
        elif wire in (_FIXED32, _FIXED64):
            pos += 4 if wire == _FIXED32 else 8
        elif wire == _BYTES:
            size, pos = _varint(buf, pos, path)
            if pos + size > len(buf):
                raise WeightsError(f"{path}: truncated BlobProto (field {field} needs {size} bytes, "
                                   f"{len(buf) - pos} left)")
            if field == _BLOB_DATA:
                if size % 4:
                    raise WeightsError(f"{path}: not a BlobProto (packed floats of {size} bytes)")
                chunks.append(np.frombuffer(buf, "<f4", count=size // 4, offset=pos).astype(np.float32))
            pos += size
        else:
            raise WeightsError(f"{path}: not a BlobProto (unsupported wire type {wire} at byte {pos})")
        if pos > len(buf):
            raise WeightsError(f"{path}: truncated BlobProto (a field runs past the end of the file)")
    shape = (dims["num"], dims["channels"], dims["length"] or 1, dims["height"], dims["width"])
    data = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    if data.size != int(np.prod(shape)):
        raise WeightsError(f"{path}: BlobProto of shape {'x'.join(map(str, shape))} holds {data.size} values, "
                           f"expected {int(np.prod(shape))} (truncated or not a mean file)")
    return data.reshape(shape)


def load_c3d_mean(path: str | Path) -> torch.Tensor:
    """The C3D mean cube in ``path``: ``[3, 16, 128, 171]`` float32, channels B, G, R, values in [0, 255].

    ``path``: a ``.binaryproto`` (C3D's BlobProto, shape 1x3x16x128x171, as
    ``sport1m_train16_128_mean.binaryproto``) or a ``.npy`` of shape ``[3, 16, 128, 171]``
    (channels x frames x height x width, channels in BGR order as C3D stores the cube; any float dtype).

    Raises:
        WeightsError: a missing or unreadable file, another suffix, another shape, or values that are
            not finite or outside [0, 255] (one line naming the file).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"{path}: C3D mean file not found (extract.c3d_mean)")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise WeightsError(f"{path}: not a readable .npy array: {exc}") from None
        if array.dtype.kind != "f":
            raise WeightsError(f"{path}: the C3D mean must hold floats, not {array.dtype}")
        expected = "[3, 16, 128, 171] (channels B, G, R x frames x height x width)"
    elif suffix == ".binaryproto":
        array = read_blobproto(path)
        expected = "1x3x16x128x171 (num x channels x length x height x width)"
    else:
        raise WeightsError(f"{path}: a C3D mean must be a .binaryproto or a .npy file")
    shape = tuple(array.shape)
    if suffix == ".binaryproto" and shape[0] == 1:
        array = array[0]
    if tuple(array.shape) != C3D_MEAN_SHAPE:
        raise WeightsError(f"{path}: C3D mean of shape {'x'.join(map(str, shape))}, expected {expected}")
    if not np.isfinite(array).all() or array.min() < 0 or array.max() > 255:
        raise WeightsError(f"{path}: C3D mean values must be finite pixel values in [0, 255]")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def git_blob_sha1(path: str | Path) -> str:
    """Git's object id of the file's content (sha1 of ``b"blob <size>\\0" + content``)."""
    data = Path(path).read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


#: what ``extract.c3d_mean=sports1m`` resolved to in this process, per cache file: the file and its sha256,
#: or None (not available: warned once, the per-channel mean used). Remembered so that the cache key and
#: the extractor built after it agree, and the warning is given once.
_SPORTS1M_RESOLVED: dict[str, tuple[Path, str] | None] = {}


def _sports1m_mean_file() -> tuple[Path, str] | None:
    """The verified Sports-1M mean cube file and its sha256, or None (after one warning) when it cannot be had."""
    where = str(cached_weights_path(C3D_SPORTS1M_MEAN))
    if where not in _SPORTS1M_RESOLVED:
        try:
            path = fetch_weights(C3D_SPORTS1M_MEAN)
        except WeightsError as exc:
            logger.warning(
                "extract.c3d_mean=sports1m: the C3D Sports-1M mean cube cannot be had (%s); features fall back "
                "to the per-channel mean and are NOT Sultani et al.'s (keyed as extract.c3d_mean=channel)", exc,
            )
            _SPORTS1M_RESOLVED[where] = None
            return None
        blob = git_blob_sha1(path)
        if blob != C3D_MEAN_GIT_BLOB:
            raise WeightsError(
                f"{path} is not C3D's sport1m_train16_128_mean.binaryproto: git blob {blob}, expected "
                f"{C3D_MEAN_GIT_BLOB}; delete it and its .sha256 pin to download it again from {C3D_MEAN_URL}"
            )
        _SPORTS1M_RESOLVED[where] = (path, sha256_file(path))
    return _SPORTS1M_RESOLVED[where]


def resolve_c3d_mean(setting: str) -> tuple[Path, str] | None:
    """The mean cube file an ``extract.c3d_mean`` setting names, with its sha256; None for the per-channel mean.

    ``"channel"`` -> None; ``"sports1m"`` -> the downloaded release file (None, after one warning per
    process, when it cannot be had); anything else -> that local file.

    Raises:
        WeightsError: a local file that does not exist, or a download that is not the release's file.
    """
    if setting == C3D_MEAN_CHANNEL:
        return None
    if setting == C3D_MEAN_SPORTS1M:
        return _sports1m_mean_file()
    path = Path(setting).expanduser()
    if not path.is_file():
        raise WeightsError(
            f"extract.c3d_mean={setting!r}: no such file (expected '{C3D_MEAN_CHANNEL}', "
            f"'{C3D_MEAN_SPORTS1M}' or a .binaryproto / .npy mean cube)"
        )
    return path, sha256_file(path)


@EXTRACTORS.register("c3d_fc6")
class C3dFc6Extractor(ClipExtractor):
    """C3D Sports-1M fc6 (after ReLU by default): one 4096-D vector per 16-frame clip.

    Preprocessing (done by the extract stage): frames resized to 128x171, minus :attr:`frame_mean` when a
    mean cube is used, 112x112 crops; :meth:`normalize` turns RGB [0, 255] into Caffe's BGR minus the
    channel mean (module docstring).

    Args:
        weights: optional local file (``--set extract.weights=PATH``): the port's ``c3d.pickle`` or a
            state dict of :class:`C3D`; without it the default weights are fetched into the user cache
            and pinned on first download.
        device: torch device for the network.
        fc6_relu: fc6 after the ReLU (default, as C3D's in-place ``relu6`` on ``fc6-1``) or before it.
        pool5: ``"caffe"`` (default) or ``"port"``, see :class:`C3D`.
        mean: ``extract.c3d_mean``: ``"channel"`` (default), ``"sports1m"`` or a mean cube file
            (:func:`resolve_c3d_mean`).

    Attributes:
        frame_mean: None (per-channel mean), or ``[3, 16, 128, 171]`` float32 on ``device``: the mean cube
            minus :data:`C3D_MEAN_BGR`, channels reversed to R, G, B, which the extract stage subtracts
            from the resized clips before cropping (``extractors.transforms.preprocess_clips``).
        mean_sha256: sha256 of the mean cube file in use, or None.

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
        mean: str = C3D_MEAN_CHANNEL,
    ) -> None:
        super().__init__(weights=weights, device=device)
        self.fc6_relu = fc6_relu
        path, self._checksum = fetch_pinned_weights(self.weights_spec, local_path=weights)
        self.model = load_c3d(path, pool5=pool5).to(self.device)
        self._mean_bgr = torch.tensor(C3D_MEAN_BGR, dtype=torch.float32).view(1, 3, 1, 1, 1)
        source = resolve_c3d_mean(mean)
        self.mean_sha256: str | None = source[1] if source is not None else None
        self.frame_mean: torch.Tensor | None = None
        if source is not None:
            residual = load_c3d_mean(source[0]) - self._mean_bgr[0]  # [3, 16, 128, 171], B, G, R
            self.frame_mean = residual.flip(0).contiguous().to(self.device)
            logger.info("C3D: subtracting the mean cube %s (sha256 %s) before cropping", source[0], source[1])

    @classmethod
    def config_options(cls, extract_cfg: Any) -> dict[str, Any]:
        """``{"mean": extract.c3d_mean}``."""
        return {"mean": getattr(extract_cfg, "c3d_mean", C3D_MEAN_CHANNEL)}

    @classmethod
    def key_inputs(cls, extract_cfg: Any) -> dict[str, Any]:
        """``{"c3d_mean_sha256": ...}`` of the mean cube actually used; nothing for the per-channel mean
        (``"channel"``, or ``"sports1m"`` when the cube cannot be had), so those keys are the ones from
        before the setting existed.

        Raises:
            StageError: a mean file that does not exist or a download that is not the release's file.
        """
        try:
            source = resolve_c3d_mean(getattr(extract_cfg, "c3d_mean", C3D_MEAN_CHANNEL))
        except WeightsError as exc:  # called before the runner's error handling: one line, not a traceback
            raise StageError(f"extract: {exc}") from exc
        return {} if source is None else {"c3d_mean_sha256": source[1]}

    @property
    def weights_checksum(self) -> str:
        """sha256 of the weights file loaded (the local file, or the pinned default download)."""
        return self._checksum

    def normalize(self, clips: torch.Tensor) -> torch.Tensor:
        """RGB to Caffe's input: ``[N, 3, T, H, W]`` RGB in [0, 255] -> float32 **BGR** minus :data:`C3D_MEAN_BGR`.

        Output channel 0 is blue minus 90.25, 1 green minus 97.66, 2 red minus 101.41; values in about
        [-101.4, 164.8]. With a mean cube, ``clips`` already had :attr:`frame_mean` subtracted (the
        extract stage does it before cropping), and the result is BGR minus the cube.
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
