"""MIST's self-guided attention encoder E_SGA (stage II) and the extractor that re-extracts with it.

J.-C. Feng, F.-T. Hong, W.-S. Zheng, "MIST: Multiple Instance Self-Training Framework for Video
Anomaly Detection", CVPR 2021 (``papers/mist-poster.txt``, "Stage II: Feature Encoder Finetuning").

E_SGA = the backbone of the extract stage (the same network code: :class:`~extractors.i3d_inception.
InceptionI3d` or :class:`~extractors.c3d.C3D`, which expose their mid-level maps) plus:

- ``M_{b-4}``, the mid-level map: Inception-I3D ``Mixed_4f`` (832 channels, T/4, H/16, W/16), C3D
  ``conv4b`` (512 channels, T/4, H/8, W/8), as in the authors' code (their C3D model takes conv4b;
  Mixed_4f is the last I3D block at stride 16, so one stride-2 convolution lands on the final map's grid).
- ``F1``: a 3x3x3 convolution (stride 1x2x2, C -> C channels, ReLU) then a 1x1x1 convolution to
  ``2 * expand_k`` channels (ReLU): its output is the attention feature map ``M*_{b-4}``.
- ``F2``: a convolution over the whole temporal extent of ``M*_{b-4}`` to one channel, sigmoid: the
  spatial attention ``A`` ``[N, 1, 1, h, w]`` in (0, 1) (poster: ``A = F2(F1(M_{b-4}))``).
- ``H_g``, the guided classification head: a 1x1x1 convolution on ``M*_{b-4}``, global average
  pooling, and the ``2 * expand_k`` channels averaged in two groups of ``expand_k``: 2 logits
  (normal, anomalous). Supervised by the pseudo-labels, it makes ``M*_{b-4}`` (and so ``A``)
  discriminative (poster: "attention map is indirectly enhanced by pseudo labels guidance").
- The attended final map ``M_b + A * M_b`` (the authors' code adds the attended map to the map),
  global average pooled to the clip feature ``f`` (1024-D for I3D, 512-D for C3D: conv5b pooled,
  as the authors' C3D model, not fc6), then the main head: dropout and a linear layer to 2 logits.

``expand_k`` = 8 (PROTOCOLS.md, MIST stage II). The re-extracted feature of a clip is ``f``; the
main head scores it (``models.mist`` keeps a copy of that head to score re-extracted features).
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


class SelfGuidedAttention(nn.Module):
    """F1, F2 and H_g on ``M_{b-4}`` (module docstring).

    Args:
        in_channels: channels of ``M_{b-4}``.
        expand_k: half the number of attention channels (PROTOCOLS.md: 8).
        mid_t: temporal length of ``M_{b-4}`` (clip_len / 4 for both backbones), the kernel of F2.
    """

    def __init__(self, in_channels: int, expand_k: int, mid_t: int) -> None:
        super().__init__()
        heads = 2 * expand_k
        self.expand_k = expand_k
        self.mid_t = mid_t
        self.f1 = nn.Sequential(
            nn.Conv3d(in_channels, in_channels, 3, stride=(1, 2, 2), padding=1), nn.ReLU(),
            nn.Conv3d(in_channels, heads, 1), nn.ReLU(),
        )
        self.f2 = nn.Conv3d(heads, 1, (mid_t, 1, 1))
        self.guide = nn.Conv3d(heads, heads, 1)

    def forward(self, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``m`` ``[N, C, mid_t, H', W']`` -> attention ``A`` ``[N, 1, 1, h, w]`` in (0, 1)
        (``h = ceil(H'/2)``), guided logits ``[N, 2]`` and ``M*_{b-4}`` ``[N, 2k, mid_t, h, w]`` (>= 0)."""
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


class ESGA(nn.Module):
    """Backbone + self-guided attention + main head (module docstring).

    Args:
        backbone: an :class:`InceptionI3d` or :class:`C3D` (weights as the extract stage loads them).
        expand_k: see :class:`SelfGuidedAttention`.
        dropout: dropout before the main head's linear layer.
        clip_len: frames per clip (16).
    """

    def __init__(self, backbone: nn.Module, expand_k: int = 8, dropout: float = 0.5, clip_len: int = 16) -> None:
        super().__init__()
        mid_c, final_c = backbone_channels(backbone)
        self.backbone = backbone
        self.feature_dim = final_c
        self.sga = SelfGuidedAttention(mid_c, expand_k, max(1, -(-clip_len // 4)))
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(final_c, 2)

    def set_backbone_trainable(self, trainable: bool) -> None:
        """Freeze (False) or unfreeze the backbone's parameters (the stage II schedule)."""
        for p in self.backbone.parameters():
            p.requires_grad_(trainable)

    def train(self, mode: bool = True) -> "ESGA":
        """The backbone's batch-norm statistics stay frozen (eval mode) even in training: stage II
        batches hold a few clips, too few for batch statistics."""
        super().train(mode)
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


def build_esga(extractor: Any, expand_k: int, dropout: float, clip_len: int) -> ESGA:
    """An E_SGA around a built extractor's network (``extractor.model``)."""
    model = getattr(extractor, "model", None)
    if not isinstance(model, nn.Module):
        raise TypeError(f"extractor {type(extractor).__name__} has no network to fine-tune")
    return ESGA(model, expand_k=expand_k, dropout=dropout, clip_len=clip_len)


class SGAExtractor:
    """Re-extraction with a fine-tuned E_SGA: the base extractor's preprocessing, E_SGA's pooled
    attended feature ``f`` per clip (``[N, D]``), and each clip's attention map kept in
    :attr:`attention` (a list of ``[N, h, w]`` float32 CPU arrays, one per batch, in order) for
    the spatial explanation.

    Args:
        base: the extract stage's extractor of ``encoder["backbone"]``, built on ``device``.
        encoder_path: ``encoder.pt`` written by MIST's stage II (``models.mist``).
    """

    def __init__(self, base: Any, encoder_path: str | Path) -> None:
        from pipeline.cache import sha256_file, verified_torch_load

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
        self.pointwise_normalize = getattr(base, "pointwise_normalize", True)
        self.registry_name = f"{base.registry_name}+mist_sga"
        self._checksum = sha256_file(path)
        self.model = build_esga(base, saved["expand_k"], 0.0, saved["clip_len"])
        self.model.load_state_dict(saved["state_dict"])
        self.model.to(self.device).eval()
        self.feature_dim = self.model.feature_dim
        self.attention: list[Any] = []

    @property
    def weights_checksum(self) -> str:
        """sha256 of ``encoder.pt``."""
        return self._checksum

    def normalize(self, clips: torch.Tensor) -> torch.Tensor:
        return self.base.normalize(clips)

    def normalize_(self, clips: torch.Tensor) -> torch.Tensor:
        """The base extractor's in-place normalisation; for a base without one,
        ``ClipExtractor.normalize_``'s default through :meth:`normalize`."""
        in_place = getattr(self.base, "normalize_", None)
        return in_place(clips) if in_place is not None else ClipExtractor.normalize_(self, clips)

    def features(self, clips: torch.Tensor) -> torch.Tensor:
        """``[N, 3, T, s, s]`` normalised clips -> ``[N, D]`` float32; appends ``[N, h, w]`` attention."""
        with torch.inference_mode():
            out = self.model(clips.to(self.device, torch.float32))
        self.attention.append(out.attention.float().cpu().numpy())
        return out.feature.float()
