"""Every detector on real I3D features of UCSD Ped2, with a weakly labelled two-fold split.

    python benchmarks/ped2_detectors.py [--crops center] [--resize-dtype uint8] [--iterations 1000] [--seeds 0 1 2]
                                        [--methods NAME ...] [--folds A B] [--diagnose]
                                        [--run-dir runs/ped2-bench] [--json OUT]

Data: the 12 UCSD Ped2 test clips in ``../shared/data/ucsd_ped2`` (JPEG frame folders, 120-180
frames each, 2,010 in all) and their frame-level intervals from ``ped2.mat`` (1-based inclusive,
converted to 0-based ``[start, end)``). Features: the real Kinetics-400 Inception-I3D
(``i3d_inception``, 1024-D), extracted by the pipeline's own extract stage into ``--run-dir`` (cached:
a rerun skips it), 16-frame clips, the last partial clip padded.

Weakly labelled split (defined here, because Ped2 ships no weak split and only its 12 test clips
are at hand; every one of them contains an anomaly and only 12 % of their frames are normal):

- two folds by clip: fold A trains on the odd clips (01, 03, ..., 11) and tests on the even ones,
  fold B the reverse; the AUC reported is per fold and their mean;
- each training clip becomes at most two training videos that share no frame: a *normal* video,
  the clips that end at least one whole clip before the first anomalous frame (label 0), and an
  *anomalous* video, everything after it (label 1). The anomalous video therefore starts with at
  least one normal clip and its anomaly's position is unknown to the detector: weak labels.
  Fold A has 2 normal videos (3 clips), fold B 2 (8 clips): a normal-starved, small-data setting;
- test: the other fold's full clips with frame-level ground truth; frame-level ROC AUC over the
  concatenation of the fold's test clips (docs/protocols.md, section 7), scores mapped to frames
  through each unit's clip range (``stages.evaluate``).

Training: each detector's own config (architecture, losses, batch composition, optimiser) except
``iterations`` (``--iterations``, the same for all; the published schedules are for datasets 100x
larger) and, with ``--short-schedule``, the detector's documented ``short_schedule`` settings for
short runs on small data (e.g. a higher learning rate); the model kept is the last step (never selected on the test clips). Segment-level
detectors get 32-segment bags from the pipeline's ``segment_bins`` / ``pool_segments`` with the
scheme their README commands use (``sultani`` for Sultani MIL, ``rtfm`` otherwise).

``--diagnose`` also logs every loss term every 30 steps and, per test clip, the number of normal
frames, the mean score of its normal and anomalous frames and the within-clip AUC; for a detector
with a ``rerank`` setting (NG-MIL) it adds the AUC of each score branch alone.
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
PED2 = Path(os.environ.get("VAD_SHARED_DATA", ROOT.parent / "shared" / "data")) / "ucsd_ped2"

log = logging.getLogger("benchmarks.ped2")


def ped2_intervals() -> dict[str, list[tuple[int, int]]]:
    """Clip id (``01``..``12``) -> 0-based ``[start, end)`` anomalous intervals from ``ped2.mat``."""
    import scipy.io

    gt = scipy.io.loadmat(PED2 / "ped2.mat")["gt"]
    out = {}
    for k in range(gt.shape[1]):
        rows = np.asarray(gt[0, k]).reshape(2, -1).T  # [[start; end]] 1-based inclusive
        out[f"{k + 1:02d}"] = [(int(s) - 1, int(e)) for s, e in rows]
    return out


def extract_features(run_dir: Path, crops: str, resize_dtype: str = "uint8") -> dict[str, tuple[dict, np.ndarray]]:
    """Run the pipeline's extract stage on the 12 clips; clip id -> (metadata, features ``[T, C, D]``)."""
    from stages.config import build_config
    from pipeline.core.runner import Runner
    from pipeline.runs import make_context
    from stages import all_stages

    run_dir.mkdir(parents=True, exist_ok=True)
    manifest = run_dir / "ped2_test_clips.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "path", "split", "label", "class", "intervals"])
        for cid, iv in ped2_intervals().items():
            w.writerow([cid, f"testing/frames/{cid}", "test", 1, "Anomaly", ";".join(f"{s}-{e}" for s, e in iv)])
    cfg = build_config(sets=[f"data.manifest={manifest}", f"data.root={PED2}", f"extract.crops={crops}",
                             f"extract.resize_dtype={resize_dtype}"])
    runner = Runner(make_context(cfg, run_dir, progress=True), all_stages())
    report = runner.run(["extract"])[0]
    if report.failed:
        raise SystemExit(f"extract failed for {report.failed}")
    from pipeline.core.store import StageDir

    sd = StageDir(report.path)
    out = {}
    for cid in ped2_intervals():
        meta, arrays = sd.load_item(cid)
        out[cid] = (meta, arrays["features"])
    return out


