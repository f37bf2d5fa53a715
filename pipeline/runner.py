"""The stage runner: cache keys, per-video artifacts, resume, failures and status.

Each stage declares what it reads (config fields, manifest columns, upstream stages). Its cache key
is the sha256 of its name and version, those config values, any weight checksums, the manifest
fingerprint over those columns, and the *output fingerprints* of its upstream stages (upstream key
plus the ids of the videos it completed). Artifacts live in ``<run_dir>/cache/<stage>/<key[:16]>/``:

- ``stage.json``: the key and every input that went into it (what ``pipeline status`` diffs);
- ``items/<video>.*``: per-video data files, each written atomically (temp file + rename), then
  ``items/<video>.json`` (metadata with each data file's sha256) written last as the item's
  completion marker;
- ``failures.jsonl``: one record per failed video (video, stage, error) from the latest attempt;
- ``DONE``: written last, once every item is complete.

A rerun skips complete items and computes only what is missing; ``--force`` deletes the stage's
current artifacts first. A failed video is recorded and the others go on.
"""

from __future__ import annotations

import fcntl
import json
import logging
import shutil
import time
import traceback
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar, Iterator

import numpy as np

from pipeline.cache import (
    atomic_save_npy,
    atomic_write_json,
    atomic_write_text,
    remove_stale_temps,
    sha256_file,
    stable_hash,
)
from pipeline.config import RunConfig, dump_config, key_fields
from pipeline.manifest import Manifest, VideoRecord, load_manifest

log = logging.getLogger(__name__)


class StageError(RuntimeError):
    """A stage that cannot run at all (as opposed to one failed video)."""


class CorruptArtifact(RuntimeError):
    """A cached file that is missing, truncated or does not match its recorded checksum."""


@dataclass
class Context:
    """What every stage sees: the resolved config and the run directory."""

    cfg: RunConfig
    run_dir: Path
    progress: bool = True

    @cached_property
    def manifest(self) -> Manifest:
        data = self.cfg.data
        if data.manifest == "demo":
            from pipeline.demo_data import DEMO_MANIFEST

            return load_manifest(DEMO_MANIFEST, data.root or self.run_dir / "demo_data", check_files=False)
        return load_manifest(data.manifest, data.root or None, check_files=False)

    def ensure_data(self) -> None:
        """Make the videos available: generates the demo dataset when ``data.manifest`` is 'demo'."""
        if self.cfg.data.manifest == "demo":
            from pipeline.demo_data import generate_demo_dataset

            generate_demo_dataset(self.manifest.root, progress=self.progress)


