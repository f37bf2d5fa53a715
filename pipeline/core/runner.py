"""The stage runner: cache keys, per-video items in the shared store, resume, failures.

A per-video stage (extract, flow, segment) keys each video's item by the stage's *settings* (its
name and version, the config values it reads, weight checksums, the outputs of whole-run upstream
stages), the video's identity (``Stage.item_identity``: its resolved path and a fingerprint of the
file) and that video's items of per-video upstream stages. Items live in the shared store
(``<store>/<stage>/<settings key[:16]>/items/<item key>.*``, see ``pipeline.core.store``), so that
adding videos to a manifest computes only the new ones, and two manifests or run directories that
share videos and settings share the work. The run directory keeps, per stage,
``<run_dir>/cache/<stage>/<key[:16]>/`` with:

- ``stage.json``: the key and every input that went into it (what ``pipeline status`` diffs);
- ``index.json`` (per-video stages): where the items are and each video's item key;
- ``failures.jsonl``: one record per failed video (video, stage, error) from the latest attempt;
- ``DONE``: written last, once every item is complete.

A whole-run stage (train, evaluate) is keyed by its settings, the manifest columns it reads and its
upstream stages' outputs (for a per-video stage: the item keys of the videos it completed); its
files are in its run-directory folder. A rerun skips complete items and computes only what is
missing; ``--force`` recomputes a stage's items for this run's videos. A failed video is recorded
and the others go on.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core.config import dump_config
from pipeline.core.errors import CorruptArtifact, StageError
from pipeline.core.manifest import VideoRecord
from pipeline.core.progress import progress_bar
from pipeline.core.stage import Context, Stage, StageReport
from pipeline.core.store import (
    DiskFull,
    StageDir,
    atomic_write_json,
    atomic_write_text,
    remove_stale_temps,
    stable_hash,
)

if TYPE_CHECKING:
    from pipeline.core.distributed import Distributed

log = logging.getLogger(__name__)

#: how many times one run recomputes corrupt cached artifacts before giving up
CORRUPT_RETRIES = 2
#: the run directory layout this runner reads (1: items inside the run directory, before the store)
LAYOUT = 2


class _Recompute(Exception):
    """Corrupt upstream artifacts were dropped: run the stages again to compute them anew.
    ``reports``: the stages this pass finished, whose counts the next pass's reports include."""

    def __init__(self, paths: list[str], reports: "list[StageReport] | None" = None) -> None:
        super().__init__(", ".join(paths))
        self.paths = paths
        self.reports = reports or []