def weak_videos(meta: dict, feats: np.ndarray, intervals: list[tuple[int, int]]) -> list[tuple[np.ndarray, int]]:
    """A training clip's normal and anomalous videos (module docstring): ``(features [t, C, D], label)``."""
    onset = min(s for s, _ in intervals)
    ranges = meta["clip_ranges"]
    # normal: clips ending at least one whole clip (16 frames) before the onset
    n_normal = sum(1 for a, b in ranges if b <= onset - 16)
    out = []
    if n_normal:
        out.append((feats[:n_normal], 0))
    out.append((feats[n_normal:], 1))
    return out


def segment_scheme(name: str) -> str:
    return "sultani" if name == "sultani_mil" else "rtfm"


def make_bank(name: str, videos: list[tuple[np.ndarray, int]]):
    from models import DETECTORS, ClipBank, FeatureBank
    from stages.segment import pool_segments, segment_bins

    labels = torch.tensor([y for _, y in videos])
    ids = [f"w{i}" for i in range(len(videos))]
    if DETECTORS.get_class(name).training_level() == "segments":
        scheme = segment_scheme(name)
        bags = [pool_segments(f, segment_bins(len(f), 32, scheme), l2=scheme == "sultani") for f, _ in videos]
        return FeatureBank(torch.from_numpy(np.stack(bags)), labels, ids)
    return ClipBank.from_videos([f for f, _ in videos], labels.tolist(), ids)


def train(name: str, bank, iterations: int, seed: int, short: bool, log_every: int = 0) -> torch.nn.Module:
    from models import DETECTORS, fit

    cls = DETECTORS.get_class(name)
    cfg = cls.Config()
    if short:
        for k, v in cls.short_schedule.items():
            setattr(cfg, k, v)
    cfg.iterations = iterations
    cfg.seed = seed  # batch orders drawn from the config's seed (RTFM's loader_draw) follow the run's seed too
    torch.manual_seed(seed)
    model = DETECTORS.get(name, feature_dim=int(bank.features.shape[-1]), cfg=cfg)

    def show(step: int, terms: dict) -> None:
        if step % log_every == 0 or step == iterations - 1:
            log.info("  step %d: %s", step, " ".join(f"{k} {float(v):.4f}" for k, v in terms.items()))

    return fit(model, bank, iterations, torch.Generator().manual_seed(seed), on_step=show if log_every else None)


