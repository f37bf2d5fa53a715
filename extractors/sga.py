"""MIST's self-guided attention encoder E_SGA (stage II) and the extractor that re-extracts with it.

J.-C. Feng, F.-T. Hong, W.-S. Zheng, "MIST: Multiple Instance Self-Training Framework for Video
Anomaly Detection", CVPR 2021 (``papers/mist-poster.txt``, "Stage II: Feature Encoder Finetuning");
the layers below are those of the authors' code (fjchange/MIST_VAD, ``models/Attention.py``,
``Self_Guided_Attention_Branch_Module``; ``models/I3D_STD.py``, ``I3D_SGA_STD``;
``models/C3D_STD.py``, ``C3D_SGA_STD``).

E_SGA = the backbone of the extract stage (the same network code: :class:`~extractors.i3d_inception.
InceptionI3d` or :class:`~extractors.c3d.C3D`, which expose their mid-level maps) plus:

- ``M_{b-4}``, the mid-level map: Inception-I3D ``Mixed_4f`` (832 channels, T/4, H/16, W/16), C3D
  ``conv4b`` (512 channels after its ReLU, T/4, H/8, W/8), as ``I3D_SGA_STD.forward`` (``out_4f``) and
  ``C3D_SGA_STD.forward`` (``out_4``).
- ``F1``: a 3x3x3 convolution, stride (1, 2, 2), padding (0, 1, 1) -- no temporal padding, so 4 time
  steps become 2 -- C -> C channels, ReLU; then a 1x1x1 convolution to ``2 * expand_k`` channels, ReLU
  (official ``Conv_Atten`` with ``out_t_channels=2``, then ``Att_1``). Its output is ``M*_{b-4}``.
- ``F2``: a convolution with kernel (2, 1, 1) (the 2 remaining time steps) to one channel, sigmoid:
  the spatial attention ``A`` ``[N, 1, 1, h, w]`` in (0, 1) (official ``Att_3``).
- ``H_g``, the guided classification head: a 1x1x1 convolution ``2k -> 2k`` on ``M*_{b-4}``, global
  average pooling, the ``2k`` channels averaged in two groups of ``k`` (channels ``0..k-1`` -> normal,
  ``k..2k-1`` -> anomalous): 2 logits (official ``Att_2`` + ``GAP`` + ``view(B, 2, -1).mean(-1)``;
  the softmax is applied by the loss, as the official ``forward(act=True)``).
- The attended final map ``M_b + A * M_b`` (A broadcast over the final map's 2 time steps; the final
  map is I3D ``Mixed_5c`` or C3D ``conv5b``), global average pooled to the clip feature ``f``
  (1024-D for I3D, 512-D for C3D), then the main head: dropout 0.8 and ``Linear(D, 2)``
  (official ``Regressor``).

Every new layer keeps PyTorch's default initialisation (the official modules call no init function).
:data:`OFFICIAL_NAMES` maps this module's parameter names to the official ones. The re-extracted
feature of a clip is ``f``; the main head scores it (``models.mist`` keeps a copy of that head).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from extractors.base import ClipExtractor

#: mid-level endpoint per backbone network and its channels (module docstring)
I3D_MID = ("Mixed_4f", 832)
C3D_MID = ("conv4b", 512)


def scale_input_(clips: torch.Tensor, mean_std: tuple[float, float]) -> torch.Tensor:
    """``(x - mean) / std`` in place on float32 ``clips`` ``[N, 3, T, H, W]`` in [0, 255] (MIST's I3D
    input: mean = std = 128, ``datasets/dataset.py`` ``Normalize``; values in [-1, 0.99])."""
    mean, std = mean_std
    return clips.sub_(mean).div_(std)


def normalize_input(clips: torch.Tensor, input_norm: tuple[float, float] | None, base: Any) -> torch.Tensor:
    """E_SGA's input scaling of ``[N, 3, T, H, W]`` clips in [0, 255], the same in stage II training and
    re-extraction: ``(x - mean) / std`` for ``input_norm`` (a float32 copy; :func:`scale_input_`),
    else the base extractor's ``normalize``."""
    if input_norm is not None:
        return scale_input_(clips.to(torch.float32, copy=True), input_norm)
    return base.normalize(clips)


