"""Self-contained HTML evaluation report (metrics table, ROC/PR curves, score curves, training curves).

Images are PNGs drawn with matplotlib's Agg backend and embedded as base64, so the HTML file can be
moved or mailed on its own; the PNGs are also kept beside it.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cache import atomic_write_bytes, atomic_write_text
from pipeline.manifest import VideoRecord


def _fig_png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _curves(gt: np.ndarray, scores: np.ndarray) -> bytes:
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve, roc_curve

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 4))
    fpr, tpr, _ = roc_curve(gt, scores)
    a.plot(fpr, tpr)
    a.plot([0, 1], [0, 1], "--", color="grey")
    a.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (frame level)")
    p, r, _ = precision_recall_curve(gt, scores)
    b.plot(r, p)
    b.set(xlabel="recall", ylabel="precision", title="precision-recall (frame level)")
    return _fig_png(fig)


def _video_plot(v: VideoRecord, scores: np.ndarray) -> bytes:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 2.2))
    for s, e in v.intervals:
        ax.axvspan(s, e, color="tab:red", alpha=0.2, lw=0)
    ax.plot(np.arange(len(scores)), scores, color="tab:blue")
    ax.set(ylim=(-0.02, 1.02), xlim=(0, max(1, len(scores) - 1)), xlabel="frame", ylabel="score")
    ax.set_title(f"{v.id} ({v.cls})" + ("  shaded: ground-truth anomaly" if v.intervals else ""), fontsize=9)
    return _fig_png(fig)


def _training_plot(train_log: Path) -> bytes | None:
    if not train_log.is_file():
        return None
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(train_log.open()))
    if not rows:
        return None
    keys = [k for k in rows[0] if k not in ("step", "val_auc")]
    steps = np.array([float(r["step"]) for r in rows])
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.6), squeeze=False, layout="constrained")
    for ax, k in zip(axes[0], keys):
        ax.plot(steps, [float(r[k]) for r in rows], lw=0.8)
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("step")
    return _fig_png(fig)


def _badness(v: VideoRecord, scores: np.ndarray) -> float:
    """Worst first: a normal video's highest score, an anomalous video's miss (1 - mean score inside)."""
    ok = np.isfinite(scores)
    gt = np.asarray(v.frame_labels(len(scores)), bool) & ok
    if v.label == 0 or not gt.any():
        return float(scores[ok].max()) if ok.any() else 0.0
    return 1.0 - float(scores[gt].mean())


def write_report(
    out_dir: Path,
    metrics: dict[str, Any],
    videos: list[VideoRecord],
    scores_dir: Path,
    train_log: Path,
    plots: bool = True,
) -> Path:
    """Write ``out_dir/report.html`` (and the PNGs beside it); returns the HTML path."""
    import matplotlib

    matplotlib.use("Agg")
    rows = []
    for k in ("auc", "ap", "ap_trapezoid", "far", "auc_abnormal_only", "score_gap", "frames", "videos"):
        v = metrics.get(k)
        rows.append(f"<tr><th>{k}</th><td>{'n/a' if v is None else (f'{v:.4f}' if isinstance(v, float) else v)}</td></tr>")
    for cls, v in metrics.get("per_class_auc", {}).items():
        rows.append(f"<tr><th>AUC {html.escape(cls)}</th><td>{'n/a' if v is None else f'{v:.4f}'}</td></tr>")
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>WS-VAD evaluation</title>",
        "<style>body{font-family:sans-serif;max-width:1000px;margin:auto}td,th{padding:2px 10px;text-align:left}"
        "img{max-width:100%}</style></head><body>",
        "<h1>Evaluation report</h1>",
        "<p>Frame-level metrics over all test videos. <b>ap</b> is sklearn's average_precision_score; "
        "<b>ap_trapezoid</b> is auc(recall, precision) as most repositories report; <b>far</b> is the share "
        f"of normal-video frames scored above {metrics.get('far_threshold')}.</p>",
        "<table>" + "".join(rows) + "</table>",
    ]
    if metrics.get("warnings"):
        parts.append("<h3>Warnings</h3><ul>" + "".join(f"<li>{html.escape(w)}</li>" for w in metrics["warnings"]) + "</ul>")
    if plots:
        loaded = [(v, np.load(scores_dir / f"{v.id}.scores.npy")) for v in videos]
        # uncovered frames are NaN in the saved scores and are left out, as in the metrics
        gt = np.concatenate([np.asarray(v.frame_labels(len(s)), np.int64)[np.isfinite(s)] for v, s in loaded])
        sc = np.concatenate([s[np.isfinite(s)] for _, s in loaded])
        if 0 < gt.sum() < gt.size:
            png = _curves(gt, sc)
            atomic_write_bytes(out_dir / "curves.png", png)
            parts += ["<h2>ROC and precision-recall</h2>", _img(png, "ROC and PR curves")]
        tl = _training_plot(train_log)
        if tl is not None:
            atomic_write_bytes(out_dir / "training.png", tl)
            parts += ["<h2>Training losses</h2>", _img(tl, "training curves")]
        parts.append("<h2>Per-video scores (worst false alarms and misses first)</h2>")
        (out_dir / "videos").mkdir(exist_ok=True)
        for v, s in sorted(loaded, key=lambda vs: -_badness(*vs)):
            png = _video_plot(v, s)
            atomic_write_bytes(out_dir / "videos" / f"{v.id}.png", png)
            parts.append(_img(png, v.id))
    parts.append("<h2>Configuration</h2><pre>" + html.escape(json.dumps(metrics.get("config", {}), indent=1)) + "</pre>")
    parts.append("</body></html>")
    path = out_dir / "report.html"
    atomic_write_text(path, "\n".join(parts))
    return path
