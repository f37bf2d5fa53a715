"""MIST end to end (``--method mist``): AUC before and after stage II, and the time of each step.

    python benchmarks/mist.py --dataset demo [--ft-epochs 4 --ft-freeze-epochs 3] [--run-dir runs/mist-demo]
    python benchmarks/mist.py --dataset ped2 --ft-batch-videos 2 [--folds A B] [...]   # ../shared/data/ucsd_ped2

``--ft-batch-videos`` counts the videos of each class (stage II batches are class-balanced); a Ped2
fold has 2 normal training videos, so it needs 2 there.

Every step is the pipeline's own stage, run by the runner (so a rerun reuses what is cached):
extract (Inception-I3D, Kinetics weights, ``--crops``), ``mist_generator`` (stage I), ``mist_pseudo``,
``train`` (stage II, E_SGA fine-tuning on raw clips), ``mist_extract`` (re-extraction), ``evaluate``.

Reported per dataset (and fold):

- ``auc_generator``: stage I's G scoring the test videos' pretrained features (before stage II),
  and ``generator_scores``, the min / mean / max of those scores (a collapsed G scores a constant);
- ``auc_esga``: the evaluate stage's AUC, E_SGA's main head on the re-extracted features (after);
- ``auc_<other>_pretrained`` / ``auc_<other>_mist``: another detector (``--other``, default AR-Net
  with its documented ``short_schedule``, ``--other-iterations`` steps) trained on the pretrained
  and on the re-extracted training features (the poster's Table 3, "encoder-agnostic"): the mean
  over ``--other-seeds`` (default: the run's seed), each seed's AUC in ``..._per_seed``;
- the seconds of each stage (0 for one reused from the cache, listed in ``cached``) and of each stage
  II step, backbone frozen and fine-tuned apart (``stage2_step_seconds``);
- ``feature_change``: how far stage II moved the test videos' features (cosine to the pretrained
  ones, norm ratio) and how flat E_SGA's attention maps are.

UCSD Ped2 uses the weak two-fold split of ``benchmarks/ped2_detectors.py`` (its functions): each
training clip becomes a normal video (the clips ending a clip before the first anomalous frame) and
an anomalous one (the rest); as stage II needs raw frames, each of those is a folder of symbolic
links to its frames under ``--run-dir``. Test videos are the other fold's whole clips.
"""

from __future__ import annotations

import argparse
import csv
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
sys.path.insert(0, str(ROOT / "benchmarks"))

log = logging.getLogger("benchmarks.mist")


