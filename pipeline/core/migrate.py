"""``pipeline migrate``: bring a run directory of the layout before the shared store up to date.

Before the store, a per-video stage kept its items in ``<run_dir>/cache/<stage>/<key>/items/<id>.*``
under a key that hashed the whole manifest. Migrating moves each complete item into the store
under the item key the runner now computes (the stage's settings, the video's identity, its
upstream items), writes the stage's index in the run directory, and renames the folders of the
whole-run stages (train, evaluate, MIST's) to the keys their upstream stages now give, so that the
next ``pipeline run`` finds everything and computes nothing. Items of videos that the run's manifest
no longer lists are moved to ``<run_dir>/unmigrated/`` (never deleted).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from pipeline.core.runner import Runner, old_layout_dirs
from pipeline.core.store import StageDir, atomic_write_json, stable_hash

log = logging.getLogger(__name__)


def _move(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` (a copy then delete when the store is on another file system)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(src, dst)
    except OSError:
        shutil.copy2(src, dst)
        src.unlink()


def migrate_run(runner: Runner) -> dict[str, Any]:
    """Migrate ``runner``'s run directory (see the module docstring); returns counts of what moved.

    Only the runner's stages are migrated, in dependency order, so that each stage's new keys can
    use its upstream stages' new ones.
    """
    ctx = runner.ctx
    old_dirs = set(old_layout_dirs(runner))
    by_id = {v.id: v for v in ctx.manifest.videos}
    new_fp: dict[str, str] = {}  # an old output fingerprint (or whole-stage key) -> the new one
    keys_of: dict[tuple[str, str], dict[str, str]] = {}  # (stage, old fingerprint) -> video id -> item key
    moved_rel: dict[str, str] = {}  # old folder (relative to the run directory) -> new
    counts = {"items": 0, "unmigrated": 0, "stage_folders": 0}
    for name in runner.order:
        stage = runner.stages[name]
        root = runner.stage_root(name)
        if not root.is_dir():
            continue
        for d in sorted(p for p in root.iterdir() if (p / "stage.json").is_file() and not (p / "index.json").is_file()):
            record = json.loads((d / "stage.json").read_text())
            inputs = dict(record["inputs"])
            ups = dict(inputs.get("upstream", {}))
            if stage.per_video:
                if d not in old_dirs:
                    continue
                new_dir = _migrate_per_video(runner, name, d, inputs, ups, by_id, new_fp, keys_of, counts)
            else:
                inputs["upstream"] = {u: new_fp.get(fp, fp) for u, fp in ups.items()}
                key = stable_hash(inputs)[:16]
                new_dir = root / key
                if new_dir != d:
                    if new_dir.exists():
                        log.warning("%s: %s already exists; left as it is", d, new_dir)
                        continue
                    os.replace(d, new_dir)
                    atomic_write_json(new_dir / "stage.json", {**record, "key": key, "inputs": inputs})
                new_fp[d.name] = key
            counts["stage_folders"] += 1
            moved_rel[str(d.relative_to(ctx.run_dir))] = str(new_dir.relative_to(ctx.run_dir))
    latest_path = ctx.run_dir / "latest.json"
    if latest_path.is_file():
        latest = json.loads(latest_path.read_text())
        atomic_write_json(latest_path, {k: moved_rel.get(v, v) for k, v in latest.items()})
    return counts


def _migrate_per_video(runner: Runner, name: str, d: Path, inputs: dict[str, Any], ups: dict[str, str],
                       by_id: dict[str, Any], new_fp: dict[str, str], keys_of: dict[tuple[str, str], dict[str, str]],
                       counts: dict[str, int]) -> Path:
    """Move one old per-video stage folder's items into the store; returns its new folder."""
    ctx, stage = runner.ctx, runner.stages[name]
    old = StageDir(d, d / "items", None)
    complete = old.complete_items()
    old_fp = stable_hash([d.name, complete])  # what the old layout's downstream keys hashed
    per_video_ups = {u: fp for u, fp in ups.items() if u in runner.stages and runner.stages[u].per_video}
    settings_inputs = {k: v for k, v in inputs.items() if k != "manifest"}
    settings_inputs["upstream"] = {u: new_fp.get(fp, fp) for u, fp in ups.items() if u not in per_video_ups}
    settings = stable_hash(settings_inputs)
    items = Path(ctx.store) / name / settings[:16] / "items"

    def item_key(vid: str) -> str | None:
        up = {u: keys_of.get((u, fp), {}).get(vid) for u, fp in per_video_ups.items()}
        if vid not in by_id or any(k is None for k in up.values()):
            return None
        return stable_hash({"settings": settings, "video": stage.item_identity(ctx, by_id[vid]), "upstream": up})[:32]

    all_keys = {v.id: k for v in stage.videos(ctx) if (k := item_key(v.id)) is not None}
    moved: dict[str, str] = {}
    for vid in complete:
        key = all_keys.get(vid)
        if key is None:
            continue
        new = StageDir(d, items, {vid: key})
        meta = old.load_meta(vid)
        files = {}
        for array, entry in meta.pop("_files").items():
            dst = new.item_file(vid, array)
            _move(old.items / entry["file"], dst)
            files[array] = {**entry, "file": dst.name}
        new.finish_item(vid, meta, files)
        old.item_meta_path(vid).unlink()
        moved[vid] = key
        counts["items"] += 1
    keys_of[(name, old_fp)] = all_keys
    new_fp[old_fp] = stable_hash([[v, moved[v]] for v in sorted(moved)])
    sd = StageDir(runner.stage_root(name) / stable_hash({"settings": settings, "items": all_keys})[:16], items, all_keys)
    sd.path.mkdir(parents=True, exist_ok=True)
    recorded = {**settings_inputs, "videos": all_keys}
    atomic_write_json(sd.path / "stage.json", {"key": sd.path.name, "inputs": recorded, "created": time.time(),
                                               "migrated_from": d.name})
    sd.write_index()
    if not (items.parent / "settings.json").is_file():
        atomic_write_json(items.parent / "settings.json", {"inputs": settings_inputs, "created": time.time()})
    if old.failures_file.is_file():
        shutil.copy2(old.failures_file, sd.failures_file)
    if old.is_done() and all(v in moved for v in complete):
        shutil.copy2(old.done_marker, sd.done_marker)
    leftovers = list(old.items.iterdir())
    if leftovers:  # items of videos no longer in the manifest: kept aside, never deleted
        counts["unmigrated"] += sum(1 for p in leftovers if p.suffix == ".json")
        dest = ctx.run_dir / "unmigrated" / name / d.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(old.items, dest)
    shutil.rmtree(d)
    return sd.path
