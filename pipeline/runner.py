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
import glob
import json
import logging
import os
import shutil
import time
import traceback
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterator

import numpy as np

from pipeline.cache import (
    DiskFull,
    atomic_save_npy,
    atomic_write_json,
    atomic_write_text,
    remove_stale_temps,
    sha256_file,
    stable_hash,
)
from pipeline.config import RunConfig, dump_config, key_fields
from pipeline.manifest import Manifest, VideoRecord, load_manifest

if TYPE_CHECKING:
    from pipeline.distributed import Distributed

log = logging.getLogger(__name__)

#: how many times one run recomputes corrupt cached artifacts before giving up
CORRUPT_RETRIES = 2


class StageError(RuntimeError):
    """A stage that cannot run at all (as opposed to one failed video)."""


class CorruptArtifact(RuntimeError):
    """A cached file that is missing, truncated or does not match its recorded checksum.

    ``path`` is the file; the runner drops what it belongs to (a video's item, or a whole-run
    stage's result) and computes it again.
    """

    def __init__(self, message: str, path: Path | None = None) -> None:
        super().__init__(message)
        self.path = path


def check_features(features: np.ndarray, where: Path | str, dim: int | None = None) -> None:
    """Refuse features no detector may see: ``features`` ``[..., D]`` (any float dtype) whose ``D``
    is not ``dim`` (when given), or with a NaN or infinite value. Raises ValueError naming ``where``
    (the file or video)."""
    if dim is not None and features.shape[-1] != dim:
        raise ValueError(f"{where}: features are {features.shape[-1]}-D, expected {dim}-D")
    bad = ~np.isfinite(features)
    if bad.any():
        raise ValueError(f"{where}: {int(bad.sum())} NaN or infinite feature values")


class _Recompute(Exception):
    """Corrupt upstream artifacts were dropped: run the stages again to compute them anew.
    ``reports``: the stages this pass finished, whose counts the next pass's reports include."""

    def __init__(self, paths: list[str], reports: "list[StageReport] | None" = None) -> None:
        super().__init__(", ".join(paths))
        self.paths = paths
        self.reports = reports or []


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

    def item_file(self, vid: str, name: str) -> Path:
        """Where array ``name`` of video ``vid`` is stored."""
        return self.items / f"{vid}.{name}.npy"

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
            raise CorruptArtifact(f"{meta_path}: unreadable cached item ({e})", meta_path) from e

    def load_item(self, vid: str, verify: bool = True) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """A video's metadata and arrays; raises CorruptArtifact if anything is missing or altered."""
        meta_path = self.item_meta_path(vid)
        meta = self.load_meta(vid)
        try:
            arrays = {}
            for name, f in meta["_files"].items():
                path = self.items / f["file"]
                if verify and sha256_file(path) != f["sha256"]:
                    raise CorruptArtifact(f"{path}: checksum does not match the one recorded at write time", path)
                arrays[name] = np.load(path, allow_pickle=False)
        except CorruptArtifact:
            raise
        except (OSError, ValueError, KeyError) as e:
            raise CorruptArtifact(f"{meta_path}: unreadable cached item ({e})", meta_path) from e
        return meta, arrays

    def drop_item(self, vid: str) -> None:
        """Remove a video's marker, then its data files (``<vid>.<name>.npy``; array names have no
        dot, so video ``a`` never takes the files of video ``a.b``)."""
        self.item_meta_path(vid).unlink(missing_ok=True)
        for p in self.items.glob(f"{glob.escape(vid)}.*.npy"):
            if "." not in p.name[len(vid) + 1 : -len(".npy")]:
                p.unlink(missing_ok=True)

    def item_of(self, path: Path) -> str | None:
        """The video whose item ``path`` (a file in :attr:`items`) belongs to; None for other files."""
        if path.parent != self.items:
            return None
        name = path.name
        if name.endswith(".json"):
            return name[: -len(".json")]
        if name.endswith(".npy") and name.count(".") >= 2:
            return name[: -len(".npy")].rsplit(".", 1)[0]
        return None

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
    #: balance a distributed run by each video's frame count (else each video counts as one)
    shard_by_frames: ClassVar[bool] = False
    #: which split's videos a per-video stage processes (None: all)
    splits: ClassVar[tuple[str, ...] | None] = None
    #: runs only when a stage that is not optional reads it (a detector's own stages, e.g. MIST's);
    #: ``pipeline status`` lists it only then
    optional: ClassVar[bool] = False

    @property
    def reads_videos(self) -> bool:
        """Whether the stage reads the videos themselves (its key holds their paths): the runner then
        makes them available (``Context.ensure_data``: the demo's are generated) before computing."""
        return "path" in self.manifest_columns

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

    def release(self) -> None:
        """Called when the stage's run ends (finished, partial or failed): drop what ``prepare``
        loaded (networks, their input buffers), so that later stages of the same run, training
        above all, get that memory back. A later ``prepare`` loads it again."""


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
    #: corrupt upstream files this stage met and dropped (the runner then runs again)
    recompute: list[str] = field(default_factory=list)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}." if not isinstance(v, dict) or v else f"{prefix}{k}"))
        return out
    return {prefix.rstrip("."): d}


