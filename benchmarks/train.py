"""Training speed of every detector on UCF-Crime-sized synthetic features.

    python benchmarks/train.py [--methods NAME ...] [--steps 20] [--videos 1610] [--crops 10]
                               [--dim 2048] [--mean-clips 455] [--device auto] [--json OUT]

The bank imitates UCF-Crime's training set (docs/protocols.md, section 2): 1,610 videos, 810
anomalous then 800 normal, 10 crops of 2,048-D ResNet-50 I3D features (RTFM's public features).
Segment-level detectors (Sultani MIL, RTFM, NG-MIL) get ``[1610, 10, 32, 2048]`` bags (4.2 GB);
clip-level ones (AR-Net, CLAWS) a :class:`~models.base.ClipBank` of every clip, with video lengths
drawn from a log-normal whose mean is ``--mean-clips`` (UCF-Crime: 128 h of 30 fps video over 1,900
videos = 455 16-frame clips per video on average, from 1.1 s to 1.6 h). A full-size clip bank is
about 60 GB; it is built as a memory-mapped file (in ``--tmp``), as the train stage does above
``train.mmap_over_gb``, so ``--crops`` / ``--videos`` can shrink it on a small machine (say so
beside the figures).

For each detector, with its own default config (batch composition, optimiser), it times
``--steps`` training steps after ``--warmup`` steps: the data path (``before_step`` +
``sample_batch`` + moving the batch to the device) and the compute (``losses`` + backward +
optimiser step), and extrapolates the wall time of the detector's full published schedule
(``train.iterations``). Goal (issue 4): RTFM's 15,000 iterations in under 10 minutes on one GPU,
with the data path never the bottleneck.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

log = logging.getLogger("benchmarks.train")


def segment_bank(n_abn: int, n_norm: int, crops: int, dim: int, seed: int):
    from models import FeatureBank

    g = torch.Generator().manual_seed(seed)
    n = n_abn + n_norm
    feats = torch.empty(n, crops, 32, dim)
    for i in range(n):  # per video, so peak memory is the bank plus one video
        feats[i] = torch.rand(crops, 32, dim, generator=g)
    labels = torch.tensor([1] * n_abn + [0] * n_norm)
    return FeatureBank(feats, labels, [f"v{i}" for i in range(n)])


def clip_lengths(n: int, mean_clips: float, seed: int) -> np.ndarray:
    """Log-normal video lengths (sigma 1.0) with the given mean, clipped to [2, 20 * mean]."""
    rng = np.random.default_rng(seed)
    sigma = 1.0
    mu = np.log(mean_clips) - sigma**2 / 2
    return np.clip(rng.lognormal(mu, sigma, n).round(), 2, 20 * mean_clips).astype(np.int64)


def clip_bank(n_abn: int, n_norm: int, crops: int, dim: int, mean_clips: float, seed: int, tmp: Path):
    from models import ClipBank

    n = n_abn + n_norm
    lengths = clip_lengths(n, mean_clips, seed)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    shape = (int(offsets[-1]), crops, dim)
    gb = np.prod(shape) * 4 / 2**30
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "clip_bank.npy"
    log.info("clip bank %s (%.1f GiB) memory-mapped at %s", shape, gb, path)
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
    rng = np.random.default_rng(seed)
    step = 4096
    for a in range(0, shape[0], step):
        arr[a : a + step] = rng.random((min(step, shape[0] - a), crops, dim), dtype=np.float32)
    arr.flush()
    labels = torch.tensor([1] * n_abn + [0] * n_norm)
    bank = ClipBank(torch.from_numpy(arr), torch.from_numpy(offsets), labels, [f"v{i}" for i in range(n)])
    return bank, gb, lengths


def time_detector(name: str, bank, device: torch.device, steps: int, warmup: int) -> dict:
    from models import DETECTORS

    cfg = DETECTORS.get_class(name).Config()
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = DETECTORS.get(name, feature_dim=int(bank.features.shape[-1]), cfg=cfg).to(device)
    opt = model.make_optimizer()
    t = time.perf_counter()
    model.setup(bank, gen)
    setup_s = time.perf_counter() - t
    model.train()
    data_s = compute_s = 0.0

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for step in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        model.before_step(bank, step, gen)
        batch = model.sample_batch(bank, gen).to(device)
        sync()
        t1 = time.perf_counter()
        terms = model.losses(batch)
        opt.zero_grad(set_to_none=True)
        terms["total"].backward()
        opt.step()
        sync()
        t2 = time.perf_counter()
        if step >= warmup:
            data_s += t1 - t0
            compute_s += t2 - t1
    per_step = (data_s + compute_s) / steps
    return {
        "method": name,
        "batch": f"{cfg.batch_abnormal}+{cfg.batch_normal}",
        "setup_s": round(setup_s, 3),
        "steps_timed": steps,
        "it_per_s": round(1 / per_step, 3),
        "data_share": round(data_s / (data_s + compute_s), 3),
        "ms_data_per_step": round(1000 * data_s / steps, 1),
        "ms_compute_per_step": round(1000 * compute_s / steps, 1),
        "schedule_iterations": cfg.iterations,
        "schedule_minutes": round(cfg.iterations * per_step / 60 + setup_s / 60, 1),
    }


def main() -> None:
    from models import DETECTORS, TrainConfig
    from stages.train import bank_on_device
    from pipeline.core.runner import resolve_device

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="*", default=None, help="detectors (default: all registered)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--videos", type=int, default=1610, help="training videos, half anomalous (UCF-Crime: 1,610)")
    p.add_argument("--crops", type=int, default=10)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--mean-clips", type=float, default=455.0)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--tmp", type=Path, default=Path("/tmp/wsvad-train-bench"))
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(resolve_device(a.device))
    names = a.methods or DETECTORS.list()
    n_abn = round(a.videos * 810 / 1610)
    n_norm = a.videos - n_abn
    levels = {n: DETECTORS.get_class(n).training_level() for n in names}
    env = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "videos": f"{n_abn} anomalous + {n_norm} normal",
        "crops": a.crops,
        "dim": a.dim,
        "date": time.strftime("%Y-%m-%d"),
    }
    results = []
    if "segments" in levels.values():
        t = time.perf_counter()
        bank = segment_bank(n_abn, n_norm, a.crops, a.dim, seed=0)
        if device.type == "cuda":
            bank.features = bank.features.to(device)
        env["segment_bank"] = f"{tuple(bank.features.shape)}, {bank.features.numel() * 4 / 2**30:.1f} GiB, built in {time.perf_counter() - t:.0f} s"
        for n in names:
            if levels[n] == "segments":
                log.info("timing %s", n)
                results.append(time_detector(n, bank, device, a.steps, a.warmup))
        del bank
    if "clips" in levels.values():
        t = time.perf_counter()
        bank, gb, lengths = clip_bank(n_abn, n_norm, a.crops, a.dim, a.mean_clips, seed=0, tmp=a.tmp)
        # placed as the train stage places it: stays mapped on the CPU, copied to a GPU it fits
        bank.features = bank_on_device(bank.features, device, TrainConfig().mmap_over_gb)
        env["clip_bank"] = (
            f"{tuple(bank.features.shape)}, {gb:.1f} GiB memory-mapped, "
            f"{'copied to the GPU' if bank.features.is_cuda else 'read from the mapped file'}, clips per video mean "
            f"{lengths.mean():.0f} median {np.median(lengths):.0f} max {lengths.max()}, built in {time.perf_counter() - t:.0f} s"
        )
        for n in names:
            if levels[n] == "clips":
                log.info("timing %s", n)
                results.append(time_detector(n, bank, device, a.steps, a.warmup))
        del bank
        (a.tmp / "clip_bank.npy").unlink(missing_ok=True)
    print(json.dumps({"env": env, "results": results}, indent=1))
    print("\n| detector | batch | it/s | data share | ms data / step | ms compute / step | schedule | est. minutes |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['method']} | {r['batch']} | {r['it_per_s']} | {r['data_share']:.0%} | {r['ms_data_per_step']} | "
              f"{r['ms_compute_per_step']} | {r['schedule_iterations']} | {r['schedule_minutes']} |")
    if a.json:
        a.json.write_text(json.dumps({"env": env, "results": results}, indent=1))


if __name__ == "__main__":
    main()
