"""Issue 17's check of preset ``rtfm``: this project's extraction against the reference network fed by
the authors' preprocessing, on the same frames and the same weights.

    python benchmarks/rtfm_reference_check.py VIDEO [--weights TUSHAR_N.pth] [--frames 40] [--out DIR]
        [--set extract.KEY=VALUE ...]

Ours: ``extract_video`` (what ``pipeline run --stage extract`` runs per video) with
``--set extract.preset=rtfm --set extract.weights=FILE``.

Reference, written here from the authors' code (not from this project's modules):

- preprocessing of RTFM issue 21 (code ``Tushar-N/pytorch-resnet3d``, ``utils/gtransforms.py``): PIL
  images, torchvision ``Resize(256)`` (bilinear), ``TenCrop(224)``, values x255, mean 114.75 and std
  57.375 per channel; 16-frame non-overlapping clips, a trailing partial clip filled by ``LoopPad``
  (the clip's own frames cycled);
- network: ``I3Res50`` of ``Tushar-N/pytorch-resnet3d`` ``models/resnet.py`` evaluated with plain
  ``torch.nn.functional`` calls straight from the state dict under Tushar-N's names (stem 5x7x7 conv
  stride 2, max-pool (2,3,3)/2 without padding, bottlenecks with (1 + 2 t)x1x1 then 1x3x3 strided
  convolutions, a (2,1,1) max-pool after layer1), the feature the mean of layer4's output.

Frames: the first ``--frames`` frames of VIDEO are written as PNG files (lossless, so both sides read
the same pixels) and both sides read that folder. Without ``--weights`` a random network in Tushar-N's
layout (Kaiming-normal convolutions as ``I3Res50.__init__`` draws them, random BN statistics) is saved
and used: the check is then of the network's structure and the preprocessing, not of the real weights.

Prints, per clip and crop, the relative L2 of ours against the reference, and exits 0 when it is below
1e-2 everywhere (issue 17's criterion).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: Tushar-N ``I3Res50``: blocks per layer and each block's temporal half-kernel ``temp_conv``
LAYERS = {1: (64, [1, 1, 1]), 2: (128, [1, 0, 1, 0]), 3: (256, [1, 0, 1, 0, 1, 0]), 4: (512, [0, 1, 0])}


def random_tushar_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict with ``I3Res50``'s names and shapes."""
    g = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}

    def conv(name: str, shape: tuple[int, ...]) -> None:
        fan_out = shape[0] * int(np.prod(shape[2:]))
        state[f"{name}.weight"] = torch.randn(shape, generator=g) * (2.0 / fan_out) ** 0.5

    def bn(name: str, c: int) -> None:
        state[f"{name}.weight"] = 1 + 0.1 * torch.randn(c, generator=g)
        state[f"{name}.bias"] = 0.1 * torch.randn(c, generator=g)
        state[f"{name}.running_mean"] = 0.1 * torch.randn(c, generator=g)
        state[f"{name}.running_var"] = 0.5 + torch.rand(c, generator=g)
        state[f"{name}.num_batches_tracked"] = torch.tensor(0)

    conv("conv1", (64, 3, 5, 7, 7))
    bn("bn1", 64)
    inplanes = 64
    for layer, (planes, temps) in LAYERS.items():
        for b, t in enumerate(temps):
            p = f"layer{layer}.{b}"
            conv(f"{p}.conv1", (planes, inplanes, 1 + 2 * t, 1, 1))
            bn(f"{p}.bn1", planes)
            conv(f"{p}.conv2", (planes, planes, 1, 3, 3))
            bn(f"{p}.bn2", planes)
            conv(f"{p}.conv3", (planes * 4, planes, 1, 1, 1))
            bn(f"{p}.bn3", planes * 4)
            if b == 0:
                conv(f"{p}.downsample.0", (planes * 4, inplanes, 1, 1, 1))
                bn(f"{p}.downsample.1", planes * 4)
            inplanes = planes * 4
    state["fc.weight"] = torch.randn(400, 2048, generator=g) * 0.01
    state["fc.bias"] = torch.zeros(400)
    return state