class Runner:
    """Runs stages in dependency order over one run directory."""

    def __init__(self, ctx: Context, stages: list[Stage], dist: "Distributed | None" = None) -> None:
        self.ctx = ctx
        self.stages = {s.name: s for s in stages}
        self.order = [s.name for s in stages]
        #: this process's rank in a torchrun job (pipeline.distributed), or None
        self.dist = dist

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
        """Run ``targets`` and whatever upstream stages they need; returns one report per stage run.

        A corrupt cached artifact met on the way (a truncated or altered file) is dropped and the
        stages are run again, which computes it anew (at most :data:`CORRUPT_RETRIES` times).
        Under torchrun (``dist``), see :mod:`pipeline.distributed`: ranks other than 0 return once
        the per-video stages are done.
        """
        check_writable(self.ctx.run_dir)
        lock, busy = None, None
        if self._main:
            lock = open(self.ctx.run_dir / ".lock", "w")
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                busy = f"{self.ctx.run_dir}: another pipeline run is using this run directory"
        if self._dist_active:
            busy = self.dist.broadcast(busy)  # every rank stops if rank 0 could not lock
        if busy:
            if lock is not None:
                lock.close()
            raise StageError(busy)
        try:
            if self._main:
                self._save_config()
            earlier: dict[str, int] = {}  # videos computed by passes cut short by corrupt artifacts
            for attempt in range(CORRUPT_RETRIES + 1):
                try:
                    reports, dirs = self._run_closure(targets, force if attempt == 0 else set())
                    break
                except _Recompute as e:
                    if attempt == CORRUPT_RETRIES:
                        raise StageError(f"corrupt cached artifacts keep coming back: {', '.join(e.paths)}") from None
                    log.warning("recomputing %d corrupt cached artifact(s): %s", len(e.paths), ", ".join(e.paths))
                    for r in e.reports:
                        if self.stages[r.stage].per_video:
                            earlier[r.stage] = earlier.get(r.stage, 0) + r.computed
            for r in reports:
                n = min(earlier.get(r.stage, 0), r.cached)
                r.computed, r.cached = r.computed + n, r.cached - n
            if self._main:
                self._write_latest(dirs)
            return reports
        finally:
            if lock is not None:
                fcntl.flock(lock, fcntl.LOCK_UN)
                lock.close()

    @property
    def _main(self) -> bool:
        """Whether this process takes the run's decisions and writes its shared files (rank 0)."""
        return self.dist is None or self.dist.is_main

    @property
    def _dist_active(self) -> bool:
        return self.dist is not None and self.dist.active

    def _run_closure(self, targets: list[str], force: set[str]) -> tuple[list[StageReport], dict[str, StageDir | None]]:
        reports: list[StageReport] = []
        fps: dict[str, str] = {}
        dirs: dict[str, StageDir | None] = {}
        for name in self.closure(targets):
            stage = self.stages[name]
            if self._dist_active and not stage.per_video:
                # whole-run stages run on rank 0 alone; the other ranks' work is done
                self.dist.active = False
                if not self._main:
                    break
            missing = [u for u in self.upstream_of(name) if not self._usable(u, dirs.get(u))]
            if missing:
                why = f"upstream {', '.join(missing)} produced nothing usable"
                log.error("%s: skipped, %s", name, why)
                reports.append(StageReport(name, "", Path(), "failed", failed=[{"video": "*", "stage": name, "error": why}]))
                dirs[name] = None
                continue
            inputs = self.inputs_of(name, fps)
            sd = self.stage_dir(name, inputs)
            if name in force and sd.path.exists() and self._main:
                log.info("%s: --force, removing %s", name, sd.path)
                shutil.rmtree(sd.path)
            try:
                report = self._run_stage(stage, sd, inputs, {u: dirs[u] for u in self.upstream_of(name)})
            finally:
                stage.release()
            reports.append(report)
            if report.recompute:
                raise _Recompute(report.recompute, reports)
            dirs[name] = sd
            fps[name] = self.output_fingerprint(name, sd)
        return reports, dirs

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
        if not stage.per_video:
            return self._run_whole(stage, sd, inputs, ups, report)
        plan = self._plan(stage, sd, inputs, ups) if self._main else None
        if self._dist_active:
            plan = self.dist.broadcast(plan)
        report.cached = plan["cached"]
        if plan["done"]:
            log.info("%s: up to date (%s)", stage.name, sd.path)
            report.summary = plan["summary"]
            return report
        rank = self.dist.rank if self._dist_active else 0
        by_id = {v.id: v for v in stage.videos(self.ctx)}
        failures, computed, corrupt = self._process(stage, sd, ups, [by_id[i] for i in plan["shares"][rank]], len(plan["videos"]))
        if self._dist_active:
            gathered = self.dist.all_gather((failures, computed, corrupt))
            failures = [f for g in gathered for f in g[0]]
            computed = sum(g[1] for g in gathered)
            corrupt = [c for g in gathered for c in g[2]]
        report.computed, report.failed = computed, failures
        report.state = "partial"
        if self._main:
            sd.record_failures(failures)
            if not failures and all(sd.item_complete(v) for v in plan["videos"]):
                sd.write_done({"videos": len(plan["videos"]), "expected": len(stage.videos(self.ctx)), "finished": time.time()})
                report.state = "computed" if report.computed else "done"
        if self._dist_active:
            self.dist.barrier()  # the next stage starts from rank 0's DONE marker and failure list
        report.seconds = time.time() - t0
        report.recompute = corrupt
        return report

    def _plan(self, stage: Stage, sd: StageDir, inputs: dict[str, Any], ups: dict[str, StageDir]) -> dict[str, Any]:
        """What a per-video stage has left to do, decided once (by rank 0 under torchrun): the
        videos, how many are cached, and each rank's share of the rest (:func:`pipeline.distributed.shard`)."""
        videos = stage.videos(self.ctx)
        for u in ups:  # only videos every per-video upstream stage completed
            if self.stages[u].per_video:
                available = set(ups[u].complete_items())
                videos = [v for v in videos if v.id in available]
        if sd.is_done():
            lost = [v.id for v in videos if not sd.item_complete(v.id)]
            if not lost:
                return {"done": True, "cached": len(videos), "summary": json.loads(sd.done_marker.read_text())}
            # a file truncated or deleted behind the cache's back: compute those videos again
            log.warning("%s: %d cached videos are missing or truncated (%s); computing them again",
                        stage.name, len(lost), ", ".join(lost[:5]) + (" ..." if len(lost) > 5 else ""))
            sd.done_marker.unlink(missing_ok=True)
        self._open_stage_dir(sd, inputs)
        todo = [v for v in videos if not sd.item_complete(v.id)]
        if todo and stage.reads_videos:
            self.ctx.ensure_data()  # before the frame counts of the shards are read
        world = self.dist.world_size if self._dist_active else 1
        if world > 1:
            from pipeline.distributed import estimate_frames, shard

            fps = self.ctx.cfg.data.folder_fps
            weights = [float(estimate_frames(self.ctx.manifest.resolve(v), fps)) if stage.shard_by_frames else 1.0 for v in todo]
            weight_of = dict(zip((v.id for v in todo), weights))
            shares = shard(list(weight_of), weights, world)
            log.info("%s: %d videos to compute over %d ranks (%s per rank)", stage.name, len(todo), world,
                     " / ".join(f"{sum(weight_of[i] for i in s):.0f}" for s in shares))
        else:
            shares = [[v.id for v in todo]]
        return {"done": False, "videos": [v.id for v in videos], "cached": len(videos) - len(todo), "shares": shares}

    def _process(
        self, stage: Stage, sd: StageDir, ups: dict[str, StageDir], todo: list[VideoRecord], total: int
    ) -> tuple[list[dict[str, Any]], int, list[str]]:
        """Compute ``todo``'s items: (failure records, videos computed, corrupt upstream files dropped)."""
        failures: list[dict[str, Any]] = []
        corrupt: list[str] = []
        computed = 0
        if not todo:
            return failures, computed, corrupt
        log.info("%s: %d of %d videos to compute", stage.name, len(todo), total)
        self._prepare(stage, sd)
        for video in _progress(todo, stage.name, self.ctx.progress):
            try:
                sd.drop_item(video.id)
                stage.process(self.ctx, video, sd, ups)
                computed += 1
            except KeyboardInterrupt:
                raise
            except DiskFull as e:  # every later write would fail too: stop, keep what is done
                sd.drop_item(video.id)
                raise StageError(f"{stage.name}: {e}") from e
            except Exception as e:  # one broken video never stops the others
                msg = f"{type(e).__name__}: {e}"
                dropped = self._drop_corrupt(e, sd) if isinstance(e, CorruptArtifact) else None
                if dropped:
                    corrupt.append(dropped)
                    msg += " (removed; computed again)"
                log.error("%s: video %s failed: %s", stage.name, video.id, msg)
                log.debug("%s", traceback.format_exc())
                sd.drop_item(video.id)
                failures.append({"video": video.id, "path": video.path, "stage": stage.name, "error": msg, "time": time.time()})
        return failures, computed, corrupt

    def _run_whole(
        self, stage: Stage, sd: StageDir, inputs: dict[str, Any], ups: dict[str, StageDir], report: StageReport
    ) -> StageReport:
        t0 = time.time()
        if sd.is_done():
            log.info("%s: up to date (%s)", stage.name, sd.path)
            report.summary = json.loads(sd.done_marker.read_text())
            report.failed = report.summary.get("failures", [])
            return report
        self._open_stage_dir(sd, inputs)
        if stage.reads_videos:
            self.ctx.ensure_data()
        self._prepare(stage, sd)
        try:
            summary = stage.run_whole(self.ctx, sd, ups)
        except CorruptArtifact as e:
            dropped = self._drop_corrupt(e, sd)
            if dropped is None:
                raise StageError(f"{stage.name}: {e}") from e
            raise _Recompute([dropped]) from e
        except DiskFull as e:
            raise StageError(f"{stage.name}: {e}") from e
        sd.write_done({**summary, "finished": time.time(), "seconds": time.time() - t0})
        report.state, report.computed, report.summary = "computed", 1, summary
        report.failed = summary.get("failures", [])  # videos a whole-run stage had to leave out
        report.seconds = time.time() - t0
        return report

    @staticmethod
    def _open_stage_dir(sd: StageDir, inputs: dict[str, Any]) -> None:
        """Create the stage's folder, remove temporary files of killed writes, record its inputs."""
        sd.path.mkdir(parents=True, exist_ok=True)
        sd.items.mkdir(exist_ok=True)
        remove_stale_temps(sd.items)
        remove_stale_temps(sd.path)
        if not (sd.path / "stage.json").is_file():
            atomic_write_json(sd.path / "stage.json", {"key": sd.path.name, "inputs": inputs, "created": time.time()})

    def _drop_corrupt(self, e: CorruptArtifact, current: StageDir) -> str | None:
        """Remove the corrupt file ``e.path`` of another stage's cache (the whole item of a video)
        and that stage's DONE marker, so that the next pass computes it again; returns the path,
        or None when it is not an upstream artifact of this run."""
        if e.path is None:
            return None
        cache = os.path.abspath(self.ctx.run_dir / "cache")
        path = Path(os.path.abspath(e.path))
        try:
            rel = path.relative_to(cache)
        except ValueError:
            return None
        owner = StageDir(Path(cache) / rel.parts[0] / rel.parts[1]) if len(rel.parts) >= 3 else None
        if owner is None or owner.path == Path(os.path.abspath(current.path)):
            return None
        vid = owner.item_of(path)
        if vid is not None:
            owner.drop_item(vid)
        else:
            path.unlink(missing_ok=True)
        owner.done_marker.unlink(missing_ok=True)
        log.warning("%s: corrupt cached artifact removed (%s); it is computed again", path, e)
        return str(path)

    # -- status ----------------------------------------------------------------------------------
    def status(self) -> list[dict[str, Any]]:
        """Each stage's state (done / partial / stale / missing) and why, without running anything."""
        rows = []
        fps: dict[str, str] = {}
        needed = set(self.closure([n for n in self.order if not self.stages[n].optional]))
        for name in self.order:
            stage = self.stages[name]
            if name not in needed:
                continue
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
                    failed = f"{n_fail} failed (see {sd.failures_file})" if n_fail else "none failed"
                    row["why"] = f"{n_done}/{n_all} videos complete, {failed}; rerun to finish"
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


def check_writable(run_dir: Path, what: str = "the run directory") -> None:
    """Create ``run_dir`` if needed and make sure files can be written in it, before any work.

    Raises:
        StageError: one line naming the directory and the reason (a read-only mount, no permission,
            a file in the way).
    """
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        hint = "choose another with --run-dir" if what == "the run directory" else "choose another"
        raise StageError(f"{run_dir}: {what} cannot be written ({e.strerror or e}); {hint}") from None


def resolve_device(name: str) -> str:
    """'auto' -> 'cuda' when a GPU is present, else 'cpu'."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


__all__ = [
    "Context",
    "check_writable",
    "CorruptArtifact",
    "Runner",
    "Stage",
    "StageDir",
    "StageError",
    "StageReport",
    "progress_bar",
    "resolve_device",
]