def backbone_maps(backbone: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``M_{b-4}`` and the final map of ``backbone`` for clips ``x`` ``[N, 3, T, H, W]`` (see module docstring)."""
    if hasattr(backbone, "forward_maps"):
        return backbone.forward_maps(x, mid=I3D_MID[0])
    if hasattr(backbone, "conv_maps"):
        return backbone.conv_maps(x)
    raise TypeError(f"{type(backbone).__name__} exposes no mid-level map (forward_maps / conv_maps)")


def backbone_channels(backbone: nn.Module) -> tuple[int, int]:
    """(channels of ``M_{b-4}``, channels of the final map) of a supported backbone."""
    if hasattr(backbone, "forward_maps"):
        return I3D_MID[1], int(backbone.feature_dim)
    if hasattr(backbone, "conv_maps"):
        return C3D_MID[1], 512
    raise TypeError(f"{type(backbone).__name__} is not a supported MIST backbone (Inception-I3D or C3D)")


#: this module's parameter-name prefixes -> the official ones (``I3D_SGA_STD`` / ``C3D_SGA_STD``:
#: ``Conv_Atten`` is the attention branch module, whose own ``Conv_Atten`` is F1's 3x3x3 convolution)
OFFICIAL_NAMES = {
    "sga.f1.0.": "Conv_Atten.Conv_Atten.0.",
    "sga.f1.2.": "Conv_Atten.Att_1.0.",
    "sga.guide.": "Conv_Atten.Att_2.",
    "sga.f2.": "Conv_Atten.Att_3.0.",
    "head.": "Regressor.1.",
}


def to_official_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The attention branch and main head of an :class:`ESGA` state dict under the official names
    (:data:`OFFICIAL_NAMES`); backbone entries are left out (the backbone ports name layers differently)."""
    out = {}
    for k, v in state.items():
        for ours, theirs in OFFICIAL_NAMES.items():
            if k.startswith(ours):
                out[theirs + k[len(ours):]] = v
    return out


class SelfGuidedAttention(nn.Module):
    """F1, F2 and H_g on ``M_{b-4}`` (module docstring; official ``Self_Guided_Attention_Branch_Module``
    with ``out_t_channels=2``).

    Args:
        in_channels: channels of ``M_{b-4}`` (832 for I3D ``Mixed_4f``, 512 for C3D ``conv4b``).
        expand_k: half the number of attention channels (official ``--expand_k 8``, configs/*_options.py).
        mid_t: temporal length of ``M_{b-4}`` (clip_len / 4 for both backbones: 4 for 16-frame clips).
            F1 has no temporal padding, so F2's temporal kernel is ``mid_t - 2`` (2 for 16-frame clips,
            the official ``kernel_size=(out_t_channels, 1, 1)``) and ``A`` has one time step.
    """

    def __init__(self, in_channels: int, expand_k: int, mid_t: int) -> None:
        super().__init__()
        if mid_t < 3:
            raise ValueError(f"the attention branch needs M_(b-4) with >= 3 time steps (clips of >= 9 frames), got {mid_t}")
        heads = 2 * expand_k
        self.expand_k = expand_k
        self.mid_t = mid_t
        self.f1 = nn.Sequential(
            nn.Conv3d(in_channels, in_channels, 3, stride=(1, 2, 2), padding=(0, 1, 1)), nn.ReLU(),
            nn.Conv3d(in_channels, heads, 1), nn.ReLU(),
        )
        self.f2 = nn.Conv3d(heads, 1, (mid_t - 2, 1, 1))
        self.guide = nn.Conv3d(heads, heads, 1)

    def forward(self, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``m`` ``[N, C, mid_t, H', W']`` -> attention ``A`` ``[N, 1, 1, h, w]`` in (0, 1)
        (``h = ceil(H'/2)``), guided logits ``[N, 2]`` and ``M*_{b-4}`` ``[N, 2k, mid_t - 2, h, w]`` (>= 0)."""
        if m.shape[2] != self.mid_t:
            raise ValueError(f"M_(b-4) has {m.shape[2]} time steps, the attention expects {self.mid_t} "
                             "(clips of clip_len = 4 * mid_t frames)")
        m_star = self.f1(m)
        attention = torch.sigmoid(self.f2(m_star))
        pooled = self.guide(m_star).mean(dim=(2, 3, 4))  # [N, 2k]
        guided = pooled.view(-1, 2, self.expand_k).mean(-1)
        return attention, guided, m_star


@dataclass
class SGAOutput:
    """One forward pass of E_SGA on ``N`` clips.

    Attributes:
        logits: ``[N, 2]`` main head (normal, anomalous), before softmax.
        guided_logits: ``[N, 2]`` guided head H_g, before softmax.
        attention: ``[N, h, w]`` float32 in (0, 1), on the final map's spatial grid.
        feature: ``[N, D]`` the attended, pooled clip feature (what re-extraction stores).
    """

    logits: torch.Tensor
    guided_logits: torch.Tensor
    attention: torch.Tensor
    feature: torch.Tensor


def batch_norms(module: nn.Module) -> list[nn.Module]:
    """The batch-normalisation layers of ``module`` (any layer keeping ``running_mean``: torch's
    ``BatchNorm*d`` and I3D's :class:`~extractors.i3d_inception.BatchNorm3dNoScale`)."""
    return [m for m in module.modules() if isinstance(getattr(m, "running_mean", None), torch.Tensor)]


class ESGA(nn.Module):
    """Backbone + self-guided attention + main head (module docstring).

    Args:
        backbone: an :class:`InceptionI3d` or :class:`C3D` (weights as the extract stage loads them).
        expand_k: see :class:`SelfGuidedAttention`.
        dropout: dropout before the main head's linear layer (official ``--dropout_rate 0.8``).
        clip_len: frames per clip (16).
        bn_batch_stats: in training mode the backbone's batch-norm layers normalise with, and update
            their running statistics from, each batch (the official ``--use_bn_sta``,
            ``I3D_SGA_STD.freeze_batch_norm`` keeping them in ``train()``); False keeps them in eval
            mode (running statistics, frozen).
        bn_scale: give the backbone's scale-free batch norms (Inception-I3D's
            :class:`~extractors.i3d_inception.BatchNorm3dNoScale`) a trainable scale of ones, as the
            affine BatchNorm3d of the official I3D (``models/I3D_STD.py``, ``Unit3Dpy``).
    """

    def __init__(self, backbone: nn.Module, expand_k: int = 8, dropout: float = 0.8, clip_len: int = 16,
                 bn_batch_stats: bool = True, bn_scale: bool = False) -> None:
        super().__init__()
        if bn_scale:
            for m in backbone.modules():
                if hasattr(m, "enable_scale"):
                    m.enable_scale()
        mid_c, final_c = backbone_channels(backbone)
        self.backbone = backbone
        self.feature_dim = final_c
        self.bn_batch_stats = bn_batch_stats
        self.sga = SelfGuidedAttention(mid_c, expand_k, max(1, -(-clip_len // 4)))
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(final_c, 2)

    def set_backbone_trainable(self, trainable: bool, bn_affine: bool | None = None) -> None:
        """Freeze (False) or unfreeze the backbone's parameters (official ``freeze_part_model``);
        its batch-norm affine parameters train only when both ``trainable`` and ``bn_affine`` (default:
        ``trainable``) hold (official ``freeze_batch_norm``, ``--freeze_bn_epochs``)."""
        bn_params = {id(p) for m in batch_norms(self.backbone) for p in m.parameters(recurse=False)}
        bn_on = trainable if bn_affine is None else (trainable and bn_affine)
        for p in self.backbone.parameters():
            p.requires_grad_(bn_on if id(p) in bn_params else trainable)

    def set_bn_momentum(self, momentum: float) -> None:
        """Momentum of the backbone's running batch statistics (torch convention: new = (1 - m) old + m batch)."""
        for m in batch_norms(self.backbone):
            m.momentum = momentum

    def train(self, mode: bool = True) -> "ESGA":
        """Training mode; the backbone's batch norms stay in eval mode unless ``bn_batch_stats``."""
        super().train(mode)
        if mode and not self.bn_batch_stats:
            self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> SGAOutput:
        """``x``: ``[N, 3, T, H, W]`` normalised clips (the backbone's input convention)."""
        frozen = not any(p.requires_grad for p in self.backbone.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            mid, final = backbone_maps(self.backbone, x)
        attention, guided, _ = self.sga(mid)
        if attention.shape[-2:] != final.shape[-2:]:  # odd input sizes: put A on the final grid
            attention = F.interpolate(attention.flatten(1, 2), size=final.shape[-2:], mode="bilinear",
                                      align_corners=False).unsqueeze(2)
        feature = (final + attention * final).mean(dim=(2, 3, 4))
        logits = self.head(self.dropout(feature))
        return SGAOutput(logits, guided, attention[:, 0, 0], feature)


def build_esga(extractor: Any, expand_k: int, dropout: float, clip_len: int, bn_batch_stats: bool = True,
               bn_scale: bool = False) -> ESGA:
    """An E_SGA around a built extractor's network (``extractor.model``)."""
    model = getattr(extractor, "model", None)
    if not isinstance(model, nn.Module):
        raise TypeError(f"extractor {type(extractor).__name__} has no network to fine-tune")
    return ESGA(model, expand_k=expand_k, dropout=dropout, clip_len=clip_len, bn_batch_stats=bn_batch_stats,
                bn_scale=bn_scale)


class SGAExtractor:
    """Re-extraction with a fine-tuned E_SGA: E_SGA's pooled attended feature ``f`` per clip
    (``[N, D]``), and each clip's attention map kept in :attr:`attention` (a list of ``[N, h, w]``
    float32 CPU arrays, one per batch, in order) for the spatial explanation.

    Input: the test-time input stage II recorded in ``encoder.pt`` (``test_input``: the resize spec
    and the crops; MIST's official one for ShanghaiTech I3D is the whole frame resized to 240x320,
    no crop, ``datasets/dataset.py``, ``Test_Dataset_SHT_I3D``), exposed as :attr:`resize` and
    :attr:`input_crops`, which the extract path (``extractors.stream.iter_clip_features``) uses in place
    of ``extract.crops``. Without one (``train.ft_test_input=extract``) it is the base extractor's
    resize and ``extract.crops``. Pixel scaling: the ``input_norm`` (mean, std) stage II trained with
    (``train.ft_input_norm=official``, MIST's I3D ``(x - 128) / 128``), else the base extractor's.
    Resize rule: the one stage II trained with (:attr:`resize_dtype`, OpenCV's by default).

    Args:
        base: the extract stage's extractor of ``encoder["backbone"]``, built on ``device``.
        encoder_path: ``encoder.pt`` written by MIST's stage II (``models.mist``).
    """

    def __init__(self, base: Any, encoder_path: str | Path) -> None:
        from pipeline.core.store import sha256_file, verified_torch_load

        path = Path(encoder_path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no fine-tuned MIST encoder (encoder.pt)")
        saved = verified_torch_load(path, map_location="cpu")  # ValueError if altered or unreadable
        if saved.get("backbone") != base.registry_name:
            raise ValueError(f"{path}: encoder fine-tuned from {saved.get('backbone')!r}, extract.backbone is "
                             f"{base.registry_name!r}")
        self.base = base
        self.device = base.device
        self.resize, self.crop_size, self.clip_len = base.resize, base.crop_size, base.clip_len
        test_input = saved.get("test_input") or {}
        #: crops to cut (``"none"``, ``"center"``, ...), or None for the run's ``extract.crops``
        self.input_crops: str | None = test_input.get("crops")
        if test_input.get("resize"):
            self.resize = tuple(test_input["resize"])
        self.pointwise_normalize = getattr(base, "pointwise_normalize", True)
        #: the resize rule stage II trained with (``"opencv"``; None: the run's extract.resize_dtype),
        #: which the extract path (``extractors.stream.network_input``) uses in place of the run's
        self.resize_dtype: str | None = saved.get("resize_dtype")
        norm = saved.get("input_norm")
        self.input_norm: tuple[float, float] | None = (float(norm[0]), float(norm[1])) if norm else None
        self.registry_name = f"{base.registry_name}+mist_sga"
        self._checksum = sha256_file(path)
        self.model = build_esga(base, saved["expand_k"], 0.0, saved["clip_len"], bn_batch_stats=False,
                                bn_scale=bool(saved.get("bn_scale", False)))
        self.model.load_state_dict(saved["state_dict"])
        self.model.to(self.device).eval()
        self.feature_dim = self.model.feature_dim
        self.attention: list[Any] = []

    @property
    def weights_checksum(self) -> str:
        """sha256 of ``encoder.pt``."""
        return self._checksum

    def normalize(self, clips: torch.Tensor) -> torch.Tensor:
        return normalize_input(clips, self.input_norm, self.base)

    def normalize_(self, clips: torch.Tensor) -> torch.Tensor:
        """:meth:`normalize` in place: the stage II scaling, or the base extractor's in-place
        normalisation (for a base without one, ``ClipExtractor.normalize_``'s default)."""
        if self.input_norm is not None:
            return scale_input_(clips, self.input_norm)
        in_place = getattr(self.base, "normalize_", None)
        return in_place(clips) if in_place is not None else ClipExtractor.normalize_(self, clips)

    def features(self, clips: torch.Tensor) -> torch.Tensor:
        """``[N, 3, T, s, s]`` normalised clips -> ``[N, D]`` float32; appends ``[N, h, w]`` attention."""
        with torch.inference_mode():
            out = self.model(clips.to(self.device, torch.float32))
        self.attention.append(out.attention.float().cpu().numpy())
        return out.feature.float()