class StageDir:
    """One stage's artifact folder for one cache key."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.items = path / "items"

    @property
    def done_marker(self) -> Path:
        return self.path / "DONE"

    @property
    def failures_file(self) -> Path:
        return self.path / "failures.jsonl"

    def is_done(self) -> bool:
        return self.done_marker.is_file()

    def item_meta_path(self, vid: str) -> Path:
        return self.items / f"{vid}.json"

    def item_complete(self, vid: str) -> bool:
        """The item's marker exists and every data file it lists has the recorded size."""
        meta_path = self.item_meta_path(vid)
        if not meta_path.is_file():
            return False
        try:
            meta = json.loads(meta_path.read_text())
            return all(
                (self.items / f["file"]).is_file() and (self.items / f["file"]).stat().st_size == f["size"]
                for f in meta.get("_files", {}).values()
            )
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def complete_items(self) -> list[str]:
        if not self.items.is_dir():
            return []
        return sorted(p.stem for p in self.items.glob("*.json") if self.item_complete(p.stem))

    def save_item(self, vid: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        """Write a video's arrays atomically, then its metadata (the completion marker) last."""
        files = {}
        for name, arr in arrays.items():
            fname = f"{vid}.{name}.npy"
            digest = atomic_save_npy(self.items / fname, arr)
            files[name] = {"file": fname, "sha256": digest, "size": (self.items / fname).stat().st_size}
        atomic_write_json(self.item_meta_path(vid), {**meta, "_files": files})

    def load_meta(self, vid: str) -> dict[str, Any]:
        """A video's metadata alone (no array is read); raises CorruptArtifact if it is unreadable."""
        meta_path = self.item_meta_path(vid)
        try:
            return json.loads(meta_path.read_text())
        except (OSError, ValueError) as e:
            raise CorruptArtifact(f"{meta_path}: unreadable cached item ({e})") from e

    def load_item(self, vid: str, verify: bool = True) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """A video's metadata and arrays; raises CorruptArtifact if anything is missing or altered."""
        meta_path = self.item_meta_path(vid)
        meta = self.load_meta(vid)
        try:
            arrays = {}
            for name, f in meta["_files"].items():
                path = self.items / f["file"]
                if verify and sha256_file(path) != f["sha256"]:
                    raise CorruptArtifact(f"{path}: checksum does not match the one recorded at write time")
                arrays[name] = np.load(path, allow_pickle=False)
        except CorruptArtifact:
            raise
        except (OSError, ValueError, KeyError) as e:
            raise CorruptArtifact(f"{meta_path}: unreadable cached item ({e})") from e
        return meta, arrays

    def drop_item(self, vid: str) -> None:
        self.item_meta_path(vid).unlink(missing_ok=True)
        for p in self.items.glob(f"{vid}.*.npy"):
            p.unlink(missing_ok=True)

    def failures(self) -> list[dict[str, Any]]:
        if not self.failures_file.is_file():
            return []
        out = []
        for line in self.failures_file.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def record_failures(self, records: list[dict[str, Any]]) -> None:
        atomic_write_text(self.failures_file, "".join(json.dumps(r) + "\n" for r in records))

    def write_done(self, summary: dict[str, Any]) -> None:
        atomic_write_json(self.done_marker, summary)


class Stage:
    """Base class of the stages. Subclasses set the class attributes and implement the hooks."""

    name: ClassVar[str]
    version: ClassVar[int] = 1
    #: config sections ("extract") or fields ("extract.crops") whose values enter the key
    reads: ClassVar[tuple[str, ...]] = ()
    #: manifest columns whose values enter the key
    manifest_columns: ClassVar[tuple[str, ...]] = ()
    #: the stages whose outputs this one reads (see :meth:`upstream_for`)
    upstream: ClassVar[tuple[str, ...]] = ()
    per_video: ClassVar[bool] = True
    #: which split's videos a per-video stage processes (None: all)
    splits: ClassVar[tuple[str, ...] | None] = None

    def upstream_for(self, cfg: RunConfig) -> tuple[str, ...]:
        """The upstream stages this run's config needs; default :attr:`upstream`. Only these enter
        the cache key, so e.g. a clip-level detector's training does not depend on segmenting."""
        return self.upstream

    # -- key ---------------------------------------------------------------------------------
    def config_inputs(self, cfg: RunConfig) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for item in self.reads:
            section, _, name = item.partition(".")
            obj = getattr(cfg, section)
            if name:
                out[item] = getattr(obj, name)
            else:
                if section == "train":
                    out["train.method"] = obj.method
                for k, v in key_fields(obj).items():
                    out[f"{section}.{k}"] = list(v) if isinstance(v, tuple) else v
        return out

    def extra_inputs(self, ctx: Context) -> dict[str, Any]:
        """Inputs beyond config and manifest, e.g. the extractor's weights checksum."""
        return {}

    def videos(self, ctx: Context) -> list[VideoRecord]:
        vids = ctx.manifest.videos
        if self.splits is not None:
            vids = [v for v in vids if v.split in self.splits]
        return vids

    # -- work ----------------------------------------------------------------------------------
    def prepare(self, ctx: Context, out: StageDir) -> None:
        """Called once before the first item that needs computing (load models here, lazily)."""

    def process(self, ctx: Context, video: VideoRecord, out: StageDir, inputs: dict[str, StageDir]) -> None:
        """Compute one video's artifact and save it with ``out.save_item``."""
        raise NotImplementedError

    def run_whole(self, ctx: Context, out: StageDir, inputs: dict[str, StageDir]) -> dict[str, Any]:
        """For stages that are not per video: do the work, return a summary for the DONE marker."""
        raise NotImplementedError


@dataclass
class StageReport:
    stage: str
    key: str
    path: Path
    state: str  # done | computed | partial | failed
    computed: int = 0
    cached: int = 0
    failed: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    summary: dict[str, Any] = field(default_factory=dict)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}." if not isinstance(v, dict) or v else f"{prefix}{k}"))
        return out
    return {prefix.rstrip("."): d}