class Runner:
    """Runs stages in dependency order over one run directory."""

    def __init__(self, ctx: Context, stages: list[Stage], dist: "Distributed | None" = None) -> None:
        self.ctx = ctx
        self.stages = {s.name: s for s in stages}
        self.order = [s.name for s in stages]
        #: this process's rank in a torchrun job (pipeline.core.distributed), or None
        self.dist = dist
        #: the current pass's stage folders, where _drop_corrupt looks for the owner of a corrupt file
        self._dirs: dict[str, StageDir | None] = {}

    # -- keys ------------------------------------------------------------------------------------
    def stage_root(self, name: str) -> Path:
        return self.ctx.run_dir / "cache" / name

    def inputs_of(self, name: str, upstream_fps: dict[str, str]) -> dict[str, Any]:
        """What a stage's key hashes. A per-video stage: its settings and the outputs of its whole-run
        upstream stages (the videos enter through their item keys, :meth:`stage_dir`). A whole-run
        stage: also the manifest columns it reads and every upstream stage's output."""
        stage = self.stages[name]
        ups = [u for u in self.upstream_of(name) if not (stage.per_video and self.stages[u].per_video)]
        inputs: dict[str, Any] = {
            "stage": name,
            "version": stage.version,
            "config": stage.config_inputs(self.ctx.cfg),
            "upstream": {u: upstream_fps[u] for u in ups},
        }
        if stage.manifest_columns and not stage.per_video:
            inputs["manifest"] = self.ctx.manifest.fingerprint(stage.manifest_columns)
        inputs.update(stage.extra_inputs(self.ctx))
        return inputs

    def upstream_of(self, name: str) -> tuple[str, ...]:
        """The stages ``name`` reads, for this run's config (train skips segment for clip-level detectors)."""
        return self.stages[name].upstream_for(self.ctx.cfg)

    def stage_dir(self, name: str, inputs: dict[str, Any], dirs: dict[str, StageDir | None]) -> StageDir:
        """The stage's folder for ``inputs``; for a per-video stage, with its items in the store and
        each video's item key: the settings key, the video's identity and its upstream items."""
        stage = self.stages[name]
        settings = stable_hash(inputs)
        if not stage.per_video:
            return StageDir(self.stage_root(name) / settings[:16])
        per_video_ups = [u for u in self.upstream_of(name) if self.stages[u].per_video]
        keys = {}
        for v in stage.videos(self.ctx):
            ups = {u: (dirs[u].keys or {}).get(v.id) if dirs.get(u) is not None else None for u in per_video_ups}
            keys[v.id] = stable_hash({"settings": settings, "video": stage.item_identity(self.ctx, v), "upstream": ups})[:32]
        items = Path(self.ctx.store) / name / settings[:16] / "items"
        return StageDir(self.stage_root(name) / stable_hash({"settings": settings, "items": keys})[:16], items, keys)

    def output_fingerprint(self, name: str, sd: StageDir) -> str:
        """What downstream keys depend on: for a per-video stage, the item keys of the videos it
        completed (by video id); for a whole-run stage, its key."""
        if self.stages[name].per_video:
            return stable_hash([[v, sd.stem(v)] for v in sd.complete_items()])
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
        Under torchrun (``dist``), see :mod:`pipeline.core.distributed`: ranks other than 0 return once
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
                self.check_layout()
                self._save_config()
            if any(self.stages[n].reads_videos for n in self.closure(targets)) and self._main:
                self.ctx.ensure_data()  # before the videos' fingerprints enter the item keys
            if self._dist_active:
                self.dist.barrier()
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

    def check_layout(self) -> None:
        """Refuse a run directory whose per-video items are still inside it (the layout before the
        shared store), rather than computing them again; ``pipeline migrate`` moves them."""
        old = old_layout_dirs(self)
        if old:
            raise StageError(
                f"{self.ctx.run_dir}: made by an earlier version, which kept per-video items inside the run "
                f"directory ({len(old)} stage folder(s), e.g. {old[0]}); run `pipeline migrate --run-dir "
                f"{self.ctx.run_dir}` to move them into the shared store without recomputing anything, "
                f"or delete {self.ctx.run_dir / 'cache'} to compute them again")

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
        self._dirs = dirs
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
            sd = self.stage_dir(name, inputs, dirs)
            if name in force and sd.path.exists() and self._main:
                log.info("%s: --force, removing %s and this run's items of it", name, sd.path)
                for vid in sd.keys or {}:
                    sd.drop_item(vid)
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
        videos, how many are cached, and each rank's share of the rest (:func:`pipeline.core.distributed.shard`)."""
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
        todo = [v for v in videos if not sd.item_complete(v.id)]  # run() made the videos available already
        world = self.dist.world_size if self._dist_active else 1
        if world > 1:
            from pipeline.core.distributed import estimate_frames, shard

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
        stage.prefetch(self.ctx, todo)
        for video in progress_bar(todo, self.ctx.progress, desc=stage.name, unit="video"):
            try:
                sd.drop_item(video.id)
                stage.process(self.ctx, video, sd, ups)
                computed += 1
            except KeyboardInterrupt:
                raise
            except DiskFull as e:  # every later write would fail too: stop, keep what is done
                sd.drop_item(video.id)
                raise StageError(f"{stage.name}: video {video.id}: {e}") from e
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
        """Create the stage's folder, remove temporary files of killed writes, record its inputs
        (and, for a per-video stage, its index and the store folder's settings)."""
        sd.path.mkdir(parents=True, exist_ok=True)
        sd.items.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(sd.items)  # the store is shared: a live writer's temporaries are kept
        remove_stale_temps(sd.path)
        if not (sd.path / "stage.json").is_file():
            recorded = {**inputs, "videos": sd.keys} if sd.keys is not None else inputs
            atomic_write_json(sd.path / "stage.json", {"key": sd.path.name, "inputs": recorded, "created": time.time()})
        if sd.keys is not None:
            sd.write_index()
            settings = sd.items.parent / "settings.json"
            if not settings.is_file():
                atomic_write_json(settings, {"inputs": inputs, "created": time.time()})

    def _drop_corrupt(self, e: CorruptArtifact, current: StageDir) -> str | None:
        """Remove the corrupt file ``e.path`` of another stage's cache (the whole item of a video)
        and that stage's DONE marker, so that the next pass computes it again; returns the path,
        or None when it is not an upstream artifact of this run."""
        if e.path is None:
            return None
        path = Path(os.path.abspath(e.path))
        for owner in self._dirs.values():
            if owner is None or owner.path == current.path:
                continue
            vid = owner.item_of(path)
            if vid is not None:
                owner.drop_item(vid)
            elif Path(os.path.abspath(owner.path)) in path.parents:
                path.unlink(missing_ok=True)
            else:
                continue
            owner.done_marker.unlink(missing_ok=True)
            log.warning("%s: corrupt cached artifact removed (%s); it is computed again", path, e)
            return str(path)
        return None

def old_layout_dirs(runner: Runner) -> list[Path]:
    """The per-video stage folders of ``runner``'s run directory in the layout before the shared
    store: items in ``<stage folder>/items`` and no ``index.json``."""
    out = []
    for name, stage in runner.stages.items():
        root = runner.stage_root(name)
        if not stage.per_video or not root.is_dir():
            continue
        for d in sorted(root.iterdir()):
            if (d / "items").is_dir() and not (d / "index.json").is_file() and (d / "stage.json").is_file():
                out.append(d)
    return out


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


