"""The stage interface: what a stage declares and implements, and what every stage sees.

Each stage declares what it reads (config fields, manifest columns, upstream stages); the runner
(``pipeline.core.runner``) turns that into cache keys. A per-video stage's item for one video is
keyed by the stage's settings, that video's identity (:meth:`Stage.item_identity`) and the video's
items of the upstream per-video stages, never by which other videos are in the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np

from pipeline.core.config import key_fields
from pipeline.core.manifest import Manifest, VideoRecord, load_manifest
from pipeline.core.store import StageDir, default_store, fingerprint


def check_features(features: np.ndarray, where: Path | str, dim: int | None = None) -> None:
    """Refuse features no detector may see: ``features`` ``[..., D]`` (any float dtype) whose ``D``
    is not ``dim`` (when given), or with a NaN or infinite value. Raises ValueError naming ``where``
    (the file or video)."""
    if dim is not None and features.shape[-1] != dim:
        raise ValueError(f"{where}: features are {features.shape[-1]}-D, expected {dim}-D")
    bad = ~np.isfinite(features)
    if bad.any():
        raise ValueError(f"{where}: {int(bad.sum())} NaN or infinite feature values")


@dataclass(frozen=True)
class GeneratedData:
    """A dataset the application makes on demand, named in place of a manifest path (``data.manifest
    = 'demo'``): the core knows no dataset, the application hands these to :class:`Context`.

    Attributes:
        manifest: its manifest CSV.
        root: its data root, relative to the run directory unless ``data.root`` is set.
        generate: ``generate(root, progress)`` writes whatever videos are missing under ``root``.
    """

    manifest: Path
    root: str
    generate: Callable[[Path, bool], Any]


@dataclass
class Context:
    """What every stage sees: the resolved config, the run directory and the shared store.

    Attributes:
        cfg: the run's config (``stages.config.build_config``).
        run_dir: the run directory (dataset-level artifacts, the index of per-video ones).
        progress: show progress bars.
        store: the folder of per-video artifacts shared between runs (default
            :func:`pipeline.core.store.default_store`).
        generated: datasets the application can make on demand, by name (``pipeline.demo``).
    """

    cfg: Any
    run_dir: Path
    progress: bool = True
    store: Path | None = None
    generated: dict[str, GeneratedData] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        self.store = Path(self.store) if self.store is not None else default_store()
        self._fingerprints: dict[str, dict[str, Any]] = {}

    @cached_property
    def manifest(self) -> Manifest:
        data = self.cfg.data
        gen = self.generated.get(data.manifest)
        if gen is not None:
            return load_manifest(gen.manifest, data.root or self.run_dir / gen.root, check_files=False)
        return load_manifest(data.manifest, data.root or None, check_files=False)

    def ensure_data(self) -> None:
        """Make the videos available: generates a dataset made on demand (the demo) when
        ``data.manifest`` names one."""
        gen = self.generated.get(self.cfg.data.manifest)
        if gen is not None:
            gen.generate(self.manifest.root, self.progress)
            self._fingerprints.clear()

    def fingerprint(self, video: VideoRecord) -> dict[str, Any]:
        """``{"path": resolved path, **store.fingerprint(path)}`` of ``video``, computed once per run."""
        path = self.manifest.resolve(video)
        key = str(path)
        if key not in self._fingerprints:
            self._fingerprints[key] = {"path": str(Path(path).resolve()), **fingerprint(Path(path))}
        return self._fingerprints[key]


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
        """Whether the stage reads the videos themselves (its key holds their paths): ``Runner.run``
        then makes them available first (``Context.ensure_data``: the demo's are generated), once,
        before their fingerprints enter the item keys."""
        return "path" in self.manifest_columns

    def upstream_for(self, cfg: Any) -> tuple[str, ...]:
        """The upstream stages this run's config needs; default :attr:`upstream`. Only these enter
        the cache key, so e.g. a clip-level detector's training does not depend on segmenting."""
        return self.upstream

    # -- key ---------------------------------------------------------------------------------
    def config_inputs(self, cfg: Any) -> dict[str, Any]:
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

    def item_identity(self, ctx: Context, video: VideoRecord) -> dict[str, Any]:
        """What identifies ``video`` for a per-video stage's item key, beside the stage's settings and
        the video's upstream items: its manifest columns (:attr:`manifest_columns`) except the id,
        ``path`` being the resolved path and its :func:`~pipeline.core.store.fingerprint`. Two
        manifests naming the same file differently share the item; a changed file gets a new one."""
        out: dict[str, Any] = {}
        for col in self.manifest_columns:
            if col == "path":
                out["path"] = ctx.fingerprint(video)
            elif col != "id":
                out[col] = getattr(video, col)
        return out

    def videos(self, ctx: Context) -> list[VideoRecord]:
        vids = ctx.manifest.videos
        if self.splits is not None:
            vids = [v for v in vids if v.split in self.splits]
        return vids

    # -- work ----------------------------------------------------------------------------------
    def prepare(self, ctx: Context, out: StageDir) -> None:
        """Called once before the first item that needs computing (load models here, lazily)."""

    def prefetch(self, ctx: Context, videos: list[VideoRecord]) -> None:
        """Called once after :meth:`prepare` with the videos :meth:`process` will be called for, in
        that order: a stage may start reading them ahead (the extract stage's decode workers,
        ``extract.decode_workers``). Default: nothing."""

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