def reference_features(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``I3Res50`` up to layer4, averaged over time and space: ``[N, 3, 16, 224, 224]`` -> ``[N, 2048]``."""

    def bn(name: str, y: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(y, state[f"{name}.running_mean"], state[f"{name}.running_var"],
                            state[f"{name}.weight"], state[f"{name}.bias"], False, 0.0, 1e-5)

    y = F.relu(bn("bn1", F.conv3d(x, state["conv1.weight"], stride=(2, 2, 2), padding=(2, 3, 3))))
    y = F.max_pool3d(y, (2, 3, 3), (2, 2, 2))
    for layer, (_, temps) in LAYERS.items():
        stride = 1 if layer == 1 else 2
        for b, t in enumerate(temps):
            p, s = f"layer{layer}.{b}", (stride if b == 0 else 1)
            out = F.relu(bn(f"{p}.bn1", F.conv3d(y, state[f"{p}.conv1.weight"], padding=(t, 0, 0))))
            out = F.relu(bn(f"{p}.bn2", F.conv3d(out, state[f"{p}.conv2.weight"], stride=(1, s, s), padding=(0, 1, 1))))
            out = bn(f"{p}.bn3", F.conv3d(out, state[f"{p}.conv3.weight"]))
            short = y
            if b == 0:
                short = bn(f"{p}.downsample.1", F.conv3d(y, state[f"{p}.downsample.0.weight"], stride=(1, s, s)))
            y = F.relu(out + short)
        if layer == 1:
            y = F.max_pool3d(y, (2, 1, 1), (2, 1, 1))
    return y.mean(dim=(2, 3, 4))


def reference_clips(frame_files: list[Path]) -> torch.Tensor:
    """The authors' preprocessing of PNG frames: ``[clips, 10, 3, 16, 224, 224]`` float32."""
    from PIL import Image
    from torchvision import transforms as T

    resize, ten = T.Resize(256), T.TenCrop(224)
    clips = []
    for start in range(0, len(frame_files), 16):
        idx = list(range(start, min(start + 16, len(frame_files))))
        idx = [idx[k % len(idx)] for k in range(16)]  # LoopPad: the partial clip's frames cycled
        crops = [ten(resize(Image.open(frame_files[i]).convert("RGB"))) for i in idx]  # 16 x 10 PIL crops
        t = torch.stack([torch.stack([T.functional.pil_to_tensor(c).float() for c in frame]) for frame in crops])
        clips.append(((t - 114.75) / 57.375).permute(1, 2, 0, 3, 4))  # [10, 3, 16, 224, 224]
    return torch.stack(clips)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("video", type=Path)
    ap.add_argument("--weights", type=Path, default=None, help="Tushar-N's converted i3d_r50_kinetics.pth")
    ap.add_argument("--frames", type=int, default=40, help="frames of VIDEO to use (default 40: 2 clips and a partial one)")
    ap.add_argument("--out", type=Path, default=None, help="folder for the frames and random weights (default: a temporary one)")
    ap.add_argument("--set", action="append", default=[], dest="sets", metavar="extract.KEY=VALUE",
                    help="override a setting of ours after the preset (to see that the check catches a departure)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_grad_enabled(False)

    import decord
    from PIL import Image

    from extractors.build import build_extractor
    from extractors.stream import extract_video
    from stages.config import build_config

    work = args.out or Path(tempfile.mkdtemp(prefix="rtfm_check_"))
    frames_dir = work / "frames"
    frames_dir.mkdir(parents=True, exist_ok=True)
    frames = decord.VideoReader(str(args.video))[: args.frames].asnumpy()
    files = []
    for i, f in enumerate(frames):
        files.append(frames_dir / f"{i + 1:06d}.png")
        Image.fromarray(f).save(files[-1])
    weights = args.weights
    if weights is None:
        weights = work / "random_i3d_r50_tushar.pth"
        torch.save(random_tushar_state(), weights)
    state = {k: v.float() for k, v in torch.load(weights, map_location="cpu", weights_only=True).items()}

    cfg = build_config(sets=["extract.preset=rtfm", f"extract.weights={weights}", "extract.device=cpu", *args.sets])
    ours, meta = extract_video(cfg, build_extractor(cfg.extract, "cpu"), frames_dir)  # [T, 10, 2048]
    ref_in = reference_clips(files)
    ref = torch.stack([reference_features(state, c) for c in ref_in]).numpy()  # [T, 10, 2048]
    print(f"{args.video}: {len(frames)} frames {frames.shape[2]}x{frames.shape[1]}; ours {ours.shape}, "
          f"reference {ref.shape}; weights {'random (Tushar-N layout)' if args.weights is None else weights}")
    if ours.shape != ref.shape:
        print("MISMATCH: clip or crop counts differ")
        return 1
    rel = np.linalg.norm(ours - ref, axis=-1) / np.maximum(np.linalg.norm(ref, axis=-1), 1e-12)
    for t in range(rel.shape[0]):
        print(f"clip {t} {meta['clip_ranges'][t]}: relative L2 per crop " + " ".join(f"{v:.2e}" for v in rel[t]))
    ok = bool((rel < 1e-2).all())
    print(f"{'match' if ok else 'MISMATCH'}: max relative L2 {rel.max():.3e} (criterion < 1e-2); "
          f"mean |feature| {np.abs(ref).mean():.3g}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