def fold_scores(name: str, model: torch.nn.Module, clips: dict, test_ids: list[str],
                intervals: dict) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per test clip, ``(frame scores, frame ground truth)`` over the frames its units cover."""
    from stages.evaluate import frames_from_units, score_units
    from stages.segment import pool_segments, segment_bins

    out = []
    for cid in test_ids:
        meta, feats = clips[cid]
        seg = None
        if model.input_level == "segments":
            scheme = segment_scheme(name)
            bins = segment_bins(len(feats), 32, scheme)
            seg = ({"bins": bins}, {"segments": pool_segments(feats, bins, l2=scheme == "sultani")})
        units, unit_frames = score_units(model, (meta, {"features": feats}), seg, "cpu")
        s, covered = frames_from_units(units, unit_frames, int(meta["n_frames"]))
        gt = np.zeros(int(meta["n_frames"]), np.uint8)
        for a, b in intervals[cid]:
            gt[a:b] = 1
        out.append((s[covered], gt[covered]))
    return out


def fold_auc(name: str, model: torch.nn.Module, clips: dict, test_ids: list[str], intervals: dict) -> float:
    """Frame-level ROC AUC over the concatenated test clips."""
    from sklearn.metrics import roc_auc_score

    per_clip = fold_scores(name, model, clips, test_ids, intervals)
    return float(roc_auc_score(np.concatenate([g for _, g in per_clip]), np.concatenate([s for s, _ in per_clip])))


def diagnose(name: str, model: torch.nn.Module, clips: dict, test_ids: list[str], intervals: dict) -> None:
    """Log per test clip: normal frames, mean score of normal / anomalous frames, within-clip AUC;
    and, for a model with a ``rerank`` setting, the fold AUC of each score branch alone."""
    from sklearn.metrics import roc_auc_score

    for cid, (s, gt) in zip(test_ids, fold_scores(name, model, clips, test_ids, intervals)):
        nor, abn = s[gt == 0], s[gt == 1]
        auc = roc_auc_score(gt, s) if len(nor) and len(abn) else float("nan")
        log.info("  clip %s: %d normal frames, mean score normal %s anomalous %s, scores %.3f-%.3f, within-clip AUC %.3f",
                 cid, len(nor), f"{nor.mean():.3f}" if len(nor) else "-", f"{abn.mean():.3f}" if len(abn) else "-",
                 s.min(), s.max(), auc)
    rerank = getattr(model.cfg, "rerank", None)
    if rerank is not None:
        for branch in ("mil", "similarity"):
            model.cfg.rerank = branch
            log.info("  %s branch alone: AUC %.4f", branch, fold_auc(name, model, clips, test_ids, intervals))
        model.cfg.rerank = rerank


def main() -> None:
    from models import DETECTORS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="*", default=None)
    p.add_argument("--crops", default="center", choices=("center", "5", "10"))
    p.add_argument("--resize-dtype", default="uint8", choices=("uint8", "float32"),
                   help="extract.resize_dtype of the features (float32: the features of runs before commit 08b4cb7)")
    p.add_argument("--iterations", type=int, default=1000)
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    p.add_argument("--short-schedule", action="store_true",
                   help="apply each detector's short_schedule settings (models/*.py; for a few hundred steps on small data)")
    p.add_argument("--folds", nargs="+", default=["A", "B"], choices=("A", "B"))
    p.add_argument("--diagnose", action="store_true", help="log loss terms and per-clip scores (module docstring)")
    p.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "ped2-bench")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not PED2.is_dir():
        raise SystemExit(f"{PED2}: UCSD Ped2 data not found (set VAD_SHARED_DATA)")
    t0 = time.time()
    clips = extract_features(a.run_dir, a.crops, a.resize_dtype)
    extract_s = time.time() - t0
    intervals = ped2_intervals()
    ids = sorted(clips)
    folds = {"A": (ids[0::2], ids[1::2]), "B": (ids[1::2], ids[0::2])}
    results = []
    for name in a.methods or DETECTORS.list():
        row: dict = {"method": name, "auc": {}}
        t = time.time()
        for fold in a.folds:
            train_ids, test_ids = folds[fold]
            videos = [v for cid in train_ids for v in weak_videos(*clips[cid], intervals[cid])]
            bank = make_bank(name, videos)
            aucs = []
            for seed in a.seeds:
                if a.diagnose:
                    log.info("%s fold %s seed %d:", name, fold, seed)
                model = train(name, bank, a.iterations, seed, a.short_schedule, log_every=30 if a.diagnose else 0)
                if a.diagnose:
                    diagnose(name, model, clips, test_ids, intervals)
                aucs.append(fold_auc(name, model, clips, test_ids, intervals))
            row["auc"][fold] = aucs
            log.info("%s fold %s: AUC %s", name, fold, " ".join(f"{x:.4f}" for x in aucs))
        per_seed = np.mean([row["auc"][f] for f in a.folds], axis=0)
        row["mean"], row["std_over_seeds"] = float(per_seed.mean()), float(per_seed.std())
        row["seconds"] = round(time.time() - t, 1)
        results.append(row)
    env = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"),
        "crops": a.crops,
        "resize_dtype": a.resize_dtype,
        "iterations": a.iterations,
        "short_schedule": a.short_schedule,
        "seeds": a.seeds,
        "folds": a.folds,
        "extract_seconds": round(extract_s, 1),
    }
    print(json.dumps({"env": env, "results": results}, indent=1))
    print("\n| detector | " + " | ".join(f"fold {f} AUC" for f in a.folds) + " | mean (std over seeds) | train seconds |")
    print("|---|" + "---|" * len(a.folds) + "---|---|")
    for r in results:
        per_fold = " | ".join(f"{np.mean(r['auc'][f]):.4f}" for f in a.folds)
        print(f"| {r['method']} | {per_fold} | {r['mean']:.4f} ({r['std_over_seeds']:.4f}) | {r['seconds']} |")
    if a.json:
        a.json.write_text(json.dumps({"env": env, "results": results}, indent=1))


if __name__ == "__main__":
    main()