def frame_scores(model: torch.nn.Module, features: dict[str, tuple[dict, np.ndarray]],
                 gt: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``model``'s frame scores and the ground truth over the concatenated test videos (covered frames)."""
    from stages.evaluate import frames_from_units, score_units

    scores, truth = [], []
    for vid, (meta, feats) in features.items():
        units, unit_frames = score_units(model, (meta, {"features": feats}), None, "cpu")
        s, covered = frames_from_units(units, unit_frames, int(meta["n_frames"]))
        scores.append(s[covered])
        truth.append(gt[vid][covered])
    return np.concatenate(scores), np.concatenate(truth)


def frame_auc(model: torch.nn.Module, features: dict[str, tuple[dict, np.ndarray]], gt: dict[str, np.ndarray]) -> float:
    """Frame-level ROC AUC of ``model``'s clip scores over the concatenated test videos."""
    from sklearn.metrics import roc_auc_score

    scores, truth = frame_scores(model, features, gt)
    return float(roc_auc_score(truth, scores))


def score_range(scores: np.ndarray) -> dict[str, float]:
    """Min, mean and max of G's test scores: a G collapsed to one constant score (e.g. all 0) shows here."""
    return {"min": round(float(scores.min()), 6), "mean": round(float(scores.mean()), 6), "max": round(float(scores.max()), 6)}


def load_split(sd, videos) -> dict[str, tuple[dict, np.ndarray]]:
    out = {}
    for v in videos:
        meta, arrays = sd.load_item(v.id)
        out[v.id] = (meta, arrays["features"].astype(np.float32))
    return out


def other_detector_auc(name: str, iterations: int, seed: int, train: dict, labels: dict, test: dict, gt: dict) -> float:
    from models import DETECTORS, ClipBank, fit

    cls = DETECTORS.get_class(name)
    cfg = cls.Config()
    for k, v in cls.short_schedule.items():
        setattr(cfg, k, v)
    cfg.batch_abnormal = min(cfg.batch_abnormal, sum(labels.values()))
    cfg.batch_normal = min(cfg.batch_normal, len(labels) - sum(labels.values()))
    cfg.seed = seed  # batch orders drawn from the config's seed follow the run's seed too
    bank = ClipBank.from_videos([f for _, f in train.values()], [labels[v] for v in train], list(train))
    torch.manual_seed(seed)
    model = DETECTORS.get(name, feature_dim=int(bank.features.shape[-1]), cfg=cfg)
    fit(model, bank, iterations, torch.Generator().manual_seed(seed))
    return frame_auc(model, test, gt)


def run_chain(run_dir: Path, sets: list[str], other: str, other_iterations: int, other_seeds: list[int] | None = None) -> dict:
    """The MIST chain through the runner; AUCs before/after and each stage's seconds."""
    from stages.config import build_config
    from pipeline.core.runner import Runner
    from pipeline.runs import make_context
    from stages import all_stages
    from stages.train import load_detector

    cfg = build_config(sets=sets, method="mist")
    ctx = make_context(cfg, run_dir, progress=False)
    runner = Runner(ctx, all_stages())
    t0 = time.time()
    reports = {r.stage: r for r in runner.run(["evaluate"])}
    total = time.time() - t0
    failed = [f for r in reports.values() for f in r.failed]
    if failed:
        raise SystemExit(f"stages failed: {failed}")
    from pipeline.core.store import StageDir

    test_v, train_v = ctx.manifest.split("test"), ctx.manifest.split("train")
    ext, mext = StageDir(reports["extract"].path), StageDir(reports["mist_extract"].path)
    gt = {v.id: np.asarray(v.frame_labels(int(ext.load_meta(v.id)["n_frames"])), np.uint8) for v in test_v}
    g = load_detector(StageDir(reports["mist_generator"].path))
    labels = {v.id: v.label for v in train_v}
    g_scores, g_truth = frame_scores(g, load_split(ext, test_v), gt)
    from sklearn.metrics import roc_auc_score

    out = {
        "auc_generator": float(roc_auc_score(g_truth, g_scores)),
        "generator_scores": score_range(g_scores),
        "auc_esga": reports["evaluate"].summary["auc"],
        "seconds": {name: round(r.seconds, 1) for name, r in reports.items()},
        "total_seconds": round(total, 1),
        "stage2": reports["train"].summary,
        "stage2_step_seconds": stage2_step_seconds(reports["train"].path, cfg.train.ft_freeze_epochs),
        "feature_change": feature_change(ext, mext, [v.id for v in test_v]),
        "cached": [name for name, r in reports.items() if r.state == "done"],
    }
    for tag, sd in (("pretrained", ext), ("mist", mext)):
        train, test = load_split(sd, train_v), load_split(sd, test_v)
        aucs = [other_detector_auc(other, other_iterations, seed, train, labels, test, gt) for seed in other_seeds or [cfg.train.seed]]
        out[f"auc_{other}_{tag}"] = float(np.mean(aucs))
        out[f"auc_{other}_{tag}_per_seed"] = aucs
    return out


def feature_change(ext, mext, ids: list[str]) -> dict[str, float]:
    """How far stage II moved the test videos' features: mean (and min) cosine between each clip's
    pretrained and re-extracted feature, their norm ratio, and the spread of E_SGA's attention maps
    (mean of each map's standard deviation over its ``h x w`` cells; 0 = a flat map)."""
    cos, ratio, spread = [], [], []
    for vid in ids:
        a = ext.load_item(vid)[1]["features"].astype(np.float64)  # [T, C, D]
        _, arrays = mext.load_item(vid)
        b = arrays["features"].astype(np.float64)
        a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])  # [T * C, D]
        na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
        cos.append((a * b).sum(1) / (na * nb))
        ratio.append(nb / na)
        att = arrays["attention"].astype(np.float32)  # [T, C, h, w]
        spread.append(att.reshape(*att.shape[:2], -1).std(-1).ravel())
    cos_all = np.concatenate(cos)
    return {"cosine_mean": round(float(cos_all.mean()), 4), "cosine_min": round(float(cos_all.min()), 4),
            "norm_ratio": round(float(np.concatenate(ratio).mean()), 3),
            "attention_spread": round(float(np.concatenate(spread).mean()), 4)}


