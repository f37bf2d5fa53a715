"""``pipeline status``: each stage's state and why, computed from the keys without running anything."""

from __future__ import annotations

import json
import time
from typing import Any

from pipeline.core.runner import Runner
from pipeline.core.store import StageDir


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}." if not isinstance(v, dict) or v else f"{prefix}{k}"))
        return out
    return {prefix.rstrip("."): d}


def stage_status(runner: Runner) -> list[dict[str, Any]]:
    """Each stage's state (done / partial / stale / missing) and why, without running anything."""
    rows = []
    fps: dict[str, str] = {}
    dirs: dict[str, StageDir | None] = {}
    needed = set(runner.closure([n for n in runner.order if not runner.stages[n].optional]))
    for name in runner.order:
        stage = runner.stages[name]
        if name not in needed:
            continue
        blocked = [u for u in runner.upstream_of(stage.name) if u not in fps]
        if blocked:
            root = runner.stage_root(name)
            if root.is_dir() and any(root.iterdir()):
                why = f"upstream {', '.join(blocked)} changed or is unfinished, so the cached result is out of date"
                rows.append({"stage": name, "state": "stale", "why": why})
            else:
                rows.append({"stage": name, "state": "missing", "why": f"never run; waits for {', '.join(blocked)}"})
            continue
        inputs = runner.inputs_of(name, fps)
        sd = runner.stage_dir(name, inputs, dirs)
        dirs[name] = sd
        row: dict[str, Any] = {"stage": name, "key": sd.path.name, "path": str(sd.path)}
        if sd.is_done():
            done = json.loads(sd.done_marker.read_text())
            row["state"] = "done"
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(done.get("finished", 0)))
            n = f", {len(sd.complete_items())} videos" if stage.per_video else ""
            row["why"] = f"up to date: its inputs (config, manifest, upstream) match the cached key{n}, finished {when}"
            fps[name] = runner.output_fingerprint(name, sd)
        elif sd.path.is_dir():
            row["state"] = "partial"
            if stage.per_video:
                n_done = len(sd.complete_items())
                n_all = len(stage.videos(runner.ctx))
                n_fail = len(sd.failures())
                failed = f"{n_fail} failed (see {sd.failures_file})" if n_fail else "none failed"
                row["why"] = f"{n_done}/{n_all} videos complete, {failed}; rerun to finish"
                if n_done:
                    fps[name] = runner.output_fingerprint(name, sd)
            else:
                row["why"] = "started but not finished; rerun resumes from its last checkpoint"
        elif stage.per_video and (in_store := sd.complete_items()):  # each call reads every item's marker
            n_done, n_all = len(in_store), len(sd.keys or {})
            row["state"] = "done" if n_done == n_all else "partial"
            row["why"] = (f"{n_done}/{n_all} videos' items already in the shared store {sd.items.parent.parent.parent} "
                          "(computed by another run or manifest); " + ("a run only records them" if n_done == n_all
                                                                       else "a run computes the others"))
            fps[name] = runner.output_fingerprint(name, sd)
        else:
            previous = _latest_other(runner, name, sd)
            if previous is None:
                row["state"], row["why"] = "missing", "never run with any settings"
            else:
                row["state"] = "stale"
                now = {**inputs, "videos": sd.keys} if sd.keys is not None else inputs
                row["why"] = "inputs changed since the cached result: " + _diff(previous, now)
        rows.append(row)
    return rows


def _latest_other(runner: Runner, name: str, current: StageDir) -> dict[str, Any] | None:
    root = runner.stage_root(name)
    if not root.is_dir():
        return None
    cands = []
    for d in root.iterdir():
        sj = d / "stage.json"
        if d != current.path and sj.is_file():
            cands.append((sj.stat().st_mtime, sj))
    if not cands:
        return None
    return json.loads(max(cands)[1].read_text())["inputs"]


def _diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    parts = []
    old, new = dict(old), dict(new)
    va, vb = old.pop("videos", None), new.pop("videos", None)
    if va is not None and vb is not None and va != vb:
        added = len(set(vb) - set(va))
        removed = len(set(va) - set(vb))
        changed = sum(1 for v in set(va) & set(vb) if va[v] != vb[v])
        parts.append(f"videos: {added} added, {removed} removed, {changed} changed on disk or upstream")
    a, b = _flatten(old), _flatten(new)
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            if k.startswith("upstream."):
                parts.append(f"upstream {k.split('.', 1)[1]} changed")
            elif k.startswith("config."):
                parts.append(f"{k[7:]}: {a.get(k)!r} -> {b.get(k)!r}")
            else:
                parts.append(f"{k} changed")
    return "; ".join(parts) or "unknown difference"