class Runner:
    """Runs stages in dependency order over one run directory."""

    def __init__(self, ctx: Context, stages: list[Stage]) -> None:
        self.ctx = ctx
        self.stages = {s.name: s for s in stages}
        self.order = [s.name for s in stages]

    # -- keys ------------------------------------------------------------------------------------
    def stage_root(self, name: str) -> Path:
        return self.ctx.run_dir / "cache" / name

    def inputs_of(self, name: str, upstream_fps: dict[str, str]) -> dict[str, Any]:
        stage = self.stages[name]
        inputs: dict[str, Any] = {
            "stage": name,
            "version": stage.version,
            "config": stage.config_inputs(self.ctx.cfg),
            "upstream": {u: upstream_fps[u] for u in self.upstream_of(name)},
        }
        if stage.manifest_columns:
            inputs["manifest"] = self.ctx.manifest.fingerprint(stage.manifest_columns)
        inputs.update(stage.extra_inputs(self.ctx))
        return inputs

    def upstream_of(self, name: str) -> tuple[str, ...]:
        """The stages ``name`` reads, for this run's config (train skips segment for clip-level detectors)."""
        return self.stages[name].upstream_for(self.ctx.cfg)

    def stage_dir(self, name: str, inputs: dict[str, Any]) -> StageDir:
        return StageDir(self.stage_root(name) / stable_hash(inputs)[:16])

    def output_fingerprint(self, name: str, sd: StageDir) -> str:
        """What downstream keys depend on: this stage's key and the videos it completed."""
        if self.stages[name].per_video:
            return stable_hash([sd.path.name, sd.complete_items()])
        return sd.path.name

    def closure(self, targets: list[str]) -> list[str]:
        need: set[str] = set()

        def visit(n: str) -> None:
            if n not in need:
                need.add(n)
                for u in self.upstream_of(n):
                    visit(u)

        for t in targets:
            visit(t)
        return [n for n in self.order if n in need]

    # -- running ---------------------------------------------------------------------------------
    def run(self, targets: list[str], force: set[str] = frozenset()) -> list[StageReport]:
        """Run ``targets`` and whatever upstream stages they need; returns one report per stage run."""
        self.ctx.run_dir.mkdir(parents=True, exist_ok=True)
        lock = open(self.ctx.run_dir / ".lock", "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StageError(f"{self.ctx.run_dir}: another pipeline run is using this run directory") from None
        try:
            self._save_config()
            reports: list[StageReport] = []
            fps: dict[str, str] = {}
            dirs: dict[str, StageDir | None] = {}
            for name in self.closure(targets):
                stage = self.stages[name]
                missing = [u for u in self.upstream_of(name) if not self._usable(u, dirs.get(u))]
                if missing:
                    why = f"upstream {', '.join(missing)} produced nothing usable"
                    log.error("%s: skipped, %s", name, why)
                    reports.append(StageReport(name, "", Path(), "failed", failed=[{"video": "*", "stage": name, "error": why}]))
                    dirs[name] = None
                    continue
                inputs = self.inputs_of(name, fps)
                sd = self.stage_dir(name, inputs)
                if name in force and sd.path.exists():
                    log.info("%s: --force, removing %s", name, sd.path)
                    shutil.rmtree(sd.path)
                report = self._run_stage(stage, sd, inputs, {u: dirs[u] for u in self.upstream_of(name)})
                reports.append(report)
                dirs[name] = sd
                fps[name] = self.output_fingerprint(name, sd)
            self._write_latest(dirs)
            return reports
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
            lock.close()

    def _prepare(self, stage: Stage, sd: StageDir) -> None:
        """``stage.prepare``; a problem there concerns the whole stage (weights, a missing folder), so
        it becomes a one-line StageError rather than a traceback."""
        try:
            stage.prepare(self.ctx, sd)
        except (ValueError, OSError, RuntimeError) as e:
            raise StageError(f"{stage.name}: {e}") from e

    def _usable(self, name: str, sd: StageDir | None) -> bool:
        if sd is None:
            return False
        return bool(sd.complete_items()) if self.stages[name].per_video else sd.is_done()

    def _save_config(self) -> None:
        text = dump_config(self.ctx.cfg)
        atomic_write_text(self.ctx.run_dir / "config.yaml", text)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        atomic_write_text(self.ctx.run_dir / "history" / f"{stamp}-config.yaml", text)

    def _write_latest(self, dirs: dict[str, StageDir | None]) -> None:
        latest_path = self.ctx.run_dir / "latest.json"
        latest = json.loads(latest_path.read_text()) if latest_path.is_file() else {}
        latest.update({n: str(d.path.relative_to(self.ctx.run_dir)) for n, d in dirs.items() if d is not None})
        atomic_write_json(latest_path, latest)

    def _run_stage(
        self, stage: Stage, sd: StageDir, inputs: dict[str, Any], ups: dict[str, StageDir]
    ) -> StageReport:
        t0 = time.time()
        report = StageReport(stage.name, sd.path.name, sd.path, "done")
        if sd.is_done():
            log.info("%s: up to date (%s)", stage.name, sd.path)
            if stage.per_video:
                report.cached = len(sd.complete_items())
            report.summary = json.loads(sd.done_marker.read_text())
            return report
        sd.path.mkdir(parents=True, exist_ok=True)
        sd.items.mkdir(exist_ok=True)
        remove_stale_temps(sd.items)
        remove_stale_temps(sd.path)
        if not (sd.path / "stage.json").is_file():
            atomic_write_json(sd.path / "stage.json", {"key": sd.path.name, "inputs": inputs, "created": time.time()})
        if not stage.per_video:
            self._prepare(stage, sd)
            summary = stage.run_whole(self.ctx, sd, ups)
            sd.write_done({**summary, "finished": time.time(), "seconds": time.time() - t0})
            report.state, report.computed, report.summary = "computed", 1, summary
            report.seconds = time.time() - t0
            return report

        videos = stage.videos(self.ctx)
        for u in ups:  # only videos every per-video upstream stage completed
            if self.stages[u].per_video:
                available = set(ups[u].complete_items())
                videos = [v for v in videos if v.id in available]
        todo = [v for v in videos if not sd.item_complete(v.id)]
        report.cached = len(videos) - len(todo)
        failures: list[dict[str, Any]] = []
        if todo:
            log.info("%s: %d of %d videos to compute", stage.name, len(todo), len(videos))
            if stage.name == "extract":
                self.ctx.ensure_data()
            self._prepare(stage, sd)
            for video in _progress(todo, stage.name, self.ctx.progress):
                try:
                    sd.drop_item(video.id)
                    stage.process(self.ctx, video, sd, ups)
                    report.computed += 1
                except KeyboardInterrupt:
                    raise
                except Exception as e:  # one broken video never stops the others
                    msg = f"{type(e).__name__}: {e}"
                    log.error("%s: video %s failed: %s", stage.name, video.id, msg)
                    log.debug("%s", traceback.format_exc())
                    sd.drop_item(video.id)
                    failures.append({"video": video.id, "path": video.path, "stage": stage.name, "error": msg, "time": time.time()})
        sd.record_failures(failures)
        report.failed = failures
        report.seconds = time.time() - t0
        if not failures and all(sd.item_complete(v.id) for v in videos):
            expected = len(stage.videos(self.ctx))
            sd.write_done({"videos": len(videos), "expected": expected, "finished": time.time()})
            report.state = "computed" if report.computed else "done"
        else:
            report.state = "partial"
        return report

    # -- status ----------------------------------------------------------------------------------
    def status(self) -> list[dict[str, Any]]:
        """Each stage's state (done / partial / stale / missing) and why, without running anything."""
        rows = []
        fps: dict[str, str] = {}
        for name in self.order:
            stage = self.stages[name]
            blocked = [u for u in self.upstream_of(stage.name) if u not in fps]
            if blocked:
                root = self.stage_root(name)
                if root.is_dir() and any(root.iterdir()):
                    why = f"upstream {', '.join(blocked)} changed or is unfinished, so the cached result is out of date"
                    rows.append({"stage": name, "state": "stale", "why": why})
                else:
                    rows.append({"stage": name, "state": "missing", "why": f"never run; waits for {', '.join(blocked)}"})
                continue
            inputs = self.inputs_of(name, fps)
            sd = self.stage_dir(name, inputs)
            row: dict[str, Any] = {"stage": name, "key": sd.path.name, "path": str(sd.path)}
            if sd.is_done():
                done = json.loads(sd.done_marker.read_text())
                row["state"] = "done"
                when = time.strftime("%Y-%m-%d %H:%M", time.localtime(done.get("finished", 0)))
                n = f", {len(sd.complete_items())} videos" if stage.per_video else ""
                row["why"] = f"up to date: its inputs (config, manifest, upstream) match the cached key{n}, finished {when}"
                fps[name] = self.output_fingerprint(name, sd)
            elif sd.path.is_dir():
                row["state"] = "partial"
                if stage.per_video:
                    n_done = len(sd.complete_items())
                    n_all = len(stage.videos(self.ctx))
                    n_fail = len(sd.failures())
                    row["why"] = f"{n_done}/{n_all} videos complete, {n_fail} failed (see {sd.failures_file.name}); rerun to finish"
                    if n_done:
                        fps[name] = self.output_fingerprint(name, sd)
                else:
                    row["why"] = "started but not finished; rerun resumes from its last checkpoint"
            else:
                previous = self._latest_other(name, sd)
                if previous is None:
                    row["state"], row["why"] = "missing", "never run with any settings"
                else:
                    row["state"] = "stale"
                    row["why"] = "inputs changed since the cached result: " + self._diff(previous, inputs)
            rows.append(row)
        return rows

    def _latest_other(self, name: str, current: StageDir) -> dict[str, Any] | None:
        root = self.stage_root(name)
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

    @staticmethod
    def _diff(old: dict[str, Any], new: dict[str, Any]) -> str:
        a, b = _flatten(old), _flatten(new)
        parts = []
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                if k.startswith("upstream."):
                    parts.append(f"upstream {k.split('.', 1)[1]} changed")
                elif k.startswith("config."):
                    parts.append(f"{k[7:]}: {a.get(k)!r} -> {b.get(k)!r}")
                else:
                    parts.append(f"{k} changed")
        return "; ".join(parts) or "unknown difference"


def progress_bar(iterable: Any, enabled: bool = True, **kw: Any) -> Any:
    """A tqdm bar on stderr; refreshed every 10 s (not 0.1 s) when stderr is not a terminal, so
    logs of batch jobs stay readable."""
    if not enabled:
        return iterable
    import sys

    from tqdm import tqdm

    return tqdm(iterable, dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 10.0, **kw)


def _progress(items: list[VideoRecord], desc: str, enabled: bool) -> Iterator[VideoRecord]:
    yield from progress_bar(items, enabled, desc=desc, unit="video")


def resolve_device(name: str) -> str:
    """'auto' -> 'cuda' when a GPU is present, else 'cpu'."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


__all__ = [
    "Context",
    "CorruptArtifact",
    "Runner",
    "Stage",
    "StageDir",
    "StageError",
    "StageReport",
    "progress_bar",
    "resolve_device",
]
