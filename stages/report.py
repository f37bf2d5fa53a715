"""Self-contained HTML evaluation report (metrics table, ROC/PR curves, score curves, training curves).

Images are PNGs drawn with matplotlib's Agg backend and embedded as base64, so the HTML file can be
moved or mailed on its own; the PNGs are also kept beside it.

The per-video verdicts (false alarm, miss) are at metrics.json's ``threshold``, chosen without the
test set (``evaluate.threshold_rule``; see ``stages.evaluate``); the report names the rule and shows
the FAR at the fixed ``evaluate.far_threshold`` (0.5) beside it.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.store import atomic_write_bytes, atomic_write_text
from pipeline.core.manifest import VideoRecord


def fig_png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _curves(gt: np.ndarray, scores: np.ndarray) -> bytes:
    import matplotlib.pyplot as plt
    from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_curve

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 4))
    fpr, tpr, _ = roc_curve(gt, scores)
    a.plot(fpr, tpr, label=f"AUC {auc(fpr, tpr):.4f}")
    a.plot([0, 1], [0, 1], "--", color="grey", lw=0.8, label="chance")
    a.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (frame level)")
    a.legend(loc="lower right", fontsize=8)
    p, r, _ = precision_recall_curve(gt, scores)
    b.plot(r, p, label=f"AP {average_precision_score(gt, scores):.4f} (step), {auc(r, p):.4f} (trapezoid)")
    b.axhline(gt.mean(), ls="--", color="grey", lw=0.8, label=f"chance (anomalous share {gt.mean():.3f})")
    b.set(xlabel="recall", ylabel="precision", title="precision-recall (frame level)", ylim=(0, 1.02))
    b.legend(loc="lower left", fontsize=8)
    return fig_png(fig)


def _video_plot(v: VideoRecord, scores: np.ndarray, verdict: "Verdict | None" = None, threshold: float | None = None,
                fixed: float | None = None) -> bytes:
    """One video's frame scores with its ground truth shaded, ``threshold`` dashed (the verdicts')
    and ``fixed`` (the FAR's 0.5) dotted when it differs."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 2.2))
    for s, e in v.intervals:
        ax.axvspan(s, e, color="tab:red", alpha=0.2, lw=0)
    ax.plot(np.arange(len(scores)), scores, color="tab:blue")
    if threshold is not None:
        ax.axhline(threshold, color="grey", ls="--", lw=0.7)
    if fixed is not None and fixed != threshold:
        ax.axhline(fixed, color="grey", ls=":", lw=0.7)
    ax.set(ylim=(-0.02, 1.02), xlim=(0, max(1, len(scores) - 1)), xlabel="frame", ylabel="score")
    title = f"{v.id} ({v.cls})" + ("; shaded: ground-truth anomaly" if v.intervals else "")
    if verdict is not None:
        title = f"{verdict.label.upper()}: {title}\n{verdict.detail}"
    ax.set_title(title, fontsize=8, color=verdict.color if verdict is not None else "black")
    return fig_png(fig)


def _as_float(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def _training_plot(train_log: Path) -> bytes | None:
    """One panel per column of ``train_log.csv`` (every loss term, ``total``, and ``val_auc`` when
    model selection logged it): each step's value, with a moving average over 2 % of the steps."""
    if not train_log.is_file():
        return None
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(train_log.open()))
    if not rows:
        return None
    keys = [k for k in rows[0] if k != "step"]
    steps = np.array([_as_float(r["step"]) for r in rows])
    series = {k: np.array([_as_float(r.get(k)) for r in rows]) for k in keys}
    keys = [k for k in keys if np.isfinite(series[k]).any()]
    if not keys:
        return None
    ncol = len(keys) if len(keys) <= 3 else 3 if len(keys) <= 6 else 4
    nrow = -(-len(keys) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.4 * ncol, 2.5 * nrow), squeeze=False, layout="constrained")
    window = max(1, len(rows) // 50)
    for ax, k in zip(axes.flat, keys):
        y = series[k]
        ok = np.isfinite(y)
        if k == "val_auc":
            ax.plot(steps[ok], y[ok], "o-", ms=3, lw=1, color="tab:green")
        else:
            ax.plot(steps[ok], y[ok], lw=0.6, color="tab:blue", alpha=0.45 if window > 1 else 1.0)
            if window > 1 and ok.sum() > window:
                smooth = np.convolve(y[ok], np.ones(window) / window, mode="valid")
                ax.plot(steps[ok][window - 1 :], smooth, lw=1.2, color="tab:blue")
        ax.set_title(k + (" (validation)" if k == "val_auc" else ""), fontsize=9)
        ax.set_xlabel("step")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
    for ax in list(axes.flat)[len(keys) :]:
        ax.set_visible(False)
    return fig_png(fig)


@dataclass
class Verdict:
    """How one test video fares at a threshold (the report's: metrics.json's ``threshold``).

    ``false_alarm``: share of its ground-truth-normal frames scored above the threshold;
    ``miss``: share of its ground-truth-anomalous frames scored at or below it. ``badness`` orders
    the report (worst first): the larger of the two, ties broken by the peak normal-frame score or
    the shortfall of the mean score inside the anomaly.
    """

    label: str
    detail: str
    false_alarm: float
    miss: float | None
    badness: tuple[float, float]

    @property
    def color(self) -> str:
        return {"false alarm": "tab:red", "miss": "tab:orange", "miss + false alarm": "tab:red"}.get(self.label, "black")


def verdict(v: VideoRecord, scores: np.ndarray, threshold: float) -> Verdict:
    """The :class:`Verdict` of one video from its saved frame scores (NaN = not evaluated)."""
    ok = np.isfinite(scores)
    gt = np.asarray(v.frame_labels(len(scores)), bool)
    normal = ok & ~gt
    anomalous = ok & gt
    fa = float(np.mean(scores[normal] > threshold)) if normal.any() else 0.0
    peak = float(scores[normal].max()) if normal.any() else 0.0
    parts = []
    if anomalous.any():
        miss = float(np.mean(scores[anomalous] <= threshold))
        inside = float(scores[anomalous].mean())
        parts.append(f"{miss:.0%} of anomalous frames <= {threshold:g} (mean score inside {inside:.2f})")
        shortfall = 1.0 - inside
    else:
        miss, shortfall = None, 0.0
    parts.append(f"{fa:.0%} of normal frames > {threshold:g} (peak {peak:.2f})")
    if fa > 0 and miss:
        label = "miss + false alarm"
    elif fa > 0:
        label = "false alarm"
    elif miss:
        label = "miss"
    else:
        label = "correct"
    return Verdict(label, "; ".join(parts), fa, miss, (max(fa, miss or 0.0), max(peak, shortfall)))


_METRIC_ROWS = (
    ("auc", "frame-level ROC AUC over all test videos"),
    ("ap", "average precision, sklearn average_precision_score (step interpolation)"),
    ("ap_trapezoid", "average precision, auc(recall, precision) (trapezoid, as most repositories report)"),
    ("far", "false-alarm rate: share of normal-video frames scored above the fixed threshold"),
    ("far_at_threshold", "false-alarm rate at the threshold chosen without the test set"),
    ("auc_abnormal_only", "ROC AUC over the frames of anomalous test videos only"),
    ("score_gap", "mean score of anomalous frames minus mean score of normal frames"),
    ("topk_precision", "NG-MIL top-k precision: share of truly anomalous snippets among each anomalous "
                       "test video's k highest-scored snippets"),
    ("frames", "evaluated frames (anomalous frames)"),
    ("videos", "test videos"),
)


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    return f"{v:.4f}" if isinstance(v, float) else html.escape(str(v))


def _metric_rows(metrics: dict[str, Any]) -> list[str]:
    rows = []
    for k, doc in _METRIC_ROWS:
        v = metrics.get(k)
        if k == "topk_precision":
            if not isinstance(v, dict):
                continue
            doc += f" (k = {v.get('k')}, {v.get('videos')} videos)"
            v = v.get("precision")
        elif k == "far":
            doc += f" ({metrics.get('far_threshold')})"
        elif k == "far_at_threshold":
            if "threshold" not in metrics:
                continue  # metrics.json of an evaluate stage before version 3
            doc += f" ({metrics['threshold']:.4g}, rule {metrics.get('threshold_rule')})"
        elif k == "frames":
            v = f"{v} ({metrics.get('anomalous_frames')})"
        rows.append(f"<tr><th>{k}</th><td>{_fmt(v)}</td><td class='doc'>{html.escape(doc)}</td></tr>")
    for cls, v in metrics.get("per_class_auc", {}).items():
        rows.append(f"<tr><th>AUC {html.escape(cls)}</th><td>{_fmt(v)}</td>"
                    "<td class='doc'>this class's videos plus every normal test video</td></tr>")
    return rows


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
    fixed = float(metrics.get("far_threshold") or 0.5)
    # the verdicts' threshold: the one chosen without the test set (evaluate.threshold_rule)
    threshold = float(metrics.get("threshold", fixed))
    note = metrics.get("threshold_note") or f"fixed threshold {fixed:g} (evaluate.far_threshold)"
    if threshold != fixed:
        note += f"; FAR at {fixed:g} also shown"
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>WS-VAD evaluation</title>",
        "<style>body{font-family:sans-serif;max-width:1000px;margin:auto}td,th{padding:2px 10px;text-align:left}"
        "td.doc{color:#555;font-size:90%}img{max-width:100%}.bad{color:#b00}.miss{color:#c60}.ok{color:#070}"
        "table.v td{font-size:90%}</style></head><body>",
        "<h1>Evaluation report</h1>",
        "<p>Frame-level metrics over all test videos, as RTFM's test_10crop.py computes them. The cache keys "
        "of the features, segments and detector they came from, and the full configuration, are at the end "
        "and in metrics.json.</p>",
        "<table>" + "".join(_metric_rows(metrics)) + "</table>",
        f"<p>Per-video verdicts below: {html.escape(note)}.</p>",
    ]
    if metrics.get("missing_test_videos"):
        parts.append(f"<p class='bad'>Test videos without features (not evaluated): "
                     f"{html.escape(', '.join(metrics['missing_test_videos']))}</p>")
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
            parts += ["<h2>Training curves</h2>",
                      "<p>Every loss term the train stage logged (train_log.csv), per step; thin: each step, "
                      "thick: moving average.</p>", _img(tl, "training curves")]
        judged = sorted(((v, s, verdict(v, s, threshold)) for v, s in loaded), key=lambda t: t[2].badness, reverse=True)
        parts.append("<h2>Per-video scores: worst false alarms and misses first</h2>")
        dotted = f"; {fixed:g} dotted" if threshold != fixed else ""
        parts.append(f"<p>At threshold {threshold:.4g} (dashed{dotted}): a <b class='bad'>false alarm</b> is a ground-truth-normal "
                     "frame scored above it, a <b class='miss'>miss</b> a ground-truth-anomalous frame scored at or "
                     "below it. Videos are ordered by the larger of the two shares.</p>")
        counts = {lab: sum(j[2].label == lab for j in judged) for lab in ("false alarm", "miss + false alarm", "miss", "correct")}
        line = ", ".join(f"{n} {lab}" for lab, n in counts.items() if n)
        if threshold != fixed:
            at_fixed = [verdict(v, s, fixed).label for v, s in loaded]
            line += f" (at {fixed:g}: " + ", ".join(
                f"{n} {lab}" for lab in counts if (n := at_fixed.count(lab))) + ")"
        parts.append(f"<p>{html.escape(line)}</p>")
        table = ["<table class='v'><tr><th>video</th><th>class</th><th>verdict</th><th>false-alarm share</th>"
                 "<th>miss share</th></tr>"]
        for v, _, vd in judged:
            css = {"correct": "ok", "miss": "miss"}.get(vd.label, "bad")
            miss = "n/a" if vd.miss is None else f"{vd.miss:.0%}"
            table.append(f"<tr><td><a href='#v-{html.escape(v.id)}'>{html.escape(v.id)}</a></td><td>{html.escape(v.cls)}"
                         f"</td><td class='{css}'>{vd.label}</td><td>{vd.false_alarm:.0%}</td><td>{miss}</td></tr>")
        parts.append("".join(table) + "</table>")
        (out_dir / "videos").mkdir(exist_ok=True)
        for v, s, vd in judged:
            png = _video_plot(v, s, vd, threshold, fixed)
            atomic_write_bytes(out_dir / "videos" / f"{v.id}.png", png)
            parts.append(f"<div id='v-{html.escape(v.id)}'>{_img(png, f'{vd.label}: {v.id}')}</div>")
    parts.append("<h2>Provenance</h2><p>cache keys: " + html.escape(json.dumps(metrics.get("cache_keys", {}))) + "</p>")
    parts.append("<h3>Configuration</h3><pre>" + html.escape(json.dumps(metrics.get("config", {}), indent=1)) + "</pre>")
    parts.append("</body></html>")
    path = out_dir / "report.html"
    atomic_write_text(path, "\n".join(parts))
    return path