def stage2_step_seconds(train_dir: Path, freeze_epochs: int) -> dict[str, list[float]]:
    """Seconds of each stage II step (``train_log.csv``), backbone frozen and fine-tuned apart."""
    out: dict[str, list[float]] = {"frozen": [], "unfrozen": []}
    with open(train_dir / "train_log.csv", newline="") as f:
        for row in csv.DictReader(f):
            out["frozen" if int(row["epoch"]) < freeze_epochs else "unfrozen"].append(round(float(row["seconds"]), 1))
    return out


def ped2_fold_manifest(run_dir: Path, train_ids: list[str], test_ids: list[str]) -> Path:
    """A manifest of the fold's weak training videos (symlinked frame folders) and its test clips."""
    from ped2_detectors import PED2, ped2_intervals

    intervals = ped2_intervals()
    data = run_dir / "data"
    rows = []
    for cid in train_ids:
        frames = sorted((PED2 / "testing" / "frames" / cid).glob("*.jpg"))
        onset = min(s for s, _ in intervals[cid])
        n_normal = max(0, (onset - 16) // 16) * 16  # whole clips ending a clip before the onset (weak_videos)
        parts = ([("n", frames[:n_normal], 0)] if n_normal else []) + [("a", frames[n_normal:], 1)]
        for tag, files, label in parts:
            folder = data / f"w{cid}{tag}"
            folder.mkdir(parents=True, exist_ok=True)
            for i, f in enumerate(files):
                link = folder / f"{i:04d}.jpg"
                if not link.exists():
                    link.symlink_to(f)
            rows.append([folder.name, folder.name, "train", label, "Anomaly" if label else "Normal", ""])
    for cid in test_ids:
        link = data / f"t{cid}"
        if not link.exists():
            link.symlink_to(PED2 / "testing" / "frames" / cid)
        rows.append([link.name, link.name, "test", 1, "Anomaly", ";".join(f"{s}-{e}" for s, e in intervals[cid])])
    manifest = run_dir / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "path", "split", "label", "class", "intervals"])
        w.writerows(rows)
    return manifest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=("demo", "ped2"), default="demo")
    p.add_argument("--folds", nargs="*", default=["A", "B"], help="Ped2 folds to run")
    p.add_argument("--crops", default="center", choices=("center", "5", "10"))
    p.add_argument("--iterations", type=int, default=1000, help="stage I generator steps")
    p.add_argument("--ft-epochs", type=int, default=4)
    p.add_argument("--ft-freeze-epochs", type=int, default=3)
    p.add_argument("--ft-batch-videos", type=int, default=5,
                   help="videos of EACH class per stage II batch (train.ft_batch_videos; before commit 366507a it "
                        "counted both classes together: 5 here is the 10 videos per batch of the earlier runs)")
    p.add_argument("--other", default="ar_net")
    p.add_argument("--other-iterations", type=int, default=300)
    p.add_argument("--other-seeds", type=int, nargs="*", default=None, help="seeds of the other detector (default: train.seed)")
    p.add_argument("--set", action="append", default=[], dest="sets", help="more --set overrides")
    p.add_argument("--run-dir", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    common = [
        f"extract.crops={a.crops}", f"train.iterations={a.iterations}", f"train.ft_epochs={a.ft_epochs}",
        f"train.ft_freeze_epochs={a.ft_freeze_epochs}", f"train.ft_batch_videos={a.ft_batch_videos}",
        "train.sub_bags=4", "train.sub_bag_len=2", "train.topk=1", "train.batch_abnormal=10", "train.batch_normal=10",
        *a.sets,
    ]
    results = {}
    if a.dataset == "demo":
        run_dir = a.run_dir or ROOT / "runs" / "mist-demo"
        results["demo"] = run_chain(run_dir, ["data.manifest=demo", *common], a.other, a.other_iterations, a.other_seeds)
    else:
        from ped2_detectors import ped2_intervals

        ids = sorted(ped2_intervals())
        folds = {"A": (ids[0::2], ids[1::2]), "B": (ids[1::2], ids[0::2])}
        for fold in a.folds:
            run_dir = (a.run_dir or ROOT / "runs" / "mist-ped2") / f"fold{fold}"
            manifest = ped2_fold_manifest(run_dir, *folds[fold])
            sets = [f"data.manifest={manifest}", f"data.root={run_dir / 'data'}", *common]
            results[f"ped2_fold{fold}"] = run_chain(run_dir, sets, a.other, a.other_iterations, a.other_seeds)
    env = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(sys.argv),
        "settings": common,
    }
    print(json.dumps({"env": env, "results": results}, indent=1))
    if a.json:
        a.json.write_text(json.dumps({"env": env, "results": results}, indent=1))


if __name__ == "__main__":
    main()
